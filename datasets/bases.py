"""Records, evaluation protocols and the common base class of the aerial-ground ReID benchmarks."""
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

from utils.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

GROUND, AERIAL = 0, 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
VIEW_MODES = ("mix", "cross", "same")


class Sample(NamedTuple):
    """One image: absolute path, identity, 0-based camera, view, time, optional text and attribute labels."""

    path: str
    pid: int
    camid: int
    viewid: int
    timeid: int
    text: Optional[str] = None
    attrs: Optional[tuple] = None


@dataclass(frozen=True)
class Protocol:
    """Which views form the query and gallery, and how the evaluator treats them.

    ``query_views``/``gallery_views``: view ids kept (``None`` keeps all). ``restrict_query`` drops query
    images whose identity is not in the gallery. ``camid_from_view`` replaces the test camera id by the view
    id (the AGAG protocols, so that same-view gallery images count as the "same camera").
    ``view_mode`` tells the evaluator how to filter views ("mix", "cross" or "same").
    """

    query_views: Optional[tuple] = None
    gallery_views: Optional[tuple] = None
    restrict_query: bool = False
    camid_from_view: bool = False
    view_mode: str = "mix"


def read_id_list(list_path, line_rule):
    """``(line number, name, identity)`` of each non-empty line ``<name> <integer id>`` of a split list file;
    a ``DataError`` names the file, the line and ``line_rule`` otherwise."""
    with open(list_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"list file '{list_path}' line {number}: {line!r} is not '{line_rule}'")
        entries.append((number, fields[0], int(fields[1])))
    return entries


