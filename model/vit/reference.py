"""Renaming between the baselines' parameter names and those of the authors' code (docs/baselines.md).

The authors' models hold a few tensors that no forward uses (e.g. ``BACKBONE.fc``, the copied-away
``BACKBONE.blocks.11``); these have no counterpart here and are dropped when converting to this layout
and left out when converting back (the authors' loader copies only the keys a file has).
"""
import re

import torch

from model.reference_names import rename_key
from utils.errors import CheckpointError


#: (our name, the authors') of the backbone shared by the four baselines (convention: model/reference_names.py).
BACKBONE_NAMES = (("backbone.sie_embed.table", "BACKBONE.sie_embed"), ("backbone.reg_token", "BACKBONE.view_token"),
                  ("backbone.", "BACKBONE."))


class ReferenceLayout:
    """Bidirectional key renaming for one model.

    ``names``: the ``(our name, the authors')`` table of ``model/reference_names.py``; a key it does not
    map keeps its name. ``fragments``: ``(our substring, the authors')`` pairs replaced in keys under
    ``fragment_scope`` (our prefixes). ``dead``: regular expressions of the authors' keys that no forward uses
    (dropped).
    """

    def __init__(self, names, fragments=(), fragment_scope=(), dead=()):
        self.names = tuple(names)
        self.fragments = tuple(fragments)
        self.fragment_scope = tuple(fragment_scope)
        self.dead = tuple(re.compile(pattern) for pattern in dead)

    def is_dead(self, reference_key):
        """Whether ``reference_key`` is one of the authors' unused tensors."""
        return any(pattern.fullmatch(reference_key) for pattern in self.dead)

    def _rename(self, key, to_ours):
        original = key
        key = rename_key(key, self.names, to_reference=not to_ours) or key
        ours_key = key if to_ours else original  # the fragment scope is given in this package's names
        if self.fragment_scope and ours_key.startswith(self.fragment_scope):
            for ours, ref in self.fragments:
                key = key.replace(ref, ours) if to_ours else key.replace(ours, ref)
        return key

    def to_ours(self, state_dict):
        """This package's state dict from the authors' one (dead tensors dropped)."""
        out = {}
        for key, value in state_dict.items():
            if self.is_dead(key):
                continue
            new_key = self._rename(key, to_ours=True)
            if new_key.endswith("sie_embed.table"):
                value = value.reshape(value.shape[0], -1)  # (R, 1, C) -> (R, C)
            out[new_key] = value
        return out

    def to_reference(self, state_dict):
        """The authors' layout of this package's state dict."""
        out = {}
        for key, value in state_dict.items():
            new_key = self._rename(key, to_ours=False)
            if key.endswith("sie_embed.table"):
                value = value.unsqueeze(1)  # (R, C) -> (R, 1, C)
            out[new_key] = value
        return out


def with_dead_last_block(reference_state):
    """Add the authors' ``BACKBONE.blocks.<last>`` and ``BACKBONE.norm`` (unused by their TransReID / SeCap
    forward) as copies of ``b1``, which is where those weights went, so that the layout is complete."""
    last = 1 + max(int(key.split(".")[2]) for key in reference_state if key.startswith("BACKBONE.blocks."))
    out = dict(reference_state)
    for key, value in reference_state.items():
        if key.startswith("b1.0."):
            out[f"BACKBONE.blocks.{last}.{key[5:]}"] = value.clone()
        elif key.startswith("b1.1."):
            out[f"BACKBONE.norm.{key[5:]}"] = value.clone()
    return out


def reference_depth(state_dict):
    """Number of blocks of an authors' backbone (its last one is unused in TransReID and SeCap)."""
    return 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("BACKBONE.blocks."))


def rows(state_dict, key, what):
    """Number of rows of the authors' tensor ``key`` (a class count), or a one-line CheckpointError."""
    value = state_dict.get(key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"the authors' checkpoint has no {key!r}, so its {what} is unknown")
    return int(value.shape[0])


def sie_counts(state_dict, cfg, num_views=1, has_view_head=False):
    """``(num_cameras, num_views)`` of the SIE table ``BACKBONE.sie_embed`` (1 where not embedded)."""
    table = state_dict.get("BACKBONE.sie_embed")
    if table is None or not (cfg.MODEL.SIE_CAMERA or cfg.MODEL.SIE_VIEW):
        return 1, num_views
    if cfg.MODEL.SIE_CAMERA and cfg.MODEL.SIE_VIEW:
        if not has_view_head:
            raise CheckpointError("BACKBONE.sie_embed mixes cameras and views and this model has no view head: "
                                  "the numbers of cameras and views cannot be told apart")
        return int(table.shape[0]) // num_views, num_views
    if cfg.MODEL.SIE_CAMERA:
        return int(table.shape[0]), num_views
    return 1, int(table.shape[0])
