# panal: `make demo` and `make test` do all set-up on a fresh clone (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 4

.PHONY: install demo test lint unit bench clean system-deps gpu-check test-under-load

$(STAMP): pyproject.toml constraints/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt -e '.[agent,bench,dev,gpu,postgres,uvloop]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m agent demo

lint: install
	$(VENV)/bin/ruff check agent hub jobs security tests panal_launch.py .ci
	$(VENV)/bin/mypy

# The system packages some tests drive (Avahi, D-Bus, Chromium): installed when root with apt-get,
# else those tests skip with the reason (and fail under CI).
system-deps:
	bash .ci/system-deps

test: lint system-deps
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --durations=15

# `make test` three times in a row beside two CPU-bound processes: the suite must hold on a busy machine.
# Prints each run's wall time and fails if any run failed; the busy loops are killed however it ends.
test-under-load:
	@stop() { kill $$busy1 $$busy2 2>/dev/null; }; trap stop EXIT; trap 'exit 130' INT TERM HUP PIPE; \
	$(PYTHON) -c 'while True: pass' & busy1=$$!; \
	$(PYTHON) -c 'while True: pass' & busy2=$$!; \
	failed=0; \
	for run in 1 2 3; do \
		start=$$(date +%s); \
		if $(MAKE) --no-print-directory test; then result=passed; else result=FAILED; failed=1; fi; \
		echo "test-under-load: run $$run $$result in $$(( $$(date +%s) - start )) s"; \
	done; \
	exit $$failed

unit: install
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -m "not slow"

bench: install
	$(PY) -m agent bench dispatch --agents 50 --tasks 10000

# On a machine with a CUDA GPU (and a CUDA build of torch in the venv): the tests marked gpu,
# `panal agent info`, `panal bench device`, one report in $$OUT or artifacts/gpu-check. A few minutes.
gpu-check: install
	$(PY) .ci/gpu_check.py

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache *.egg-info
