# make run: the default comparison; make test: the test suite; make lint: ruff; make docs: the site. Each creates .venv on first use.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint docs bench figures clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m bench run

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

docs: $(STAMP)
	$(PY) -m bench.cli.docs --check
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m benchmark tests/benchmarks --benchmark-sort=name

figures: $(STAMP)
	$(PY) -m bench figures

clean-venv:
	rm -rf $(VENV)
