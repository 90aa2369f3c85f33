"""AG-ReID (v1) and AG-ReID.v2 with their protocols.

Layouts: ``<root>/AGReID/{train,query,gallery}/*.jpg`` + ``qut_attribute_v4_88_attributes.mat``;
``<root>/AGReID.v2/{train_all,query,gallery}/<any>/*.jpg`` + ``qut_attribute_v8.mat`` (the folder may also
be called ``AGReIDv2``). File names contain ``P<digits>T<digits>A<digits>`` and ``C<digits>F<digits>``;
the identity is the integer of the concatenated P, T and A digits, the time id the last A digit.
v1: camera 3 is ground (CCTV), any other aerial. v2: camera 3 CCTV, 2 wearable, any other UAV.
"""
import os
import re

import numpy as np

from text import prompts
from utils.errors import DataError

from .bases import AERIAL, GROUND, Protocol, ReIDDataset, Sample, list_images
from .registry import register_dataset

IDENTITY_PATTERN = re.compile(r"P(\d+)T(\d+)A(\d+)")
CAMERA_PATTERN = re.compile(r"C(\d+)F(\d+)")
NAME_RULE = "P<digits>T<digits>A<digits>...C<digits>F<digits>...jpg"
CCTV_CAMERA, WEARABLE_CAMERA = 3, 2
CCTV, WEARABLE, UAV = 0, 1, 2

# The 88 one-hot columns of the QUT attribute file: 15 attributes in this order, classes in this order.
QUT_ATTRIBUTES = (
    ("gender", ("male", "female", "unknown")),
    ("age", ("young", "middle", "old", "unknown")),
    ("height", ("child", "short", "medium", "tall", "unknown")),
    ("weight", ("thin", "medium", "fat", "unknown")),
    ("ethnic", ("white", "black", "asian", "india", "unknown")),
    ("haircolor", ("black", "brown", "white", "red", "gray", "occluded", "unknown")),
    ("hairstyle", ("bald", "short", "medium", "long", "horsetail", "unknown")),
    ("beard", ("on", "off", "unknown")),
    ("moustache", ("on", "off", "unknown")),
    ("glasses", ("normal", "sun", "off", "unknown")),
    ("head", ("hat", "scarf", "neckless", "occluded", "unknown")),
    ("upper", ("tshirt", "blouse", "sweater", "coat", "bikini", "naked", "dress", "uniform", "shirt", "suit",
               "hoodie", "cardiga", "unknown")),
    ("lower", ("jeans", "leggins", "pants", "shorts", "skirt", "bikini", "dress", "uniform", "suit", "unknown")),
    ("feet", ("sportshoe", "classicshoe", "highheels", "boots", "sandals", "nothing", "unknown")),
    ("bag", ("normal", "backpack", "hand", "rolling", "umbrella", "sportif", "market", "nothing", "unknown")),
)
QUT_COLUMNS = sum(len(classes) for _, classes in QUT_ATTRIBUTES)
# Raw value marking the class that applies within a one-hot block (1 = does not apply).
QUT_POSITIVE = 2


def parse_agreid_name(path, camera_to_view):
    """``(pid, camid, viewid, timeid)`` from an AG-ReID file name; camid equals viewid in AG-ReID."""
    name = os.path.basename(path)
    identity, camera = IDENTITY_PATTERN.search(name), CAMERA_PATTERN.search(name)
    if identity is None or camera is None:
        raise DataError(f"image file name '{path}' does not follow the AG-ReID rule {NAME_RULE}")
    p, t, a = identity.groups()
    viewid = camera_to_view(int(camera.group(1)))
    return int(p + t + a), viewid, viewid, int(a[-1])


def decode_qut_row(raw):
    """Class index per attribute from one row of 88 raw values (the last class when none is marked)."""
    labels, start = [], 0
    for _, classes in QUT_ATTRIBUTES:
        block = raw[start:start + len(classes)]
        marked = np.flatnonzero(block == QUT_POSITIVE)
        labels.append(int(marked[0]) if marked.size else len(classes) - 1)
        start += len(classes)
    return tuple(labels)


def _index_to_pid(value, path):
    try:
        if isinstance(value, (int, float, np.integer, np.floating)):
            return int(value)
        return int(str(value).strip())
    except ValueError:
        raise DataError(f"attribute file '{path}': image_index {value!r} is not an integer identity") from None


