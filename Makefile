# One entry point for people and CI. Everything installs into .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install browser protos run test lint pytest bench demo-assets clean

install: $(STAMP)

# torch first, pinned to the CPU build that lies on this machine's disk, so nothing pulls
# a multi-GB CUDA build; pyproject keeps the open range (torch>=2.4) for real users.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev,ray,mlflow]'
	touch $(STAMP)

# The browser test drives Debian's chromium through Playwright (never `playwright install`);
# the page's modules are also checked under Node.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v node >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium and nodejs for the page's tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium nodejs >/dev/null; }

protos: install
	$(PYTHON) protos/generate.py

demo-assets: install
	$(BIN)/oneseek demo-assets

run: install
	$(BIN)/oneseek up

lint: install
	$(BIN)/ruff check services gateway tests bench
	$(BIN)/ruff format --check services gateway tests bench
	$(BIN)/mypy

pytest: install browser
	$(BIN)/pytest

test: lint pytest

# wrk (Debian) loads the REST routes and their bare baselines alike.
bench: install
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing Debian's wrk for the REST benchmarks"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(PYTHON) bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var
