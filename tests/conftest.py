"""pytest fixtures shared by the test modules (their plain helpers are in ``tests/fixtures.py``)."""
import pytest
import torch



@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """A small SynthAG benchmark (16 identities x 12 images of 64 x 32), generated once per test module."""
    from datasets.synthetic import SynthConfig, generate_synthag

    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=0), num_workers=1)
    return root


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny tensors gain nothing from two, and waiting for a busy core does cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
