"""The model contract: what a registered model takes from a batch, returns in training, and trains with.

A model is a ``ReIDModel`` subclass registered with ``@MODELS.register("Name")`` and built as
``Model(cfg, num_classes, num_cameras, num_views, attributes)``. It declares

* ``batch_inputs``: the batch entries its ``forward`` takes as keywords besides the images
  (``camids``, ``viewids``, ``timeids``, ``text_tokens``, ``attrs``);
* in training mode, ``forward`` returns a :class:`ModelOutput` (named identity logits and metric features
  per branch, plus model-specific tensors for its loss terms); in eval mode the ``(B, embedding_dim)``
  test-time feature that evaluation ranks with;
* ``loss_specs(cfg)``: the loss terms (names in ``loss.LOSSES``) and their weights, the one place a
  model's loss weights are read from the config;
* ``fixes``: the ``MODEL.FIXES`` switches (defects of the authors' code) the model honours, for
  ``tools/ablation.py --fixes``; ``components``: boolean config keys that each remove one part of the
  model, in the order ``tools/ablation.py`` adds them back (empty: no component ablation);
* ``checkpoint_hints``: ``(parameter-name fragment, config keys)`` rows naming the keys that decide
  whether a parameter exists, for the one-line message about a checkpoint that does not fit;
* ``identity_parameters``: patterns (``re.fullmatch`` on state-dict names) of the tensors with one row per
  training identity (identity classifiers, CLIP-ReID's prompts), which MODEL.PRETRAIN_CHOICE "finetune" leaves
  out; ``dataset_parameters``: patterns of tensors sized by the training set's cameras, views or attributes,
  which "finetune" loads where they fit the new training set and re-initialises otherwise;
* ``training_phases``: :class:`TrainingPhase` classes the engine runs before the main training loop, each
  with its own data, optimiser and schedule (CLIP-ReID's prompt learning); ``stand_in_for_phases`` fills what
  they would leave with fixed random values, for tools that time only the main loop;
* ``lr_step_at_epoch_start``: whether the main loop steps its learning-rate schedule at the start of every
  epoch (epoch e trains at schedule step e, as the authors' CLIP-ReID stage 2) instead of at the end (epoch
  e trains at step e - 1, as their other training loops);
* ``from_reference_state_dict`` / ``to_reference_state_dict``: the mapping between this model's
  parameter names and those of the authors' code (identity unless the layouts differ);
  ``reference_model_args``: the constructor sizes of the authors' model behind one of their state dicts
  (tools/convert_reference.py uses all three).

docs/architecture.md shows how a batch flows through these pieces.
"""
from dataclasses import dataclass, field
from typing import Any, Dict

import torch
from torch import nn

from utils.errors import CheckpointError

BATCH_KEYS = ("camids", "viewids", "timeids", "text_tokens", "attrs")


@dataclass
class ModelOutput:
    """Training-mode output of a model.

    ``id_logits``: branch name -> (B, num_classes) identity logits; the first branch is the main one
    (training accuracy). ``features``: branch name -> (B, C) features for the metric losses (triplet; the
    center loss uses the first). ``aux``: model-specific tensors read by its loss terms, e.g.
    ``view_logits`` (B, V), ``view_feat``/``inv_feat`` (B, C), ``attr_logits`` (list of (B, n_a)),
    ``i2t_logits`` (B, num_classes).
    """

    id_logits: Dict[str, torch.Tensor]
    features: Dict[str, torch.Tensor]
    aux: Dict[str, Any] = field(default_factory=dict)

    def float(self):
        """A copy with every floating-point tensor (also in ``aux``'s lists and dicts) in fp32, differentiably:
        the loss terms' input under bf16 autocast."""
        return ModelOutput(*(_to_float32(part) for part in (self.id_logits, self.features, self.aux)))


def _to_float32(value):
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _to_float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(item) for item in value)
    return value


@dataclass(frozen=True)
class LossSpec:
    """One loss term of a model: its registry ``name``, its ``weight`` and constructor ``options``."""

    name: str
    weight: float
    options: Dict[str, Any] = field(default_factory=dict)


def view_loss(cfg, weight):
    """The view loss term with ``weight``: the authors' smoothing, epsilon / (number of identities) on each
    view logit (``view_identity_smoothing``), or over the views with MODEL.FIXES.VIEW_LOSS_SMOOTHING
    (``view``)."""
    return LossSpec("view" if cfg.MODEL.FIXES.VIEW_LOSS_SMOOTHING else "view_identity_smoothing", weight)


