# GIE Studio: `make demo` and `make test` set everything up themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?=
OUT ?= out
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint format lab conformance bench clean extension chromium gpu-check \
	gpu-rehearse gpu-wheels

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# The JupyterLab extension: node deps (npm ci) when the lock changes, a build (tsc +
# jupyter-builder into studio/labextension) when its sources change, and a symlink into the
# venv's labextensions folder (a copy, as pip install -e makes, would hide later rebuilds).
EXT_DEPS := extension/node_modules/.package-lock.json
EXT_BUILT := studio/labextension/package.json
EXT_SOURCES := extension/package.json extension/tsconfig.json $(wildcard extension/src/*.ts extension/style/*)
EXT_LINK := $(VENV)/share/jupyter/labextensions/gie-studio

$(EXT_DEPS): extension/package.json extension/package-lock.json
	cd extension && export npm_config_registry="$$(npm config get registry)" && \
	  npm ci --no-audit --no-fund
	@touch $@

$(EXT_BUILT): $(EXT_DEPS) $(EXT_SOURCES) | $(STAMP)
	cd extension && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" npm run build
	@touch $@

extension: $(EXT_BUILT)
	@if [ ! -L $(EXT_LINK) ]; then mkdir -p $(dir $(EXT_LINK)) && rm -rf $(EXT_LINK) && \
	  ln -s $(CURDIR)/studio/labextension $(EXT_LINK); fi

setup: $(STAMP) extension

demo: setup
	@model="$(MODEL)"; if [ -z "$$model" ]; then model=$$($(PY) -m engine.examples resnet50); fi; \
	backend=$$($(PY) -c 'from engine.backends.cuda.setup import auto_backend; print(auto_backend())'); \
	echo "== backend: $$backend (cuda when CuPy sees a GPU)"; \
	echo "== gie inspect $$model"; $(VENV)/bin/gie inspect "$$model" && \
	echo "== gie run $$model" && $(VENV)/bin/gie run "$$model" --warmup 1 --iterations 5 && \
	echo "== gie optimize $$model -O3" && mkdir -p $(OUT) && \
	$(VENV)/bin/gie optimize "$$model" -O3 -o $(OUT)/optimized.onnx --json $(OUT)/steps.json && \
	echo "== gie build $$model" && \
	$(VENV)/bin/gie build "$$model" -o $(OUT)/model.gie --timing-cache $(OUT)/timing_cache.json \
	  --backend $$backend && \
	echo "== gie profile $(OUT)/model.gie" && $(VENV)/bin/gie profile $(OUT)/model.gie && \
	echo "== gie compare $$model $(OUT)/model.gie" && $(VENV)/bin/gie compare "$$model" $(OUT)/model.gie && \
	if [ -z "$(MODEL)" ]; then \
	  $(PY) -m engine.examples resnet50 --calib-npz $(OUT)/calib.npz >/dev/null && \
	  echo "== gie build $$model --int8 --fp16 --calib $(OUT)/calib.npz" && \
	  $(VENV)/bin/gie build "$$model" --int8 --fp16 --calib $(OUT)/calib.npz \
	    --calib-cache $(OUT)/calibration.json -o $(OUT)/model_int8.gie \
	    --timing-cache $(OUT)/timing_cache.json --backend $$backend && \
	  echo "== gie compare $$model $(OUT)/model_int8.gie" && \
	  $(VENV)/bin/gie compare "$$model" $(OUT)/model_int8.gie --min-cosine 0.99 && \
	  echo "== gie export-qdq $(OUT)/model_int8.gie" && \
	  $(VENV)/bin/gie export-qdq $(OUT)/model_int8.gie -o $(OUT)/model_int8_qdq.onnx; \
	fi && \
	echo "== python -m studio $$model --out $(OUT)/studio (session: engine, recipe, QDQ, report)" && \
	$(PY) -m studio "$$model" --out $(OUT)/studio --fp16 && \
	echo "wrote $(OUT)/: optimized.onnx, steps.json, model.gie, timing_cache.json$(if $(MODEL),, (+ int8 engine, calibration cache, QDQ model)) and $(OUT)/studio/ (engine, recipe, QDQ model, report.html: open it offline, or: make lab)"

# The browser tests (tests/e2e) drive Debian's chromium; install it when missing and we are
# root, else they skip with the reason. Never `playwright install` (no downloaded browsers).
chromium:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== apt-get install -y chromium (for the browser tests)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null || \
	  { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null; } || \
	  echo "chromium could not be installed: the browser tests will skip"; \
	else echo "chromium is missing and we are not root: the browser tests will skip"; fi

test: setup chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --nbmake tests notebooks

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser notebooks/

conformance: setup
	$(PY) -m engine.conformance --json $(OUT)/conformance.json

bench: setup
	$(PY) bench/cpu_vs_onnxruntime.py

# The CUDA checks for an H100/H200 (engine/backends/cuda/gpu_check.py): results JSON in $OUT
# (or out/gpu-check); without a GPU it writes {"gpu": null, "reason": ...} and succeeds.
gpu-check:
	sh scripts/gpu-check.sh

# The engine sections of gpu-check on the CPU shim at toy sizes: the script runs end to end.
gpu-rehearse: setup
	$(PY) -m engine.backends.cuda.gpu_check --rehearse --out out/gpu-rehearsal

# Wheels a GPU machine lacks (Python 3.12 there), carried in .whl/ (git-ignored).
gpu-wheels: setup
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_17_x86_64 --platform any -d .whl \
		"onnx-ir==$$($(PY) -c 'import onnx_ir; print(onnx_ir.__version__)')"

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache studio/labextension extension/node_modules extension/lib
