"""CARGO (synthetic aerial-ground ReID) with its protocols.

Layout: ``<root>/CARGO/{train,query,gallery}/**/*.jpg``. File names ``Cam<N>_<day|night>_<pid>_<index>.jpg``;
cameras 1-5 are aerial, 6-13 ground. CARGO has no attribute annotations.
"""
import os
import re

from text import prompts
from utils.errors import DataError

from .bases import AERIAL, GROUND, Protocol, ReIDDataset, Sample, list_images
from .cp2108 import PROTOCOLS
from .registry import register_dataset

NAME_PATTERN = re.compile(r"^Cam(\d+)_(day|night)_(-?\d+)_")
NAME_RULE = "Cam<N>_<day|night>_<pid>_<index>.jpg"
TIME_IDS = {"day": 1, "night": 0}
LAST_AERIAL_CAMERA = 5


def parse_cargo_name(path):
    """``(pid, camid, viewid, timeid)`` from a CARGO file name (``DataError`` if it breaks the rule)."""
    match = NAME_PATTERN.match(os.path.basename(path))
    if match is None or int(match.group(1)) < 1:
        raise DataError(f"image file name '{path}' does not follow the CARGO rule {NAME_RULE}")
    camera = int(match.group(1))
    viewid = AERIAL if camera <= LAST_AERIAL_CAMERA else GROUND
    return int(match.group(3)), camera - 1, viewid, TIME_IDS[match.group(2)]


class CARGOBase(ReIDDataset):
    """Reader of the CARGO folders; protocol subclasses set ``protocol``."""

    folder = "CARGO"

    @property
    def dataset_dir(self):
        return os.path.join(self.root, self.folder)

    def read_split(self, split):
        layout = f"{self.folder}/{{train,query,gallery}}/**/{NAME_RULE} under '{self.root}'"
        self.require_dir(self.dataset_dir, layout)
        folder = self.require_dir(os.path.join(self.dataset_dir, split), layout)
        return [Sample(path, *parse_cargo_name(path)) for path in list_images(folder)]

    def annotate(self, sample, split):
        return prompts.test_caption(self.num_prompt_words, prompts.ATTRIBUTES_NOT_AVAILABLE), None


@register_dataset("CARGO")
class CARGO(CARGOBase):
    """CARGO, all query vs all gallery images (query not restricted to gallery identities)."""


@register_dataset("CARGO_AG")
class CARGOAG(CARGOBase):
    """CARGO, aerial query vs ground gallery."""

    protocol = PROTOCOLS["AG"]


@register_dataset("CARGO_GA")
class CARGOGA(CARGOBase):
    """CARGO, ground query vs aerial gallery."""

    protocol = PROTOCOLS["GA"]


@register_dataset("CARGO_AA")
class CARGOAA(CARGOBase):
    """CARGO, aerial query vs aerial gallery."""

    protocol = PROTOCOLS["AA"]


@register_dataset("CARGO_GG")
class CARGOGG(CARGOBase):
    """CARGO, ground query vs ground gallery."""

    protocol = PROTOCOLS["GG"]


@register_dataset("CARGO_AGAG")
class CARGOAGAG(CARGOBase):
    """CARGO, all vs all, only cross-view matches count (camera id = view id)."""

    protocol = PROTOCOLS["AGAG"]


@register_dataset("CARGO_AAGG")
class CARGOAAGG(CARGOBase):
    """CARGO, all vs all (no query restriction), only same-view matches count."""

    protocol = Protocol(view_mode="same")
