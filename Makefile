# Set-up and test commands (README). Each target creates its own virtual environment on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch, pinned: an unpinned torch pulls the newest multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install test
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q
