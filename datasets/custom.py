"""Custom: any aerial-ground data listed in a CSV manifest (``DATASETS.CUSTOM.MANIFEST``), with CP2108's protocols.

The manifest (docs/custom_data.md) is a CSV file whose header names its columns:

* required: ``path`` (relative to the CSV's folder, or absolute), ``pid`` and ``camid`` (integers >= 0) and
  ``split`` (``train``, ``query`` or ``gallery``);
* optional: ``viewid`` (``0``/``ground`` or ``1``/``aerial``; every image is ground without the column),
  ``timeid`` (``0``/``day`` or ``1``/``night``; 0 without the column) and attribute columns ``attr:<name>``
  (integer classes >= 0; an attribute has as many classes as its largest value + 1).

Every row is checked when the manifest is read, and the images of a split when that split is read; a bad value
stops the run with one line naming the CSV and the line. The protocols are CP2108's (``datasets.cp2108.PROTOCOLS``):
``Custom`` (all queries against the whole gallery), ``Custom_AG``, ``_GA``, ``_AA``, ``_GG``, ``_AGAG``,
``_AAGG``.
"""
import csv
import difflib
import logging
import os
import re
from dataclasses import dataclass

from configs import CN, declare_config
from text import prompts
from utils.errors import ConfigError, DataError

from .bases import AERIAL, GROUND, ReIDDataset, Sample
from .cp2108 import PROTOCOLS
from .registry import register_dataset

logger = logging.getLogger(__name__)


@declare_config
def add_custom_config(cfg):
    """The Custom datasets' key: the CSV manifest listing the images (DATASETS.CUSTOM)."""
    cfg.DATASETS.CUSTOM = CN()
    # CSV manifest read by the Custom* datasets (docs/custom_data.md): columns path, pid, camid, split and
    # optionally viewid, timeid, attr:<name>. A relative path is taken from the current folder.
    cfg.DATASETS.CUSTOM.MANIFEST = ""


