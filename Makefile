# Two entry points, both self-contained on a fresh machine:
#   make demo   -- the main job (train a small GPT-2, convert to AgencyGPT2, prune, compare, reload, generate)
#   make test   -- the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever pyproject.toml changes. torch is pinned first so the CPU wheel is used.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,bench]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/agency_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
