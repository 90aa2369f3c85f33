"""Training over several machines, as two torchrun launchers on this machine (``--nnodes 2``, one process each,
gloo over 127.0.0.1, static rendezvous at rank 0's launcher, each node its own OUTPUT_DIR as on two
machines): the same weights as one launcher with two processes, and a launcher killed mid-training stops the
other node with one error line, within DIST.TIMEOUT_MINUTES, instead of leaving it waiting."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.fixtures import BASELINE, REPO_ROOT, children, free_port, tiny
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TIMEOUT_MINUTES = 0.5
# Evaluation only at the end, of one protocol: the runs are about training.
QUICK = ["DATASETS.TESTS", "('SynthAG_ALL',)", "SOLVER.EVAL_PERIOD", "1000", "SOLVER.TENSORBOARD", "False",
         "SOLVER.CHECKPOINT_PERIOD", "2", "DIST.TIMEOUT_MINUTES", str(TIMEOUT_MINUTES)]
ENV = {"PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def node_command(node_rank, port, root, output_dir, epochs):
    """torchrun for node ``node_rank`` of 2 (one process), meeting at 127.0.0.1:``port``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "train_svpr.py",
            "--config_file", BASELINE, *tiny(root, output_dir, epochs=epochs, extra=QUICK)]


def start_nodes(root, tmp_path, epochs):
    """Both launchers, each in a session of its own (as on two machines), their output in node<rank>.log; each
    node has its own OUTPUT_DIR (only rank 0 writes there)."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        log = open(tmp_path / f"node{rank}.log", "w", encoding="utf-8")
        nodes.append(subprocess.Popen(node_command(rank, port, root, str(tmp_path / f"node{rank}"), epochs),
                                      cwd=REPO_ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()
    return nodes


def running(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(launchers, pids=()):
    """SIGKILL whatever still runs of ``launchers`` (Popen), their workers and ``pids`` (cleanup after a failed
    test: workers live in sessions of their own and would outlive their launcher)."""
    pids = list(pids)
    for launcher in launchers:
        if launcher.poll() is None:
            pids += children(launcher.pid)
            launcher.kill()
            launcher.wait()
    for pid in pids:
        if running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_two_nodes_train_as_one_launcher_and_a_killed_launcher_stops_the_other(synth_root, tmp_path):
    """Two nodes reach, after epoch 2, the weights of one launcher with two processes (both write
    ``<MODEL.NAME>_2.pth``; the number of epochs left does not change the first two). Then node 1's launcher is
    killed (SIGKILL) mid-training: its worker (in a session of its own, so untouched by the kill) notices and
    stops; rank 0's next collective fails, and node 0 exits with one error line within DIST.TIMEOUT_MINUTES
    instead of training on and waiting for node 1 at exit. Rank 0's last checkpoint is intact."""
    one = tmp_path / "one_launcher"
    # The single launcher runs alongside the two nodes (processes mostly starting up: the cores are shared).
    with open(tmp_path / "one_launcher.log", "w", encoding="utf-8") as log:
        single = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--master_port", str(free_port()), "train_svpr.py", "--config_file", BASELINE,
                                   *tiny(synth_root, str(one), epochs=2, extra=QUICK)],
                                  cwd=REPO_ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
    nodes = start_nodes(synth_root, tmp_path, epochs=1000)
    workers = []
    try:
        assert single.wait(timeout=300) == 0, (tmp_path / "one_launcher.log").read_text()[-3000:]
        log = tmp_path / "node0" / "train.log"
        deadline = time.monotonic() + 300  # hang guard: the start of a run on a loaded machine
        while not (log.exists() and "epoch 3 iter" in log.read_text(encoding="utf-8")):
            assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), \
                (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = children(nodes[1].pid)
        assert len(workers) == 1
        nodes[1].send_signal(signal.SIGKILL)
        nodes[1].wait()
        # Hang guard: DIST.TIMEOUT_MINUTES and a minute for a loaded machine.
        code = nodes[0].wait(timeout=TIMEOUT_MINUTES * 60 + 60)
        deadline = time.monotonic() + 60
        while running(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(workers[0]), "node 1's worker outlived its launcher"
    finally:
        stop([single, *nodes], workers)
    (expected_path,) = one.glob("*_2.pth")
    expected = load_checkpoint(str(expected_path))
    got = load_checkpoint(str(tmp_path / "node0" / expected_path.name))
    assert got["epoch"] == expected["epoch"] == 2 and got["model"].keys() == expected["model"].keys()
    assert all(torch.equal(got["model"][name], value) for name, value in expected["model"].items())
    assert not list((tmp_path / "node1").glob("*.pth"))  # only rank 0 writes

    output = (tmp_path / "node0.log").read_text(encoding="utf-8")
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: rank 0: a collective operation with the other processes failed")
    assert f"DIST.TIMEOUT_MINUTES = {TIMEOUT_MINUTES:g}" in errors[0]
    state = load_checkpoint(str(tmp_path / "node0" / "checkpoint_last.pth"))
    assert state["epoch"] >= 2 and all(torch.isfinite(value).all() for value in state["model"].values())
    node1 = (tmp_path / "node1.log").read_text(encoding="utf-8")
    assert "rank 1: the torchrun launcher that started this process" in node1
