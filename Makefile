# panal: `make demo` and `make test` do all set-up on a fresh clone (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 4

.PHONY: install demo test lint unit bench clean

$(STAMP): pyproject.toml constraints/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt -e '.[agent,bench,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m agent demo

lint: install
	$(VENV)/bin/ruff check agent hub jobs security tests
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --durations=15

unit: install
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -m "not slow"

bench: install
	$(PY) -m agent bench dispatch --agents 50 --tasks 20000

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache *.egg-info
