"""MSMT17 in both released layouts.

Layouts, under the first of ``MSMT17``, ``MSMT17_V2``, ``MSMT17_V1``, ``msmt17/MSMT17_V2``,
``msmt17/MSMT17_V1`` found in the root:

* V1: ``train/`` and ``test/`` image folders;
* V2: ``mask_train_v2/`` and ``mask_test_v2/`` image folders;

each with ``list_train.txt``, ``list_val.txt`` (images of the train folder), ``list_query.txt`` and
``list_gallery.txt`` (images of the test folder). A list line is ``<path relative to its folder> <pid>``.
The training split is train + val with the lists' own identities (val images are train identities).
The camera comes from the file name: ``<pid>_<index>_<camera>_...`` (the released naming, e.g.
``0000_000_01_0303morning_0015_0.jpg``) or ``<pid>_c<camera>_...``; 15 cameras, 1-based. One view.
"""
import os
import re

from text import prompts
from utils.errors import DataError

from .bases import GROUND, ReIDDataset, Sample, read_id_list
from .market1501 import locate_folder
from .registry import register_dataset

FOLDERS = ("MSMT17", "MSMT17_V2", "MSMT17_V1", "msmt17/MSMT17_V2", "msmt17/MSMT17_V1")
# (train images, test images) of the V1 and V2 layouts.
IMAGE_FOLDERS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))
LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",),
         "gallery": ("list_gallery.txt",)}
NAME_PATTERN = re.compile(r"^\d+_(?:\d+_(\d+)|c(\d+))_")
NAME_RULE = "<pid>_<index>_<camera>_....jpg or <pid>_c<camera>_....jpg with camera 1-15"
NUM_CAMERAS = 15


def parse_msmt17_camera(path):
    """0-based camera of an MSMT17 image; ``DataError`` naming the file and the rule when it breaks it."""
    match = NAME_PATTERN.match(os.path.basename(path))
    camera = int(match.group(1) or match.group(2)) if match else 0
    if not 1 <= camera <= NUM_CAMERAS:
        raise DataError(f"image file name '{path}' does not follow the MSMT17 rule {NAME_RULE}")
    return camera - 1


@register_dataset("msmt17")
class MSMT17(ReIDDataset):
    """MSMT17 (Wei et al., CVPR 2018): 1041 training identities, 15 cameras."""

    view_names = {GROUND: "ground"}

    @property
    def dataset_dir(self):
        if not hasattr(self, "_dataset_dir"):
            lists = tuple(name for names in LISTS.values() for name in names)
            self._dataset_dir = locate_folder(self, FOLDERS, *(folders + lists for folders in IMAGE_FOLDERS))
        return self._dataset_dir

    def _image_folders(self):
        base = self.dataset_dir
        for train, test in IMAGE_FOLDERS:
            # Evaluation needs only the test images.
            if (os.path.isdir(os.path.join(base, train)) or not self.load_train) and \
                    os.path.isdir(os.path.join(base, test)):
                return os.path.join(base, train), os.path.join(base, test)
        raise DataError(f"dataset {self.name}: '{base}' holds neither train/ + test/ (MSMT17_V1) nor "
                        f"mask_train_v2/ + mask_test_v2/ (MSMT17_V2)")

    def read_split(self, split):
        train_dir, test_dir = self._image_folders()
        images = train_dir if split == "train" else test_dir
        samples = []
        for list_name in LISTS[split]:
            list_path = os.path.join(self.dataset_dir, list_name)
            if not os.path.isfile(list_path):
                raise DataError(f"dataset {self.name}: list file '{list_path}' not found; expected "
                                f"{', '.join(n for names in LISTS.values() for n in names)} in '{self.dataset_dir}'")
            samples.extend(self._read_list(list_path, images))
        return samples

    def _read_list(self, list_path, images):
        samples = []
        for number, name, pid in read_id_list(list_path, "<relative/path.jpg> <pid>"):
            path = os.path.join(images, name)
            if not os.path.isfile(path):
                raise DataError(f"list file '{list_path}' line {number}: image '{path}' not found")
            samples.append(Sample(path, pid, parse_msmt17_camera(path), GROUND, 0))
        return samples

    def annotate(self, sample, split):
        # No attributes or captions: every image gets the plain prompt.
        return prompts.test_caption(self.num_prompt_words), None
