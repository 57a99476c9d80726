"""Install this pack with ComfyUI-Manager's own code in a throwaway environment, then start ComfyUI with it.

Used by tests/test_manager_install.py (``make test-manager``); also runs alone:
``.venv/bin/python tests/manager_harness.py`` prints the Manager's transcript and a summary.

What it does, in order:
1. A cached base environment, ``out/manager-env/base-<key>``: a venv with torch 2.14.1 + torchvision 0.29.1, ComfyUI
   v0.3.64's requirements (minus torch/torchvision/torchaudio and the workflow-templates / embedded-docs packages;
   the frontend package stays: main.py exits without it) and ``comfyui-manager==4.3`` from PyPI, which brings
   cm-cli. <key> hashes all of that; a new key builds a new base and deletes the old one.
2. A fresh run folder, ``out/manager-env/run``: a hard-link copy of the base venv (pip unlinks files before it
   replaces or removes them, so the base is never changed; its package list is checked at every run), a fresh
   unpack of the v0.3.64 tarball, and a git snapshot of this checkout's working tree (tracked and untracked files
   that git does not ignore, so uncommitted changes are tested too) at ``run/github/<owner>/<repo>``.
3. ``python -m cm_cli install <[project.urls] Repository>`` (exactly what the ``cm-cli`` console script runs), with
   ``GITHUB_ENDPOINT=file://<run>/github``: the Manager's own GitHub-mirror setting, so its clone of
   ``https://github.com/<owner>/<repo>`` reads the snapshot instead of the network. That is the Manager's
   install-by-git-URL path (``legacy.manager_core.gitclone_install``, which its legacy UI's "Install via Git URL" route
   ``POST /v2/customnode/install/git_url`` also calls):
   git clone into custom_nodes/<repo>, ``execute_install_script``: one ``pip install <line>`` per requirements.txt
   line (with its blacklist / downgrade blacklist / remap rules), ``PIPFixer.fix_broken()``, then ``install.py``;
   then cm-cli's ``fix_broken()`` again. The unified resolver (``--uv-compile`` / ``use_unified_resolver``) is off
   by default in 4.3; its first two steps (collect, ``uv pip compile``) run afterwards, compile only, to record
   what it would pin for torch & co.
4. In the installed environment: versions of torch, torchvision, numpy, Pillow; ``import facenet_pytorch``; the
   pack loaded in-process by ComfyUI's loader (its own NODE_CLASS_MAPPINGS); then ``main.py --cpu`` on a free
   loopback port and ``GET /object_info``.

Offline except for the package registry (pip). Nothing is asserted here: the result goes to the test.
"""
from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
INENV = os.path.join(HERE, "manager_inenv.py")
HARNESS_VERSION = "1"  # bump when the base environment's recipe changes
MANAGER_SPEC = os.environ.get("UG_MANAGER_SPEC", "comfyui-manager==4.3")
TORCH_SPECS = ("torch==2.14.1", "torchvision==0.29.1")
# Not installed in the base: torch & co. are pinned above; the templates and docs are big and optional.
HOST_REQ_SKIP = re.compile(r"^(torch|torchvision|torchaudio|comfyui-workflow-templates|comfyui-embedded-docs)\b", re.I)
DEFAULT_TARBALL = os.path.abspath(os.path.join(ROOT, "..", "shared", "hosts", "comfyui-0.3.64.tar.gz"))
MANAGER_TIMEOUT = 900  # s; a requirement that pulls another torch downloads and unpacks ~3 GB
SERVER_TIMEOUT = 240   # s, main.py up to an answering /object_info on a busy 2-core machine


class HarnessError(RuntimeError):
    pass


