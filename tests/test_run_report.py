"""The run report picture (nodes/run_report.py) at the size the example workflows preview it: text large enough
to read, the term labels clear of the plots, more than two y ticks, a legend for the shaded window."""
from __future__ import annotations

import importlib.util
import os

from conftest import ROOT

spec = importlib.util.spec_from_file_location("ug_run_report", os.path.join(ROOT, "nodes", "run_report.py"))
run_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_report)


def trace(steps=10, repeats=2):
    return [{"step": i, "repeat": r, "phase": "forward", "terms": {"move:dog": 3.0 - 0.2 * i, "clip": 0.5 + i}}
            for i in range(steps) for r in range(repeats)]


def test_report_text_is_readable_at_the_preview_size():
    layout = {}
    image = run_report.render(trace(), ["UG KSampler run: " + "a long summary line " * 8], steps=10,
                              window=(0.0, 0.8), repeats=2, term_windows={"move:dog": (0.0, 0.6)}, layout=layout)
    assert image.shape[2] == run_report.WIDTH
    scale = run_report.PREVIEW_WIDTH / run_report.WIDTH
    assert min(layout["fonts"]) * scale >= 12, layout["fonts"]
    # Each term has its panel; its label sits above the plot, not on the curve.
    assert len(layout["plots"]) == len(layout["labels"]) == 2
    for label, plot in zip(layout["labels"], layout["plots"]):
        assert label[3] <= plot[1] and label[2] <= run_report.WIDTH, (label, plot)
    # The long caption line is wrapped inside the picture: the right margin beside the caption stays white.
    pixels = (image[0] * 255).round()
    caption = pixels[:int(layout["labels"][0][1]), -run_report.PAD + 2:, :]
    assert bool((caption == 255).all())


def test_report_of_a_run_without_guided_steps():
    layout = {}
    image = run_report.render([], ["nothing"], steps=4, layout=layout)
    assert image.shape[0] == 1 and layout["plots"] == []
