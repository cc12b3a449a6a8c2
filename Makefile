# make run: the default comparison; make test: the test suite. Both create .venv on first use.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m bench run

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
