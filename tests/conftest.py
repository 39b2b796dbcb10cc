import copy
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
import pytest
from dspy.dsp.utils.settings import DEFAULT_CONFIG


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
