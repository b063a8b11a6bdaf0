# Every target that runs project code first brings .venv up to date;
# bootstrap.sh returns at once when nothing changed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: venv test demo test-reliability bench

venv:
	VENV=$(abspath $(VENV)) bash scripts/bootstrap.sh

test: venv
	$(PYTEST) -q --durations=30 tests

# The whole system once: export the model, start tritonserver + the search service, index sample photos,
# search with captions, caption a photo, stop everything. Quick run: make demo DEMO_ARGS="--model coca-tiny"
DEMO_ARGS ?=
demo: venv
	$(VENV)/bin/coca demo $(DEMO_ARGS)

# The full reliability suite: every test marked `long`, in every file (crash safety, Triton faults, decoder
# cache hygiene, fuzzing, load, Milvus killed and back, replicas started together, a Triton endpoint killed or
# hung under load, Ray bulk ingest through the service, reindex killed mid-way, the captioner variants).
# make test runs everything else (-m 'not long', pyproject.toml), including the quick variants of these, so
# nothing here runs twice. Figures: a table at the end, and JSON in $(RELIABILITY_REPORT).
RELIABILITY_REPORT ?= reliability-report.json
test-reliability: venv
	COCA_RELIABILITY_REPORT=$(abspath $(RELIABILITY_REPORT)) $(PYTEST) -q --durations=30 -m long tests

# One benchmark: make bench BENCH="caption --model coca-tiny" (names: python -m bench, or coca bench --help).
BENCH ?= caption --model coca-tiny --pretrained random
bench: venv
	$(PY) -m bench $(BENCH)