def read_qut_attributes(path):
    """Identity -> attribute class indices from a QUT attribute ``.mat`` file (struct ``qut_attribute``)."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"reading the attribute file '{path}' needs scipy: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # scipy raises several unrelated types for damaged files
        raise DataError(f"attribute file '{path}' is not a readable MATLAB file: {exc}") from None
    if "qut_attribute" not in mat:
        raise DataError(f"attribute file '{path}': expected a struct 'qut_attribute' with 'train' and 'test'")
    labels = {}
    for part in ("train", "test"):
        table = getattr(mat["qut_attribute"], part, None)
        fields = list(getattr(table, "_fieldnames", ()))
        if "image_index" not in fields:
            raise DataError(f"attribute file '{path}': expected qut_attribute.{part} with an 'image_index' field")
        columns = [f for f in fields if f != "image_index"]
        if len(columns) != QUT_COLUMNS:
            raise DataError(f"attribute file '{path}': qut_attribute.{part} has {len(columns)} attribute "
                            f"columns, expected {QUT_COLUMNS}")
        index = np.atleast_1d(table.image_index)
        values = [np.atleast_1d(np.asarray(getattr(table, c))) for c in columns]
        if any(v.shape != index.shape for v in values):
            raise DataError(f"attribute file '{path}': qut_attribute.{part} columns differ in length")
        rows = np.stack(values, axis=1).astype(np.int64)  # (N, 88)
        for key, raw in zip(index, rows):
            # An identity listed in both parts keeps its first (train) row.
            labels.setdefault(_index_to_pid(key, path), decode_qut_row(raw))
    return labels


class AGReIDBase(ReIDDataset):
    """Reader of the AG-ReID folders; protocol subclasses set ``protocol``."""

    folders = ("AGReID",)
    split_folders = {"train": "train", "query": "query", "gallery": "gallery"}
    attribute_file = "qut_attribute_v4_88_attributes.mat"

    @property
    def dataset_dir(self):
        candidates = [os.path.join(self.root, f) for f in self.folders]
        return next((c for c in candidates if os.path.isdir(c)), candidates[0])

    @staticmethod
    def camera_to_view(camera):
        return GROUND if camera == CCTV_CAMERA else AERIAL

    def _layout(self):
        splits = ",".join(self.split_folders.values())
        return f"{' or '.join(self.folders)}/{{{splits}}}/ with {NAME_RULE} images under '{self.root}'"

    def read_split(self, split):
        self.require_dir(self.dataset_dir, self._layout())
        folder = self.require_dir(os.path.join(self.dataset_dir, self.split_folders[split]), self._layout())
        return [Sample(path, *parse_agreid_name(path, self.camera_to_view)) for path in list_images(folder)]

    def load_annotations(self):
        self.attribute_labels = None
        if self.use_text or self.use_attr:
            path = os.path.join(self.dataset_dir, self.attribute_file)
            if not os.path.isfile(path):
                why = "use_attr" if self.use_attr else "use_text"
                raise DataError(f"attribute file '{path}' not found (needed for {why})")
            self.attribute_labels = read_qut_attributes(path)
            self.attribute_path = path

    def attribute_schema(self):
        return [(name, len(classes)) for name, classes in QUT_ATTRIBUTES]

    def annotate(self, sample, split):
        if split != "train":
            return prompts.test_caption(self.num_prompt_words, prompts.ATTRIBUTES_UNKNOWN), None
        labels = self.attribute_labels.get(sample.pid) if self.attribute_labels is not None else None
        if self.attribute_labels is not None and labels is None:
            raise DataError(f"attribute file '{self.attribute_path}' has no row for identity {sample.pid} "
                            f"(image '{sample.path}')")
        text = None
        if self.use_text:
            described = prompts.describe_attributes(
                (name, classes[label]) for (name, classes), label in zip(QUT_ATTRIBUTES, labels))
            text = prompts.attribute_caption(self.num_prompt_words, described)
        return text, labels


class AGReIDv2Base(AGReIDBase):
    """Reader of the AG-ReID.v2 folders (three platforms: CCTV, wearable, UAV)."""

    folders = ("AGReID.v2", "AGReIDv2")
    split_folders = {"train": "train_all", "query": "query", "gallery": "gallery"}
    attribute_file = "qut_attribute_v8.mat"
    view_names = {CCTV: "cctv", WEARABLE: "wearable", UAV: "uav"}

    @staticmethod
    def camera_to_view(camera):
        return {CCTV_CAMERA: CCTV, WEARABLE_CAMERA: WEARABLE}.get(camera, UAV)


@register_dataset("AGReID")
class AGReID(AGReIDBase):
    """AG-ReID, all query vs all gallery images."""


@register_dataset("AGReID_AG")
class AGReIDAG(AGReIDBase):
    """AG-ReID, aerial query vs ground gallery."""

    protocol = Protocol(query_views=(AERIAL,), gallery_views=(GROUND,), restrict_query=True)


@register_dataset("AGReID_GA")
class AGReIDGA(AGReIDBase):
    """AG-ReID, ground query vs aerial gallery."""

    protocol = Protocol(query_views=(GROUND,), gallery_views=(AERIAL,), restrict_query=True)


@register_dataset("AGReIDv2")
class AGReIDv2(AGReIDv2Base):
    """AG-ReID.v2, all query vs all gallery images."""


@register_dataset("AGReIDv2_AC")
class AGReIDv2AC(AGReIDv2Base):
    """AG-ReID.v2, UAV query vs CCTV gallery."""

    protocol = Protocol(query_views=(UAV,), gallery_views=(CCTV,), restrict_query=True)


@register_dataset("AGReIDv2_CA")
class AGReIDv2CA(AGReIDv2Base):
    """AG-ReID.v2, CCTV query vs UAV gallery."""

    protocol = Protocol(query_views=(CCTV,), gallery_views=(UAV,), restrict_query=True)


@register_dataset("AGReIDv2_AW")
class AGReIDv2AW(AGReIDv2Base):
    """AG-ReID.v2, UAV query vs wearable gallery."""

    protocol = Protocol(query_views=(UAV,), gallery_views=(WEARABLE,), restrict_query=True)


@register_dataset("AGReIDv2_WA")
class AGReIDv2WA(AGReIDv2Base):
    """AG-ReID.v2, wearable query vs UAV gallery."""

    protocol = Protocol(query_views=(WEARABLE,), gallery_views=(UAV,), restrict_query=True)
