"""``python -m benchmarks.speed``: the cost of one guided iteration at a small size (``benchmarks.speed.iteration``)."""
import sys

from benchmarks.speed.iteration import main

sys.exit(main())
