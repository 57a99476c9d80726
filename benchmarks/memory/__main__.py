"""``python -m benchmarks.memory``: the GPU memory of one image-guided iteration per model family (``cli``)."""
import sys

from benchmarks.memory.cli import main

sys.exit(main())