REQUIRED_COLUMNS = ("path", "pid", "camid", "split")
OPTIONAL_COLUMNS = ("viewid", "timeid")
ATTRIBUTE_PREFIX = "attr:"
SPLITS = ("train", "query", "gallery")
VIEW_WORDS = {"ground": GROUND, "aerial": AERIAL}
TIME_WORDS = {"day": 0, "night": 1}
_INTEGER = re.compile(r"[0-9]+")
_COLUMN_RULE = (f"required: {', '.join(REQUIRED_COLUMNS)}; optional: {', '.join(OPTIONAL_COLUMNS)}, "
                f"{ATTRIBUTE_PREFIX}<name>")


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest: its CSV line, absolute path, labels, split and attribute classes."""

    line: int
    path: str
    pid: int
    camid: int
    viewid: int
    timeid: int
    split: str
    attrs: tuple = ()


class Manifest:
    """The checked rows of a manifest file. ``attribute_names`` / ``attribute_classes``: the ``attr:`` columns
    in file order and their number of classes; ``has_views`` / ``has_times``: whether those columns exist."""

    def __init__(self, path, rows, attribute_names=(), has_views=False, has_times=False):
        self.path = path
        self.rows = list(rows)
        self.attribute_names = tuple(attribute_names)
        self.attribute_classes = tuple(max(row.attrs[k] for row in self.rows) + 1
                                       for k in range(len(self.attribute_names)))
        self.has_views = has_views
        self.has_times = has_times
        self._checked_splits = set()
        self.warned = False

    @property
    def folder(self):
        return os.path.dirname(self.path)

    def error(self, line, message):
        """The one-line ``DataError`` about ``line`` of this manifest."""
        return DataError(f"manifest '{self.path}' line {line}: {message}")

    def rows_of(self, split):
        return [row for row in self.rows if row.split == split]

    def samples(self, split):
        """The ``Sample``s of ``split`` in file order, after checking that each of its images exists."""
        rows = self.rows_of(split)
        if not rows:
            raise DataError(f"manifest '{self.path}' has no row with split '{split}' (every split of "
                            f"{', '.join(SPLITS)} needs at least one image)")
        if split not in self._checked_splits:
            for row in rows:
                if not os.path.isfile(row.path):
                    raise self.error(row.line, f"image '{row.path}' not found")
            self._checked_splits.add(split)
        return [Sample(row.path, row.pid, row.camid, row.viewid, row.timeid) for row in rows]

    def warnings(self):
        """What is legal but probably not meant: identities in both training and test splits, query identities
        with no gallery image, and views with no image in a test split (their protocols are then empty)."""
        found = []
        pids = {split: {row.pid for row in self.rows_of(split)} for split in SPLITS}
        shared = sorted(pids["train"] & (pids["query"] | pids["gallery"]))
        if shared:
            found.append(f"{len(shared)} identities are in both the train and a test split ({_some(shared)}): "
                         f"the test then measures identities the model was trained on")
        absent = sorted(pids["query"] - pids["gallery"])
        if absent:
            found.append(f"{len(absent)} of the {len(pids['query'])} query identities have no gallery image "
                         f"({_some(absent)}): their queries cannot be matched and are left out")
        if not self.has_views:
            found.append("no viewid column: every image is ground (view 0), so the cross-view protocols "
                         "(Custom_AG, Custom_GA, Custom_AGAG, ...) are empty")
            return found
        for split in SPLITS:
            views = {row.viewid for row in self.rows_of(split)}
            for viewid, word in sorted((v, w) for w, v in VIEW_WORDS.items()):
                if viewid not in views:
                    found.append(f"the {split} split has no {word} images (view {viewid})")
        return found


def _some(values, count=5):
    """The first ``count`` of ``values`` for a message, with "..." when there are more."""
    shown = ", ".join(str(v) for v in values[:count])
    return shown + (", ..." if len(values) > count else "")


def _parse_header(names, path):
    """``(column index by name, attribute columns [(index, name)])``; ``DataError`` for a bad header."""
    def header_error(message):
        return DataError(f"manifest '{path}' line 1: {message} ({_COLUMN_RULE})")

    if not names or not any(names):
        raise header_error("expected a header naming the columns")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise header_error(f"column '{twice[0]}' appears twice")
    index, attributes = {}, []
    for position, name in enumerate(names):
        if name.startswith(ATTRIBUTE_PREFIX):
            attribute = name[len(ATTRIBUTE_PREFIX):].strip()
            if not attribute:
                raise header_error(f"column '{name}' names no attribute")
            attributes.append((position, attribute))
        elif name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            index[name] = position
        else:
            close = difflib.get_close_matches(name, REQUIRED_COLUMNS + OPTIONAL_COLUMNS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise header_error(f"unknown column '{name}'{hint}")
    attribute_names = [name for _, name in attributes]
    twice = sorted({name for name in attribute_names if attribute_names.count(name) > 1})
    if twice:
        raise header_error(f"attribute '{twice[0]}' appears twice")
    missing = [name for name in REQUIRED_COLUMNS if name not in index]
    if missing:
        raise header_error(f"the header has no column '{missing[0]}'")
    return index, attributes


def label_number(text, words=None):
    """The label ``text`` stands for: its non-negative integer (with ``words``, only one of their ids), or the
    id of one of ``words`` (``{word: id}``, any case); None when it is neither. Shared with
    tools/make_manifest.py, which reads the same labels from file names."""
    if words and text.lower() in words:
        return words[text.lower()]
    if _INTEGER.fullmatch(text):
        number = int(text)
        if words is None or number in words.values():
            return number
    return None


def _integer(value, column, line, manifest_path, words=None):
    """The non-negative integer of a cell (or the id of one of ``words``); ``DataError`` otherwise."""
    number = label_number(value.strip(), words)
    if number is not None:
        return number
    expected = "a non-negative integer" if words is None else (
        f"one of {', '.join(str(v) for v in sorted(set(words.values())))} or {', '.join(words)}")
    raise DataError(f"manifest '{manifest_path}' line {line}: {column} {value!r} is not {expected}")


def parse_manifest(path):
    """Read and check the manifest ``path``: a :class:`Manifest`, or a one-line ``DataError`` naming the
    CSV and the line of the first problem (header, value, duplicate image, no query identity in the gallery).
    Image files are checked later, split by split (:meth:`Manifest.samples`)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise ConfigError(f"DATASETS.CUSTOM.MANIFEST: manifest '{path}' not found (a CSV listing the images; "
                          "tools/make_manifest.py writes one from a folder)")
    folder = os.path.dirname(path)
    line = 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            index, attributes = _parse_header(header, path)
            rows, first_line_of = [], {}
            for cells in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(header):
                    raise DataError(f"manifest '{path}' line {line}: {len(cells)} fields, but the header has "
                                    f"{len(header)}")
                relative = cells[index["path"]].strip()
                if not relative:
                    raise DataError(f"manifest '{path}' line {line}: empty path")
                image = os.path.normpath(os.path.join(folder, os.path.expanduser(relative)))
                if image in first_line_of:
                    raise DataError(f"manifest '{path}' line {line}: image '{relative}' is listed twice (first on "
                                    f"line {first_line_of[image]})")
                first_line_of[image] = line
                split = cells[index["split"]].strip().lower()
                if split not in SPLITS:
                    raise DataError(f"manifest '{path}' line {line}: split {cells[index['split']]!r} is not one "
                                    f"of {', '.join(SPLITS)}")
                optional = {name: (_integer(cells[index[name]], name, line, path, words)
                                   if name in index else 0)
                            for name, words in (("viewid", VIEW_WORDS), ("timeid", TIME_WORDS))}
                rows.append(ManifestRow(
                    line, image, _integer(cells[index["pid"]], "pid", line, path),
                    _integer(cells[index["camid"]], "camid", line, path), optional["viewid"], optional["timeid"],
                    split, tuple(_integer(cells[k], f"{ATTRIBUTE_PREFIX}{name}", line, path)
                                 for k, name in attributes)))
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"manifest '{path}' line {line + 1}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"manifest '{path}' lists no image (expected a header line, then one line per image)")
    gallery = {row.pid for row in rows if row.split == "gallery"}
    queries = [row for row in rows if row.split == "query"]
    if queries and gallery and not any(row.pid in gallery for row in queries):
        raise DataError(f"manifest '{path}' line {queries[0].line}: none of the query split's identities has an "
                        f"image in the gallery split (first query row here), so no query can be matched")
    return Manifest(path, rows, [name for _, name in attributes], "viewid" in index, "timeid" in index)


