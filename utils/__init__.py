"""Runtime utilities: logging, seeding, device choice, distributed helpers, atomic checkpoints,
command-line plumbing, user-facing errors, and the evaluation metrics.
"""
