# Every target sets up the virtualenv it needs; a fresh machine needs only Python 3.11+,
# make and git.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Every version installed here, in CI and in the image (runtime, dev tools, the build
# backend, pip itself); `make lock` regenerates it from pyproject.toml.
CONSTRAINTS := constraints.txt
PIP_PINNED := --constraint $(CONSTRAINTS) --build-constraint $(CONSTRAINTS)
UV_VERSION := 0.13.9

.PHONY: run test check fmt lint typecheck bench soak openapi lock clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) pip
	$(BIN)/python -m pip install --quiet $(PIP_PINNED) -e '.[server,dev]'
	@touch $(STAMP)

## run: start the service (embedded memory:// store and stub services unless set otherwise)
run: $(STAMP)
	AUTHSESSION_REDIS_ADDR="$${AUTHSESSION_REDIS_ADDR:-memory://}" $(BIN)/authsession

## test: the whole test suite (starts its own redis-server processes)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

## check: format, lint, strict typing, then the tests
check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy authsession
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

## soak: the long-running variants (e.g. a 30 s slowloris at the default timeouts)
soak: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m soak

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

openapi: $(STAMP)
	$(BIN)/python -m authsession.http.openapi openapi

## lock: re-pin constraints.txt to the newest versions pyproject.toml allows (then commit it)
lock:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv==$(UV_VERSION)'
	$(BIN)/python -c 'import tomllib; print("\n".join(["pip", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]]))' > $(VENV)/lock-extra.in
	$(BIN)/uv pip compile --quiet --universal --python-version 3.11 \
	  --extra server --extra dev --custom-compile-command 'make lock' \
	  --output-file $(CONSTRAINTS) pyproject.toml $(VENV)/lock-extra.in

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/timing.py
	$(BIN)/python bench/projection.py
	$(BIN)/python bench/gateway_bench.py
	$(BIN)/python bench/workers.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
