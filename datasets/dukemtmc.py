"""DukeMTMC-reID and Occluded-Duke (Market-1501's layout, see datasets/market1501.py).

File names ``PPPP_cC_fFFFFFFF.jpg`` (identity, camera 1-8, frame). DukeMTMC-reID lives in the first of
``dukemtmcreid/DukeMTMC-reID``, ``DukeMTMC-reID``, ``dukemtmc-reid/DukeMTMC-reID``; Occluded-Duke in
``dukemtmcreid/Occluded_Duke`` or ``Occluded_Duke``. One view, no attributes.
"""
import re

from .market1501 import SplitFolders
from .registry import register_dataset


class DukeFormat(SplitFolders):
    """File-name rule of the DukeMTMC-reID family."""

    name_pattern = re.compile(r"^(-?\d+)_c(\d+)_f\d+")
    name_rule = "PPPP_cC_fFFFFFFF.jpg (identity, camera 1-8, frame)"
    num_cameras = 8
    directory_order = True


@register_dataset("dukemtmc")
class DukeMTMC(DukeFormat):
    """DukeMTMC-reID (Ristani et al. 2016; Zheng et al., ICCV 2017): 702 training identities, 8 cameras."""

    folders = ("dukemtmcreid/DukeMTMC-reID", "DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID")


@register_dataset("occ_duke")
class OccludedDuke(DukeFormat):
    """Occluded-Duke (Miao et al., ICCV 2019): DukeMTMC-reID re-split with occluded queries."""

    folders = ("dukemtmcreid/Occluded_Duke", "Occluded_Duke")
