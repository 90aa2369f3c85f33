"""Optimisers with per-parameter groups (bias learning rate and weight decay, larger classifier learning
rate) and learning-rate schedules (warm-up multi-step, warm-up cosine).
"""
