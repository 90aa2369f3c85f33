"""SynthAG protocols: the synthetic benchmark read through the CP2108-format loader from ``<root>/SynthAG``."""
import logging
import os

from utils import distributed

from .cp2108 import PROTOCOLS, CP2108Format
from .registry import register_dataset
from .synthetic import generate_synthag, synth_config_from_cfg

logger = logging.getLogger(__name__)


class SynthAGBase(CP2108Format):
    """SynthAG (CP2108 format); generated on demand by :meth:`prepare`."""

    folder = "SynthAG"

    @classmethod
    def prepare(cls, root, cfg):
        """Generate the benchmark under ``root`` when it is missing and ``DATASETS.AUTO_GENERATE`` is on."""
        target = os.path.join(root, cls.folder)
        if cfg.DATASETS.AUTO_GENERATE and not os.path.isdir(target):
            if distributed.is_main_process():
                logger.info("generating the synthetic benchmark in %s", target)
                generate_synthag(root, synth_config_from_cfg(cfg), num_workers=cfg.DATALOADER.NUM_WORKERS or None)
            distributed.barrier()


@register_dataset("SynthAG_ALL")
class SynthAGAll(SynthAGBase):
    """SynthAG, all query vs all gallery images."""

    protocol = PROTOCOLS["ALL"]


@register_dataset("SynthAG_AG")
class SynthAGAG(SynthAGBase):
    """SynthAG, aerial query vs ground gallery."""

    protocol = PROTOCOLS["AG"]


@register_dataset("SynthAG_GA")
class SynthAGGA(SynthAGBase):
    """SynthAG, ground query vs aerial gallery."""

    protocol = PROTOCOLS["GA"]


@register_dataset("SynthAG_AA")
class SynthAGAA(SynthAGBase):
    """SynthAG, aerial query vs aerial gallery."""

    protocol = PROTOCOLS["AA"]


@register_dataset("SynthAG_GG")
class SynthAGGG(SynthAGBase):
    """SynthAG, ground query vs ground gallery."""

    protocol = PROTOCOLS["GG"]


@register_dataset("SynthAG_AGAG")
class SynthAGAGAG(SynthAGBase):
    """SynthAG, all vs all, only cross-view matches count (camera id = view id)."""

    protocol = PROTOCOLS["AGAG"]


@register_dataset("SynthAG_AAGG")
class SynthAGAAGG(SynthAGBase):
    """SynthAG, all vs all, only same-view matches count."""

    protocol = PROTOCOLS["AAGG"]
