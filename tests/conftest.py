import os
import random

import pytest
import torch

# Triton picks its interpreter when it defines kernels, so this must precede any import of
# fastavg._triton: without a GPU, the Triton kernels then run (and are tested) on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # tests/test_fuzz.py's profiles: `pytest --hypothesis-profile=thorough` runs 10,000 examples.
    from hypothesis import HealthCheck, settings

    _fuzz = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=200, derandomize=True, **_fuzz)
    settings.register_profile("thorough", max_examples=10_000, **_fuzz)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield
