"""What an interrupted run needs to continue exactly, shared by the training loop and the model phases: every
process's RNG states, and the error that stops a diverged run."""
from utils.distributed import all_gather_object, get_rank
from utils.errors import UserError
from utils.seed import get_rng_state, set_rng_state


class DivergedError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def rng_states():
    """Every rank's RNG states, in rank order (a collective under torchrun: call it on every rank)."""
    return all_gather_object(get_rng_state())


def restore_rng(states):
    """Restore this rank's entry of :func:`rng_states` (a single state dict is accepted too)."""
    if isinstance(states, (list, tuple)):
        states = states[get_rank() % len(states)]
    set_rng_state(states)
