# Every target that runs project code first brings .venv up to date;
# bootstrap.sh returns at once when nothing changed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: venv test demo test-reliability bench

venv:
	VENV=$(abspath $(VENV)) bash scripts/bootstrap.sh

test: venv
	$(PYTEST) -q tests

# Placeholder until clients/cli.py grows a `demo` command.
demo: venv
	$(VENV)/bin/coca demo

# Placeholder: the reliability suite (server restarts, timeouts, load) comes later.
test-reliability: venv
	@echo "test-reliability: no reliability tests yet"

# Placeholder until bench/ has a runner.
bench: venv
	@if [ -f bench/__main__.py ]; then $(PY) -m bench; else echo "bench: no benchmarks yet"; fi
