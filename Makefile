# Tollbooth: `make run` starts everything on the embedded default; `make test` runs the suite.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Tests use the PostgreSQL and Redis on this machine; override to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/tollbooth
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: install run test lint services browser bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv

$(VENV)/.installed: requirements.lock $(BIN)/python
	$(BIN)/uv pip install --python $(BIN)/python -r requirements.lock
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m devtools.run

services:
	./devtools/start-services.sh

browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

lint: install
	$(BIN)/ruff check .
	$(BIN)/python manage.py makemigrations --check --dry-run

test: install services browser lint
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) CELERY_TASK_ALWAYS_EAGER=1 \
		$(BIN)/python -m pytest -n 2 --dist loadgroup

bench: install services
	$(BIN)/python -m bench.gateway
