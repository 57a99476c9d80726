"""Benchmarks and demo of the Universal Guidance pack (which ``make`` target runs what: ``benchmarks/README.md``):
speed (``benchmarks.speed``, ``benchmarks.speed_modes``), memory (``benchmarks.memory``), FLOPs
(``benchmarks.flops``), quality on 8×8 digits (``benchmarks.digits``), self-guidance on coloured shapes
(``benchmarks.shapes``)."""
