"""Market-1501, and the reader shared by the benchmarks stored in its layout (DukeMTMC-reID, Occluded-Duke,
VeRi-776).

Layout: ``<folder>/{bounding_box_train,query,bounding_box_test}/*.jpg``, the folder being the first of
``Market-1501-v15.09.15``, ``market1501/Market-1501-v15.09.15``, ``Market-1501``, ``market1501`` found
under the root. File names ``PPPP_cCsS_FFFFFF_BB.jpg`` (identity, camera 1-6, sequence, frame, box).
Identity -1 marks junk images, ignored everywhere; identity 0 marks distractors, kept in the gallery where
they never match a query. One view, no attributes.
"""
import os
import re

from text import prompts
from utils.errors import DataError

from .bases import GROUND, ReIDDataset, Sample, list_images
from .registry import register_dataset

JUNK_PID = -1


def locate_folder(dataset, folders, *layouts):
    """Absolute path of the first of ``folders`` under ``dataset.root`` that holds every entry of one of
    ``layouts`` (tuples of required sub-paths).

    Falls back to the first existing folder (so that the missing entry is reported by the caller);
    ``DataError`` naming every folder tried when none exists.
    """
    candidates = [os.path.join(dataset.root, f) for f in folders]
    for candidate in candidates:
        if any(all(os.path.exists(os.path.join(candidate, r)) for r in layout) for layout in layouts):
            return candidate
    existing = [c for c in candidates if os.path.isdir(c)]
    if existing:
        return existing[0]
    raise DataError(f"dataset {dataset.name}: none of the folders {', '.join(folders)} found under "
                    f"'{dataset.root}'")


class SplitFolders(ReIDDataset):
    """Reader of benchmarks with one image folder per split and identity + camera in each file name.

    Subclasses set ``folders`` (accepted dataset folders under the root, in order of preference),
    ``split_folders``, ``name_pattern`` (a regex whose groups 1 and 2 are the identity and the 1-based
    camera), ``name_rule`` (its description for messages), ``num_cameras`` and ``subject`` (the prompt noun).
    """

    folders = ()
    split_folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    name_pattern = None
    name_rule = ""
    num_cameras = 0
    subject = prompts.PERSON
    view_names = {GROUND: "ground"}
    # The reference meets the training images of some of these benchmarks in directory order (an unsorted
    # glob), which then decides its identity labels (ReIDDataset.label_insertion_order).
    directory_order = False

    @property
    def dataset_dir(self):
        if not hasattr(self, "_dataset_dir"):
            self._dataset_dir = locate_folder(self, self.folders, tuple(self.split_folders.values()))
        return self._dataset_dir

    def parse_name(self, path):
        """``(pid, camid)`` from a file name (camid 0-based); ``DataError`` naming it and the rule otherwise."""
        match = self.name_pattern.match(os.path.basename(path))
        if match is None or not 1 <= int(match.group(2)) <= self.num_cameras:
            raise DataError(f"image file name '{path}' does not follow the {self.name} rule {self.name_rule}")
        return int(match.group(1)), int(match.group(2)) - 1

    def read_split(self, split):
        layout = (f"{{{','.join(self.split_folders.values())}}}/ in one of {', '.join(self.folders)} "
                  f"under '{self.root}'")
        folder = self.require_dir(os.path.join(self.dataset_dir, self.split_folders[split]), layout)
        samples = []
        for path in list_images(folder):
            pid, camid = self.parse_name(path)
            if pid != JUNK_PID:
                samples.append(Sample(path, pid, camid, GROUND, 0))
        return samples

    def annotate(self, sample, split):
        # No attributes or captions: every image gets the plain prompt.
        return prompts.test_caption(self.num_prompt_words, subject=self.subject), None

    def label_insertion_order(self, samples):
        if not self.directory_order:
            return super().label_insertion_order(samples)
        listing = {}  # folder -> {file name: position in os.listdir}

        def position(sample):
            folder, name = os.path.split(sample.path)
            if folder not in listing:
                listing[folder] = {entry: i for i, entry in enumerate(os.listdir(folder))}
            return folder, listing[folder][name]

        return [s.pid for s in sorted(samples, key=position)]


@register_dataset("market1501")
class Market1501(SplitFolders):
    """Market-1501 (Zheng et al., ICCV 2015): 751 training identities, 6 cameras."""

    folders = ("Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "Market-1501", "market1501")
    name_pattern = re.compile(r"^(-?\d+)_c(\d+)s\d+_\d+_\d+")
    name_rule = "PPPP_cCsS_FFFFFF_BB.jpg (identity, camera 1-6, sequence, frame, box)"
    num_cameras = 6
