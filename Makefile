# Fresh-machine entry points: `make demo` (a real training run) and `make test`.
# Every target creates or refreshes .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU machines get the CPU wheel of torch (an unpinned torch pulls the multi-GB CUDA build).
# On a CUDA machine your own torch (>= 2.6) is kept; override with TORCH_SPEC=... if you like.
TORCH_SPEC ?= $(shell (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1) && echo "torch>=2.6" || echo "torch==2.13.0")
PIP_TORCH_ARGS ?=
RUN_NAME ?= quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test lint bench mainrun clean browser gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[data,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnlab train configs/quickstart.yaml name=$(RUN_NAME)
	$(BIN)/attnlab eval runs/$(RUN_NAME)
	$(BIN)/attnlab sample runs/$(RUN_NAME) --prompt "def " --max-new-tokens 300 --temperature 0.7 --top-k 40 --seed 0

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -n 2 --durations=15

# Style and types: ruff (lint + format, settings in pyproject.toml) and mypy on the attention package and config.
lint: $(STAMP)
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples
	$(BIN)/mypy

# The report test opens a page in headless Chromium (Debian's package). Install it where we may
# (root + apt); elsewhere that one test skips and says why.
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) >/dev/null 2>&1; } || \
	  echo "note: no Chromium (install chromium-headless-shell); the browser test will skip"

bench: $(STAMP)
	$(BIN)/attnlab bench train configs/mainrun.yaml --out benchmarks/train-mainrun-cpu

mainrun: $(STAMP)
	$(BIN)/attnlab train configs/mainrun.yaml

# On a CUDA machine: install attnlab next to the machine's own torch (never replacing it; only the
# missing pure-Python packages, and none without a network), then prove every GPU path and record
# the numbers in benchmarks/gpu-<device>/ (about 9 minutes on one H200; see docs/gpu.md).
# DRY=1: the same stages on CPU with tiny sizes, in .venv. GPU_CHECK_ARGS: more flags (--stages, --cap, ...).
# GPU_WHEELS=DIR: install the missing packages from a folder of wheels (machines without a network).
GPU_PYTHON ?= python3
GPU_WHEELS ?=
GPU_INSTALL_REPORT := .gpu-check-install.json
ifdef DRY
gpu-check: $(STAMP)
	$(BIN)/attnlab gpu-check --dry-run $(GPU_CHECK_ARGS)
else
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) -m attnlab.deps --report $(GPU_INSTALL_REPORT) $(if $(GPU_WHEELS),--wheels $(GPU_WHEELS))
	PYTHONPATH=src $(GPU_PYTHON) -m attnlab gpu-check --install-report $(GPU_INSTALL_REPORT) $(GPU_CHECK_ARGS)
endif

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