def list_images(folder):
    """Sorted absolute paths of every image below ``folder`` (recursive)."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


class ReIDDataset:
    """Base class: reads the three splits through :meth:`read_split`, applies the protocol, annotates.

    Subclasses set ``view_names`` and ``protocol`` and implement ``read_split(split) -> list[Sample]``
    (raw pids, no text/attrs) and ``annotate(sample, split) -> (text, attrs)``. They may override
    ``load_annotations()`` (called once before any split is read) and ``attribute_schema()``.
    After construction: ``train`` (pids relabelled 0..N-1 as the reference numbers them, see
    :meth:`label_insertion_order`; junk id -1 dropped), ``query`` and ``gallery`` (raw ids),
    ``num_train_pids``, ``num_train_cams``, ``num_train_views``, ``attributes`` (``(name, num_classes)``
    pairs in label order; empty unless ``use_attr`` and the dataset has attributes), ``view_mode``,
    ``name``. With ``load_train=False`` the training split is neither read nor needed on disk
    (evaluation): ``train`` is empty and ``num_train_pids`` 0.
    """

    registry_name = None
    view_names = {GROUND: "ground", AERIAL: "aerial"}
    protocol = Protocol()
    # Evaluation trials: a benchmark whose protocol draws its gallery at random (VehicleID) is evaluated
    # on ``num_trials`` draws, selected with :meth:`select_trial`, and the results are averaged.
    num_trials = 1

    def __init__(self, root, use_text=False, use_attr=False, text_prompt=4, verbose=True, load_train=True):
        if not isinstance(text_prompt, int) or isinstance(text_prompt, bool) or text_prompt < 0:
            raise ConfigError(f"text_prompt (MODEL.TEXT_PROMPT) = {text_prompt!r}: expected an integer >= 0")
        if self.protocol.view_mode not in VIEW_MODES:
            raise ConfigError(f"{type(self).__name__}.protocol.view_mode = {self.protocol.view_mode!r}: "
                              f"expected one of {', '.join(VIEW_MODES)}")
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.use_text = bool(use_text)
        self.use_attr = bool(use_attr)
        self.num_prompt_words = text_prompt
        self.name = self.registry_name or type(self).__name__
        self.view_mode = self.protocol.view_mode
        self.load_train = bool(load_train)

        self.load_annotations()
        self.attributes = tuple(self.attribute_schema()) if self.use_attr else ()
        self.train = self._make_train(self.read_split("train")) if self.load_train else []
        gallery = self._keep_views(self.read_split("gallery"), self.protocol.gallery_views)
        query = self._keep_views(self.read_split("query"), self.protocol.query_views)
        if self.protocol.restrict_query:
            gallery_pids = {s.pid for s in gallery}
            query = [s for s in query if s.pid in gallery_pids]
        if self.protocol.camid_from_view:
            gallery = [s._replace(camid=s.viewid) for s in gallery]
            query = [s._replace(camid=s.viewid) for s in query]
        self.gallery = [self._with_annotation(s, "gallery") for s in gallery]
        self.query = [self._with_annotation(s, "query") for s in query]
        for split in self.splits:
            if not getattr(self, split):
                raise DataError(f"dataset {self.name} under '{self.dataset_dir}': the {split} split is empty "
                                f"after applying the protocol")

        all_samples = self.train + self.query + self.gallery
        self.num_train_pids = len({s.pid for s in self.train})
        # Sized to the largest id of any split so that camera/view embeddings can index every image.
        self.num_train_cams = max(s.camid for s in all_samples) + 1
        self.num_train_views = max(s.viewid for s in all_samples) + 1
        if verbose:
            logger.info("%s statistics:\n%s", self.name, format_statistics(self))

    @property
    def splits(self):
        """The splits this instance reads: ("train", "query", "gallery"), or the last two without training."""
        return ("train", "query", "gallery") if self.load_train else ("query", "gallery")

    # ---- subclass interface -------------------------------------------------------------------------
    @classmethod
    def prepare(cls, root, cfg):
        """Make the dataset available under ``root`` before it is read (default: nothing to do)."""

    @classmethod
    def options_from_config(cls, cfg):
        """Dataset-specific constructor keyword arguments taken from ``cfg`` (default: none)."""
        return {}

    def select_trial(self, trial):
        """Set ``query``/``gallery`` to those of evaluation trial ``trial`` (0 <= trial < ``num_trials``).

        One fixed split by default, so trial 0 leaves them unchanged.
        """
        if not 0 <= trial < self.num_trials:
            raise IndexError(f"dataset {self.name}: trial {trial} out of range [0, {self.num_trials})")

    @property
    def dataset_dir(self):
        raise NotImplementedError

    def load_annotations(self):
        """Read text/attribute annotation files needed by the options (default: none)."""

    def attribute_schema(self):
        """``(name, num_classes)`` pairs in label order (default: no attributes)."""
        return ()

    def read_split(self, split):
        raise NotImplementedError

    def annotate(self, sample, split):
        """``(text, attrs)`` for ``sample`` (raw pid) in ``split``; default none."""
        return None, None

    def label_insertion_order(self, samples):
        """Raw training identities in the order the reference's loader meets them (default: its images in
        sorted path order).

        The reference numbers identities by their position in a Python ``set`` filled in this order, whose
        iteration order is not always ascending ({100, 101, 104, 105} iterates 104, 105, 100, 101); the same
        weights then train the same classifier row (and CLIP-ReID prompt) for an identity as there.
        """
        return [s.pid for s in sorted(samples, key=lambda s: s.path)]

    # ---- protocol mechanics --------------------------------------------------------------------------
    def _keep_views(self, samples, views):
        return list(samples) if views is None else [s for s in samples if s.viewid in views]

    def _with_annotation(self, sample, split):
        text, attrs = self.annotate(sample, split)
        return sample._replace(text=text if self.use_text else None,
                               attrs=tuple(attrs) if (self.use_attr and attrs is not None) else None)

    def _make_train(self, samples):
        samples = [s for s in samples if s.pid != -1]
        label_of = {pid: label for label, pid in enumerate(set(self.label_insertion_order(samples)))}
        return [self._with_annotation(s, "train")._replace(pid=label_of[s.pid]) for s in samples]

    def require_dir(self, path, layout):
        """``DataError`` naming ``path`` and the expected ``layout`` unless the folder exists."""
        if not os.path.isdir(path):
            raise DataError(f"dataset {self.name}: folder '{path}' not found; expected {layout}")
        return path


def format_statistics(dataset):
    """Table of identities, images and cameras per split and per view of ``dataset``."""
    header = f"  {'subset':<18} | {'# ids':>6} | {'# images':>8} | {'# cameras':>9}"
    rule = "  " + "-" * (len(header) - 2)
    lines = [rule, header, rule]
    for split in getattr(dataset, "splits", ("train", "query", "gallery")):
        samples = getattr(dataset, split)
        lines.append(_stats_row(split, samples))
        for viewid in sorted({s.viewid for s in samples}):
            view = dataset.view_names.get(viewid, str(viewid))
            lines.append(_stats_row(f"  {split}/{view}", [s for s in samples if s.viewid == viewid]))
    lines.append(rule)
    return "\n".join(lines)


def _stats_row(label, samples):
    ids = len({s.pid for s in samples})
    cams = len({s.camid for s in samples})
    return f"  {label:<18} | {ids:>6} | {len(samples):>8} | {cams:>9}"
