PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The exact versions of every Python package that `make test` (and so CI) installs: the versions the suite passed
# with. pyproject.toml keeps ranges for users; `make test-latest` tries the newest the ranges admit, and `make
# lock` writes this file again from .venv once the suite passes there.
LOCK := requirements-test.lock
STAMP := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: setup browser redis demo test test-latest lock lint clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/streamllm models pull smollm2-135m

demo: setup
	$(BIN)/streamllm demo

# The chat page's browser tests and the terminal chat's test need Chromium, its driver and tmux, from Debian's
# packages. Where they cannot be installed (no apt, not root) those tests are skipped, each with its reason.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v tmux >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver tmux \
	  || echo "make browser: apt-get failed; the browser and terminal tests will be skipped"; \
	else echo "make browser: cannot install chromium, chromium-driver and tmux here; their tests will be skipped"; fi

# The shared session store's tests start a real redis-server (Debian's package) on a loopback port.
redis:
	@if command -v redis-server >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server \
	  || echo "make redis: apt-get failed; the Redis store tests will be skipped"; \
	else echo "make redis: cannot install redis-server here; the Redis store tests will be skipped"; fi

test: setup browser redis
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q tests

# The suite against the newest versions pyproject.toml admits, in a venv of its own (run it before widening a range).
test-latest: browser redis
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q torch==2.13.0
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE '^(transformers|tokenizers|gguf|accelerate)=='
	$(LATEST)/bin/streamllm models pull smollm2-135m
	$(LATEST)/bin/python -m pytest -q tests

# Write the lock from .venv (after the suite passed there). torch is left out: pyproject.toml pins it.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^torch==' > $(LOCK)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(LATEST) build src/*.egg-info
