"""Model files that must not be trusted, and architectures that cannot be built from a file.

- A TorchScript archive is loaded from the very bytes whose SHA-256 was checked: swapping the file on disk after
  a trusted load (same size, same time stamp) or between the check and the load never gets the swapped file run.
- A crafted archive under an OpenAI file name is called what it is (not OpenAI's file: hash mismatch) with what to
  do (delete it, download the published file again); a pickle holding code is refused in one short line.
- The CLIP architecture list offers only what builds from the weight file; an architecture whose tokenizer or
  text tower comes from the Hugging Face Hub is refused with a message naming what is missing.
"""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

import prompts
import random_networks as rn
from conftest import CHECKPOINT
from guidance import clip as ug_clip
from guidance import download as ug_dl

AUTO = "auto (from file)"
# open_clip configs that take a tokenizer or text tower from the Hugging Face Hub (one of each family).
HUB_ARCHS = ["roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32", "mt5-base-ViT-B-32", "nllb-clip-base",
             "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256", "coca_roberta-ViT-B-32"]


def assert_short_refusal(message: str, name: str) -> None:
    """The properties of a message a user reads in the UI: one line, plain text, no advice to turn off the safe
    loader, the file named, short."""
    assert "\n" not in message and "\r" not in message, message
    assert "\x1b" not in message, repr(message)
    assert "weights_only=False" not in message and "weights_only" not in message, message
    assert name in message, message
    assert len(message) < 400, (len(message), message)


# ----------------------------------------------------------------------------------- TorchScript hash check

def _same_size_archives(tmp_path):
    """(path, trusted bytes, crafted bytes): two code-running archives of identical size whose loading writes
    ``mark-trusted`` resp. ``mark-crafted`` next to them (same-length names: same archive size)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    trusted = rn.write_code_running_archive(str(tmp_path / "a" / "clip.pt"), str(tmp_path / "mark-trusted"))
    crafted = rn.write_code_running_archive(str(tmp_path / "b" / "clip.pt"), str(tmp_path / "mark-crafted"))
    with open(trusted, "rb") as f:
        good = f.read()
    with open(crafted, "rb") as f:
        bad = f.read()
    assert len(good) == len(bad) and good != bad
    return trusted, good, bad


def test_archive_swapped_after_a_trusted_load_with_the_old_time_stamp_is_refused(tmp_path, monkeypatch):
    path, good, bad = _same_size_archives(tmp_path)
    monkeypatch.setitem(ug_dl.EXTRA_TRUSTED_TORCHSCRIPT, ug_dl.file_sha256(path), "clip.pt")
    sd = ug_dl.load_state_dict_file(path)  # the trusted archive: loaded (and its own code ran)
    assert set(sd) == {"weight"} and (tmp_path / "mark-trusted").exists()
    before = os.stat(path)
    with open(path, "r+b") as f:  # same size, rewritten in place, time stamp put back
        f.write(bad)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(RuntimeError, match="TorchScript archive.*refused"):
        ug_dl.load_state_dict_file(path)
    assert not (tmp_path / "mark-crafted").exists(), "the swapped archive was loaded unverified"


def test_archive_swapped_between_the_check_and_the_load_is_never_loaded(tmp_path, monkeypatch):
    """The file is replaced right after its hash was checked against the trusted table: what gets loaded is still
    the checked content."""
    path, good, bad = _same_size_archives(tmp_path)
    table = {**ug_dl.trusted_torchscript(), ug_dl.file_sha256(path): "clip.pt"}
    swapped = []

    def swap_after_check():
        if not swapped:
            with open(path, "wb") as f:
                f.write(bad)
            swapped.append(True)
        return table

    monkeypatch.setattr(ug_dl, "trusted_torchscript", swap_after_check)
    sd = ug_dl.load_state_dict_file(path)
    assert swapped and set(sd) == {"weight"}
    assert not (tmp_path / "mark-crafted").exists(), "the file swapped after the check was loaded"
    assert (tmp_path / "mark-trusted").exists()  # the checked bytes were the ones loaded


def test_file_that_becomes_an_archive_after_it_was_classified_is_refused(tmp_path, monkeypatch):
    """Classified as a plain torch.save file, then swapped for an archive: torch.load (weights_only) meets the
    archive; it is refused as a TorchScript archive, in one line, and runs nothing."""
    marker = tmp_path / "marker"
    path = rn.write_code_running_archive(str(tmp_path / "swapped.pt"), str(marker))
    monkeypatch.setattr(ug_dl, "is_torchscript_archive", lambda p: False)
    with pytest.raises(RuntimeError) as info:
        ug_dl.load_state_dict_file(path)
    assert not marker.exists()
    msg = str(info.value)
    assert "TorchScript archive" in msg and "refused" in msg and "weights_only" not in msg and "\n" not in msg, msg


# ------------------------------------------------------------------------------------------- messages

def test_crafted_archive_under_an_openai_name_is_called_not_openais(tmp_path):
    marker = tmp_path / "marker"
    path = rn.write_code_running_archive(str(tmp_path / "ViT-B-32.pt"), str(marker))
    with pytest.raises(RuntimeError) as info:
        ug_dl.load_state_dict_file(path)
    assert not marker.exists()
    msg = str(info.value)
    entry = ug_dl.WEIGHT_FILES["ViT-B-32.pt"]
    found = ug_dl.file_sha256(path)
    assert "'ViT-B-32.pt' is not OpenAI's" in msg and "SHA-256 mismatch" in msg, msg
    assert entry.sha256_prefix[:16] in msg and found[:16] in msg, msg  # expected vs found
    assert "Delete it" in msg and entry.url in msg and str(tmp_path) in msg, msg
    assert "Convert" not in msg and "\n" not in msg, msg


class _Payload:
    """Unpickling it calls ``open(marker, "w")``: a file appears if the pickle's code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Thing:
    def __init__(self):
        self.value = 1


