from hypothesis import settings, HealthCheck, Phase
from hypothesis.stateful import run_state_machine_as_test
from tests.reliability import test_store_model as m
import os

def test_tmp_milvus(request):
    uri = request.getfixturevalue("milvus_server").uri
    t = m.Totals()
    mach = m.make_machine("milvus:HNSW", t, uri)
    run_state_machine_as_test(mach, settings=settings(max_examples=int(os.environ.get("EX", 6)), stateful_step_count=40, deadline=None,
        database=None, derandomize=True, suppress_health_check=list(HealthCheck), phases=[Phase.generate],
        report_multiple_bugs=False))
    print(vars(t))
