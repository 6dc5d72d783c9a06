# make demo : create .venv if missing, install, run the demo (writes demo-output/; ~11 min on 2 CPU cores)
# make test : create .venv if missing, install with dev extras, run ruff and pytest
# make demo-quick : the demo in under 3 minutes; make bench / bench-quick : benchmarks into docs/benchmarks.md
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test test-slow lint bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cerberus demo

demo-quick: $(STAMP)
	$(VENV)/bin/cerberus demo --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs

test: lint
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow || [ $$? -eq 5 ]

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
