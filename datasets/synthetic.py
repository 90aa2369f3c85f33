"""SynthAG: a procedurally drawn aerial-ground person ReID benchmark in CP2108's on-disk format.

Every identity is a person drawn with Pillow (body shape, skin, hair, upper/lower garment colour and
style, shoes, hat, glasses, bag, phone). Ground cameras (CP2108 numbers < 23) see an upright full body;
aerial cameras (>= 23) see the same person from above: the head and shoulders dominate, the legs are
strongly foreshortened, the crop is rotated arbitrarily, at lower resolution and blurred. Night images
are darker, bluer and noisier. The output (``train.txt``/``query.txt``/``gallery.txt``, ``images/``, the
attribute JSON and its index map, captions) is read by the CP2108 loader. Same seed -> identical bytes.
"""
import json
import multiprocessing
import os
import re
import shutil
import signal
import dataclasses
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from utils.errors import DataError, UserError

COLORS = {
    "black": (28, 28, 32), "white": (232, 232, 226), "gray": (128, 128, 132), "red": (196, 32, 38),
    "blue": (38, 66, 192), "green": (44, 146, 64), "yellow": (226, 198, 44), "orange": (236, 128, 34),
    "purple": (120, 52, 160), "brown": (118, 74, 40),
}
COLOR_NAMES = tuple(COLORS)
SKIN_TONES = ((255, 220, 185), (236, 188, 150), (198, 140, 100), (141, 94, 62), (92, 60, 40))
HAIR_COLORS = ((20, 16, 14), (92, 58, 30), (180, 140, 80), (150, 150, 150), (140, 50, 20))
UNKNOWN = "unknown"
# CP2108 attribute names with the value vocabulary of this benchmark ("unknown" last).
VOCABULARY = {
    "Accessories": ("backpack", "handbag", "shoulder bag", "none", UNKNOWN),
    "Feet": ("sneakers", "boots", "sandals", "leather shoes", UNKNOWN),
    "Glasses": ("glasses", "sunglasses", "none", UNKNOWN),
    "Head Accessories": ("hat", "cap", "none", UNKNOWN),
    "Holding Phone": ("yes", "no", UNKNOWN),
    "Lower Clothing": ("trousers", "shorts", "skirt", UNKNOWN),
    "Lower Color": COLOR_NAMES + (UNKNOWN,),
    "Lower Style": ("plain", "striped", UNKNOWN),
    "Pose": ("standing", "walking", UNKNOWN),
    "Upper Clothing": ("t-shirt", "shirt", "coat", UNKNOWN),
    "Upper Color": COLOR_NAMES + (UNKNOWN,),
    "Upper Style": ("plain", "striped", "checked", "logo", UNKNOWN),
}
# Attributes that cannot be seen from above: annotated "unknown" for aerial images.
HIDDEN_FROM_ABOVE = ("Feet", "Glasses", "Lower Style")
DAY, NIGHT = 1, 0
FIRST_AERIAL_CAMERA = 23
SUPERSAMPLE = 2


@dataclass(frozen=True)
class SynthConfig:
    """Size and seed of a generated benchmark."""

    num_ids: int = 200
    images_per_id: int = 40
    height: int = 128
    width: int = 64
    seed: int = 0
    ground_cameras: int = 6
    aerial_cameras: int = 4
    night_fraction: float = 0.3
    occlusion_fraction: float = 0.1


# ---------------------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------------------
def _choice(rng, values, p=None):
    return values[int(rng.choice(len(values), p=p))]


