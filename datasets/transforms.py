"""Train and test image transforms (torchvision v2 on uint8 tensors) and image decoding."""
import time
import warnings

import torch
from PIL import Image, ImageFile
from timm.data.random_erasing import RandomErasing
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, v2

from utils.errors import DataError

# Partly written JPEGs still decode (the reference datasets contain a few).
ImageFile.LOAD_TRUNCATED_IMAGES = True
READ_ATTEMPTS = 3
# torchvision 0.29 flags its decoders as deprecated in favour of TorchCodec; they remain the fastest here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def read_image(path, attempts=READ_ATTEMPTS):
    """Decode ``path`` to a uint8 RGB tensor (3, H, W).

    torchvision's decoder first; Pillow for what it cannot read (truncated files, rare formats). Transient
    I/O errors are retried ``attempts`` times, then a one-line ``DataError`` names the file.
    """
    error = None
    for attempt in range(attempts):
        try:
            return decode_image(path, mode=ImageReadMode.RGB)
        except (RuntimeError, OSError, ValueError) as exc:
            error = exc
        try:
            with Image.open(path) as img:
                return v2.functional.pil_to_tensor(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            error = exc
        if attempt + 1 < attempts:
            time.sleep(0.05 * (attempt + 1))
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise DataError(f"image '{path}' cannot be read ({reason}) after {attempts} attempts")


def build_train_transform(cfg):
    """Resize (bicubic), flip, pad, random crop, normalise, random erasing (per-pixel normal values)."""
    size = list(cfg.INPUT.SIZE_TRAIN)
    return v2.Compose([
        v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=cfg.INPUT.PROB),
        v2.Pad(cfg.INPUT.PADDING, fill=0),
        v2.RandomCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD)),
        RandomErasing(probability=cfg.INPUT.RE_PROB, mode="pixel", max_count=1, device="cpu"),
    ])


def build_test_transform(cfg):
    """Resize (bilinear) and normalise."""
    return v2.Compose([
        v2.Resize(list(cfg.INPUT.SIZE_TEST), interpolation=InterpolationMode.BILINEAR, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD)),
    ])
