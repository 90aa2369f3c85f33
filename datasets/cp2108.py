"""CP2108 (and every benchmark stored in its on-disk format, e.g. SynthAG) with its protocols.

Layout under ``<root>/<folder>/``: either ``split_v{V}/{train,query,gallery}_v{V}.txt`` with images in
``images_v{V}/`` (``images/`` when V < 100), or the released ``{train,query,gallery}.txt`` with ``images/``.
Each split line is an image path relative to the images folder. File names are
``<pid>_<camera>_<time>_<scene>[_...].<ext>``; cameras 1-22 are ground, 23 and up aerial.
Annotations: ``attr_translation_idx.json`` ({attribute: {value: class}}), ``attributes_labeled_qwen.json``
({"<pid>_<view>_<time>": {attribute: value}}), ``attribute_captions_doubao.json``
({"<pid>_<view>_<time>": caption}). Like the reference, every image reads the entry of (pid, view 0, time 1)
unless ``annotation_per_image`` (MODEL.FIXES.ANNOTATION_PER_IMAGE) asks for the image's own entry.
"""
import json
import logging
import os

from configs import check_choice, declare_config
from text import prompts
from utils.errors import ConfigError, DataError

from .bases import AERIAL, GROUND, Protocol, ReIDDataset, Sample
from .registry import DATASETS, register_dataset

#: Sources of CP2108's training texts (MODEL.TEXT_TYPE).
TEXT_TYPES = ("attribute", "captions")


def _check_cp2108_config(cfg):
    check_choice(cfg, "MODEL.TEXT_TYPE", TEXT_TYPES)


@declare_config(check=_check_cp2108_config)
def add_cp2108_config(cfg):
    """CP2108's keys: the split version, the text source and the annotation-lookup fix."""
    # CP2108 text source: "attribute" (text built from the attribute labels) or "captions" (caption JSON).
    cfg.MODEL.TEXT_TYPE = "attribute"
    # CP2108 captions and attribute labels: the reference gives every image (train, query, gallery) the entry
    # of (identity, view 0, time 1); True looks up each image's own (identity, view, time) entry.
    cfg.MODEL.FIXES.ANNOTATION_PER_IMAGE = False
    # CP2108 split version (split_v{V}/ and images_v{V}/).
    cfg.DATASETS.VERSION = 100

logger = logging.getLogger(__name__)

ATTRIBUTE_NAMES = ("Accessories", "Feet", "Glasses", "Head Accessories", "Holding Phone", "Lower Clothing",
                   "Lower Color", "Lower Style", "Pose", "Upper Clothing", "Upper Color", "Upper Style")
TRANSLATION_FILE = "attr_translation_idx.json"
ATTRIBUTE_FILE = "attributes_labeled_qwen.json"
CAPTION_FILE = "attribute_captions_doubao.json"
FIRST_AERIAL_CAMERA = 23
UNKNOWN = "unknown"
# The one (view, time) entry the reference reads for every image of an identity.
REFERENCE_ENTRY = (GROUND, 1)
NAME_RULE = "<pid>_<camera>_<time>_<scene>[_...].<ext> with integer pid, camera >= 1 and time"


def parse_cp2108_name(path):
    """``(pid, camid, viewid, timeid)`` from a CP2108-format file name (``DataError`` if it breaks the rule)."""
    fields = os.path.splitext(os.path.basename(path))[0].split("_")
    try:
        if len(fields) < 4:
            raise ValueError
        pid, camera, timeid = int(fields[0]), int(fields[1]), int(fields[2])
    except ValueError:
        raise DataError(f"image file name '{path}' does not follow the CP2108 rule {NAME_RULE}") from None
    if camera < 1:
        raise DataError(f"image file name '{path}' does not follow the CP2108 rule {NAME_RULE}")
    viewid = GROUND if camera < FIRST_AERIAL_CAMERA else AERIAL
    return pid, camera - 1, viewid, timeid


