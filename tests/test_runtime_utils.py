"""Runtime utilities: atomic checkpoints, safe loading, device fallback, RNG state round trip."""
import logging
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.device import resolve_device
from utils.errors import CheckpointError
from utils.seed import get_rng_state, set_rng_state


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ckpt.pth"
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "best": 0.5, "config": "A: 1\n"}
    save_checkpoint(state, str(path))
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []


def test_crash_mid_write_keeps_old_checkpoint(tmp_path):
    """A process killed while writing leaves the previous checkpoint intact and readable."""
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, str(path))
    script = textwrap.dedent(f"""
        import os, torch
        import utils.checkpoint as ck
        real_save = torch.save
        def dying_save(obj, handle):
            real_save(obj, handle)
            handle.flush()
            os._exit(9)  # simulated crash after writing data, before the rename
        ck.torch.save = dying_save
        ck.save_checkpoint({{"epoch": 2, "w": torch.zeros(1000)}}, {str(path)!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert result.returncode == 9
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))


class _Custom:
    """A class that a weights_only load must refuse to construct."""


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": _Custom()}, str(path))
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(str(path))


def test_load_missing_and_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(str(garbage))


def test_device_fallback_to_cpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_device("cuda") == torch.device("cpu")
    assert "CUDA is not available" in caplog.text
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_picks_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_rng_state_round_trip_through_safe_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({"rng": get_rng_state()}, str(tmp_path / "rng.pth"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(str(tmp_path / "rng.pth"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
