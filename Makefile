# make quickstart: create .venv if missing, then train/sample/evaluate the digits DDT.
# make test: create .venv if missing, then run the test suite (what .ci/run calls).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: quickstart test test-fast venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip check
	touch $@

venv: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) launch.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"
