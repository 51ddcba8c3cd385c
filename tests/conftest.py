"""Shared fixtures. Without a GPU, Triton kernels run on CPU tensors through its interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import slug_fast  # noqa: E402

from trained_models import trained_digits  # noqa: E402


def available(backends):
    """pytest params for each backend, skipped with the dispatcher's reason when unavailable."""
    reasons = slug_fast.backends()
    return [pytest.param(b, marks=pytest.mark.skipif(reasons[b] is not None, reason=str(reasons[b])))
            for b in backends]


@pytest.fixture
def gen():
    """A generator with a fresh random seed each run; the seed is printed for replay."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")  # shown when the test fails
    return torch.Generator().manual_seed(seed)


def device_for(backend):
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def digits_trained():
    """(state_dict, data) of the digits mini-CLIP after a short training run, trained once."""
    state, data = trained_digits()
    return {k: v.clone() for k, v in state.items()}, data


@pytest.fixture
def digits_model(digits_trained):
    """A fresh copy of the trained mini-CLIP for each test."""
    from slug_fast import digits

    model = digits.build_model(0)
    model.load_state_dict(digits_trained[0])
    return model.eval()


@pytest.fixture
def gloo_world(tmp_path):
    """A one-process gloo group in this process (torch.distributed's default), destroyed afterwards."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "gloo-store"), 1), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
