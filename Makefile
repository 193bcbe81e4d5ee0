# Set-up and the two main jobs. Everything installs into a local virtual environment.
#   make demo   create .venv, install lowbit, run `lowbit demo`
#   make test   create .venv, install lowbit + test tools, run ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch. Override (e.g. TORCH_SPEC='torch>=2.3') to pick another build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint format install bench-baselines clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml setup.py lowbit/runtime/_lbk.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/lowbit demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-baselines: $(VENV)/.installed
	$(BIN)/python bench/baselines.py

clean:
	rm -rf $(VENV) lowbit-demo .pytest_cache .ruff_cache
