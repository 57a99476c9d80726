"""Speed benchmarks: what a Universal Guidance iteration costs inside a real ComfyUI, and where the time goes.

Two commands (``make bench-speed`` runs both; ``make bench-gpu`` the second on a CUDA GPU):

* ``python -m benchmarks.speed``: one guided iteration at a small size (default 64² pixels) against a plain step,
  split into its parts (``iteration``; writes ``speed.json``);
* ``python -m benchmarks.speed_modes``: every guided mode at 512² (Jacobian × decoder × CFG branch,
  ``low_memory``), peak memory in child processes under a watchdog, FLOPs, whole images (``orchestrate``; writes
  ``speed_512[_cuda].json`` and ``.png``).

The modules, by job:

* ``tools``: clocks synchronised with the device, peak memory, load average, machine and host description;
* ``terms``: the guidance terms a run can time, by name;
* ``harness``: ``HostBench``, the pack's sampler run and timed per iteration inside a booted ComfyUI, and the probe
  that times the parts of an iteration with the sampler's own tensors;
* ``iteration``: the small-size benchmark (``SpeedBench``), its table and command line;
* ``modes``: the guided modes by name and the parts each is the sum of;
* ``measure``: ``ModeBench``, every mode and part timed in interleaved rounds, and whole images;
* ``children``: the memory and timing child processes;
* ``orchestrate``: the parent: children under the memory watchdog, the result file, the command line;
* ``summary``: medians, overhead ratios, speedups, memory cuts, FLOPs and targets from the raw samples;
* ``report``: the printed table and the chart.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # the pack's ``headless`` package, when a module is run from elsewhere
    sys.path.insert(0, _ROOT)
