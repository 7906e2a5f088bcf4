# Two commands do all the set-up on a fresh machine:
#   make demo   index the bundled sample corpus into the embedded default store and search it
#   make test   lint and run every test (what CI runs)
PYTHON ?= python3
# Users choose their torch build by installing it first; only a machine without torch gets this one.
TORCH ?= torch==2.13.0
# BAAI/bge-m3 by default; a local checkpoint folder; or "random" for a small random checkpoint of
# the same layout (no download: the pipeline runs the same, the rankings mean nothing).
MODEL ?= BAAI/bge-m3

.PHONY: install install-test demo test lint

install:  ## the library with every store adapter
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[all]"

install-test: install  ## + pytest, ruff, Ray
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) -m m3connect demo --model "$(MODEL)"

lint: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint
	$(PYTHON) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the test suite did not load"; fi; \
	  exit $$rc
	bash integrations/run_tests.sh
