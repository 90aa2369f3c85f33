"""Image decoding and the train and test transforms.

INPUT.IMAGE_BACKEND chooses the decoder and with it the resize: "pil" (default) decodes with Pillow and
resizes the PIL image with Pillow's filters, exactly as the reference's torchvision transforms do (so every
input is pixel-identical to the authors' at any image size); "tensor" decodes with torchvision and resizes
uint8 tensors (faster, but when an image is shrunk up to 1 grey level apart with bilinear and up to ~20 with
bicubic interpolation). Flip, pad and crop are exact on either; then both divide by 255 as ``ToTensor``
does, normalise and erase.

Either decoder first reads the image's header with Pillow (no pixel is decoded) and refuses a file that claims
more than :data:`MAX_IMAGE_PIXELS` pixels: a PNG or JPEG of a few kilobytes can claim 30000 x 30000 pixels,
2.7 GB once decoded (a "decompression bomb").
"""
import io
import re
import time
import warnings

import torch
import torchvision.transforms as transforms_v1
from PIL import Image, ImageFile
from timm.data.random_erasing import RandomErasing
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode, v2

from utils.errors import ConfigError, DataError

# Partly written JPEGs still decode (the reference datasets contain a few).
ImageFile.LOAD_TRUNCATED_IMAGES = True
READ_ATTEMPTS = 3
IMAGE_BACKENDS = ("pil", "tensor")
# torchvision 0.29 flags its decoders as deprecated in favour of TorchCodec; they remain the fastest here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
#: The most pixels (width x height) an image may have: 8192 x 8192 (200 MB decoded), 8 times a 4K video frame
#: and thousands of times a person crop (Market-1501's are 128 x 64). A file whose header claims more is
#: refused, with one line naming it, before anything is decoded.
MAX_IMAGE_PIXELS = 8192 * 8192
# Pillow warns from 89 M pixels (its default limit) and raises from twice that; every image it would warn
# about is larger than MAX_IMAGE_PIXELS and refused with the one-line error instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_PIL_ERRORS = (OSError, ValueError, SyntaxError)


def _refuse(path, claim):
    raise DataError(f"image '{path}' refused before decoding: its header claims {claim}, more than the "
                    f"{MAX_IMAGE_PIXELS} pixels an image may have (datasets.transforms.MAX_IMAGE_PIXELS); "
                    "a decompression bomb, or not a person crop")