def draw_identity(seed, pid):
    """Appearance of identity ``pid``: attribute values (CP2108 names) and drawing parameters."""
    rng = np.random.default_rng([seed, pid, 0])
    attrs = {
        "Upper Clothing": _choice(rng, ("t-shirt", "shirt", "coat")),
        "Upper Color": _choice(rng, COLOR_NAMES),
        "Upper Style": _choice(rng, ("plain", "striped", "checked", "logo"), p=(0.4, 0.2, 0.2, 0.2)),
        "Lower Clothing": _choice(rng, ("trousers", "shorts", "skirt"), p=(0.6, 0.2, 0.2)),
        "Lower Color": _choice(rng, COLOR_NAMES),
        "Lower Style": _choice(rng, ("plain", "striped"), p=(0.75, 0.25)),
        "Feet": _choice(rng, ("sneakers", "boots", "sandals", "leather shoes")),
        "Head Accessories": _choice(rng, ("hat", "cap", "none"), p=(0.2, 0.2, 0.6)),
        "Glasses": _choice(rng, ("glasses", "sunglasses", "none"), p=(0.2, 0.15, 0.65)),
        "Accessories": _choice(rng, ("backpack", "handbag", "shoulder bag", "none"), p=(0.3, 0.2, 0.2, 0.3)),
        "Holding Phone": _choice(rng, ("yes", "no"), p=(0.25, 0.75)),
        "Pose": _choice(rng, ("standing", "walking")),
    }
    look = {
        "height": float(rng.uniform(0.84, 1.0)),
        "build": float(rng.uniform(0.85, 1.2)),
        "skin": SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
        "hair": HAIR_COLORS[int(rng.integers(len(HAIR_COLORS)))],
        "hair_style": _choice(rng, ("short", "long", "bald"), p=(0.55, 0.35, 0.1)),
        "second": COLORS[_choice(rng, COLOR_NAMES)],
        "shoe": COLORS[_choice(rng, ("black", "brown", "white", "gray", "red", "blue"))],
        "hat": COLORS[_choice(rng, COLOR_NAMES)],
        "bag": COLORS[_choice(rng, COLOR_NAMES)],
    }
    return attrs, look


