"""Deterministic fault injection for the tests of interruption, divergence and distributed faults.

The environment variable ``SVPR_TEST_INTERRUPT`` names one point of a run and what happens there, e.g.
``stage2:epoch=2:iter=3:signal=SIGTERM`` (after batch 3 of stage-2 epoch 2 the process sends itself
SIGTERM). Phases: ``stage2`` (the main training loop) and the ``name`` of a model's extra training phase
(``stage1``: CLIP-ReID's prompt learning).
Actions (``signal=``): ``SIGINT``, ``SIGTERM``, ``SIGKILL`` (a real signal to this process), ``NAN``
(the caller makes the batch's loss NaN), ``STALL`` (this process stops responding) and ``EXIT`` (this
process dies at once). Optional ``rank=R`` limits it to one torchrun rank and ``restart=N`` to one
elastic attempt. Unset, nothing happens; the variable is read here only.
"""
import functools
import os
import signal
import time

from utils.distributed import get_rank, restart_count

ENV_VAR = "SVPR_TEST_INTERRUPT"


@functools.lru_cache(maxsize=None)
def _planned():
    text = os.environ.get(ENV_VAR, "")
    if not text:
        return None
    phase, *fields = text.split(":")
    plan = dict(field.split("=", 1) for field in fields)
    return phase, int(plan["epoch"]), int(plan["iter"]), plan["signal"].upper(), plan.get("rank"), plan.get("restart")


def fault_injection_planned():
    """Whether this process runs with a fault plan (only the test suite sets one)."""
    return _planned() is not None


def fault_point(phase, epoch, iteration):
    """Called after each batch; returns True when the loss of this batch must be made NaN."""
    plan = _planned()
    if plan is None or plan[:3] != (phase, epoch, iteration):
        return False
    action, rank, restart = plan[3:]
    if (rank is not None and int(rank) != get_rank()) or (restart is not None and int(restart) != restart_count()):
        return False
    if action == "NAN":
        return True
    if action == "STALL":
        while True:
            time.sleep(3600)
    if action == "EXIT":
        os._exit(1)
    os.kill(os.getpid(), getattr(signal, action))
    # A caught signal's handler runs at the next bytecode; give it one so the process stops here.
    time.sleep(0.5)
    return False
