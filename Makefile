# Every target sets up the virtualenv it needs; a fresh machine needs only Python 3.11+,
# make and git.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test check fmt lint typecheck bench openapi clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
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

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

openapi: $(STAMP)
	$(BIN)/python -m authsession.http.openapi openapi

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/gateway_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
