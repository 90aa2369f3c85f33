"""SynthAG's person masks (datasets.synthetic.person_mask): the pixels the drawn person covers, computed again
from the generator's settings, never stored: they match what drawing the person changes in the image, they are
read from a read-only benchmark without writing anything, and a file the generator did not draw is refused."""
import os
import stat

import numpy as np
import pytest
from PIL import Image

import datasets.synthetic as synthetic
from datasets.synthetic import SynthConfig, draw_identity, generate_synthag, person_mask, render_image
from utils.errors import DataError

CONFIG = SynthConfig(num_ids=4, images_per_id=8, height=64, width=32, seed=2, occlusion_fraction=0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return generate_synthag(str(tmp_path_factory.mktemp("synth")), CONFIG, num_workers=1)


def _transparent(attrs, look, width, height):
    return Image.new("RGBA", (width, height), (0, 0, 0, 0))


@pytest.mark.parametrize("aerial", [0, 1])
@pytest.mark.parametrize("occluded", [False, True])
def test_mask_is_where_drawing_the_person_changes_the_image(monkeypatch, aerial, occluded):
    """The same image drawn with an invisible person (every random draw the same) differs from the real one
    where the person is: the mask must be that region (an occluder hides the person from both)."""
    for pid in range(1, 4):
        attrs, look = draw_identity(7, pid)
        args = (attrs, look, aerial, 23 if aerial else 2, 1, occluded)
        image, mask = render_image(*args, np.random.default_rng(pid), 32, 64, with_mask=True)
        with monkeypatch.context() as patch:
            patch.setattr(synthetic, "draw_front", _transparent)
            patch.setattr(synthetic, "draw_top", _transparent)
            without = render_image(*args, np.random.default_rng(pid), 32, 64)
        assert np.array_equal(np.asarray(image), np.asarray(render_image(*args, np.random.default_rng(pid), 32, 64)))
        # Changed by more than 16 levels per channel on average (aerial footage is shrunk and blurred: its
        # person's edge pixels change by less, so its masks match less tightly).
        changed = np.abs(np.asarray(image, dtype=float) - np.asarray(without, dtype=float)).sum(-1) > 48
        assert mask.dtype == bool and mask.shape == (64, 32) and 0.01 < mask.mean() < 0.7

        def overlap(candidate):
            return (candidate & changed).sum() / (candidate | changed).sum()

        assert overlap(mask) > (0.6 if aerial else 0.8), (pid, overlap(mask))
        assert overlap(np.roll(mask, 8, axis=1)) < overlap(mask) / 2  # a mask a quarter of the width off fails


def test_masks_of_the_files_are_read_without_writing(folder):
    names = sorted(os.listdir(os.path.join(folder, "images")))
    before = {entry.name: entry.stat().st_mtime_ns for entry in os.scandir(folder)}
    modes = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            modes[path] = os.stat(path).st_mode
            os.chmod(path, modes[path] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    os.chmod(folder, os.stat(folder).st_mode & ~stat.S_IWUSR)
    try:
        masks = [person_mask(folder, name) for name in names]
    finally:
        os.chmod(folder, os.stat(folder).st_mode | stat.S_IWUSR)
        for path, mode in sorted(modes.items(), key=lambda item: -len(item[0])):
            os.chmod(path, mode)
    assert {entry.name: entry.stat().st_mtime_ns for entry in os.scandir(folder)} == before
    assert len(masks) == CONFIG.num_ids * CONFIG.images_per_id
    shares = np.array([mask.mean() for mask in masks])
    assert all(mask.shape == (64, 32) for mask in masks) and shares.min() > 0.01 and shares.max() < 0.7
    ground = [mask for name, mask in zip(names, masks) if int(name.split("_")[1]) < synthetic.FIRST_AERIAL_CAMERA]
    assert np.mean([mask[:, 12:20].mean() > mask[:, :6].mean() for mask in ground]) > 0.9  # people stand centred


def test_a_file_the_generator_did_not_draw_is_refused(folder, tmp_path):
    copy = tmp_path / "SynthAG"
    (copy / "images").mkdir(parents=True)
    names = sorted(os.listdir(os.path.join(folder, "images")))
    with open(os.path.join(folder, synthetic.SETTINGS_FILE), "rb") as source:
        (copy / synthetic.SETTINGS_FILE).write_bytes(source.read())
    # Another image of the same identity under this one's name.
    Image.open(os.path.join(folder, "images", names[2])).save(copy / "images" / names[0], quality=90)
    with pytest.raises(DataError, match=names[0]):
        person_mask(str(copy), names[0])
    with pytest.raises(DataError, match="not a SynthAG image name"):
        person_mask(folder, "0099_01_1_1_000.jpg")
    os.remove(copy / synthetic.SETTINGS_FILE)
    with pytest.raises(DataError, match=synthetic.SETTINGS_FILE):
        person_mask(str(copy), names[0])
