"""``python -m headless run``: a real run of the image-guidance example workflow with the tiny checkpoint (subprocess), and the
error paths — no ComfyUI, unknown node types, missing model files, invalid widget values — with their exit codes
and messages. The error paths after the boot run in this process on the session's host (``runner.main(argv,
host=...)``, the code path of the command line minus the boot) to keep the suite fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import workflow_files as wfiles
from conftest import CHECKPOINT, ROOT
from headless import runner

IMAGE_WF = wfiles.path("image.json")
FAST = ["--set", "4.width=32", "--set", "4.height=32", "--set", "5.steps=2", "--set", "5.recurrence=1"]


def run_cli(args, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "headless", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture()
def inputs(tmp_path):
    return wfiles.write_reference(str(tmp_path / "refs"))


def test_runs_image_workflow_and_writes_images(host, tmp_path, inputs):
    """The real command line: boots ComfyUI, converts the UI file, runs it, writes the PNG into --out."""
    out = tmp_path / "out"
    proc = run_cli([IMAGE_WF, "--cpu", "--models", wfiles.TINY_MODELS_ROOT, "--input", str(tmp_path / "in"),
                    "--set", f"1.ckpt_name={CHECKPOINT}", "--set", f"11.image={inputs}", *FAST,
                    "--set", "5.seed=42", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    images = sorted(p for p in out.rglob("*.png") if "previews" not in p.parts)
    assert [p.name for p in images] == ["image_00001_.png"], proc.stdout[-2000:]
    reports = sorted((out / "previews").glob("*.png"))  # the KSampler's run report, previewed by the workflow
    assert len(reports) == 1 and Image.open(reports[0]).size[0] == 720
    assert Image.open(images[0]).size == (32, 32)
    assert np.asarray(Image.open(images[0])).std() > 0
    assert "[run] node 5 (UniversalGuidanceKSampler)" in proc.stdout
    assert "[run] node 5: 2/2" in proc.stdout  # progress of the sampler
    assert f"[run] wrote {images[0]}" in proc.stdout
    # the sampler's summary line, as the README promises
    assert "[run] Universal Guidance: 2 steps, 2 iterations, 2 denoiser backward passes, 2 guided decodes in" \
        in proc.stdout, proc.stdout[-2000:]
    # ... once: not again by ComfyUI's console log handler
    assert (proc.stdout + proc.stderr).count("Universal Guidance: 2 steps, 2 iterations") == 1, proc.stderr[-2000:]
    assert (tmp_path / "in" / wfiles.REFERENCE).is_file()  # the image path was copied into the input folder


def test_missing_comfyui_path_is_a_clear_error(tmp_path):
    proc = run_cli([IMAGE_WF, "--comfyui", str(tmp_path / "nowhere"), "--out", str(tmp_path)], timeout=60)
    assert proc.returncode == runner.EXIT_SETUP
    assert f"no ComfyUI checkout at '{tmp_path / 'nowhere'}'" in proc.stderr and "nodes.py" in proc.stderr
    proc = run_cli([IMAGE_WF, "--out", str(tmp_path)], env={"COMFYUI_PATH": str(tmp_path)}, timeout=60)
    assert proc.returncode == runner.EXIT_SETUP and "COMFYUI_PATH" in proc.stderr


def run_here(host, capsys, args):
    code = runner.main(args, host=host)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_custom_node_names_the_node(host, tmp_path, capsys):
    wf = wfiles.load(IMAGE_WF)
    next(n for n in wf["nodes"] if n["id"] == 12)["type"] = "SomePackMaskNode"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    code, _, err = run_here(host, capsys, [str(path), "--out", str(tmp_path / "out")])
    assert code == runner.EXIT_INVALID
    assert "node 12: SomePackMaskNode — install the custom-node pack that provides it" in err


def test_newer_core_node_says_update_comfyui(host, tmp_path, capsys):
    if "SamplerCustomAdvanced" in host.node_types:
        pytest.skip("this ComfyUI has SamplerCustomAdvanced; the message is for 2024-03 hosts")
    code, _, err = run_here(host, capsys, [wfiles.path("samplercustom_advanced.json"),
                                           "--out", str(tmp_path / "out")])
    assert code == runner.EXIT_INVALID
    assert "node 5: SamplerCustomAdvanced — core ComfyUI node added in 2024-04; update ComfyUI" in err
    assert "node 23: CFGGuider — core ComfyUI node added in 2024-04" in err


def test_missing_model_file_names_file_and_folder(host, tmp_path, capsys):
    code, _, err = run_here(host, capsys, [IMAGE_WF, "--out", str(tmp_path / "out")])
    assert code == runner.EXIT_INVALID
    assert ("node 1 (CheckpointLoaderSimple) input 'ckpt_name': model file 'v1-5-pruned-emaonly.safetensors' "
            "not found. Put it into the 'checkpoints' model folder") in err
    assert host.model_dir("checkpoints") in err
    assert "node 11 (LoadImage) input 'image': image file 'example.png' not found in the input folder" in err


def test_missing_model_file_lists_each_folder_once(host, tmp_path, capsys):
    """--models naming a root the host already searches (here relative, the host's absolute), given twice and in two
    runs: each folder is listed once."""
    root = os.path.relpath(wfiles.TINY_MODELS_ROOT)
    for _ in range(2):
        code, _, err = run_here(host, capsys, [IMAGE_WF, "--out", str(tmp_path / "out"), "--models", root,
                                               "--models", wfiles.TINY_MODELS_ROOT,
                                               "--set", "1.ckpt_name=not-there.safetensors"])
        assert code == runner.EXIT_INVALID
        line = next(x for x in err.splitlines() if "'not-there.safetensors' not found" in x)
        folders = line.split("(one of: ", 1)[1].split("), or pass --models", 1)[0].split(", ")
        real = [os.path.realpath(f) for f in folders]
        assert len(set(real)) == len(real), folders
        assert os.path.realpath(os.path.join(wfiles.TINY_MODELS_ROOT, "checkpoints")) in real
        assert host.model_dir("checkpoints") in folders


@pytest.mark.parametrize("value", ["{tmp}/no-such-folder/photo.png", "no-such-photo.png"])
def test_set_image_that_does_not_exist_is_a_usage_error(host, tmp_path, capsys, value):
    """A --set image that is neither a file nor an image of the input folder is a bad --set (exit 2), named."""
    value = value.format(tmp=tmp_path)
    code, _, err = run_here(host, capsys, [IMAGE_WF, "--out", str(tmp_path / "out"), "--input", str(tmp_path / "in"),
                                           "--set", f"1.ckpt_name={CHECKPOINT}", "--set", f"11.image={value}"])
    assert code == runner.EXIT_SETUP, err
    assert f"--set '11.image={value}': no image file at {value!r}" in err
    assert f"the input folder {tmp_path / 'in'} has no image of that name" in err


@pytest.mark.parametrize("setting, expected", [
    ("5.steps=0", ["node 5 (UniversalGuidanceKSampler): Universal KSampler: input 'steps': 0 is below its "
                   "minimum 1; enter a number between 1 and 10000"]),
    ("5.scheduler=\"fastest\"", ["node 5 (UniversalGuidanceKSampler) input 'scheduler': invalid value 'fastest'; "
                                 "allowed: one of [", "'normal'"]),
    ("10.start_percent=0.9", ["node 10 (UniversalGuidanceImage): UG Image Guidance: inputs 'start_percent' and "
                              "'end_percent': the window from 0.9 to 0.5 is empty"]),
])
def test_invalid_widget_value_names_node_input_and_allowed(host, tmp_path, capsys, inputs, setting, expected):
    code, _, err = run_here(host, capsys, [IMAGE_WF, "--out", str(tmp_path / "out"), "--input",
                                           os.path.dirname(inputs), "--set", f"1.ckpt_name={CHECKPOINT}",
                                           "--set", f"11.image={wfiles.REFERENCE}", *FAST,
                                           "--set", "10.end_percent=0.5", "--set", setting])
    assert code == runner.EXIT_INVALID, err
    for text in expected:
        assert text in err


def test_bad_set_option(host, tmp_path, capsys):
    code, _, err = run_here(host, capsys, [IMAGE_WF, "--out", str(tmp_path), "--set", "5steps=3"])
    assert code == runner.EXIT_SETUP and "expected NODE_ID.INPUT=VALUE" in err
    code, _, err = run_here(host, capsys, [IMAGE_WF, "--out", str(tmp_path), "--set", "5.stepz=3"])
    assert code == runner.EXIT_SETUP and "node 5 (UniversalGuidanceKSampler) has no input 'stepz'" in err
    code, _, err = run_here(host, capsys, [IMAGE_WF, "--out", str(tmp_path), "--set", "99.steps=3"])
    assert code == runner.EXIT_SETUP and "no node 99" in err


def test_value_parsing():
    assert runner.parse_set("3.seed=42") == ("3", "seed", 42)
    assert runner.parse_set("5.cfg=7.5") == ("5", "cfg", 7.5)
    assert runner.parse_set("5.jacobian=false") == ("5", "jacobian", False)
    assert runner.parse_set("5.jacobian=False") == ("5", "jacobian", False)
    assert runner.parse_set("2.text=a cat, 4k") == ("2", "text", "a cat, 4k")
    assert runner.parse_set('2.text="42"') == ("2", "text", "42")
    assert runner.parse_set('6.vae=["1", 2]') == ("6", "vae", ["1", 2])


def test_term_reports_are_printed(host, tmp_path, capfd):
    """A term's report line (here: the steps a face term had to skip) reaches the runner's output."""
    pytest.importorskip("facenet_pytorch")
    import random_networks as rn
    folder = os.path.join(host.workdir, "models", "universal_guidance", "face")
    os.makedirs(folder, exist_ok=True)
    weights = rn.write_face_net(folder)
    ref = (rn.astronaut((160, 160))[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(ref).save(tmp_path / "face.png")
    api = prompts_face(os.path.basename(weights))
    wf = tmp_path / "face_api.json"
    wf.write_text(json.dumps(api))
    code = runner.main([str(wf), "--set", f"32.image={tmp_path / 'face.png'}", "--out", str(tmp_path / "out")],
                       host=host)
    out = capfd.readouterr().out
    assert code == 0, out
    assert "[run] Universal Guidance: face: no face found in 2 of 2 evaluations" in out, out[-2000:]


def prompts_face(face_file: str) -> dict:
    import prompts
    p = prompts.base(CHECKPOINT, size=32)
    p["32"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    p["44"] = {"class_type": "UniversalGuidanceFace", "inputs": {
        "reference": ["32", 0], "model": face_file, "loss": "l1", "crop": "detect", "weight": 1.0,
        "start_percent": 0.0, "end_percent": 1.0}}
    p["5"] = {"class_type": "UniversalGuidanceKSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "vae": ["1", 2],
        "guidance": ["44", 0], "seed": 1, "steps": 2, "cfg": 1.0, "scheduler": "normal", "denoise": 1.0,
        **prompts.KNOBS}}
    p["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "face"}}
    return p


@pytest.mark.parametrize("extra", [["--listen", "0.0.0.0"], ["--liste", "0.0.0.0"], ["--lis=0.0.0.0"],
                                   ["--listen=::"]])
def test_serve_cannot_be_talked_into_another_address(tmp_path, capsys, extra):
    from headless import serve
    code = serve.main(["--print-command", "--workdir", str(tmp_path), "--", *extra])
    assert code == 2 and "127.0.0.1 only" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # serve's own options take no abbreviations either
        serve.main(["--print-command", "--workdir", str(tmp_path), "--liste", "0.0.0.0"])


def test_serve_command_ends_with_the_loopback_address(tmp_path, capsys):
    from headless import serve
    assert serve.main(["--print-command", "--workdir", str(tmp_path), "--", "--lowvram"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[-2:] == ["--listen", "127.0.0.1"] and "--lowvram" in cmd
    assert cmd[4] == os.path.join(str(tmp_path), "models")  # the workdir's models folder is ComfyUI's models folder