@dataclass
class Result:
    repo_url: str = ""
    pack_dir: str = ""
    host: str = ""
    python: str = ""
    manager_cmd: list = field(default_factory=list)
    manager_rc: int | None = None
    manager_log: str = ""
    manager_lists: dict = field(default_factory=dict)
    requirements: list = field(default_factory=list)
    before: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    unified: dict = field(default_factory=dict)
    server_rc: int | None = None
    server_error: str = ""
    server_log: str = ""
    object_info: dict = field(default_factory=dict)  # node id -> python_module
    timings: dict = field(default_factory=dict)
    base_built: bool = False
    run_dir: str = ""


def log(msg: str) -> None:
    print(f"[manager-harness] {msg}", file=sys.stderr, flush=True)


def sh(cmd, *, cwd=None, env=None, timeout=None, capture=False):
    """Run a command; raise HarnessError with its output on failure."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout or ''}"[-6000:])
    return proc.stdout


def inenv_json(python: str, *args, env=None, timeout=300) -> dict:
    out = sh([python, INENV, *args], env=env, timeout=timeout, capture=True)
    for line in reversed(out.splitlines()):
        if line.startswith("UG-JSON "):
            return json.loads(line[len("UG-JSON "):])
    raise HarnessError(f"no result from manager_inenv.py {' '.join(args)}:\n{out[-4000:]}")


def requirement_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.split("#")[0].strip() for ln in f if ln.split("#")[0].strip()]


def repository_url(root: str = ROOT) -> str:
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"].rstrip("/")


def host_requirements(tarball: str) -> tuple[str, list[str]]:
    """(top folder of the tarball, ComfyUI's requirements minus HOST_REQ_SKIP)."""
    with tarfile.open(tarball) as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/requirements.txt"))
        text = tar.extractfile(member).read().decode()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return member.name.split("/")[0], [ln for ln in lines if not HOST_REQ_SKIP.match(ln)]


def site_packages_listing(venv: str) -> list[str]:
    sp = os.path.join(venv, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
    return sorted(os.listdir(sp))


def ensure_base(env_root: str, tarball: str, result: Result) -> str:
    _, host_reqs = host_requirements(tarball)
    recipe = json.dumps([HARNESS_VERSION, sys.version, TORCH_SPECS, MANAGER_SPEC, host_reqs])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    base = os.path.join(env_root, f"base-{key}")
    stamp = os.path.join(base, "ug-base.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            saved = json.load(f)
        if saved.get("listing") == site_packages_listing(base):
            log(f"base environment cached: {base}")
            return base
        log(f"base environment {base} was changed since it was built: rebuilding it")
    os.makedirs(env_root, exist_ok=True)
    for name in os.listdir(env_root):  # old keys, a half-built base
        if name.startswith("base-"):
            shutil.rmtree(os.path.join(env_root, name))
    t0 = time.monotonic()
    log(f"building the base environment {base} (torch, ComfyUI v0.3.64's requirements, {MANAGER_SPEC}) ...")
    sh([sys.executable, "-m", "venv", base])
    py = os.path.join(base, "bin", "python")
    sh([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    reqs = os.path.join(base, "ug-host-requirements.txt")
    with open(reqs, "w") as f:
        f.write("\n".join(host_reqs) + "\n")
    sh([py, "-m", "pip", "install", "-q", *TORCH_SPECS, "-r", reqs, MANAGER_SPEC])
    with open(stamp, "w") as f:
        json.dump({"recipe": json.loads(recipe), "listing": site_packages_listing(base)}, f)
    result.base_built = True
    result.timings["base_build_s"] = round(time.monotonic() - t0, 1)
    return base


def snapshot_checkout(root: str, dest: str) -> None:
    """A one-commit git repository of ``root``'s working tree (tracked + untracked, minus git-ignored files)."""
    listing = subprocess.run(["git", "-C", root, "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode().split("\0")
    files = sorted({p for p in listing if p and os.path.isfile(os.path.join(root, p))})
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)
    git = ["git", "-C", dest, "-c", "user.name=ug-test", "-c", "user.email=ug-test@localhost",
           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]
    sh([*git, "init", "-q"])
    sh([*git, "add", "-A"])
    sh([*git, "commit", "-q", "-m", "snapshot of the checkout for the ComfyUI-Manager test"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_and_list(python: str, host: str, log_path: str, result: Result) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch"]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=host, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            if proc.poll() is not None:
                result.server_error = f"ComfyUI exited with {proc.returncode} before answering"
                break
            try:
                with urllib.request.urlopen(url + "object_info", timeout=30) as r:
                    info = json.loads(r.read())
                result.object_info = {name: v.get("python_module", "") for name, v in info.items()}
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    result.server_error = f"ComfyUI did not answer GET /object_info within {SERVER_TIMEOUT} s"
                    break
                time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        result.server_rc = proc.returncode
        with open(log_path, encoding="utf-8", errors="replace") as f:
            result.server_log = f.read()


def install(root: str = ROOT, env_root: str | None = None, tarball: str | None = None) -> Result:
    env_root = os.path.abspath(env_root or os.environ.get("UG_MANAGER_ENV") or os.path.join(root, "out", "manager-env"))
    tarball = tarball or os.environ.get("CURRENT_TARBALL") or DEFAULT_TARBALL
    if not os.path.isfile(tarball):
        raise FileNotFoundError(tarball)
    os.makedirs(env_root, exist_ok=True)
    with open(os.path.join(env_root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time per environment folder (it holds one run/)
        return _install(root, env_root, tarball)


def _install(root: str, env_root: str, tarball: str) -> Result:
    result = Result()
    t_start = time.monotonic()
    base = ensure_base(env_root, tarball, result)

    t0 = time.monotonic()
    run = os.path.join(env_root, "run")
    result.run_dir = run
    if os.path.exists(run):  # the last run: moved aside at once, deleted in the background (45k files)
        os.rename(run, os.path.join(env_root, f"run.old-{time.time_ns()}"))
    for name in os.listdir(env_root):
        if name.startswith("run.old-"):
            subprocess.Popen(["rm", "-rf", os.path.join(env_root, name)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.makedirs(run)
    venv = os.path.join(run, "venv")
    sh(["cp", "-al", base, venv])  # hard links: instant, and pip never writes into a file in place
    python = os.path.join(venv, "bin", "python")  # never venv/bin/cm-cli: its #! line names the base venv
    top, _ = host_requirements(tarball)
    sh(["tar", "-xzf", tarball, "-C", run])
    host = os.path.join(run, top)
    url = repository_url(root)
    m = re.match(r"^https://github\.com/([^/]+)/([^/]+?)(?:\.git)?$", url)
    if not m:
        raise HarnessError(f"[project.urls] Repository is not a https://github.com/<owner>/<repo> URL: {url}")
    owner, repo = m.groups()
    snapshot_checkout(root, os.path.join(run, "github", owner, repo))
    result.repo_url, result.host, result.python = url, host, python
    result.pack_dir = os.path.join(host, "custom_nodes", repo)
    result.before = inenv_json(python, "versions")
    result.timings["run_prepare_s"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    env = {**os.environ, "COMFYUI_PATH": host, "GITHUB_ENDPOINT": "file://" + os.path.join(run, "github"),
           "COLUMNS": "400", "PYTHONUNBUFFERED": "1", "PIP_PROGRESS_BAR": "off"}
    env.pop("VIRTUAL_ENV", None)
    result.manager_cmd = [python, "-m", "cm_cli", "install", url]
    log(f"cm-cli install {url}  (GITHUB_ENDPOINT={env['GITHUB_ENDPOINT']}) ...")
    try:
        proc = subprocess.run(result.manager_cmd, cwd=host, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=MANAGER_TIMEOUT)
        result.manager_rc, result.manager_log = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        result.manager_rc = None
        result.manager_log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        result.manager_log += f"\n[manager-harness] cm-cli did not finish within {MANAGER_TIMEOUT} s\n"
    with open(os.path.join(run, "manager-install.log"), "w") as f:
        f.write(result.manager_log)
    result.timings["manager_install_s"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    result.manager_lists = inenv_json(python, "manager-lists", "--host", host, env=env)
    req = os.path.join(result.pack_dir, "requirements.txt")
    result.requirements = requirement_lines(req) if os.path.exists(req) else requirement_lines(
        os.path.join(root, "requirements.txt"))
    result.check = inenv_json(python, "check", "--host", host, "--pack", result.pack_dir)
    try:
        result.unified = inenv_json(python, "unified-compile", "--host", host, "--pack", result.pack_dir, env=env,
                                    timeout=360)
    except (HarnessError, subprocess.TimeoutExpired) as e:
        result.unified = {"success": False, "error": str(e)[-2000:]}
    result.timings["checks_s"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    start_and_list(python, host, os.path.join(run, "comfyui.log"), result)
    result.timings["comfyui_start_s"] = round(time.monotonic() - t0, 1)
    result.timings["total_s"] = round(time.monotonic() - t_start, 1)
    with open(os.path.join(run, "result.json"), "w") as f:
        json.dump({k: v for k, v in result.__dict__.items() if k not in ("manager_log", "server_log")}, f, indent=1)
    log("timings: " + ", ".join(f"{k} {v}" for k, v in result.timings.items()))
    return result


# ---- reading the Manager's transcript -------------------------------------------------------------------------

EXECUTE = re.compile(r"## ComfyUI-Manager: EXECUTE => (\[.*\])\s*$", re.M)
BLACKLIST_SKIP = re.compile(r"\[ComfyUI-Manager\] skip black listed pip installation: '([^']*)'")
REMAP = re.compile(r"\[ComfyUI-Manager\] '([^']*)' is remapped to '([^']*)'")
# Lines that mean something failed, in the Manager's words or pip's ("ERROR: ..."), or logged ("ERROR:root:...").
FAILURE = re.compile(r"install script failed|Install\(git-clone\) error|An error occurred while installing|"
                     r"Traceback \(most recent call last\)|Failed to restore|Failed to execute install script|"
                     r"Already exists|Invalid git url|Failed nodes|^ERROR: |^ERROR:root:", re.M)
# Expected here, and why: "Line is comment...skipping" (our comment lines) and "INFO: Frozen ComfyUI mode." (the
# host is an unpacked tarball, not a git checkout) match nothing above. PIPFixer logs "PyTorch is not installed"
# when torchaudio is missing, and no torchaudio release exists for torch 2.14.1: so the Manager's torch rollback
# is inactive here, and a torch change made by our requirements shows up in the version check instead.
BENIGN = re.compile(r"^ERROR:root:\[ComfyUI-Manager\] PyTorch is not installed$")
PROGRESS = re.compile(r"^\s*(\d+%\||0it \[)|it/s\]\s*$")  # GitPython clone progress bars (tqdm)


def executed(log_text: str) -> list[list[str]]:
    out = []
    for m in EXECUTE.finditer(log_text):
        try:
            out.append([str(x) for x in ast.literal_eval(m.group(1))])
        except (ValueError, SyntaxError):
            out.append([m.group(1)])
    return out


def pip_installed_lines(log_text: str) -> list[str]:
    """The argument of every ``pip install X`` the Manager ran (one per requirements.txt line)."""
    return [cmd[-1] for cmd in executed(log_text) if cmd[-3:-1] == ["pip", "install"]]


def failure_lines(log_text: str) -> list[str]:
    return [ln for ln in log_text.splitlines() if FAILURE.search(ln) and not BENIGN.match(ln)]


def readable(log_text: str) -> str:
    """The transcript without progress bars and pip's notes about the local index folders of this machine."""
    return "\n".join(ln for ln in log_text.splitlines()
                     if not PROGRESS.search(ln) and not ln.startswith("WARNING: Location 'file://"))


def main() -> int:
    r = install()
    print(readable(r.manager_log))
    print("---- summary ----")
    print(json.dumps({k: v for k, v in r.__dict__.items() if k not in ("manager_log", "server_log")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
