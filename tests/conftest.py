import copy
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
import pytest
from dspy.dsp.utils.settings import DEFAULT_CONFIG
from helpers import calibrated_model, refine, world

from markovscale_dspy import MarkovCalibrator

# A script the tracing tests run in processes of their own (it parses its command line on import).
collect_ignore = ["tracing_session.py"]


@pytest.fixture(autouse=True)
def private_trace_store(tmp_path, monkeypatch):
    """Each test gets its own calibration trace store, so no test reuses another's chains."""
    monkeypatch.setenv("MARKOVSCALE_TRACE_DIR", str(tmp_path / "traces"))


@pytest.fixture(autouse=True)
def clean_dspy_settings():
    """Every test starts from DSPy's defaults with an in-memory cache only (as DSPy's own suite does)."""
    original_cache = dspy.cache
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    yield
    dspy.configure(**copy.deepcopy(DEFAULT_CONFIG))
    dspy.cache = original_cache


@pytest.fixture(scope="session")
def hetero_model(tmp_path_factory):
    """A model calibrated on 400 questions of the heterogeneous preset (several question types), shared read-only
    by the belief-policy, select='best' and budget tests. Session-scoped fixtures are set up before the autouse
    ones above, so it gets its own trace directory explicitly."""
    from benchmarks.worlds import preset_world

    return calibrated_model(
        preset_world("heterogeneous", 400, seed=10), rounds=5, trace_dir=tmp_path_factory.mktemp("hetero-traces")
    )


@pytest.fixture
def calibrated():
    """A program calibrated on 60 simulated questions and its calibration report (fresh for every test: some tests
    edit the report)."""
    w = world(60)
    calibrator = MarkovCalibrator(w.metric, rounds=3, num_threads=1)
    with dspy.context(lm=w.lm()):
        program = calibrator.compile(refine(), trainset=w.examples)
    return program, calibrator.report


def pytest_collection_modifyitems(config, items):
    """Under ``-n 2`` (``make test``), keep each file on one worker so its module fixtures are built once, the files
    that share the session's ``hetero_model`` on one worker too (it takes seconds to calibrate), and every test that
    starts llama.cpp on the same worker: two servers at once would fight over the two cores."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    shared = {item.nodeid.split("::")[0] for item in items if "hetero_model" in getattr(item, "fixturenames", ())}
    for item in items:
        path = item.nodeid.split("::")[0]
        if item.get_closest_marker("llm"):
            group = "llm"
        else:
            group = "hetero_model" if path in shared else path
        item.add_marker(pytest.mark.xdist_group(group))
