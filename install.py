"""Run by ComfyUI-Manager after requirements.txt (or by hand: `python install.py` with ComfyUI's Python).

Installs facenet-pytorch (MTCNN + InceptionResnetV1, for face guidance) WITHOUT its dependencies: version 2.6.0
pins torch<2.3, torchvision<0.18, numpy<2 and Pillow<10.3, which would downgrade a working ComfyUI. Its code runs
with current versions of all four.
"""
import importlib.util
import subprocess
import sys

FACENET = "facenet-pytorch==2.6.0"


def main() -> int:
    if importlib.util.find_spec("facenet_pytorch") is not None:
        return 0
    command = [sys.executable, "-m", "pip", "install", "--no-deps", FACENET]
    print("Universal Guidance: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