class ReIDModel(nn.Module):
    """Base class of every registered model (see the module docstring for the contract)."""

    batch_inputs = ()
    training_phases = ()
    lr_step_at_epoch_start = False
    fixes = ()
    components = ()
    checkpoint_hints = ()
    identity_parameters = ()
    dataset_parameters = ()
    #: Width of the test-time feature and of the first training feature; set by the constructor.
    embedding_dim = 0
    feature_dim = 0

    def stand_in_for_phases(self, generator):
        """Fill what this model's ``training_phases`` would leave in it with fixed random values drawn from
        ``generator`` (they time the same), so that tools timing only the main loop (benchmarks, profiles) can
        run it. Nothing to fill by default."""

    def loss_specs(self, cfg):
        """The model's loss terms (list of :class:`LossSpec`)."""
        raise NotImplementedError

    def test_feature_inputs(self):
        """The batch entries (of ``batch_inputs``) the eval-mode feature depends on; evaluation embeds once the
        images that two test protocols batch alike with equal such entries (all of ``batch_inputs`` unless the
        model knows that some of them are not read, e.g. camera ids without a camera embedding)."""
        return tuple(self.batch_inputs)

    def forward_inputs(self, batch):
        """Keyword arguments of ``forward`` taken from a batch dict."""
        unknown = [key for key in self.batch_inputs if key not in BATCH_KEYS]
        if unknown:
            raise ValueError(f"{type(self).__name__}.batch_inputs names unknown batch entries {unknown}; "
                             f"expected some of {BATCH_KEYS}")
        return {key: batch.get(key) for key in self.batch_inputs}

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """This model's state dict from a state dict of the authors' code (``module.`` already stripped)."""
        return dict(state_dict)

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """The authors' state-dict layout of this model's ``state_dict``."""
        return dict(state_dict)

    @classmethod
    def reference_model_args(cls, state_dict, cfg):
        """``{"num_classes", "num_cameras", "num_views", "attributes"}`` of the authors' model behind
        ``state_dict`` (their layout, ``module.`` stripped)."""
        raise CheckpointError(f"{cls.__name__} (MODEL.ARCH_NAME {cfg.MODEL.ARCH_NAME}) cannot read the model "
                              f"sizes from a reference checkpoint: conversion is not implemented for it")


class TrainingPhase:
    """A training phase a model runs before the main loop, with its own loader, optimiser and schedule.

    A model lists its phase classes in ``ReIDModel.training_phases``; the engine
    (``processor/phase_runner.py``) builds each as ``Phase(cfg, model, dataset, device)`` (``dataset``: the
    training ``datasets.bases.ReIDDataset``, ``model`` unwrapped) and runs it: when this run trains the phase
    (``trains()``), it calls ``setup()``, builds ``make_optimizer()`` and ``make_scheduler(optimizer)``, and for
    every epoch up to ``max_epochs`` steps the optimiser once per payload of ``batches(epoch)`` on
    ``loss(payload)`` (with the config's gradient scaler; the phase applies autocast where it wants it), steps
    the scheduler, and writes
    ``OUTPUT_DIR/<checkpoint_name>`` (``state_dict()`` plus the optimiser, scheduler and RNG states), from which
    an interrupted phase resumes exactly. Otherwise ``load_result()`` obtains the phase's result without
    training. ``finish()`` runs last in every case.
    """

    #: Identifier in fault-injection plans (``processor/faults.py``), and its wording in log lines.
    name = ""
    title = ""
    #: File under OUTPUT_DIR holding the phase's state after each epoch.
    checkpoint_name = ""
    #: Config keys of the phase that a resumed run may change (e.g. its log period).
    resume_may_change = ()

    def __init__(self, cfg, model, dataset, device):
        self.cfg, self.model, self.dataset, self.device = cfg, model, dataset, device

    @property
    def max_epochs(self):
        """Number of epochs of the phase."""
        raise NotImplementedError

    @property
    def log_period(self):
        """Epochs between two log lines."""
        return 1

    def trains(self):
        """Whether this run trains the phase (else ``load_result``)."""
        return True

    def load_result(self):
        """Obtain the phase's result without training it (e.g. from a file the config names)."""
        raise NotImplementedError

    def setup(self):
        """Prepare training (its loader, cached inputs); called once before the first epoch this run trains."""

    def make_optimizer(self):
        """The phase's optimiser."""
        raise NotImplementedError

    def make_scheduler(self, optimizer):
        """The phase's learning-rate schedule, stepped after every epoch."""
        raise NotImplementedError

    def batches(self, epoch):
        """The payloads of ``epoch`` (1-based), one optimiser step each."""
        raise NotImplementedError

    def loss(self, payload):
        """The scalar loss of one payload."""
        raise NotImplementedError

    def state_dict(self):
        """What the phase trains and its own random state (a dict of tensors and plain values)."""
        return {}

    def load_state_dict(self, state, source):
        """Restore ``state_dict()`` read from ``source`` (a path, for messages)."""

    def finish(self):
        """After the phase: hand its result to the model (e.g. fix the text features of every identity)."""