def _write_pickles(folder, marker):
    """name → path of files ``torch.load(weights_only=True)`` refuses, with torch's longest messages."""
    files = {}
    files["reduce-call.pt"] = folder / "reduce-call.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(str(marker))}, files["reduce-call.pt"])
    files["object.pth"] = folder / "object.pth"
    torch.save({"w": torch.zeros(2), "x": _Thing()}, files["object.pth"])  # torch's text has ANSI bold in it
    files["plain-pickle.bin"] = folder / "plain-pickle.bin"
    with open(files["plain-pickle.bin"], "wb") as f:
        pickle.dump(_Payload(str(marker)), f, protocol=4)
    return {k: str(v) for k, v in files.items()}


def test_torch_messages_of_these_files_are_what_the_refusal_replaces(tmp_path):
    """Precondition: torch's own text for these files is multi-line, advises weights_only=False, has ANSI."""
    texts = []
    for path in _write_pickles(tmp_path, tmp_path / "marker").values():
        with pytest.raises(pickle.UnpicklingError) as info:
            torch.load(path, weights_only=True)
        texts.append(str(info.value))
    assert all("weights_only" in t and "\n" in t for t in texts) and any("\x1b" in t for t in texts)


@pytest.mark.parametrize("name", ["reduce-call.pt", "object.pth", "plain-pickle.bin"])
def test_pickle_refusal_is_one_short_line(tmp_path, name):
    marker = tmp_path / "marker"
    path = _write_pickles(tmp_path, marker)[name]
    with pytest.raises(RuntimeError) as info:
        ug_dl.load_state_dict_file(path)
    assert not marker.exists(), "the pickle's code ran"
    msg = str(info.value)
    assert_short_refusal(msg, name)
    assert "holds code, not only tensors" in msg and "refused" in msg, msg
    assert ".safetensors" in msg and "convert" in msg, msg


@pytest.mark.parametrize("content", [b"this is not a pickle at all\n" * 4, b"\x80\x02}q\x00(X"])
def test_unreadable_file_message_is_one_short_line(tmp_path, content):
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(content)
    with pytest.raises(RuntimeError) as info:
        ug_dl.load_state_dict_file(str(path))
    msg = str(info.value)
    assert_short_refusal(msg, "damaged.ckpt")
    assert "download it again" in msg, msg


def test_pickle_under_a_standard_name_says_it_is_not_the_published_file(tmp_path):
    name = "lraspp_mobilenet_v3_large-d234d4ea.pth"
    marker = tmp_path / "marker"
    torch.save({"w": torch.zeros(2), "x": _Payload(str(marker))}, tmp_path / name)
    with pytest.raises(RuntimeError) as info:
        ug_dl.load_state_dict_file(str(tmp_path / name))
    assert not marker.exists()
    msg = str(info.value)
    assert "holds code" in msg and "not the published" in msg and ug_dl.WEIGHT_FILES[name].url in msg, msg
    assert "\n" not in msg and "\x1b" not in msg and "weights_only" not in msg, msg


# ------------------------------------------------------------------------------------ CLIP architectures

def test_hub_architectures_are_known_to_open_clip():
    """Precondition of the tests below: these names exist and their configs name a Hugging Face model."""
    import open_clip
    for arch in HUB_ARCHS:
        assert arch in open_clip.list_models(), arch
        text_cfg = open_clip.get_model_config(arch)["text_cfg"]
        assert text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"), arch


