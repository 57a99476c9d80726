"""Benchmarks of the Universal Guidance pack (speed: ``benchmarks.speed``; quality: ``benchmarks.digits``)."""
