"""Per-epoch learning-rate schedules: warm-up multi-step (the main training loop) and warm-up cosine
(CLIP-ReID's prompt learning builds it from its own keys)."""
import bisect
import math

from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from utils.errors import ConfigError


class WarmupMultiStepLR(LambdaLR):
    """Warm-up then step decay, stepped once per epoch.

    With ``t = last_epoch`` (epoch e, 1-based, trains at t = e - 1 when stepped at the end of every epoch,
    at t = e when stepped at the start, see ``ReIDModel.lr_step_at_epoch_start``) the learning rate is
    ``base_lr * warmup(t) * gamma ** (number of milestones <= t)``, where ``warmup(t)`` is 1 for
    ``t >= warmup_iters`` and otherwise ``warmup_factor`` ("constant") or
    ``warmup_factor * (1 - t / warmup_iters) + t / warmup_iters`` ("linear").
    The schedule itself is not part of ``state_dict()``: it comes from the arguments, the state from the
    checkpoint.
    """

    def __init__(self, optimizer, milestones, gamma=0.1, warmup_factor=1.0 / 3, warmup_iters=500,
                 warmup_method="linear", last_epoch=-1):
        milestones = list(milestones)
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {milestones}")
        if warmup_method not in ("constant", "linear"):
            raise ValueError(f"warmup_method must be 'constant' or 'linear', got {warmup_method!r}")

        def factor(t):
            warmup = 1.0
            if t < warmup_iters:
                if warmup_method == "constant":
                    warmup = warmup_factor
                else:
                    alpha = t / warmup_iters
                    warmup = warmup_factor * (1 - alpha) + alpha
            return warmup * gamma ** bisect.bisect_right(milestones, t)

        super().__init__(optimizer, factor, last_epoch=last_epoch)


class WarmupCosineLR(LRScheduler):
    """Linear warm-up then cosine decay, stepped once at the end of every epoch (CLIP-ReID's prompt learning).

    Epoch e (1-based) trains at ``t = e`` like the reference, whose timm scheduler is stepped with the
    epoch number at the start of each epoch: for ``t < warmup_epochs`` the learning rate is
    ``warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_epochs``, then
    ``lr_min + (base_lr - lr_min) * (1 + cos(pi * t / max_epochs)) / 2`` while ``t < max_epochs``, and
    ``lr_min`` from ``t = max_epochs`` on.
    """

    def __init__(self, optimizer, max_epochs, warmup_epochs=0, warmup_lr_init=0.0, lr_min=0.0,
                 last_epoch=-1):
        if max_epochs < 1 or not 0 <= warmup_epochs:
            raise ValueError(f"need max_epochs >= 1 and warmup_epochs >= 0, got {max_epochs}, {warmup_epochs}")
        self.max_epochs = max_epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_lr_init = warmup_lr_init
        self.lr_min = lr_min
        super().__init__(optimizer, last_epoch=last_epoch)

    def lr_at(self, base_lr, epoch):
        """Learning rate of a group with ``base_lr`` during 1-based ``epoch``."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr_init + epoch * (base_lr - self.warmup_lr_init) / self.warmup_epochs
        if epoch >= self.max_epochs:
            return self.lr_min
        return self.lr_min + 0.5 * (base_lr - self.lr_min) * (1 + math.cos(math.pi * epoch / self.max_epochs))

    def get_lr(self):
        # last_epoch counts completed epochs, so the epoch about to be trained is last_epoch + 1.
        return [self.lr_at(base_lr, self.last_epoch + 1) for base_lr in self.base_lrs]


def make_scheduler(cfg, optimizer):
    """``WarmupMultiStepLR`` from SOLVER.STEPS, GAMMA, WARMUP_FACTOR, WARMUP_ITERS and WARMUP_METHOD."""
    solver = cfg.SOLVER
    steps = list(solver.STEPS)
    if steps != sorted(steps):
        raise ConfigError(f"SOLVER.STEPS must be increasing epoch numbers, got {steps}")
    if solver.WARMUP_METHOD not in ("constant", "linear"):
        raise ConfigError(f"SOLVER.WARMUP_METHOD must be 'constant' or 'linear', got {solver.WARMUP_METHOD!r}")
    return WarmupMultiStepLR(optimizer, steps, gamma=solver.GAMMA, warmup_factor=solver.WARMUP_FACTOR,
                             warmup_iters=solver.WARMUP_ITERS, warmup_method=solver.WARMUP_METHOD)
