# make demo : create .venv if missing, install, run the demo
# make test : create .venv if missing, install with dev extras, run ruff and pytest
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cerberus demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs

test: lint
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow || [ $$? -eq 5 ]

bench: $(STAMP)
	$(PY) benchmarks/model_speed.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
