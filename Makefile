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

# The full reliability suite: crash safety, Triton faults, decoder cache hygiene, fuzzing, load, security,
# long tests included (make test runs its short part). Figures: a table at the end, and JSON in
# $(RELIABILITY_REPORT).
RELIABILITY_REPORT ?= reliability-report.json
test-reliability: venv
	COCA_RELIABILITY_REPORT=$(abspath $(RELIABILITY_REPORT)) $(PYTEST) -q -m "long or not long" tests/reliability

# Placeholder until bench/ has a runner.
bench: venv
	@if [ -f bench/__main__.py ]; then $(PY) -m bench; else echo "bench: no benchmarks yet"; fi