# ---------------------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------------------
def _box(cx, cy, rx, ry):
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def draw_front(attrs, look, width, height):
    """RGBA image (width x height) of the upright person, feet at the bottom, facing the camera."""
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    w, h, cx = width, height, width / 2
    b = look["build"]
    upper, lower = COLORS[attrs["Upper Color"]], COLORS[attrs["Lower Color"]]
    skin, hair = look["skin"], look["hair"]
    head_r = 0.062 * h
    head_y = 0.085 * h
    torso_w = 0.40 * w * b
    arm_w = 0.10 * w * b
    top, waist = 0.17 * h, 0.52 * h
    walking = attrs["Pose"] == "walking"

    if look["hair_style"] == "long":
        d.rectangle([cx - head_r * 1.05, head_y, cx + head_r * 1.05, 0.24 * h], fill=hair)
    if attrs["Accessories"] == "backpack":  # visible beside the torso from the front
        d.rectangle([cx - torso_w / 2 - 0.05 * w, 0.2 * h, cx + torso_w / 2 + 0.05 * w, 0.45 * h], fill=look["bag"])

    # legs and lower garment
    leg_w = 0.16 * w * b
    foot_y = 0.95 * h
    spread = 0.09 * w if walking else 0.0
    legs = []
    for side in (-1, 1):
        hip_x = cx + side * (torso_w / 2 - leg_w / 2)
        foot_x = hip_x + side * spread
        legs.append((hip_x, foot_x))
        d.polygon([(hip_x - leg_w / 2, waist), (hip_x + leg_w / 2, waist), (foot_x + leg_w / 2, foot_y),
                   (foot_x - leg_w / 2, foot_y)], fill=skin)
    garment_end = {"trousers": foot_y, "shorts": 0.68 * h, "skirt": 0.72 * h}[attrs["Lower Clothing"]]
    if attrs["Lower Clothing"] == "skirt":
        d.polygon([(cx - torso_w / 2, waist), (cx + torso_w / 2, waist), (cx + torso_w / 2 + 0.1 * w, garment_end),
                   (cx - torso_w / 2 - 0.1 * w, garment_end)], fill=lower)
    else:
        frac = (garment_end - waist) / (foot_y - waist)
        for hip_x, foot_x in legs:
            end_x = hip_x + (foot_x - hip_x) * frac
            d.polygon([(hip_x - leg_w / 2 - 1, waist), (hip_x + leg_w / 2 + 1, waist),
                       (end_x + leg_w / 2 + 1, garment_end), (end_x - leg_w / 2 - 1, garment_end)], fill=lower)
            if attrs["Lower Style"] == "striped":
                d.line([(hip_x, waist), (end_x, garment_end)], fill=look["second"], width=max(1, int(0.03 * w)))
    if attrs["Lower Style"] == "striped" and attrs["Lower Clothing"] == "skirt":
        for i in range(3):
            y = waist + (garment_end - waist) * (i + 1) / 4
            d.line([(cx - torso_w / 2 - 0.05 * w, y), (cx + torso_w / 2 + 0.05 * w, y)], fill=look["second"],
                   width=max(1, int(0.02 * h)))
    shoe_h = {"boots": 0.09 * h, "sandals": 0.025 * h}.get(attrs["Feet"], 0.045 * h)
    shoe = skin if attrs["Feet"] == "sandals" else look["shoe"]
    for _, foot_x in legs:
        d.rectangle([foot_x - leg_w / 2 - 0.02 * w, foot_y - shoe_h, foot_x + leg_w / 2 + 0.04 * w, foot_y + 0.03 * h],
                    fill=shoe)
        if attrs["Feet"] == "sandals":
            d.line([(foot_x - leg_w / 2, foot_y), (foot_x + leg_w / 2, foot_y)], fill=look["shoe"], width=2)

    # torso and arms
    torso_end = 0.60 * h if attrs["Upper Clothing"] == "coat" else waist + 0.02 * h
    d.polygon([(cx - torso_w / 2, top), (cx + torso_w / 2, top), (cx + torso_w / 2 + 0.02 * w, torso_end),
               (cx - torso_w / 2 - 0.02 * w, torso_end)], fill=upper)
    sleeve_end = 0.30 * h if attrs["Upper Clothing"] == "t-shirt" else 0.50 * h
    for side in (-1, 1):
        x0 = cx + side * (torso_w / 2 + arm_w / 2)
        d.rectangle([x0 - arm_w / 2, top + 0.01 * h, x0 + arm_w / 2, 0.51 * h], fill=skin)
        d.rectangle([x0 - arm_w / 2, top + 0.01 * h, x0 + arm_w / 2, sleeve_end], fill=upper)
    style = attrs["Upper Style"]
    stripe = max(1, int(0.025 * h))
    if style == "striped":
        for y in np.arange(top + 0.04 * h, torso_end, 0.07 * h):
            d.line([(cx - torso_w / 2, y), (cx + torso_w / 2, y)], fill=look["second"], width=stripe)
    elif style == "checked":
        for y in np.arange(top + 0.04 * h, torso_end, 0.08 * h):
            d.line([(cx - torso_w / 2, y), (cx + torso_w / 2, y)], fill=look["second"], width=max(1, stripe // 2))
        for x in np.arange(cx - torso_w / 2 + 0.06 * w, cx + torso_w / 2, 0.12 * w):
            d.line([(x, top), (x, torso_end)], fill=look["second"], width=max(1, stripe // 2))
    elif style == "logo":
        d.ellipse(_box(cx, 0.30 * h, 0.09 * w, 0.045 * h), fill=look["second"])
    if attrs["Upper Clothing"] == "shirt":
        d.polygon([(cx - 0.06 * w, top), (cx + 0.06 * w, top), (cx, top + 0.05 * h)], fill=(240, 240, 240))
    elif attrs["Upper Clothing"] == "coat":
        d.line([(cx, top), (cx, torso_end)], fill=(20, 20, 20), width=max(1, int(0.02 * w)))

    # accessories on the body
    if attrs["Accessories"] == "backpack":
        for side in (-1, 1):
            d.line([(cx + side * 0.12 * w, top), (cx + side * 0.12 * w, 0.40 * h)], fill=(30, 30, 30),
                   width=max(1, int(0.03 * w)))
    elif attrs["Accessories"] == "handbag":
        hx = cx + torso_w / 2 + arm_w / 2
        d.rectangle([hx - 0.07 * w, 0.50 * h, hx + 0.09 * w, 0.60 * h], fill=look["bag"])
    elif attrs["Accessories"] == "shoulder bag":
        d.line([(cx - torso_w / 2, top), (cx + torso_w / 2, 0.48 * h)], fill=look["bag"], width=max(1, int(0.035 * w)))
        d.rectangle([cx + torso_w / 2 - 0.08 * w, 0.44 * h, cx + torso_w / 2 + 0.1 * w, 0.54 * h], fill=look["bag"])
    if attrs["Holding Phone"] == "yes":
        d.rectangle([cx - 0.13 * w, 0.33 * h, cx - 0.02 * w, 0.37 * h], fill=skin)
        d.rectangle([cx - 0.05 * w, 0.28 * h, cx + 0.03 * w, 0.36 * h], fill=(15, 15, 20))

    # head
    d.rectangle([cx - 0.04 * w, head_y + head_r * 0.8, cx + 0.04 * w, top + 1], fill=skin)
    d.ellipse(_box(cx, head_y, head_r * 0.9, head_r), fill=skin)
    if look["hair_style"] != "bald":
        d.chord(_box(cx, head_y, head_r * 0.95, head_r * 1.05), 180, 360, fill=hair)
    if attrs["Glasses"] != "none":
        color = (10, 10, 10)
        for side in (-1, 1):
            box = _box(cx + side * head_r * 0.4, head_y + head_r * 0.1, head_r * 0.28, head_r * 0.2)
            if attrs["Glasses"] == "sunglasses":
                d.ellipse(box, fill=color)
            else:
                d.ellipse(box, outline=color, width=max(1, int(0.012 * h)))
    if attrs["Head Accessories"] == "hat":
        d.rectangle([cx - head_r * 1.5, head_y - head_r * 0.45, cx + head_r * 1.5, head_y - head_r * 0.25],
                    fill=look["hat"])
        d.rectangle([cx - head_r * 0.85, head_y - head_r * 1.35, cx + head_r * 0.85, head_y - head_r * 0.35],
                    fill=look["hat"])
    elif attrs["Head Accessories"] == "cap":
        d.chord(_box(cx, head_y - head_r * 0.2, head_r * 0.95, head_r * 0.95), 180, 360, fill=look["hat"])
        d.rectangle([cx - head_r * 0.2, head_y - head_r * 0.35, cx + head_r * 1.5, head_y - head_r * 0.15],
                    fill=look["hat"])
    return img


def draw_top(attrs, look, width, height):
    """RGBA image of the person seen from above: head and shoulders dominant, legs foreshortened."""
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    # What remains visible of the body: the upright figure squashed to a quarter of its height.
    body = draw_front(attrs, look, width, height).resize((int(width * 0.9), max(1, int(height * 0.28))),
                                                         Image.BILINEAR)
    img.alpha_composite(body, (int(width * 0.05), int(height * 0.46)))
    d = ImageDraw.Draw(img)
    w, h, cx = width, height, width / 2
    b = look["build"]
    upper = COLORS[attrs["Upper Color"]]
    cy = 0.42 * h
    shoulder_rx, shoulder_ry = 0.42 * w * b, 0.15 * h
    for side in (-1, 1):  # arms from above
        arm = upper if attrs["Upper Clothing"] != "t-shirt" else look["skin"]
        d.ellipse(_box(cx + side * shoulder_rx * 0.95, cy + 0.04 * h, 0.09 * w, 0.1 * h), fill=arm)
    d.ellipse(_box(cx, cy, shoulder_rx, shoulder_ry), fill=upper)
    if attrs["Upper Style"] == "striped":
        for dy in (-0.06, 0.0, 0.06):
            d.line([(cx - shoulder_rx * 0.8, cy + dy * h), (cx + shoulder_rx * 0.8, cy + dy * h)],
                   fill=look["second"], width=max(1, int(0.02 * h)))
    elif attrs["Upper Style"] == "checked":
        for dx in (-0.2, 0.0, 0.2):
            d.line([(cx + dx * w, cy - shoulder_ry * 0.8), (cx + dx * w, cy + shoulder_ry * 0.8)],
                   fill=look["second"], width=max(1, int(0.015 * h)))
    if attrs["Accessories"] == "backpack":
        d.rectangle([cx - 0.22 * w, cy - 0.14 * h, cx + 0.22 * w, cy - 0.02 * h], fill=look["bag"])
    elif attrs["Accessories"] in ("handbag", "shoulder bag"):
        d.ellipse(_box(cx + shoulder_rx * 1.05, cy + 0.09 * h, 0.1 * w, 0.05 * h), fill=look["bag"])
    if attrs["Holding Phone"] == "yes":
        d.rectangle([cx - 0.08 * w, cy + 0.1 * h, cx + 0.04 * w, cy + 0.14 * h], fill=(15, 15, 20))
    head_r = 0.24 * w
    top = look["skin"] if look["hair_style"] == "bald" else look["hair"]
    if look["hair_style"] == "long":
        d.ellipse(_box(cx, cy - 0.01 * h, head_r * 1.15, head_r * 1.35), fill=look["hair"])
    d.ellipse(_box(cx, cy - 0.02 * h, head_r, head_r * 1.05), fill=top)
    if attrs["Head Accessories"] == "hat":
        d.ellipse(_box(cx, cy - 0.02 * h, head_r * 1.45, head_r * 1.45), fill=look["hat"])
        d.ellipse(_box(cx, cy - 0.02 * h, head_r * 0.8, head_r * 0.8), fill=tuple(int(c * 0.8) for c in look["hat"]))
    elif attrs["Head Accessories"] == "cap":
        d.ellipse(_box(cx, cy - 0.02 * h, head_r, head_r * 1.05), fill=look["hat"])
        d.rectangle([cx - head_r * 0.6, cy + head_r * 0.7, cx + head_r * 0.6, cy + head_r * 1.3], fill=look["hat"])
    return img


def _background(rng, camera, aerial, width, height):
    """Camera-specific scenery with per-image variation."""
    crng = np.random.default_rng([camera, 7])
    base = crng.integers(60, 200, size=3)
    if aerial:  # asphalt, grass or tiles seen from above
        img = Image.new("RGB", (width, height), tuple(int(v) for v in (base + rng.integers(-15, 16, 3)).clip(0, 255)))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x = float(rng.uniform(0, width))
            color = tuple(int(v) for v in crng.integers(150, 256, 3))
            d.line([(x, 0), (x + rng.uniform(-width, width), height)], fill=color, width=int(rng.integers(1, 4)))
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            d.ellipse(_box(x, y, rng.uniform(3, 12), rng.uniform(3, 12)),
                      fill=tuple(int(v) for v in rng.integers(30, 200, 3)))
        return img
    sky = (base * 0.6 + 90).clip(0, 255)
    floor_y = int(height * rng.uniform(0.68, 0.8))
    rows = np.linspace(0, 1, height)[:, None, None]
    gradient = (sky[None, None, :] * (1.1 - 0.3 * rows)).clip(0, 255)
    arr = np.broadcast_to(gradient, (height, width, 3)).copy()
    arr[floor_y:] = (base * 0.7).clip(0, 255)
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # buildings / street furniture
        x0 = rng.uniform(-0.2, 1.0) * width
        bw, bh = rng.uniform(0.2, 0.6) * width, rng.uniform(0.2, 0.6) * height
        color = tuple(int(v) for v in (crng.integers(40, 220, 3) + rng.integers(-20, 21, 3)).clip(0, 255))
        d.rectangle([x0, floor_y - bh, x0 + bw, floor_y], fill=color)
    return img


def _occlude(rng, img, mask):
    """Draw an occluder over ``img``; the person ``mask`` (same size) loses what it covers."""
    w, h = img.size
    color = tuple(int(v) for v in rng.integers(20, 230, 3))
    if rng.random() < 0.5:  # an object in front of the legs
        box = [0, h * rng.uniform(0.6, 0.8), w, h]
    else:  # a pole or another pedestrian at the side
        x = w * rng.uniform(0.0, 0.7)
        box = [x, 0, x + w * rng.uniform(0.2, 0.35), h]
    ImageDraw.Draw(img).rectangle(box, fill=color)
    ImageDraw.Draw(mask).rectangle(box, fill=0)


def _illuminate(rng, img, timeid):
    arr = np.asarray(img, dtype=np.float32)
    if timeid == NIGHT:
        arr = arr * rng.uniform(0.3, 0.45) + np.array([0.0, 4.0, 18.0], dtype=np.float32)
        sigma = 9.0
    else:
        arr = arr * rng.uniform(0.9, 1.15)
        sigma = 3.0
    arr = arr + rng.normal(0.0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def render_image(attrs, look, aerial, camera, timeid, occluded, rng, width, height, with_mask=False):
    """One camera image (RGB, width x height) of the identity; with ``with_mask`` also its person mask, a
    bool array (height, width): the pixels the person covers at least half of, occluders removed. The mask
    costs no draws from ``rng``: the image is the same either way."""
    cw, ch = width * SUPERSAMPLE, height * SUPERSAMPLE
    canvas = _background(rng, camera, aerial, cw, ch)
    if aerial:
        size = int(ch * rng.uniform(0.7, 0.85))
        person = draw_top(attrs, look, int(size * 0.6), size)
        person = person.rotate(float(rng.uniform(0, 360)), resample=Image.BILINEAR, expand=True)
        scale = min(cw / person.width, ch / person.height, 1.0)
        if scale < 1.0:
            person = person.resize((max(1, int(person.width * scale)), max(1, int(person.height * scale))),
                                   Image.BILINEAR)
        x = int((cw - person.width) / 2 + rng.uniform(-0.1, 0.1) * cw)
        y = int((ch - person.height) / 2 + rng.uniform(-0.1, 0.1) * ch)
    else:
        fh = int(ch * look["height"] * rng.uniform(0.84, 0.97))
        person = draw_front(attrs, look, int(fh * 0.5), fh)
        person = person.rotate(float(rng.uniform(-4, 4)), resample=Image.BILINEAR, expand=True)
        x = int((cw - person.width) / 2 + rng.uniform(-0.08, 0.08) * cw)
        y = int(ch - person.height - rng.uniform(0.0, 0.04) * ch)
    canvas.paste(person, (x, y), person)
    mask = Image.new("L", canvas.size, 0)  # the person's opacity on the canvas
    mask.paste(person.getchannel("A"), (x, y))
    if occluded:
        _occlude(rng, canvas, mask)
    if aerial:  # distant, low-resolution footage
        factor = rng.uniform(0.3, 0.5)
        small_size = (max(4, int(width * factor)), max(8, int(height * factor)))
        small = canvas.resize(small_size, Image.BILINEAR)
        img = small.resize((width, height), Image.BILINEAR).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
        mask = mask.resize(small_size, Image.BILINEAR).resize((width, height), Image.BILINEAR)
    else:
        img = canvas.resize((width, height), Image.LANCZOS)
        mask = mask.resize((width, height), Image.BILINEAR)
    img = _illuminate(rng, img, timeid)
    return (img, np.asarray(mask) >= 128) if with_mask else img


# ---------------------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------------------
def camera_ids(config):
    """``(ground camera numbers, aerial camera numbers)`` in CP2108 numbering."""
    if not 1 <= config.ground_cameras < FIRST_AERIAL_CAMERA or config.aerial_cameras < 1:
        raise DataError(f"SynthAG needs 1..{FIRST_AERIAL_CAMERA - 1} ground cameras and at least 1 aerial camera, "
                        f"got {config.ground_cameras} and {config.aerial_cameras}")
    return (tuple(range(1, config.ground_cameras + 1)),
            tuple(range(FIRST_AERIAL_CAMERA, FIRST_AERIAL_CAMERA + config.aerial_cameras)))


@dataclass(frozen=True)
class ImagePlan:
    """What image ``k`` of an identity shows: file ``name``, view (``aerial`` 0/1), ``camera``, ``timeid``,
    ``occluded``."""

    k: int
    name: str
    aerial: int
    camera: int
    timeid: int
    occluded: bool


def _image_plans(config, pid):
    """The :class:`ImagePlan` of every image of identity ``pid``, in order."""
    rng = np.random.default_rng([config.seed, pid, 1])
    cameras = camera_ids(config)
    orders = [rng.permutation(len(c)) for c in cameras]
    plans = []
    for k in range(config.images_per_id):
        aerial = k % 2
        view_cams = cameras[aerial]
        camera = view_cams[orders[aerial][(k // 2) % len(view_cams)]]
        timeid = NIGHT if rng.random() < config.night_fraction else DAY
        occluded = rng.random() < config.occlusion_fraction
        scene = camera % 3
        plans.append(ImagePlan(k, f"{pid:04d}_{camera:02d}_{timeid}_{scene}_{k:03d}.jpg", aerial, camera, timeid,
                               occluded))
    return plans


def _render(config, pid, plan, attrs, look, with_mask=False):
    image_rng = np.random.default_rng([config.seed, pid, 2, plan.k])
    return render_image(attrs, look, plan.aerial, plan.camera, plan.timeid, plan.occluded, image_rng, config.width,
                        config.height, with_mask)


def _render_identity(job):
    """Render and write every image of one identity; return its image records."""
    config, pid, image_dir = job
    attrs, look = draw_identity(config.seed, pid)
    records = []
    for plan in _image_plans(config, pid):
        _render(config, pid, plan, attrs, look).save(os.path.join(image_dir, plan.name), quality=90)
        records.append((plan.name, plan.aerial, plan.camera, plan.timeid))
    return pid, attrs, records


class GenerationError(UserError):
    """A rendering process died: reported as one line (exit code 1), not a user mistake."""

    exit_code = 1


def _leave_interrupts_to_the_parent():
    # A forked worker inherits the parent's Python signal handlers; the entry points' SIGTERM handler raises
    # SystemExit, which can strike inside the pool's queue locks and leave a worker that neither works nor
    # exits. Workers ignore Ctrl-C (the parent handles it and stops them) and die at once on SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _render_in_processes(jobs, workers):
    """``_render_identity`` over ``jobs`` in ``workers`` processes, in order.

    A worker that dies (killed, out of memory) ends the generation with an error instead of a wait for a
    result that never comes; on any error or interrupt the jobs not started are dropped and the running
    ones finish, so nothing writes into the staging folder once it is being removed.
    """
    # Rendering needs only Pillow and numpy, so forking is safe and avoids re-importing torch.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_leave_interrupts_to_the_parent)
    try:
        results = list(pool.map(_render_identity, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    except BrokenProcessPool as exc:
        raise GenerationError("a SynthAG rendering process died (killed, or out of memory?); "
                              "nothing was written, generate again") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _annotation(attrs, aerial):
    return {name: (UNKNOWN if aerial and name in HIDDEN_FROM_ABOVE else value) for name, value in attrs.items()}


def _caption(values):
    parts = [f"The person is {values['Pose']}, wearing a {values['Upper Color']} {values['Upper Style']} "
             f"{values['Upper Clothing']} and {values['Lower Color']} {values['Lower Clothing']}"]
    if values["Feet"] != UNKNOWN:
        parts.append(f"with {values['Feet']}")
    if values["Head Accessories"] != "none":
        parts.append(f"a {values['Head Accessories']} on the head")
    if values["Accessories"] != "none":
        parts.append(f"carrying a {values['Accessories']}")
    if values["Holding Phone"] == "yes":
        parts.append("holding a phone")
    return ", ".join(parts) + "."


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


SETTINGS_FILE = "synth_config.json"


def stored_settings(target):
    """``{"origin": ..., <SynthConfig fields>}`` a generated benchmark folder was made with (None if unknown)."""
    try:
        with open(os.path.join(target, SETTINGS_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


#: A re-drawn image matches its file when their mean absolute difference (0-255 levels) after a box blur of
#: radius 2 is below this: JPEG at quality 90 removes much of the drawn noise (up to 8 levels unblurred), which
#: the blur averages out (at most 1.8 levels on the quickstart's images); another image of the same identity
#: differs by 9 or more.
MATCH_LEVELS = 4.0


def _blurred(image):
    return np.asarray(image.filter(ImageFilter.BoxBlur(2)), dtype=np.float32)


def person_mask(folder, name):
    """The person mask (bool (height, width), True where the person is visible) of image ``name`` of the
    benchmark in ``folder`` (a folder :func:`generate_synthag` wrote).

    Computed, never stored: the image is drawn again from the settings in the folder's ``synth_config.json``,
    following the same random draws, and checked against the file; nothing is written. A ``DataError`` names
    the file when the folder has no settings, or the image is not this generator's drawing of it."""
    settings = stored_settings(folder)
    if settings is None:
        raise DataError(f"'{os.path.join(folder, SETTINGS_FILE)}' is missing or unreadable: the person masks of a "
                        f"SynthAG folder are drawn again from its generator settings")
    fields = {field.name for field in dataclasses.fields(SynthConfig)}
    config = SynthConfig(**{key: value for key, value in settings.items() if key in fields})
    path = os.path.join(folder, "images", name)
    match = re.fullmatch(r"(\d{4})_\d{2}_\d_\d_(\d{3})\.jpg", name)
    pid, k = (int(match.group(1)), int(match.group(2))) if match else (0, -1)
    if not 1 <= pid <= config.num_ids or not 0 <= k < config.images_per_id:
        raise DataError(f"'{path}' is not a SynthAG image name of this folder (PPPP_CC_T_S_KKK.jpg, identity 1-"
                        f"{config.num_ids}, image 0-{config.images_per_id - 1})")
    plan = _image_plans(config, pid)[k]
    attrs, look = draw_identity(config.seed, pid)
    image, mask = _render(config, pid, plan, attrs, look, with_mask=True)
    try:
        with Image.open(path) as stored:
            stored = _blurred(stored.convert("RGB"))
    except OSError as error:
        raise DataError(f"'{path}' cannot be read ({error})") from None
    drawn = _blurred(image)
    difference = np.abs(stored - drawn).mean() if stored.shape == drawn.shape and plan.name == name else np.inf
    if difference > MATCH_LEVELS:
        raise DataError(f"'{path}' is not what this generator draws for it (mean difference {difference:.1f} levels): "
                        f"its person mask is unknown; generate the benchmark again")
    return mask


def _remove_stale_staging(target):
    """Delete staging folders ``<target>.tmp-<pid>`` left by generators that died (SIGKILL, power loss)."""
    parent, name = os.path.split(target)
    for entry in os.listdir(parent):
        if not entry.startswith(f"{name}.tmp-") and not entry.startswith(f"{name}.old-"):
            continue
        pid = entry.rsplit("-", 1)[-1]
        alive = pid.isdigit() and int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}")
        if not alive:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def generate_synthag(root, config=SynthConfig(), num_workers=None, folder="SynthAG", overwrite=False,
                     origin="generate_synthag"):
    """Write the benchmark to ``<root>/<folder>`` and return that path.

    Everything is written to a staging folder next to it that is renamed into place at the end, so the
    benchmark is either complete or absent; a failure (also Ctrl-C or SIGTERM) removes the staging folder.
    The settings are stored in ``synth_config.json`` inside it, with ``origin`` (who asked for it: the
    training's ``DATASETS.SYNTH`` values regenerate only what they generated themselves).
    """
    if config.num_ids < 4 or config.images_per_id < 6 or config.height < 16 or config.width < 8:
        raise DataError(f"SynthAG size too small: num_ids={config.num_ids} (>= 4), images_per_id="
                        f"{config.images_per_id} (>= 6), height={config.height} (>= 16), width={config.width} (>= 8)")
    camera_ids(config)
    target = os.path.join(os.path.abspath(root), folder)
    if os.path.exists(target) and not overwrite:
        raise DataError(f"'{target}' already exists; remove it or pass overwrite")
    os.makedirs(root, exist_ok=True)
    _remove_stale_staging(target)
    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_benchmark(staging, config, num_workers, origin)
        if os.path.exists(target):
            # Swap by renames: the old benchmark stays whole until the new one is in place.
            retired = f"{target}.old-{os.getpid()}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_benchmark(staging, config, num_workers, origin):
    """Render every image and write the split and annotation files into the folder ``staging``."""
    image_dir = os.path.join(staging, "images")
    os.makedirs(image_dir)

    jobs = [(config, pid, image_dir) for pid in range(1, config.num_ids + 1)]
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        results = [_render_identity(job) for job in jobs]
    else:
        results = _render_in_processes(jobs, workers)

    rng = np.random.default_rng([config.seed, 3])
    pids = np.arange(1, config.num_ids + 1)
    train_pids = set(int(p) for p in rng.permutation(pids)[: config.num_ids // 2])
    splits = {"train": [], "query": [], "gallery": []}
    labels, captions = {}, {}
    for pid, attrs, records in results:
        for _, aerial, _, timeid in records:
            key = f"{pid}_{aerial}_{timeid}"
            labels[key] = _annotation(attrs, aerial)
            captions[key] = _caption(labels[key])
        if pid in train_pids:
            splits["train"].extend(name for name, *_ in records)
            continue
        for view in (0, 1):
            # Query: the first image of two different cameras per view; everything else is gallery.
            seen = set()
            for name, aerial, camera, _ in records:
                if aerial != view:
                    continue
                if camera not in seen and len(seen) < 2:
                    seen.add(camera)
                    splits["query"].append(name)
                else:
                    splits["gallery"].append(name)
    # Some (pid, view, time) annotations are left out so that the loader's repair rules are exercised.
    for pid in pids:
        keys = sorted(k for k in labels if k.startswith(f"{pid}_"))
        if len(keys) > 1 and rng.random() < 0.15:
            dropped = keys[int(rng.integers(len(keys)))]
            del labels[dropped], captions[dropped]

    for split, names in splits.items():
        with open(os.path.join(staging, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in sorted(names)))
    _write_json(os.path.join(staging, "attr_translation_idx.json"),
                {name: {value: i for i, value in enumerate(values)} for name, values in VOCABULARY.items()})
    _write_json(os.path.join(staging, "attributes_labeled_qwen.json"), labels)
    _write_json(os.path.join(staging, "attribute_captions_doubao.json"), captions)
    _write_json(os.path.join(staging, SETTINGS_FILE), {"origin": origin, **dataclasses.asdict(config)})


def synth_config_from_cfg(cfg):
    """:class:`SynthConfig` from the ``DATASETS.SYNTH.*`` keys."""
    s = cfg.DATASETS.SYNTH
    return SynthConfig(num_ids=s.NUM_IDS, images_per_id=s.IMAGES_PER_ID, height=s.HEIGHT, width=s.WIDTH, seed=s.SEED)
