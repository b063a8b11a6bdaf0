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

# The whole system once: export the model, start tritonserver + the search service, index sample photos,
# search with captions, caption a photo, stop everything. Quick run: make demo DEMO_ARGS="--model coca-tiny"
DEMO_ARGS ?=
demo: venv
	$(VENV)/bin/coca demo $(DEMO_ARGS)

# Placeholder: the reliability suite (server restarts, timeouts, load) comes later.
test-reliability: venv
	@echo "test-reliability: no reliability tests yet"

# Placeholder until bench/ has a runner.
bench: venv
	@if [ -f bench/__main__.py ]; then $(PY) -m bench; else echo "bench: no benchmarks yet"; fi
