"""SynthAG protocols: the synthetic benchmark read through the CP2108-format loader from ``<root>/SynthAG``."""
import dataclasses
import logging
import os

from configs import CN, declare_config
from utils import distributed
from utils.errors import DataError

from .cp2108 import PROTOCOLS, CP2108Format
from .registry import register_dataset
from .synthetic import SETTINGS_FILE, generate_synthag, stored_settings, synth_config_from_cfg


@declare_config
def add_synthag_config(cfg):
    """SynthAG's keys: whether to generate it, and the generator's settings (DATASETS.SYNTH)."""
    # Generate the synthetic benchmark under ROOT_DIR when it is missing (SynthAG datasets only).
    cfg.DATASETS.AUTO_GENERATE = True
    # Synthetic aerial-ground benchmark generator settings (used when it is generated).
    cfg.DATASETS.SYNTH = CN()
    cfg.DATASETS.SYNTH.NUM_IDS = 200  # identities in total (split into train and test identities)
    cfg.DATASETS.SYNTH.IMAGES_PER_ID = 40  # images per identity across all cameras
    cfg.DATASETS.SYNTH.HEIGHT = 128  # image height in pixels
    cfg.DATASETS.SYNTH.WIDTH = 64  # image width in pixels
    cfg.DATASETS.SYNTH.SEED = 0  # generator seed; same seed gives identical files

logger = logging.getLogger(__name__)

ORIGIN = "DATASETS.SYNTH"  # the synth_config.json origin of folders generated here


class SynthAGBase(CP2108Format):
    """SynthAG (CP2108 format); generated on demand by :meth:`prepare`."""

    folder = "SynthAG"

    @classmethod
    def prepare(cls, root, cfg):
        """With ``DATASETS.AUTO_GENERATE``, generate the benchmark under ``root`` when it is missing, or again
        when this setting generated it with other ``DATASETS.SYNTH.*`` values (its ``synth_config.json``).

        A folder made otherwise (``tools/make_synthetic.py``, an older version) is used as it is, with a warning
        when its settings differ: it is the user's data, not ours to replace.
        """
        if not cfg.DATASETS.AUTO_GENERATE:
            return
        target = os.path.join(root, cls.folder)
        wanted = dataclasses.asdict(synth_config_from_cfg(cfg))
        stored = stored_settings(target) if os.path.isdir(target) else None
        same = stored is not None and {k: v for k, v in stored.items() if k != "origin"} == wanted
        if os.path.isdir(target) and (same or (stored or {}).get("origin") != ORIGIN):
            if not same and distributed.is_main_process():
                logger.warning("%s was not generated from DATASETS.SYNTH (settings %s, wanted %s): using it as it "
                               "is; delete it to generate it from the config", target, stored or "unknown", wanted)
            return
        if distributed.is_main_process():
            if os.path.isdir(target):
                logger.warning("%s was generated with other DATASETS.SYNTH values (%s); generating it again",
                               target, stored)
            else:
                logger.info("generating the synthetic benchmark in %s", target)
            try:
                generate_synthag(root, synth_config_from_cfg(cfg), num_workers=cfg.DATALOADER.NUM_WORKERS or None,
                                 overwrite=True, origin=ORIGIN)
            except OSError as exc:  # e.g. a read-only data folder: nothing was written
                why = "was generated with other DATASETS.SYNTH values" if os.path.isdir(target) else "is missing"
                raise DataError(f"DATASETS.AUTO_GENERATE: {target} {why} and cannot be generated there "
                                f"({exc.strerror or exc}); set DATASETS.ROOT_DIR to a writable folder (or, for an "
                                f"existing one, DATASETS.SYNTH to its values in {SETTINGS_FILE})") from None
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
