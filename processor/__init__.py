"""Training and evaluation loops: CLIP-ReID stage 1 (prompt learning), stage 2 / single-stage ReID
fine-tuning, and inference over the test protocols.
"""
from utils.errors import UserError


class NotImplementedYet(UserError):
    """Raised by entry points whose processor has not landed yet."""


def run_training(cfg, device, resume=False, config_file=None):
    """Train the configured model (not implemented yet)."""
    raise NotImplementedYet("training is not implemented yet (processor/ is empty); see the open issues")


def run_testing(cfg, device, config_file=None):
    """Evaluate TEST.WEIGHT on DATASETS.TESTS (not implemented yet)."""
    raise NotImplementedYet("testing is not implemented yet (processor/ is empty); see the open issues")
