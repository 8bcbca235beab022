# Two commands for a fresh machine (see README.md):
#   make demo   set up .venv and run the 2-rank training demo with telemetry on
#   make test   set up .venv (+ Debian prometheus/alertmanager when root) and run all tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.otel-ml-installed

.PHONY: setup demo test unit integration lint format bench docs system-deps clean

$(STAMP): pyproject.toml $(wildcard otel_ml/regions/_cregion*) otel_ml/_cdetectors.c
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU torch first: an unpinned torch with no torch installed pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[torch,test,integrations]"
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/otel-ml demo

system-deps:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null; \
	else echo "note: install Debian packages prometheus and prometheus-alertmanager (as root) to run the integration tests"; fi

lint: setup
	$(VENV)/bin/ruff check otel_ml tests benchmarks .ci deploy
	$(VENV)/bin/ruff format --check otel_ml tests benchmarks .ci deploy

format: setup
	$(VENV)/bin/ruff format otel_ml tests benchmarks .ci deploy
	$(VENV)/bin/ruff check --fix otel_ml tests benchmarks .ci deploy

test: setup system-deps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

unit: setup
	$(VENV)/bin/pytest -q -m "not integration"

integration: setup system-deps
	$(VENV)/bin/pytest -q -m integration

bench: setup system-deps
	for b in log span modules progress overhead soak scale; do $(PY) benchmarks/bench_$$b.py || exit 1; done

docs: setup
	$(PY) .ci/update_readme.py

clean:
	rm -rf $(VENV) otel-ml-runs .pytest_cache .ruff_cache *.egg-info
