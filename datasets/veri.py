"""VeRi-776 vehicle ReID.

Layout: ``<root>/VeRi/{image_train,image_query,image_test}/*.jpg``; file names ``VVVV_cCCC_FFFFFFFF_N.jpg``
(vehicle identity, camera 1-20, frame, index). Every image is loaded: the viewpoint annotations some
codebases read from extra keypoint files are not used, so there is one view. No attributes.
"""
import re

from text import prompts

from .market1501 import SplitFolders
from .registry import register_dataset


@register_dataset("veri")
class VeRi(SplitFolders):
    """VeRi-776 (Liu et al., ICME 2016): 576 training vehicles, 20 cameras."""

    folders = ("VeRi",)
    split_folders = {"train": "image_train", "query": "image_query", "gallery": "image_test"}
    name_pattern = re.compile(r"^(-?\d+)_c(\d+)_\d+_\d+")
    name_rule = "VVVV_cCCC_FFFFFFFF_N.jpg (vehicle identity, camera 1-20, frame, index)"
    num_cameras = 20
    subject = prompts.VEHICLE
    directory_order = True
