import os
import random

import pytest
import torch

# Triton picks its interpreter when it defines kernels, so this must precede any import of
# fastavg._triton: without a GPU, the Triton kernels then run (and are tested) on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield
