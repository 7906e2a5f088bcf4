# Two commands do all the set-up on a fresh machine:
#   make demo       index the bundled sample corpus into the embedded default store and search it
#   make test       lint and run every test (what CI runs)
# and, while working on the code:
#   make test-fast  lint and every test but the slow and live ones (under 2 minutes)
#   make test-live  start Qdrant, Milvus and Elasticsearch (docker-compose.yml), run the live tests
PYTHON ?= python3
# Users choose their torch build by installing it first; only a machine without torch gets this one.
TORCH ?= torch==2.13.0
# BAAI/bge-m3 by default; a local checkpoint folder; or "random" for a small random checkpoint of
# the same layout (no download: the pipeline runs the same, the rankings mean nothing).
MODEL ?= BAAI/bge-m3
COMPOSE ?= docker compose
# Installs are done once: a stamp file per extra and Python environment (a new virtualenv gets
# its own), redone when pyproject.toml changes.
STAMPS := .make/$(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])")

.PHONY: install install-dev install-test demo test test-fast test-live lint lint-fast

$(STAMPS)/install: pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[all]"
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/install-dev: $(STAMPS)/install
	$(PYTHON) -m pip install -e ".[dev]"
	@touch $@

$(STAMPS)/install-test: $(STAMPS)/install-dev
	$(PYTHON) -m pip install -e ".[test]"
	@touch $@

install: $(STAMPS)/install  ## the library with every store adapter

install-dev: $(STAMPS)/install-dev  ## + pytest and ruff

install-test: $(STAMPS)/install-test  ## + Ray (the full suite)

demo: install
	$(PYTHON) -m m3connect demo --model "$(MODEL)"

lint-fast: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

lint: install-test lint-fast

# pytest exits 5 when it collected no test: say so (a suite that did not load is not a pass).
PYTEST_NO_TESTS = rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the test suite did not load"; fi; \
	  exit $$rc

test: lint
	$(PYTHON) -m pytest -q --durations=15; $(PYTEST_NO_TESTS)
	bash integrations/run_tests.sh

test-fast: lint-fast
	$(PYTHON) -m pytest -q -m "not slow and not live"; $(PYTEST_NO_TESTS)

test-live: install-test
	$(COMPOSE) up -d --wait
	QDRANT_URL=http://localhost:6333 MILVUS_URI=http://localhost:19530 \
	  ES_URL=http://localhost:9200 $(PYTHON) -m pytest -q -m live -rs; $(PYTEST_NO_TESTS)
	ES_URL=http://localhost:9201 $(PYTHON) -m pytest -q -m live -rs tests/test_store_elasticsearch.py; \
	  $(PYTEST_NO_TESTS)
	@echo "the servers keep running: '$(COMPOSE) down -v' stops them and deletes their data"
