# Two commands on a fresh machine: `make demo` and `make test` (`make lint` checks the style).
# Set-up: a .venv with CPU torch when no CUDA is present (torch==2.13.0, served locally here),
# then aimkit itself in editable mode with its dev extras. Existing torch is never upgraded.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test test-all lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==$(TORCH_VERSION); fi
	@touch $@

$(VENV)/.aimkit: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(VENV)/.aimkit

demo: setup
	$(BIN)/aimkit generate --model aim-tiny-shapes --num 16 --captions --out demo.png

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -p no:cacheprovider

test-all: setup
	$(BIN)/python -m pytest -p no:cacheprovider

# the rule set is pinned in pyproject.toml ([tool.ruff.lint]); CI (.ci/run) runs this and `make test`
lint: setup
	$(BIN)/ruff check aimkit tests recipes benchmarks scripts

clean:
	rm -rf $(VENV) build dist *.egg-info
