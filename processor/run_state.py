"""What an interrupted run needs to continue exactly, shared by the training loop and the model phases: every
process's RNG states, the fingerprint of the training data (a resume on other data could not be exact), and
the error that stops a diverged run."""
import collections
import hashlib
import os

import torch

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


def _hash64(text):
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                          signed=True)


def training_data_fingerprint(samples, root):
    """What makes a resume on ``samples`` (the training split) exact, stored in every resumable checkpoint:
    per image, a 64-bit hash of its path relative to the dataset ``root`` (the folder may move between an
    interruption and the resume), a hash of its size and labels (camera, view, time, caption, attributes)
    and its identity label. Sizes, not modification times or contents: a copied dataset keeps them, and
    reading every image would take minutes on a large benchmark (an image replaced by one of exactly the same
    size is not noticed). ``{"paths": (N,), "records": (N,), "labels": (N,)}`` int64 tensors."""
    root = os.path.abspath(root)
    paths, records, labels = [], [], []
    for sample in samples:
        path = os.path.abspath(sample.path)
        relative = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        paths.append(_hash64(relative))
        records.append(_hash64(repr((size, sample.camid, sample.viewid, sample.timeid, sample.text, sample.attrs))))
        labels.append(int(sample.pid))
    return {name: torch.tensor(values, dtype=torch.int64)
            for name, values in (("paths", paths), ("records", records), ("labels", labels))}


def _counts(singular, plural, counts):
    """``"14 images removed, 1 added"`` of ``[(14, "removed"), (1, "added"), (0, "relabelled")]``."""
    counts = [(count, what) for count, what in counts if count]
    return ", ".join(f"{count} {(singular if count == 1 else plural) + ' ' if not index else ''}{what}"
                     for index, (count, what) in enumerate(counts))


def describe_data_change(stored, current):
    """What changed between two :func:`training_data_fingerprint`\\ s, e.g. ``"14 images removed, 1 relabelled;
    1 identity removed (8 -> 7 identities)"``, or ``""`` when nothing did."""
    old = dict(zip(stored["paths"].tolist(), zip(stored["records"].tolist(), stored["labels"].tolist())))
    new = dict(zip(current["paths"].tolist(), zip(current["records"].tolist(), current["labels"].tolist())))
    common = old.keys() & new.keys()
    # Identity labels are renumbered when identities come or go: match each old identity to the new label
    # that most of its remaining images carry; an image whose label disagrees with that match was relabelled.
    votes = {}
    for key in common:
        votes.setdefault(old[key][1], collections.Counter())[new[key][1]] += 1
    match = {label: counter.most_common(1)[0][0] for label, counter in votes.items()}
    relabelled = sum(new[key][1] != match[old[key][1]] for key in common)
    changed = sum(new[key][0] != old[key][0] for key in common)
    old_ids, new_ids = {label for _, label in old.values()}, {label for _, label in new.values()}
    images = _counts("image", "images", [(len(old.keys() - common), "removed"), (len(new.keys() - common), "added"),
                                         (relabelled, "relabelled"), (changed, "changed in size or labels")])
    identities = _counts("identity", "identities", [(len(old_ids - match.keys()), "removed"),
                                                    (len(new_ids - {new[key][1] for key in common}), "added")])
    if identities or len(old_ids) != len(new_ids):
        identities = f"{identities or 'identities merged or split'} ({len(old_ids)} -> {len(new_ids)} identities)"
    return "; ".join(part for part in (images, identities) if part)
