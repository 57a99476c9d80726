"""Every widget input of every node the pack registers, fed bad values through ComfyUI's real validator and executor.

For each node a small valid prompt is built (tiny random models, a 32×32 image, 2 steps). For each widget input
(read from ``INPUT_TYPES``: INT, FLOAT, STRING, BOOLEAN, combo lists, required and optional) every bad value of its
type replaces the valid one: NaN, ±inf, huge, negative, zero, fractions for whole numbers, empty and whitespace
strings, values of the wrong type, values outside a combo's list, null, malformed box and word lists. Each case
must end in one of:

* ``refused at validation`` / ``refused at run``: an error that names the input (and, at run time, the node);
* ``ran, guided``: a finite output that differs from the same prompt's unguided output (forward_strength 0);
* ``ran, said so``: the output equals the unguided one and the run's summary says that nothing was guided;
* ``ran`` (nodes that do not guide: the attention map): a finite output.

Anything else — a non-finite output, or an unguided output nobody was told about — is a silent failure. The
table (node × input × value → outcome) is written to ``out/test-reports/fuzz-<host>.md``.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import prompts
from conftest import CHECKPOINT, have_facenet
from headless.host import pack_module

SIZE = 32
STEPS = 1
PROMPT = "a photo of a cat"
CAPTURE = "UGTestCaptureTensor"


class CaptureTensor:
    """A test-only output node that keeps the tensor it receives (LATENT samples or IMAGE)."""

    seen: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}, "optional": {"image": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # never cached: every prompt records its own output

    def keep(self, latent=None, image=None):
        CaptureTensor.seen.append((image if image is not None else latent["samples"]).detach().clone())
        return {}


@pytest.fixture(scope="module")
def fuzz_host(host, nets):
    host.node_types[CAPTURE] = CaptureTensor
    ref = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(ref).save(os.path.join(host.workdir, "input", "ug_fuzz_ref.png"))
    yield host
    host.node_types.pop(CAPTURE, None)


# ----------------------------------------------------------------------------------------------- base prompts

def _sampler_inputs(guidance_ref, **knobs):
    return {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "vae": ["1", 2], "guidance": guidance_ref, "seed": 3, "steps": STEPS, "cfg": 2.0,
            "scheduler": "normal", "denoise": 1.0, **{**prompts.KNOBS, **knobs}}


def _graph(term_nodes: dict, guidance_ref, **knobs) -> dict:
    p = prompts.base(CHECKPOINT, size=SIZE)
    p["2"]["inputs"]["text"] = PROMPT
    p["11"] = {"class_type": "LoadImage", "inputs": {"image": "ug_fuzz_ref.png"}}
    p.update(term_nodes)
    p["5"] = {"class_type": "UniversalGuidanceKSampler", "inputs": _sampler_inputs(guidance_ref, **knobs)}
    p["9"] = {"class_type": CAPTURE, "inputs": {"latent": ["5", 0]}}
    return p


def _window(weight):
    return {"weight": weight, "start_percent": 0.0, "end_percent": 1.0}


def _image_term():
    return {"class_type": "UniversalGuidanceImage", "inputs": {"image": ["11", 0], "loss": "l2", **_window(100.0)}}


def _sg(class_type, **extra):
    return {"class_type": class_type, "inputs": {"clip": ["1", 1], "prompt": PROMPT, "words": "cat",
                                                 "layers": "all", **_window(4.0), "end_percent": 1.0, **extra}}


NORMALIZED = {"strength_mode": "normalized", "forward_strength": 0.5, "cfg": 1.0}  # cfg 1: one model call


def base_prompt(class_type: str, nets) -> tuple:
    """``(prompt, id of the node under test, id of the node whose forward_strength turns guidance off or None)``."""
    name = os.path.basename
    if class_type == "UniversalGuidanceKSampler":
        return _graph({"10": _image_term()}, ["10", 0]), "5", "5"
    if class_type == "UniversalGuidanceSampler":
        p = _graph({"10": _image_term()}, ["10", 0])
        del p["5"]
        p["20"] = {"class_type": "UniversalGuidanceSampler", "inputs": {"vae": ["1", 2], "guidance": ["10", 0],
                                                                         **prompts.KNOBS}}
        p["21"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal",
                                                              "steps": STEPS, "denoise": 1.0}}
        p["5"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 3, "cfg": 2.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["20", 0], "sigmas": ["21", 0], "latent_image": ["4", 0]}}
        return p, "20", "20"
    if class_type == "UniversalGuidanceSamplerOptions":
        p = _graph({"10": _image_term()}, ["10", 0])
        p["30"] = {"class_type": class_type, "inputs": {}}
        p["5"]["inputs"]["options"] = ["30", 0]
        return p, "30", "5"
    if class_type == "UniversalGuidanceImage":
        return _graph({"10": _image_term()}, ["10", 0]), "10", "5"
    terms = {
        "UniversalGuidanceCLIPText": {"text": "a red apple", "clip_model": name(nets["clip_vit"][1]),
                                      "architecture": "auto (from file)", "cutouts": 0, **_window(100.0)},
        "UniversalGuidanceStyle": {"style_image": ["11", 0], "clip_model": name(nets["clip_rn"][1]),
                                   "architecture": "auto (from file)", "gram_weight": 0.5, **_window(600.0)},
        "UniversalGuidanceSegmentation": {"model": name(nets["seg"]), "architecture": "auto (from file)",
                                          "class_name": "person", "outside_mask": "background", "input_size": 64,
                                          "mask": ["11", 1], **_window(400.0)},
        "UniversalGuidanceFace": {"reference": ["11", 0], "model": name(nets.get("face", "")), "loss": "l1",
                                  "crop": "full", **_window(20000.0)},
        "UniversalGuidanceDetection": {"boxes": "2,2,20,30,person; 16,8,30,24,dog", "coordinates": "pixels",
                                       "width": SIZE, "height": SIZE, "model": name(nets["det"]),
                                       "box_regression": False, "detector_size": 64, **_window(100.0)},
    }
    if class_type in terms:
        return _graph({"10": {"class_type": class_type, "inputs": terms[class_type]}}, ["10", 0],
                      **NORMALIZED), "10", "5"
    sg = {
        "UniversalGuidanceSGMove": _sg(class_type, mode="to (x, y)", x=0.2, y=0.5),
        "UniversalGuidanceSGResize": _sg(class_type, factor=2.0),
        # keeping what the unguided twin has changes nothing on its own: keep a reference's layout, and keep the
        # appearance while Move edits
        "UniversalGuidanceSGKeepLayout": {**_sg(class_type), "inputs": {**_sg(class_type)["inputs"],
                                                                        "reference": ["12", 0]}},
        "UniversalGuidanceSGKeepAppearance": {**_sg(class_type), "inputs": {**_sg(class_type)["inputs"],
                                                                            "guidance": ["13", 0]}},
        "UniversalGuidanceSGAppearanceTransfer": {**_sg(class_type), "inputs": {
            **_sg(class_type)["inputs"], "reference": ["12", 0]}},
    }
    if class_type in sg:
        nodes_ = {"10": sg[class_type],
                  "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["1", 2]}},
                  "13": _sg("UniversalGuidanceSGMove", mode="to (x, y)", x=0.2, y=0.5)}
        return _graph(nodes_, ["10", 0], **NORMALIZED), "10", "5"
    if class_type == "UniversalGuidanceAttentionMap":
        p = prompts.base(CHECKPOINT, size=SIZE)
        p["10"] = {"class_type": class_type, "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "words": "cat", "layers": "all",
            "latent": ["4", 0], "noise_level": 0.5, "seed": 0}}
        p["9"] = {"class_type": CAPTURE, "inputs": {"latent": ["4", 0], "image": ["10", 0]}}
        return p, "10", None
    return None, None, None


# ------------------------------------------------------------------------------------------------- bad values

NUMBER_VALUES = [("nan", math.nan), ("+inf", math.inf), ("-inf", -math.inf), ("huge", 1e300), ("negative", -1),
                 ("zero", 0), ("text", "abc"), ("null", None)]
INT_VALUES = [("nan", math.nan), ("huge", 10 ** 30), ("negative", -1), ("zero", 0), ("fraction", 1.5),
              ("text", "abc"), ("null", None)]
STRING_VALUES = [("empty", ""), ("whitespace", "   \n "), ("number", 7), ("null", None)]
BOOLEAN_VALUES = [("text", "maybe"), ("number", 2), ("null", None)]
COMBO_VALUES = [("not in list", "bogus"), ("empty", ""), ("number", 3), ("null", None)]
MALFORMED = {
    "boxes": [("nan box", "nan,4,20,20,person"), ("inf box", "2,2,inf,20,dog"), ("short box", "1,2,3"),
              ("unknown label", "2,2,20,20,unicorn"), ("empty box", "20,20,10,10,person"),
              ("outside image", "2,2,900,20,person")],
    "words": [("word not in prompt", "zebra"), ("only commas", ",,,")],
}


def as_converted(kind, value):
    """A required INT/FLOAT value as ComfyUI's validator converts it before anything else sees it (None if it
    cannot)."""
    try:
        return {"INT": int, "FLOAT": float}[kind](value) if kind in ("INT", "FLOAT") else value
    except (TypeError, ValueError, OverflowError, KeyError):
        return None


def bad_values(name: str, kind) -> list:
    if isinstance(kind, (list, tuple)):
        return COMBO_VALUES
    values = {"FLOAT": NUMBER_VALUES, "INT": INT_VALUES, "STRING": STRING_VALUES, "BOOLEAN": BOOLEAN_VALUES}
    return list(values.get(kind, [])) + MALFORMED.get(name, [])


# ---------------------------------------------------------------------------------------------------- running

class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _node_error_text(node_errors: dict, node_id: str) -> str:
    entry = node_errors.get(node_id) or {}
    return " | ".join(f"{e.get('message', '')}: {e.get('details', '')}" for e in entry.get("errors", []))


def fresh(prompt: dict) -> dict:
    """A copy of an API prompt as a client sends it (the executor notes its own keys, e.g. 'is_changed', in the
    node dicts it runs)."""
    return {k: {"class_type": v["class_type"], "inputs": copy.deepcopy(v["inputs"])} for k, v in prompt.items()}


def execute(host, prompt: dict):
    """``("validation", text)``, ``("run error", node_id, text)`` or ``("ok", tensor, log lines)``."""
    prompt = fresh(prompt)
    ok, error, outputs, node_errors = host.validate(prompt)
    if not ok:
        return ("validation", node_errors, error)
    handler = LogLines()
    logger = logging.getLogger("universal_guidance")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    CaptureTensor.seen.clear()
    try:
        result = host.run(prompt, validate=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if not result.success:
        err = result.error() or {}
        return ("run error", str(err.get("node_id")), str(err.get("exception_message", result.messages)))
    assert CaptureTensor.seen, ("the capture node did not run", result.messages[-3:], prompt.get("5"))
    return ("ok", CaptureTensor.seen[-1], handler.lines)


SAID_UNGUIDED = ("nothing was guided", "nothing was sampled", "was not guided", "unguided", "no step of", "every guidance update")


def classify(host, prompt, node_id, node_name, input_name, off_id, unguided_cache: dict, base=None) -> str:
    got = execute(host, prompt)
    if got[0] == "validation":
        _, node_errors, error = got
        text = _node_error_text(node_errors, node_id)
        if f"'{input_name}'" in text or input_name in text:
            return "refused at validation"
        return f"UNCLEAR validation error: {text or error}"[:400]
    if got[0] == "run error":
        _, where, text = got
        # named by this node, or by the sampler it feeds (e.g. every term's 'weight' 0: nothing to guide)
        if (f"'{input_name}'" in text) and (node_name in text or where in (node_id, off_id)):
            return "refused at run"
        return f"UNCLEAR run error at node {where}: {text}"[:400]
    _, out, lines = got
    if not torch.isfinite(out.float()).all():
        return "SILENT: non-finite output reported as success"
    if off_id is None:
        return "ran"
    # The unguided twin: the valid prompt with guidance off, carrying the case's value only where it changes
    # unguided sampling too (seed, steps, cfg, …; not a guidance knob, not a term's input).
    knobs = pack_module("nodes.sampler_nodes")
    off = fresh(base if base is not None else prompt)
    guidance_only = set(knobs.GUIDANCE_KNOBS) | set(knobs.MODE_KNOB) | set(knobs.EXPERT_KNOBS)
    if node_id == off_id and input_name not in guidance_only and input_name in prompt[node_id]["inputs"]:
        off[off_id]["inputs"][input_name] = prompt[node_id]["inputs"][input_name]
    off[off_id]["inputs"]["forward_strength"] = 0.0
    off[off_id]["inputs"]["backward_steps"] = 0
    key = repr(sorted((k, repr(sorted(v["inputs"].items()))) for k, v in off.items()))
    if key not in unguided_cache:
        ref = execute(host, off)
        unguided_cache[key] = ref[1] if ref[0] == "ok" else None
    unguided = unguided_cache[key]
    if unguided is None:
        return "refused at run (only the unguided variant ran)"  # pragma: no cover - not seen
    if unguided.shape != out.shape or (unguided - out).abs().max() > 1e-6:
        return "ran, guided"
    if any(s in line for line in lines for s in SAID_UNGUIDED):
        return "ran, said so"
    asked_off = input_name in ("forward_strength",) and prompt[node_id]["inputs"].get(input_name) == 0
    if asked_off:
        return "ran, guidance off as asked (forward_strength 0)"
    return "SILENT: same as unguided, nothing said: " + " / ".join(lines[-3:])[:300]


def node_classes():
    mappings = pack_module().NODE_CLASS_MAPPINGS
    return sorted(mappings)


@pytest.fixture(scope="module")
def table():
    rows = []
    yield rows
    from conftest import ROOT
    host_name = "current" if os.environ.get("COMFYUI_PATH") else "2024-03"
    out = os.path.join(ROOT, "out", "test-reports")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"fuzz-{host_name}.md"), "w") as f:
        f.write("| node | input | bad value | outcome | seconds |\n|---|---|---|---|---|\n")
        for row in rows:
            f.write("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |\n")
        counts = {}
        for row in rows:
            kind = row[3].split(":")[0].split(" (")[0]
            counts[kind] = counts.get(kind, 0) + 1
        f.write(f"\n{len(rows)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + "\n")


@pytest.mark.parametrize("class_type", [
    "UniversalGuidanceKSampler", "UniversalGuidanceSampler", "UniversalGuidanceSamplerOptions",
    "UniversalGuidanceRunReport", "UniversalGuidanceImage",
    "UniversalGuidanceCLIPText", "UniversalGuidanceStyle", "UniversalGuidanceSegmentation",
    "UniversalGuidanceFace", "UniversalGuidanceDetection", "UniversalGuidanceSGMove", "UniversalGuidanceSGResize",
    "UniversalGuidanceSGKeepLayout", "UniversalGuidanceSGKeepAppearance", "UniversalGuidanceSGAppearanceTransfer",
    "UniversalGuidanceAttentionMap"])
def test_every_bad_widget_value_is_refused_or_handled(fuzz_host, nets, table, class_type):
    host = fuzz_host
    cls = host.node_types[class_type]
    validation = pack_module("nodes.validation")
    specs = validation.widget_specs(cls.INPUT_TYPES())
    if class_type == "UniversalGuidanceFace" and not have_facenet():
        pytest.skip("facenet-pytorch not installed (make venv installs it --no-deps)")
    if not specs:
        table.append((cls.NAME, "—", "—", "no widget inputs", "0"))
        return
    prompt, node_id, off_id = base_prompt(class_type, nets)
    assert prompt is not None, f"no base prompt for {class_type}: add one to base_prompt()"
    unguided = {}
    baseline = classify(host, prompt, node_id, cls.NAME, "-", off_id, unguided)
    assert baseline in ("ran, guided", "ran"), f"the valid base prompt of {class_type} does not run guided: {baseline}"
    silent = []
    required = cls.INPUT_TYPES().get("required", {})
    for name, (kind, _) in specs.items():
        for label, value in bad_values(name, kind):
            case = fresh(prompt)
            case[node_id]["inputs"][name] = value
            started = time.perf_counter()
            if name in required and as_converted(kind, value) == prompt[node_id]["inputs"].get(name, object()):
                # ComfyUI's own conversion (int(), float()) makes it the valid prompt: it runs as that one did
                outcome = f"ran as the valid prompt ({as_converted(kind, value)!r} after ComfyUI's conversion)"
            else:
                outcome = classify(host, case, node_id, cls.NAME, name, off_id, unguided, base=prompt)
            table.append((cls.NAME, name, label, outcome, f"{time.perf_counter() - started:.2f}"))
            if outcome.startswith(("SILENT", "UNCLEAR")):
                silent.append((name, label, outcome))
    assert not silent, "\n".join(map(str, silent))
