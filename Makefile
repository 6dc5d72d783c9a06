# make demo : create .venv if missing, install, run the demo (writes demo-output/; ~11 min on 2 CPU cores)
# make test : create .venv if missing, install with dev extras, run ruff and pytest
# make demo-quick : the demo in under 3 minutes; make bench / bench-quick : benchmarks into docs/benchmarks.md
# make browser : Debian's chromium and chromium-driver (as root) for the viewer's browser test; make test-slow uses it
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test test-slow lint bench bench-quick browser clean

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
	$(VENV)/bin/pytest -q --durations=15

test-slow: $(STAMP) browser
	$(VENV)/bin/pytest -q -m slow || [ $$? -eq 5 ]

# headless Chromium for tests/test_view_browser.py (it skips without it); where the system is not Debian/Ubuntu or
# you are not root, this says so and the slow tests still run
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) || \
	  echo "browser: could not install chromium and chromium-driver (needs apt-get as root): the browser test will skip"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