def read_json(path, needed_for):
    """Parsed JSON file; ``DataError`` naming the file when missing or malformed."""
    if not os.path.isfile(path):
        raise DataError(f"annotation file '{path}' not found (needed for {needed_for})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"annotation file '{path}' is not valid JSON: {exc}") from None


class AnnotationTable:
    """Per-image annotations keyed ``"<pid>_<view>_<time>"`` with the reference's repair rules.

    ``lookup(pid, view, time)`` returns that entry; when missing, the same view at the other time, then the
    other view at the same time, then the other view at the other time (for (view 0, time 1) these are the
    reference's repair rules).
    """

    def __init__(self, entries, path):
        self.path = path
        self.table = {}
        if not isinstance(entries, dict):
            raise DataError(f"annotation file '{path}': expected a JSON object keyed '<pid>_<view>_<time>'")
        for key, value in entries.items():
            try:
                pid, viewid, timeid = (int(v) for v in str(key).split("_"))
            except ValueError:
                raise DataError(f"annotation file '{path}': key {key!r} is not '<pid>_<view>_<time>'") from None
            self.table.setdefault(pid, {})[(viewid, timeid)] = value

    def lookup(self, pid, viewid, timeid):
        entries = self.table.get(pid)
        if not entries:
            raise DataError(f"annotation file '{self.path}' has no entry for identity {pid}")
        for view in [viewid] + sorted(v for v in {v for v, _ in entries} if v != viewid):
            for time in [timeid] + sorted(t for v, t in entries if v == view and t != timeid):
                if (view, time) in entries:
                    return entries[(view, time)]
        raise AssertionError("unreachable: a non-empty table always matches some (view, time)")


class CP2108Format(ReIDDataset):
    """Reader of the CP2108 on-disk format; protocol subclasses set ``protocol``.

    ``version`` picks ``split_v{version}/`` and ``images_v{version}/``; ``annotation_per_image`` reads each
    image's own (identity, view, time) annotation entry instead of the reference's single entry per identity;
    ``text_type`` words the training texts from the attribute labels ("attribute") or the caption file
    ("captions").
    """

    folder = "CP2108"

    def __init__(self, root, version=100, annotation_per_image=False, text_type="attribute", **options):
        if text_type not in TEXT_TYPES:
            raise ConfigError(f"text_type (MODEL.TEXT_TYPE) = {text_type!r}: expected one of "
                              f"{', '.join(TEXT_TYPES)}")
        self.version = int(version)
        self.annotation_per_image = bool(annotation_per_image)
        self.text_type = text_type
        super().__init__(root, **options)

    @classmethod
    def options_from_config(cls, cfg):
        return {"version": cfg.DATASETS.VERSION, "annotation_per_image": cfg.MODEL.FIXES.ANNOTATION_PER_IMAGE,
                "text_type": cfg.MODEL.TEXT_TYPE}

    @property
    def dataset_dir(self):
        return os.path.join(self.root, self.folder)

    # ---- splits ---------------------------------------------------------------------------------------
    def _layout(self):
        """``(split files by split, images folder)`` of whichever supported layout is present."""
        base = self.require_dir(self.dataset_dir, self._layout_description())
        v = self.version
        versioned = {s: os.path.join(base, f"split_v{v}", f"{s}_v{v}.txt") for s in ("train", "query", "gallery")}
        versioned_images = os.path.join(base, f"images_v{v}" if v >= 100 else "images")
        released = {s: os.path.join(base, f"{s}.txt") for s in ("train", "query", "gallery")}
        released_images = os.path.join(base, "images")
        for files, images in ((versioned, versioned_images), (released, released_images)):
            if all(os.path.isfile(files[s]) for s in self.splits) and os.path.isdir(images):
                return files, images
        missing = next(p for p in [*(versioned[s] for s in self.splits), versioned_images] if not os.path.exists(p))
        raise DataError(f"dataset {self.name}: '{missing}' not found; expected {self._layout_description()}")

    def _layout_description(self):
        v = self.version
        images = f"images_v{v}" if v >= 100 else "images"
        return (f"{self.folder}/split_v{v}/{{train,query,gallery}}_v{v}.txt + {self.folder}/{images}/ "
                f"(or {self.folder}/{{train,query,gallery}}.txt + {self.folder}/images/) under '{self.root}'")

    def read_split(self, split):
        if not hasattr(self, "_layout_cache"):
            self._layout_cache = self._layout()
        files, images = self._layout_cache
        split_file = files[split]
        samples = []
        with open(split_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines, 1):
            relative = line.strip()
            if not relative:
                continue
            path = os.path.join(images, relative)
            if not os.path.isfile(path):
                # The released split files may already carry the "images/" prefix.
                alternative = os.path.join(self.dataset_dir, relative)
                if not os.path.isfile(alternative):
                    raise DataError(f"split file '{split_file}' line {number}: image '{path}' not found")
                path = alternative
            pid, camid, viewid, timeid = parse_cp2108_name(path)
            samples.append(Sample(os.path.abspath(path), pid, camid, viewid, timeid))
        counts = {name: sum(s.viewid == v for s in samples) for v, name in self.view_names.items()}
        logger.debug("%s: %s", split_file, counts)
        return samples

    # ---- annotations ------------------------------------------------------------------------------------
    def load_annotations(self):
        self.translation = None
        self.labels = None
        self.captions = None
        needs_labels = self.use_attr or (self.use_text and self.text_type == "attribute")
        if needs_labels:
            why = "use_attr" if self.use_attr else "use_text with text_type 'attribute'"
            base = self.dataset_dir
            self.translation = read_json(os.path.join(base, TRANSLATION_FILE), why)
            translation_ok = isinstance(self.translation, dict) and all(
                isinstance(v, dict) for v in self.translation.values())
            if not translation_ok:
                raise DataError(f"annotation file '{os.path.join(base, TRANSLATION_FILE)}': expected "
                                f"{{attribute: {{value: class_index}}}}")
            path = os.path.join(base, ATTRIBUTE_FILE)
            self.labels = AnnotationTable(read_json(path, why), path)
            self.attribute_names = tuple(sorted(n for n in ATTRIBUTE_NAMES if n in self.translation))
            if not self.attribute_names:
                raise DataError(f"annotation file '{os.path.join(base, TRANSLATION_FILE)}' names none of the "
                                f"attributes {', '.join(ATTRIBUTE_NAMES)}")
        if self.use_text and self.text_type == "captions":
            path = os.path.join(self.dataset_dir, CAPTION_FILE)
            self.captions = AnnotationTable(read_json(path, "use_text with text_type 'captions'"), path)

    def attribute_schema(self):
        return [(name, len(self.translation[name])) for name in self.attribute_names]

    def _entry_of(self, sample):
        """(pid, view, time) of the annotation ``sample`` reads."""
        if self.annotation_per_image:
            return sample.pid, sample.viewid, sample.timeid
        return (sample.pid, *REFERENCE_ENTRY)

    def _values(self, sample):
        """Attribute name -> value string of the sample's annotation ('unknown' when absent)."""
        entry = self.labels.lookup(*self._entry_of(sample))
        if not isinstance(entry, dict):
            raise DataError(f"annotation file '{self.labels.path}': entry of identity {sample.pid} is not an object")
        return {name: str(entry.get(name, UNKNOWN)) for name in self.attribute_names}

    def _attribute_labels(self, values):
        labels = []
        for name in self.attribute_names:
            classes = self.translation[name]
            if values[name] not in classes:
                raise DataError(f"annotation file '{os.path.join(self.dataset_dir, TRANSLATION_FILE)}': "
                                f"attribute {name!r} has no class for value {values[name]!r}")
            label = classes[values[name]]
            if not isinstance(label, int) or not 0 <= label < len(classes):
                raise DataError(f"annotation file '{os.path.join(self.dataset_dir, TRANSLATION_FILE)}': "
                                f"attribute {name!r} value {values[name]!r} has class {label!r}, expected an "
                                f"integer in [0, {len(classes)})")
            labels.append(label)
        return tuple(labels)

    def annotate(self, sample, split):
        describe = self.use_text and split == "train" and self.text_type == "attribute"
        values = self._values(sample) if (self.use_attr or describe) else None
        attrs = self._attribute_labels(values) if self.use_attr else None
        text = None
        if self.use_text:
            if split != "train":
                text = prompts.test_caption(self.num_prompt_words)
            elif self.text_type == "captions":
                caption = self.captions.lookup(*self._entry_of(sample))
                text = prompts.attribute_caption(self.num_prompt_words, caption)
            else:
                described = prompts.describe_attributes(
                    (name.replace(" ", "_"), values[name]) for name in self.attribute_names)
                text = prompts.attribute_caption(self.num_prompt_words, described)
        return text, attrs


PROTOCOLS = {
    "ALL": Protocol(restrict_query=True),
    "AG": Protocol(query_views=(AERIAL,), gallery_views=(GROUND,), restrict_query=True),
    "GA": Protocol(query_views=(GROUND,), gallery_views=(AERIAL,), restrict_query=True),
    "AA": Protocol(query_views=(AERIAL,), gallery_views=(AERIAL,), restrict_query=True),
    "GG": Protocol(query_views=(GROUND,), gallery_views=(GROUND,), restrict_query=True),
    "AGAG": Protocol(camid_from_view=True, view_mode="cross"),
    "AAGG": Protocol(restrict_query=True, view_mode="same"),
}


@register_dataset("CP2108_ALL")
class CP2108All(CP2108Format):
    """CP2108, all query vs all gallery images."""

    protocol = PROTOCOLS["ALL"]


@register_dataset("CP2108_AG")
class CP2108AG(CP2108Format):
    """CP2108, aerial query vs ground gallery."""

    protocol = PROTOCOLS["AG"]


@register_dataset("CP2108_GA")
class CP2108GA(CP2108Format):
    """CP2108, ground query vs aerial gallery."""

    protocol = PROTOCOLS["GA"]


@register_dataset("CP2108_AA")
class CP2108AA(CP2108Format):
    """CP2108, aerial query vs aerial gallery."""

    protocol = PROTOCOLS["AA"]


@register_dataset("CP2108_GG")
class CP2108GG(CP2108Format):
    """CP2108, ground query vs ground gallery."""

    protocol = PROTOCOLS["GG"]


@register_dataset("CP2108_AGAG")
class CP2108AGAG(CP2108Format):
    """CP2108, all vs all, only cross-view matches count (camera id = view id)."""

    protocol = PROTOCOLS["AGAG"]


@register_dataset("CP2108_AAGG")
class CP2108AAGG(CP2108Format):
    """CP2108, all vs all, only same-view matches count."""

    protocol = PROTOCOLS["AAGG"]


def _register_old_name(cls):
    """Register ``cls`` again under its old name ``CP2000_*``, logging a notice when it is used."""
    new_name = cls.registry_name
    old_name = new_name.replace("CP2108", "CP2000", 1)

    def __init__(self, *args, **kwargs):
        logger.info("%s is the old name of %s", old_name, new_name)
        cls.__init__(self, *args, **kwargs)

    # A subclass, so that the registry holds one class per name; it keeps the new registry_name, under
    # which the dataset then reports itself.
    alias = type(cls.__name__ + "OldName", (cls,), {"__init__": __init__, "__doc__": f"Old name of {new_name}."})
    DATASETS.register(old_name)(alias)


# The seed README called CP2108's protocols CP2000_*; those names keep working.
for _protocol in (CP2108All, CP2108AG, CP2108GA, CP2108AA, CP2108GG, CP2108AGAG, CP2108AAGG):
    _register_old_name(_protocol)
