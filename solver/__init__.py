"""Optimisers with per-parameter groups (bias learning rate and weight decay, larger classifier learning
rate) and learning-rate schedules (warm-up multi-step, warm-up cosine).
"""
from solver.optimizer import make_optimizer, make_stage1_optimizer
from solver.scheduler import WarmupCosineLR, WarmupMultiStepLR, make_scheduler, make_stage1_scheduler

__all__ = ["WarmupCosineLR", "WarmupMultiStepLR", "make_optimizer", "make_scheduler", "make_stage1_optimizer",
           "make_stage1_scheduler"]
