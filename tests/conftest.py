"""pytest fixtures shared by the test modules (their plain helpers are in ``tests/fixtures.py``)."""
import pytest
import torch



@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny tensors gain nothing from two, and waiting for a busy core does cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
