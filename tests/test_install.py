"""Installing the pack must not change the user's torch, torchvision, numpy or Pillow."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARDED = ("torch", "torchvision", "numpy", "pillow")
FORBIDDEN = re.compile(r"^\s*(torch|torchvision|torchaudio|facenet[-_]pytorch)\b", re.I)


def versions() -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in %r}))" % (GUARDED,))
    return json.loads(subprocess.check_output([sys.executable, "-c", code], text=True))


def requirement_lines():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def test_requirements_never_list_torch_or_facenet_nor_pin_transformers():
    lines = requirement_lines()
    assert lines, "requirements.txt is empty"
    assert not [ln for ln in lines if FORBIDDEN.match(ln)]
    assert not [ln for ln in lines if re.match(r"^\s*transformers\s*[=<>~!]", ln, re.I)]


def test_installing_the_pack_keeps_torch_torchvision_numpy_pillow():
    before = versions()
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", os.path.join(ROOT, "requirements.txt")])
    subprocess.check_call([sys.executable, os.path.join(ROOT, "install.py")])
    after = versions()
    assert after == before
    import importlib.util
    assert importlib.util.find_spec("facenet_pytorch") is not None


def test_plain_facenet_install_would_downgrade(tmp_path):
    """Why install.py uses --no-deps: pip's resolver wants to replace the guarded packages."""
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                    "--report", str(report), "facenet-pytorch==2.6.0"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not report.exists():
        import pytest
        pytest.skip("pip could not resolve facenet-pytorch's pins here (the point stands: they conflict)")
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    have = versions()
    assert any(chosen.get(n) not in (None, have[n]) for n in GUARDED), chosen
