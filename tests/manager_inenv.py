"""Runs INSIDE the throwaway ComfyUI-Manager environment (its own Python), never in .venv.

    python manager_inenv.py versions
        JSON {name: version} of torch, torchvision, numpy, pillow (no import of torch: fast).
    python manager_inenv.py check --host COMFYUI --pack PACK_DIR
        JSON: versions, the installed version of each requirements.txt line's package, whether facenet_pytorch
        imports (MTCNN and InceptionResnetV1), and the pack's own
        NODE_CLASS_MAPPINGS as ComfyUI v0.3.64 registers it in-process (nodes.load_custom_node).
    python manager_inenv.py manager-lists --host COMFYUI
        JSON: the Manager's pip blacklist, downgrade blacklist and remaps, as cm-cli sets them up.
    python manager_inenv.py unified-compile --host COMFYUI --pack PACK_DIR
        JSON: what the Manager's opt-in unified resolver would pin for the guarded packages (compile only).

Only the standard library and what the environment has; written for the harness in manager_harness.py.
"""
from __future__ import annotations

import asyncio
import importlib.metadata as metadata
import inspect
import json
import os
import re
import sys
import traceback

GUARDED = ("torch", "torchvision", "numpy", "pillow")


def versions() -> dict:
    out = {}
    for name in GUARDED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def requirement_versions(pack: str) -> dict:
    """{requirements.txt line: installed version of its package, or None}."""
    out = {}
    with open(os.path.join(pack, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name = re.split(r"[<>=!~;\[ ]", line)[0]
                try:
                    out[line] = metadata.version(name)
                except metadata.PackageNotFoundError:
                    out[line] = None
    return out


def facenet() -> dict:
    try:
        import facenet_pytorch
        from facenet_pytorch import MTCNN, InceptionResnetV1  # noqa: F401
        return {"importable": True, "version": metadata.version("facenet-pytorch"),
                "file": facenet_pytorch.__file__}
    except Exception:
        return {"importable": False, "error": traceback.format_exc(limit=3)}


def pack_registry(host: str, pack: str) -> dict:
    """The pack loaded by ComfyUI's own loader in this process; its mapping as the pack exports it."""
    sys.path.insert(0, host)
    os.chdir(host)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401  (v0.3.64 needs it before `import nodes`)
    import nodes
    before = set(nodes.NODE_CLASS_MAPPINGS)
    result = nodes.load_custom_node(pack)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    init = os.path.realpath(os.path.join(pack, "__init__.py"))
    own = None
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path) == init and getattr(module, "NODE_CLASS_MAPPINGS", None) is not None:
            own = sorted(module.NODE_CLASS_MAPPINGS)
    return {"loaded": bool(result), "pack_mapping": own,
            "registered": sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)}


def manager_lists(host: str) -> dict:
    os.environ["COMFYUI_PATH"] = host
    import cm_cli.__main__ as cli  # the module cm-cli runs: it sets up the lists at import
    g = cli.cm_global
    return {"pip_blacklist": sorted(g.pip_blacklist), "pip_downgrade_blacklist": sorted(g.pip_downgrade_blacklist),
            "pip_overrides": dict(g.pip_overrides)}


def unified_compile(host: str, pack: str) -> dict:
    """The Manager's unified-resolver mode (opt-in: ``use_unified_resolver`` / ``cm-cli --uv-compile``), first two
    steps only: collect the pack's requirements with its rules, ``uv pip compile`` them against ComfyUI's
    requirements. Returns what the lockfile pins for the guarded packages (the install step would apply them)."""
    lists = manager_lists(host)
    from comfyui_manager.common.unified_dep_resolver import UnifiedDepResolver, collect_base_requirements
    resolver = UnifiedDepResolver(node_pack_paths=[pack], base_requirements=collect_base_requirements(host),
                                  blacklist=set(lists["pip_blacklist"]), overrides=lists["pip_overrides"],
                                  downgrade_blacklist=lists["pip_downgrade_blacklist"])
    deps = resolver.collect_requirements()
    lock = resolver.compile_lockfile(deps)
    out = {"collected": [r.spec for r in deps.requirements], "skipped": [list(x) for x in deps.skipped],
           "success": lock.success, "error": (lock.stderr or "")[-2000:] + " ".join(lock.conflicts)}
    if lock.success:
        pins = {}
        with open(lock.lockfile_path) as f:
            for line in f:
                m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
                if m and m.group(1).lower() in GUARDED:
                    pins[m.group(1).lower()] = m.group(2)
        out["pins"] = pins
    return out


def main(argv) -> int:
    what = argv[1]
    opts = dict(zip(argv[2::2], argv[3::2]))
    if what == "versions":
        out = versions()
    elif what == "check":
        out = {"versions": versions(), "facenet": facenet(), "requirements": requirement_versions(opts["--pack"])}
        try:
            out.update(pack_registry(opts["--host"], opts["--pack"]))
        except Exception:
            out["registry_error"] = traceback.format_exc()
    elif what == "manager-lists":
        out = manager_lists(opts["--host"])
    elif what == "unified-compile":
        out = unified_compile(opts["--host"], opts["--pack"])
    else:
        raise SystemExit(f"unknown command {what!r}")
    # A marker line, so that whatever ComfyUI or the Manager print before it does not spoil the JSON.
    sys.stdout.write("\nUG-JSON " + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
