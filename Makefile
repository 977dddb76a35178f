# Two entry points a new user needs: `make run` (start the CA) and `make test`.
# Both create .venv and install meshca with its dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STATE_DIR ?= .meshca

.PHONY: run test check lint typecheck protos system-deps clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

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

run: $(BIN)/.installed
	$(BIN)/meshca server --state-dir $(STATE_DIR) \
	  --grpc-listen 127.0.0.1:15012 --grpc-mtls-listen 127.0.0.1:15013 \
	  --http-listen 127.0.0.1:15014

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
