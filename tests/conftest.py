import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    # Tiny tensors: one thread avoids spin-waiting threads that slow the suite down
    # badly when the machine is busy, and costs little when it is not.
    torch.set_num_threads(1)
    # The GPU tests' tolerances are for full float32: TF32 convolutions/matmuls are off (cuDNN's are on by default).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_threads():
    """A test may set torch's thread count: the next one starts with the suite's again."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pretend_kernels(monkeypatch):
    """Route every custom op through its torch.library op, as on a GPU (whose CPU twin then runs)."""
    from torch_utils.ops import _build
    monkeypatch.delenv('NEXT3D_OPS_REF', raising=False)
    monkeypatch.setattr(_build, 'want_kernel', lambda op, impl, *tensors: impl != 'ref')
    monkeypatch.setattr(_build, 'kernel_available', lambda name, sources, device=None: True)