# Manifests already read, by absolute path, with the (size, modification time) they were read at: the
# protocols of one run read the file once.
_MANIFESTS = {}


def read_manifest(path):
    """:func:`parse_manifest`, reusing the result while the file is unchanged."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        stat = os.stat(path)
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None
    cached = _MANIFESTS.get(path)
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[1]
    manifest = parse_manifest(path)
    _MANIFESTS[path] = (stamp, manifest)
    return manifest


class CustomBase(ReIDDataset):
    """Images, labels and splits from the manifest ``manifest`` (``DATASETS.CUSTOM.MANIFEST``); protocol
    subclasses set ``protocol``. ``root`` (DATASETS.ROOT_DIR) is not used: paths come from the manifest.

    Training texts (``use_text``) describe the ``attr:`` classes ("A photo of a X X X X person with the
    following attributes: color is 2, bag is 0."); without attribute columns there are no texts, so the
    CLIP models train without captions and SVPR-ReID without ASMOE (as on CARGO).
    """

    def __init__(self, root, manifest="", **options):
        if not str(manifest).strip():
            raise ConfigError("config key DATASETS.CUSTOM.MANIFEST is empty: the Custom datasets read their images "
                              "from a CSV manifest (docs/custom_data.md)")
        self.manifest = read_manifest(manifest)
        self._row_of = {row.path: row for row in self.manifest.rows}
        if options.get("verbose", True) and not self.manifest.warned:
            self.manifest.warned = True
            for warning in self.manifest.warnings():
                logger.warning("manifest %s: %s", self.manifest.path, warning)
        super().__init__(root, **options)

    @classmethod
    def options_from_config(cls, cfg):
        return {"manifest": cfg.DATASETS.CUSTOM.MANIFEST}

    @property
    def dataset_dir(self):
        return self.manifest.folder

    def read_split(self, split):
        return self.manifest.samples(split)

    def attribute_schema(self):
        return list(zip(self.manifest.attribute_names, self.manifest.attribute_classes))

    def annotate(self, sample, split):
        if not self.manifest.attribute_names:
            return None, None
        attrs = self._row_of[sample.path].attrs
        text = None
        if self.use_text:
            if split == "train":
                described = prompts.describe_attributes(
                    (name.replace(" ", "_"), value) for name, value in zip(self.manifest.attribute_names, attrs))
                text = prompts.attribute_caption(self.num_prompt_words, described)
            else:
                text = prompts.test_caption(self.num_prompt_words)
        return text, attrs


@register_dataset("Custom")
class Custom(CustomBase):
    """The manifest's data, all queries against the whole gallery (queries kept when their identity is in it)."""

    protocol = PROTOCOLS["ALL"]


@register_dataset("Custom_AG")
class CustomAG(CustomBase):
    """The manifest's data, aerial queries against the ground gallery."""

    protocol = PROTOCOLS["AG"]


@register_dataset("Custom_GA")
class CustomGA(CustomBase):
    """The manifest's data, ground queries against the aerial gallery."""

    protocol = PROTOCOLS["GA"]


@register_dataset("Custom_AA")
class CustomAA(CustomBase):
    """The manifest's data, aerial queries against the aerial gallery."""

    protocol = PROTOCOLS["AA"]


@register_dataset("Custom_GG")
class CustomGG(CustomBase):
    """The manifest's data, ground queries against the ground gallery."""

    protocol = PROTOCOLS["GG"]


@register_dataset("Custom_AGAG")
class CustomAGAG(CustomBase):
    """The manifest's data, every query against the whole gallery, only cross-view matches count."""

    protocol = PROTOCOLS["AGAG"]


@register_dataset("Custom_AAGG")
class CustomAAGG(CustomBase):
    """The manifest's data, queries against the whole gallery, only same-view matches count."""

    protocol = PROTOCOLS["AAGG"]
