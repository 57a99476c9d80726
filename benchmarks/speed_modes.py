"""``python -m benchmarks.speed_modes``: what a guided iteration costs in every mode, at the real size (512²,
``--latent 64``), in the real ComfyUI (``make bench-speed``, second step; ``make bench-gpu``).

    python -m benchmarks.speed_modes --latent 64 --out out/bench            # CPU: speed_512.json, speed_512.png
    python -m benchmarks.speed_modes --latent 64 --device cuda --end-to-end  # GPU: speed_512_cuda.json, .png

The parent process and its options: ``benchmarks/speed/orchestrate.py``; the modes: ``benchmarks/speed/modes.py``;
the timing: ``benchmarks/speed/measure.py``; the result: ``benchmarks/speed/summary.py`` and ``report.py``. The
parent starts its children with this same command (``--child memory|timing``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.speed.orchestrate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
