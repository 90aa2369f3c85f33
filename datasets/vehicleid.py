"""VehicleID vehicle ReID with its random-gallery protocol.

Layout: ``<root>/VehicleID_V1.0/image/<name>.jpg`` and ``<root>/VehicleID_V1.0/train_test_split/`` with
``train_list.txt`` and ``test_list_{800,1600,2400}.txt``; each line ``<image name> <vehicle id>`` (the
name without or with ``.jpg``). Protocol: for every test vehicle one image drawn at random forms the
gallery and the others are queries; results are averaged over several draws (trials), each seeded by
``(seed, trial)``. VehicleID has no cameras: queries get camera 0 and gallery images camera 1, so that
same-camera removal removes nothing. One view, no attributes.
"""
import os
from collections import defaultdict

import numpy as np

from configs import declare_config
from text import prompts
from utils.errors import ConfigError, DataError

from .bases import GROUND, ReIDDataset, Sample, read_id_list
from .registry import register_dataset


@declare_config
def add_vehicleid_config(cfg):
    """VehicleID's keys: test-list size and the random gallery draws."""
    # VehicleID: test set size, picks train_test_split/test_list_<size>.txt (800, 1600 or 2400).
    cfg.DATASETS.VEHICLEID_TEST_SIZE = 800
    # VehicleID: number of random query/gallery draws (trials) the results are averaged over.
    cfg.DATASETS.VEHICLEID_TRIALS = 10
    # VehicleID: seed of the gallery draws; trial t draws with (seed, t), so a seed fixes every trial.
    cfg.DATASETS.VEHICLEID_SEED = 0

QUERY_CAMERA, GALLERY_CAMERA = 0, 1


@register_dataset("VehicleID")
class VehicleID(ReIDDataset):
    """VehicleID (Liu et al., CVPR 2016): 13164 training vehicles; test sets of 800, 1600 or 2400 vehicles.

    ``test_size`` picks ``test_list_<test_size>.txt``; ``num_trials`` random galleries, drawn with ``seed``.
    """

    folder = "VehicleID_V1.0"
    view_names = {GROUND: "ground"}
    num_trials = 10

    def __init__(self, root, test_size=800, num_trials=10, seed=0, **options):
        for key, value, low in (("DATASETS.VEHICLEID_TEST_SIZE", test_size, 1),
                                ("DATASETS.VEHICLEID_TRIALS", num_trials, 1), ("DATASETS.VEHICLEID_SEED", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{key} = {value!r}: expected an integer >= {low}")
        self.test_size = test_size
        self.num_trials = num_trials
        self.seed = seed
        self.trial = 0
        super().__init__(root, **options)

    @classmethod
    def options_from_config(cls, cfg):
        return {"test_size": cfg.DATASETS.VEHICLEID_TEST_SIZE, "num_trials": cfg.DATASETS.VEHICLEID_TRIALS,
                "seed": cfg.DATASETS.VEHICLEID_SEED}

    @property
    def dataset_dir(self):
        return os.path.join(self.root, self.folder)

    def _layout(self):
        return (f"{self.folder}/image/*.jpg + {self.folder}/train_test_split/{{train_list.txt,"
                f"test_list_{self.test_size}.txt}} under '{self.root}'")

    def _read_list(self, list_name):
        """``(image path, vehicle id)`` pairs of a split list, checked against the image folder."""
        if not hasattr(self, "_images"):
            image_dir = self.require_dir(os.path.join(self.dataset_dir, "image"), self._layout())
            self.require_dir(os.path.join(self.dataset_dir, "train_test_split"), self._layout())
            self._images = set(os.listdir(image_dir))
        list_path = os.path.join(self.dataset_dir, "train_test_split", list_name)
        if not os.path.isfile(list_path):
            raise DataError(f"dataset {self.name}: list file '{list_path}' not found; expected {self._layout()}")
        pairs = []
        for number, name, pid in read_id_list(list_path, "<image name> <vehicle id>"):
            name = name if name.lower().endswith(".jpg") else name + ".jpg"
            if name not in self._images:
                raise DataError(f"list file '{list_path}' line {number}: image "
                                f"'{os.path.join(self.dataset_dir, 'image', name)}' not found")
            pairs.append((os.path.join(self.dataset_dir, "image", name), pid))
        return pairs

    def _draw(self, trial):
        """``(query, gallery)`` of ``trial``: one random gallery image per test vehicle, the rest queries."""
        if not hasattr(self, "_test_by_pid"):
            by_pid = defaultdict(list)
            for path, pid in self._read_list(f"test_list_{self.test_size}.txt"):
                by_pid[pid].append(path)
            self._test_by_pid = {pid: sorted(paths) for pid, paths in sorted(by_pid.items())}
        rng = np.random.default_rng([self.seed, trial])
        query, gallery = [], []
        for pid, paths in self._test_by_pid.items():
            chosen = int(rng.integers(len(paths)))
            for i, path in enumerate(paths):
                if i == chosen:
                    gallery.append(Sample(path, pid, GALLERY_CAMERA, GROUND, 0))
                else:
                    query.append(Sample(path, pid, QUERY_CAMERA, GROUND, 0))
        return query, gallery

    def read_split(self, split):
        if split == "train":
            return [Sample(path, pid, QUERY_CAMERA, GROUND, 0) for path, pid in self._read_list("train_list.txt")]
        query, gallery = self._draw(self.trial)
        return query if split == "query" else gallery

    def select_trial(self, trial):
        super().select_trial(trial)
        self.trial = trial
        query, gallery = self._draw(trial)
        self.query = [self._with_annotation(s, "query") for s in query]
        self.gallery = [self._with_annotation(s, "gallery") for s in gallery]

    def annotate(self, sample, split):
        # No attributes or captions: every image gets the plain prompt.
        return prompts.test_caption(self.num_prompt_words, subject=prompts.VEHICLE), None

    def label_insertion_order(self, samples):
        # The reference fills its set from the sorted vehicle ids.
        return sorted(s.pid for s in samples)
