"""Run ComfyUI headless — the real executor and node registry, no web server — for tests and the CLI runner."""