def _open_checked(source, path):
    """``Image.open(source)`` (``path``: its name for messages), which reads only the header; a ``DataError``
    when the header claims more than :data:`MAX_IMAGE_PIXELS`."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, beyond twice its limit
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        _refuse(path, f"{claimed.group(1)} pixels" if claimed else "more pixels than Pillow's limit")
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        _refuse(path, f"{width} x {height} pixels")
    return image


def _pil_rgb(path):
    with _open_checked(path, path) as img:
        return img.convert("RGB")


def _torchvision_rgb(path):
    data = read_file(path)  # the file's bytes (N,) uint8: the header checked is the one decoded
    try:
        _open_checked(io.BytesIO(data.numpy()), path).close()
    except _PIL_ERRORS:
        pass  # a header Pillow cannot read (e.g. a corrupt file): torchvision decides, and names a failure
    return decode_image(data, mode=ImageReadMode.RGB)


def _read(path, attempts, decoders):
    """The first of ``decoders`` that reads ``path``; transient I/O errors are retried ``attempts`` times,
    then a one-line ``DataError`` names the file. An image refused for its size (a ``DataError``) is not
    retried."""
    error = None
    for attempt in range(attempts):
        for decode, errors in decoders:
            try:
                return decode(path)
            except errors as exc:
                error = exc
        if attempt + 1 < attempts:
            time.sleep(0.05 * (attempt + 1))
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise DataError(f"image '{path}' cannot be read ({reason}) after {attempts} attempts")


def read_image(path, attempts=READ_ATTEMPTS):
    """Decode ``path`` to a uint8 RGB tensor (3, H, W): torchvision's decoder first, Pillow for what it
    cannot read (truncated files, rare formats); a ``DataError`` naming the file if neither can."""
    return _read(path, attempts, [(_torchvision_rgb, (RuntimeError, OSError, ValueError)),
                                  (lambda p: v2.functional.pil_to_tensor(_pil_rgb(p)), _PIL_ERRORS)])


def read_pil_image(path, attempts=READ_ATTEMPTS):
    """Decode ``path`` with Pillow to an RGB ``PIL.Image`` (the reference's ``Image.open(path).convert('RGB')``);
    a ``DataError`` naming the file if it cannot."""
    return _read(path, attempts, [(_pil_rgb, _PIL_ERRORS)])


def image_reader(cfg):
    """The decoder of INPUT.IMAGE_BACKEND: :func:`read_pil_image` ("pil") or :func:`read_image` ("tensor")."""
    backend = cfg.INPUT.IMAGE_BACKEND
    if backend not in IMAGE_BACKENDS:
        raise ConfigError(f"INPUT.IMAGE_BACKEND = {backend!r}: expected one of {', '.join(IMAGE_BACKENDS)}")
    return read_pil_image if backend == "pil" else read_image


class ToFloat:
    """PIL image or uint8 tensor (3, H, W) -> contiguous float32 (3, H, W) in [0, 1].

    Divides by 255 as the reference's ``ToTensor`` does (``v2.ToDtype`` multiplies by 1/255, one float ulp
    away on 126 of the 256 levels).
    """

    def __call__(self, image):
        if isinstance(image, Image.Image):
            return transforms_v1.functional.to_tensor(image)
        return transforms_v1.functional.convert_image_dtype(image.contiguous(), torch.float32)


def _to_normalised_float(cfg):
    # The v1 Normalize is the reference's arithmetic, here in place on the fresh float tensor (half the time
    # of v2.Normalize).
    return [ToFloat(),
            transforms_v1.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD), inplace=True)]


class TrainTransform:
    """Resize (bicubic), flip, pad, random crop, /255, normalise, random erasing (per-pixel normal values).

    Takes a PIL image (transformed by Pillow up to the crop, as the reference) or a uint8 tensor
    (transformed by torchvision). A uint8 tensor already at the training size, which the resize leaves as it
    is, takes a fused path: the same random draws in the same order and a bit-identical result, from a few
    tensor operations instead of six transforms (per image 3-4x faster; SynthAG's images are all such).
    """

    def __init__(self, cfg):
        self.size = tuple(cfg.INPUT.SIZE_TRAIN)
        self.flip_prob = cfg.INPUT.PROB
        self.padding = cfg.INPUT.PADDING
        normalize = _to_normalised_float(cfg)
        self.erasing = RandomErasing(probability=cfg.INPUT.RE_PROB, mode="pixel", max_count=1, device="cpu")
        self.general = v2.Compose([
            v2.Resize(list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=self.flip_prob),
            v2.Pad(self.padding, fill=0),
            v2.RandomCrop(list(self.size)),
            *normalize,
            self.erasing,
        ])
        self.mean = torch.tensor(cfg.INPUT.PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg.INPUT.PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
        # What a zero (padding) pixel becomes, by the same operations as every other pixel.
        self.pad_value = (torch.zeros(3, 1, 1) / 255.0).sub_(self.mean).div_(self.std)

    def __call__(self, image):
        if not (torch.is_tensor(image) and image.dtype == torch.uint8 and image.dim() == 3
                and image.shape[0] == 3 and tuple(image.shape[-2:]) == self.size):
            return self.general(image)
        height, width = self.size
        pad = self.padding
        # The draws of v2.RandomHorizontalFlip, then v2.RandomCrop on the padded (H + 2p, W + 2p) image.
        if torch.rand(1) < self.flip_prob:
            image = image.flip(-1)
        top = int(torch.randint(0, 2 * pad + 1, size=())) if pad > 0 else 0
        left = int(torch.randint(0, 2 * pad + 1, size=())) if pad > 0 else 0
        out = self.pad_value.expand(3, height, width).clone()  # (3, H, W)
        # Rows/columns of the crop window (padded coordinates) that fall on the image, which sits at pad..pad+H.
        row0, row1 = max(top, pad), min(top + height, pad + height)
        col0, col1 = max(left, pad), min(left + width, pad + width)
        if row0 < row1 and col0 < col1:
            pixels = image[:, row0 - pad:row1 - pad, col0 - pad:col1 - pad].to(torch.float32) / 255.0
            out[:, row0 - top:row1 - top, col0 - left:col1 - left] = pixels.sub_(self.mean).div_(self.std)
        return self.erasing(out)


def build_train_transform(cfg):
    """The training transform (:class:`TrainTransform`)."""
    return TrainTransform(cfg)


def build_test_transform(cfg):
    """Resize (bilinear), /255 and normalise; takes a PIL image or a uint8 tensor like the train transform."""
    return v2.Compose([
        v2.Resize(list(cfg.INPUT.SIZE_TEST), interpolation=InterpolationMode.BILINEAR, antialias=True),
        *_to_normalised_float(cfg),
    ])
