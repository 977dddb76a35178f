# Two entry points a new user needs: `make run` (the demo: a CA, agents and proxies on
# loopback) and `make test`. Both create .venv on first use; `run` installs meshca and
# its dependencies alone, `test` adds the developer tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test check lint typecheck protos system-deps clean

$(BIN)/python:
	@echo "creating the virtualenv $(VENV) ($(PYTHON) -m venv)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The package alone: what `make run` needs. pip shows each package it fetches.
$(BIN)/.installed-package: pyproject.toml | $(BIN)/python
	@echo "installing meshca and its dependencies into $(VENV) (once; a minute or two)"
	$(BIN)/pip install --progress-bar on -e .
	touch $@

# The package and the developer tools (pytest, mypy, ruff...): what `make test` needs.
$(BIN)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(BIN)/.installed-package

# Debian packages the tests use as real peers: openssl (independent verifier), SoftHSM2
# (the PKCS#11 backend), curl, and nginx (fed by the agent's file sink). Installed only
# when missing.
system-deps:
	@missing=""; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

run: $(BIN)/.installed-package
	$(BIN)/meshca demo

lint: $(BIN)/.installed
	$(BIN)/ruff check meshca tests bench
	$(BIN)/ruff format --check meshca tests bench

typecheck: $(BIN)/.installed
	$(BIN)/mypy meshca

test: $(BIN)/.installed system-deps lint typecheck
	$(BIN)/pytest -q

protos: $(BIN)/.installed
	scripts/gen-protos.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
