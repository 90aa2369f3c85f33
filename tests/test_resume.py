"""Exact resume of SVPR-ReID after SIGTERM at a fixed batch (``SVPR_TEST_INTERRUPT``, sent by the process to
itself), without loader workers: the final weights equal the uninterrupted run's bit for bit. CLIP-ReID, both of
its stages, loader workers and many interruptions at random moments: ``tests/test_faults.py``'s kill soak."""
import os

import pytest

from datasets.synthetic import SynthConfig, generate_synthag
from tests.fixtures import SVPR, assert_bit_identical, check_ok, final_weights, run_script, temporaries, tiny
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ENV = "SVPR_TEST_INTERRUPT"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=0), num_workers=1)
    return root


def train(config, overrides, resume=False, interrupt=None):
    env = {"OMP_NUM_THREADS": "1", ENV: interrupt or ""}
    return run_script(["train_svpr.py", "--config_file", config, *(["--resume"] if resume else []), *overrides],
                      env=env)


def test_sigterm_mid_epoch_without_workers_resumes_bit_identically(synth_root, tmp_path):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    check_ok(train(SVPR, tiny(synth_root, straight, 3, workers=0)))
    killed = train(SVPR, tiny(synth_root, interrupted, 3, workers=0), interrupt="stage2:epoch=2:iter=3:signal=SIGTERM")
    assert killed.returncode == 143, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert "interrupted in epoch 2" in killed.stdout and "Traceback" not in killed.stderr
    assert load_checkpoint(os.path.join(interrupted, "checkpoint_last.pth"))["epoch"] == 1
    assert not os.path.exists(os.path.join(interrupted, "model_final.pth"))
    check_ok(train(SVPR, tiny(synth_root, interrupted, 3, workers=0), resume=True))
    assert_bit_identical(final_weights(straight), final_weights(interrupted))
    assert not temporaries(interrupted), temporaries(interrupted)
