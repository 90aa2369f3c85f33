"""pytest fixtures shared by the test modules (their plain helpers are in ``tests/fixtures.py``)."""
import importlib
import os
import sys

import pytest
import torch

from utils.threads import available_cores, plan_threads


def pytest_configure(config):
    """Under pytest-xdist (``-n``) each worker takes its share of the cores, for its own operations and, through
    ``OMP_NUM_THREADS``, for the scripts it starts: two workers of two threads each on 2 cores would run every
    parallel operation 15-20x slower (see ``utils.threads``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = plan_threads(available_cores(), workers, 0, "cpu").threads
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


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


@pytest.fixture
def cli(monkeypatch, capsys, single_thread):
    """``cli(script, args, interrupt=None)`` runs ``python <script>.py args`` in this process (``script``: a module
    name such as ``"train_svpr"`` or ``"tools.export"``); returns (exit code, non-empty stderr lines). For entry
    points where no worker process or signal is involved: the exit code and stderr a user sees, without the
    seconds of a new interpreter."""
    from processor import faults
    from tests.fixtures import process_state_restored
    from utils.entrypoint import run_main

    def call(script, args, interrupt=None):
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
        monkeypatch.setenv(faults.ENV_VAR, interrupt or "")
        faults._planned.cache_clear()
        capsys.readouterr()
        try:
            run_main(importlib.import_module(script).main)
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    with process_state_restored():
        yield call