@pytest.mark.parametrize("arch", ["roberta-ViT-B-32", "ViT-B-16-SigLIP"])
def test_hub_architecture_is_refused_before_transformers_is_asked(arch, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    for build in (lambda: ug_clip.load_clip(arch, None), lambda: ug_clip.clip_tokenizer(arch)):
        with pytest.raises(ValueError) as info:
            build()
        msg = str(info.value)
        hub = ug_clip.hub_dependencies(arch)
        assert arch in msg and "Hugging Face" in msg and all(repr(n) in msg for n in hub.values()), msg
        assert "ViT-B-32" in msg and "\n" not in msg, msg


# ------------------------------------------------------------------------------- through the real nodes

@pytest.fixture(scope="module")
def clip_folder(host):
    import folder_paths
    folder = os.path.join(host.workdir, "models", "universal_guidance", "clip")
    os.makedirs(folder, exist_ok=True)
    folder_paths.add_model_folder_path("ug_clip", folder)
    arch, path = rn.write_tiny_clip(folder, "vit")
    return folder, arch, path


def clip_prompt(clip_model: str, architecture: str = AUTO) -> dict:
    p = prompts.base(CHECKPOINT, size=32)
    p["40"] = {"class_type": "UniversalGuidanceCLIPText", "inputs": {
        "text": "a red apple", "clip_model": clip_model, "architecture": architecture, "cutouts": 0,
        "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    p["5"] = {"class_type": "UniversalGuidanceKSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "vae": ["1", 2], "guidance": ["40", 0], "seed": 0, "steps": 1, "cfg": 1.0, "scheduler": "normal",
        "denoise": 1.0, **prompts.KNOBS}}
    p["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    p["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ug_safety"}}
    return p


def run_error(host, prompt) -> str:
    result = host.run(prompt)
    assert not result.success, "the run succeeded"
    err = result.error()
    assert err is not None, result.messages  # an execution error, not a validation error
    # ComfyUI v0.3.x sends "{exception}\n{tips}" (tips empty but for out-of-memory): drop what the host appends.
    return err["exception_message"].rstrip("\n")


@pytest.mark.parametrize("node", ["UniversalGuidanceCLIPText", "UniversalGuidanceStyle"])
def test_architecture_list_offers_only_what_builds_from_the_file(host, clip_folder, node):
    listed = host.node_types[node].INPUT_TYPES()["required"]["architecture"][0]
    assert listed[0] == AUTO and {"ViT-B-32", "ViT-L-14", "RN50", clip_folder[1]} <= set(listed)
    assert not set(HUB_ARCHS) & set(listed), sorted(set(HUB_ARCHS) & set(listed))
    assert not [a for a in listed[1:] if ug_clip.hub_dependencies(a)]


@pytest.mark.parametrize("file_name", ["xlm-roberta-base-ViT-B-32-laion5b.safetensors",
                                       "ViT-B-16-SigLIP-256-webli.safetensors"])
def test_file_of_a_hub_architecture_gives_a_clear_error(host, clip_folder, file_name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    folder, _, tiny = clip_folder
    path = os.path.join(folder, file_name)
    shutil.copyfile(tiny, path)
    try:
        msg = run_error(host, clip_prompt(file_name))
    finally:
        os.remove(path)
    arch = file_name.rsplit("-", 1)[0]
    assert "UG CLIP Text Guidance: input 'architecture'" in msg and file_name in msg, msg
    assert f"{arch!r}" in msg and "Hugging Face model" in msg and "Hugging Face cache" in msg, msg
    assert "huggingface.co" not in msg and "does not fit" not in msg, msg


def test_crafted_openai_name_through_the_node(host, clip_folder, tmp_path):
    folder = clip_folder[0]
    marker = tmp_path / "marker"
    path = rn.write_code_running_archive(os.path.join(folder, "ViT-B-32.pt"), str(marker))
    try:
        msg = run_error(host, clip_prompt("ViT-B-32.pt"))
    finally:
        os.remove(path)
    assert not marker.exists()
    assert "UG CLIP Text Guidance: input 'clip_model'" in msg and "is not OpenAI's" in msg, msg
    assert "Delete it" in msg and ug_dl.WEIGHT_FILES["ViT-B-32.pt"].url in msg and "\n" not in msg, msg


def test_pickle_refusal_through_the_node_is_one_short_line(host, clip_folder, tmp_path):
    folder, arch, _ = clip_folder
    name = f"{arch}-pickled.pt"
    marker = tmp_path / "marker"
    path = os.path.join(folder, name)
    torch.save({"w": torch.zeros(2), "x": _Payload(str(marker)), "y": _Thing()}, path)
    try:
        msg = run_error(host, clip_prompt(name))
    finally:
        os.remove(path)
    assert not marker.exists()
    assert msg.startswith("UG CLIP Text Guidance: input 'clip_model': "), msg
    assert_short_refusal(msg, name)
    assert "holds code" in msg and ".safetensors" in msg, msg
