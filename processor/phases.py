"""Training-phase registry: engine phases a model names in ``training_phases`` (run before the main loop).

A phase is a class registered with ``@register_phase("name")``, built as
``Phase(cfg, model, data, device)`` (``data`` is the training ``datasets.DataBundle``) and run as
``phase.run(resume)``; with ``resume`` it restores its own result from ``OUTPUT_DIR`` instead of
running again.
"""
from utils.registry import Registry

PHASES = Registry("training phase", "a model's training_phases", package="processor")
register_phase = PHASES.register
