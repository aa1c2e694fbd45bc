# Two entry points: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs browser-deps bench-overhead bench-attribution bench-ledger bench-routing bench-fuzz bench-soak bench-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/joulegate demo

test: $(STAMP) browser-deps
	$(BIN)/ruff check proxy policies tests bench
	$(BIN)/mypy proxy policies
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check proxy policies tests bench
	$(BIN)/mypy proxy policies

# docs/config.md is generated from the config's JSON Schema; tests/test_docs.py fails when stale.
docs: $(STAMP)
	$(BIN)/python -m proxy.config_doc > docs/config.md

# The dashboard's browser test drives Debian's chromium through chromium-driver. Without apt
# (and no chromium) the test skips, except under CI=true, where it fails.
browser-deps:
	command -v chromium >/dev/null && test -x /usr/bin/chromedriver || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# Benchmarks need wrk (Debian package) on top of the venv.
bench-deps: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

bench-overhead: bench-deps
	$(BIN)/python -m bench.overhead

bench-attribution: $(STAMP)
	$(BIN)/python -m bench.attribution

bench-ledger: bench-deps
	$(BIN)/python -m bench.ledger

bench-routing: $(STAMP)
	$(BIN)/python -m bench.routing

bench-fuzz: $(STAMP)
	$(BIN)/python -m bench.fuzz --cases 5000

# 5 min warm-up + 10 min at c=64; run it on a quiet machine.
bench-soak: $(STAMP)
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info
