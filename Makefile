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

# The full reliability suite: crash safety, Triton faults, decoder cache hygiene, fuzzing, load, security,
# long tests included (make test runs its short part), plus the service tests it relies on for TLS, message
# limits, path confinement and bombs, Ray bulk ingest (its long half: the service embeds), and the scale-out
# faults too slow for CI's budget (Milvus killed and back; a Triton endpoint killed under mixed load).
# Figures: a table at the end, and JSON in $(RELIABILITY_REPORT).
RELIABILITY_REPORT ?= reliability-report.json
SECURITY_TESTS := $(addprefix tests/test_search_service.py::,test_token_tls_and_message_limit \
	test_bad_items_fail_alone test_bad_requests_get_the_right_status test_triton_down_gives_unavailable_then_recovers)
# Only what make test does not already run: long tests, and the quick variants (marker `short`) of long ones
# left out (the long one checks all they do); tests/test_triton.py's long part (the captioner variants) only.
test-reliability: venv
	COCA_RELIABILITY_REPORT=$(abspath $(RELIABILITY_REPORT)) $(PYTEST) -q --durations=30 -m "long or not short" \
		tests/reliability $(SECURITY_TESTS) tests/test_ray_ingest.py::test_bulk_ingest_and_resume \
		tests/test_milvus_store.py::test_milvus_down_gives_unavailable_naming_milvus_then_recovers \
		tests/test_triton_pool.py::test_service_under_mixed_load_loses_no_call_when_an_endpoint_dies_and_takes_it_back \
		tests/test_reindex.py::test_reindex_killed_mid_way_resumes_with_the_same_oracle; \
	status=$$?; $(PYTEST) -q --durations=10 -m long tests/test_triton.py || status=1; exit $$status

# One benchmark: make bench BENCH="caption --model coca-tiny" (names: python -m bench, or coca bench --help).
BENCH ?= caption --model coca-tiny --pretrained random
bench: venv
	$(PY) -m bench $(BENCH)
