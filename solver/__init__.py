"""Optimisers with per-parameter groups (bias learning rate and weight decay, larger classifier learning
rate) and learning-rate schedules (warm-up multi-step, warm-up cosine).
"""
from solver.optimizer import build_optimizer, make_optimizer
from solver.scheduler import WarmupCosineLR, WarmupMultiStepLR, make_scheduler

__all__ = ["WarmupCosineLR", "WarmupMultiStepLR", "build_optimizer", "make_optimizer", "make_scheduler"]
