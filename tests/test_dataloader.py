"""Data pipeline: real loaders with worker processes over real JPEGs, samplers, transforms, bad images."""
import gzip
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from configs.defaults import get_cfg_defaults
from datasets import (ContiguousShardSampler, RandomIdentitySampler, SynthConfig, build_test_transform,
                      build_train_transform, generate_synthag, image_reader, make_dataloaders, read_image,
                      read_pil_image)
from utils.errors import ConfigError, DataError
from tests.fixtures import openai_clip_module


def _openai_tokenizer():
    """OpenAI's own BPE tokenizer from the openai-clip package."""
    return openai_clip_module("simple_tokenizer").SimpleTokenizer()


BPE = _openai_tokenizer()
SOT, EOT = BPE.encoder["<|startoftext|>"], BPE.encoder["<|endoftext|>"]


class CountingTokenizer:
    """CLIP tokenisation (SOT + BPE + EOT, zero padded, truncated with EOT last) that counts its inputs."""

    def __init__(self):
        self.seen = Counter()

    def __call__(self, texts, context_length, truncate=True):
        self.seen.update(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT] + BPE.encode(text) + [EOT]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = EOT
            out[row, :len(ids)] = torch.tensor(ids)
        return out


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    generate_synthag(root, SynthConfig(num_ids=8, images_per_id=8, height=32, width=16, seed=1), num_workers=1)
    return root


def small_cfg(root, workers=2):
    cfg = get_cfg_defaults()
    cfg.DATASETS.ROOT_DIR = str(root)
    cfg.DATASETS.NAMES = "SynthAG_ALL"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.USE_TEXT = True
    cfg.MODEL.USE_ATTR = True
    cfg.MODEL.TEXT_LEN = 40
    cfg.INPUT.SIZE_TRAIN = [32, 16]
    cfg.INPUT.SIZE_TEST = [32, 16]
    cfg.INPUT.PADDING = 2
    cfg.INPUT.PIXEL_MEAN = [0.5, 0.4, 0.3]
    cfg.INPUT.PIXEL_STD = [0.2, 0.25, 0.3]
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.DATALOADER.NUM_INSTANCE = 2
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.TEST.IMS_PER_BATCH = 16
    return cfg


def test_loaders_with_worker_processes(synth_root):
    tokenizer = CountingTokenizer()
    bundle = make_dataloaders(small_cfg(synth_root), tokenizer=tokenizer)
    ds = bundle.dataset
    texts = {s.text for s in ds.train} | {s.text for s in ds.query + ds.gallery}
    # Each distinct text was tokenised exactly once per loader that holds it (train, val).
    assert all(tokenizer.seen[t] == 1 for t in texts)
    # Train workers restart each epoch (seeded per epoch for exact resume); evaluation workers persist.
    assert bundle.train_loader.num_workers == 2 and not bundle.train_loader.persistent_workers
    assert bundle.val_loader.persistent_workers

    known = {}
    for s in ds.train:
        known.setdefault((s.pid, s.camid, s.viewid, s.timeid, s.attrs), set()).add(s.text)
    batches = list(bundle.train_loader)
    assert len(batches) == len(bundle.train_loader) > 0
    for batch in batches:
        assert batch["images"].shape == (8, 3, 32, 16) and batch["images"].dtype == torch.float32
        pids = batch["pids"].tolist()
        assert [pids[i] for i in range(0, 8, 2)] == [pids[i + 1] for i in range(0, 8, 2)]
        assert len(set(pids)) == 4
        assert batch["text_tokens"].shape == (8, 40) and batch["attrs"].shape == (8, 12)
        for i in range(8):
            key = (pids[i], batch["camids"][i].item(), batch["viewids"][i].item(), batch["timeids"][i].item(),
                   tuple(batch["attrs"][i].tolist()))
            assert key in known
            expected = [tokenizer([t], 40)[0] for t in known[key]]
            assert any(torch.equal(batch["text_tokens"][i], e) for e in expected)

    val = list(bundle.val_loader)
    samples = ds.query + ds.gallery
    assert bundle.num_query == len(ds.query) and bundle.num_gallery == len(ds.gallery)
    assert torch.cat([b["index"] for b in val]).tolist() == list(range(len(samples)))
    assert [p for b in val for p in b["paths"]] == [s.path for s in samples]
    assert torch.cat([b["pids"] for b in val]).tolist() == [s.pid for s in samples]
    first = samples[0]
    assert torch.equal(val[0]["text_tokens"][0], tokenizer([first.text], 40)[0])
    # Test images: plain normalisation of the decoded JPEG (the size already matches).
    pixels = np.asarray(Image.open(first.path).convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) \
        / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert torch.allclose(val[0]["images"][0], expected, atol=3 / 255 / 0.2)


def test_without_texts_no_tokenizer_is_needed(synth_root):
    cfg = small_cfg(synth_root, workers=0)
    cfg.MODEL.USE_TEXT = False
    cfg.MODEL.USE_ATTR = False

    def forbidden(*args, **kwargs):
        raise AssertionError("tokenizer called without texts")

    bundle = make_dataloaders(cfg, tokenizer=forbidden)
    batch = next(iter(bundle.train_loader))
    assert batch["text_tokens"] is None and batch["attrs"] is None
    assert bundle.dataset.attributes == ()


def _plan(pids, batch, k, seed, epoch, rank=0, world=1):
    sampler = RandomIdentitySampler(pids, batch, k, seed=seed, rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    size = len(sampler)
    return list(sampler), size


def test_identity_sampler_structure_and_exact_length():
    pids = [p for p in range(10) for _ in range(p % 4 + 1)]  # 1..4 images per identity
    indices, size = _plan(pids, 8, 2, seed=3, epoch=0)
    assert len(indices) == size and size % 8 == 0 and size > 0
    for start in range(0, size, 8):
        batch = [pids[i] for i in indices[start:start + 8]]
        assert batch[0::2] == batch[1::2] and len(set(batch)) == 4
    assert _plan(pids, 8, 2, seed=3, epoch=0)[0] == indices
    assert _plan(pids, 8, 2, seed=3, epoch=1)[0] != indices
    sampler = RandomIdentitySampler(pids, 8, 2, seed=3)
    first, second = list(sampler), list(sampler)  # the epoch advances by itself
    assert first == indices and second == _plan(pids, 8, 2, seed=3, epoch=1)[0]


def test_distributed_ranks_share_each_batch_disjointly():
    pids = [p for p in range(12) for _ in range(5)]
    full, _ = _plan(pids, 8, 2, seed=7, epoch=4)
    shares = [_plan(pids, 8, 2, seed=7, epoch=4, rank=r, world=2) for r in range(2)]
    assert len(shares[0][0]) == len(shares[1][0]) == shares[0][1] == len(full) // 2
    for b in range(len(full) // 8):
        part0, part1 = shares[0][0][4 * b:4 * b + 4], shares[1][0][4 * b:4 * b + 4]
        assert part0 + part1 == full[8 * b:8 * b + 8]
        assert not {pids[i] for i in part0} & {pids[i] for i in part1}


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="multiple of DATALOADER.NUM_INSTANCE"):
        RandomIdentitySampler([0, 1], 6, 4)
    with pytest.raises(ConfigError, match="split into 2 processes"):
        RandomIdentitySampler([0, 1, 2], 6, 2, world_size=2)
    with pytest.raises(DataError, match="2 identities, fewer than the 4"):
        RandomIdentitySampler([0, 1, 1], 8, 2)


def test_contiguous_shards_cover_in_order():
    shards = [list(ContiguousShardSampler(10, r, 3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_transforms_shapes_and_constant_image(tmp_path):
    cfg = small_cfg(tmp_path)
    cfg.INPUT.RE_PROB = 1.0
    path = str(tmp_path / "grey.png")
    Image.new("RGB", (20, 50), (128, 64, 32)).save(path)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 50, 20)
    test = build_test_transform(cfg)(image)
    expected = (torch.tensor([128, 64, 32]) / 255.0 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.3])
    assert test.shape == (3, 32, 16)
    assert torch.allclose(test, expected[:, None, None].expand(3, 32, 16), atol=1e-5)
    train = build_train_transform(cfg)(image)
    assert train.shape == (3, 32, 16)
    # Random erasing with p=1 writes per-pixel noise somewhere; padding zeros may show as well.
    assert (train != expected[:, None, None]).any()


# Odd sizes, shrunk and enlarged to 64 x 32; random pixels are the hardest case for a resampling filter.
ODD_SIZES = [(300, 110), (97, 41), (61, 203), (129, 63), (40, 17)]


def _odd_images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate(ODD_SIZES):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = str(tmp_path / (f"odd{i}.png" if i % 2 else f"odd{i}.jpg"))
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _exact_cfg(tmp_path, backend="pil"):
    cfg = small_cfg(tmp_path)
    cfg.INPUT.SIZE_TRAIN = cfg.INPUT.SIZE_TEST = [64, 32]
    cfg.INPUT.PROB, cfg.INPUT.RE_PROB, cfg.INPUT.PADDING = 0.0, 0.0, 0  # augmentations off: the deterministic part
    cfg.INPUT.IMAGE_BACKEND = backend
    return cfg


@pytest.mark.parametrize("split,pil_filter", [("train", Image.BICUBIC), ("test", Image.BILINEAR)])
def test_pil_backend_resizes_images_of_any_size_exactly_as_pillow(tmp_path, split, pil_filter):
    # The reference: PIL image, Pillow's resize (bicubic at train, bilinear at test), ToTensor (/ 255), Normalize.
    cfg = _exact_cfg(tmp_path)
    transform = (build_train_transform if split == "train" else build_test_transform)(cfg)
    mean = torch.tensor(cfg.INPUT.PIXEL_MEAN)[:, None, None]
    std = torch.tensor(cfg.INPUT.PIXEL_STD)[:, None, None]
    for path in _odd_images(tmp_path):
        pillow = np.asarray(Image.open(path).convert("RGB").resize((32, 64), pil_filter))  # (64, 32, 3) uint8
        expected = (torch.from_numpy(pillow.copy()).permute(2, 0, 1).float() / 255 - mean) / std
        got = transform(image_reader(cfg)(path))
        assert got.shape == (3, 64, 32) and got.is_contiguous()
        assert torch.equal(got, expected), path


def test_tensor_backend_is_the_faster_approximation(tmp_path):
    # "tensor" decodes to uint8 tensors and resizes them with torchvision: same pipeline, not Pillow's pixels
    # when shrinking (the documented price of its speed).
    cfg, fast = _exact_cfg(tmp_path), _exact_cfg(tmp_path, "tensor")
    assert image_reader(cfg) is read_pil_image and image_reader(fast) is read_image
    path = _odd_images(tmp_path)[0]  # 300 x 110 -> 64 x 32
    exact = build_train_transform(cfg)(read_pil_image(path))
    approx = build_train_transform(fast)(read_image(path))
    assert approx.shape == exact.shape and not torch.equal(approx, exact)
    assert float((approx - exact).abs().max()) * min(cfg.INPUT.PIXEL_STD) * 255 < 40  # a few grey levels


def test_pixels_are_divided_by_255_like_to_tensor(tmp_path):
    # Every grey level ends as level / 255 in float32 (x * (1/255) differs by one ulp on 126 of the 256 levels).
    cfg = _exact_cfg(tmp_path)
    cfg.INPUT.SIZE_TEST = [16, 16]
    cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD = [0.0] * 3, [1.0] * 3
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = str(tmp_path / "levels.png")
    Image.fromarray(np.stack([levels] * 3, axis=2)).save(path)
    expected = torch.from_numpy(levels).float().div(255)
    assert not torch.equal(expected, torch.from_numpy(levels).float() * (1 / 255))
    for backend in ("pil", "tensor"):
        cfg.INPUT.IMAGE_BACKEND = backend
        out = build_test_transform(cfg)(image_reader(cfg)(path))
        assert all(torch.equal(out[c], expected) for c in range(3)), backend


def test_unknown_image_backend_is_a_config_error(tmp_path):
    cfg = small_cfg(tmp_path)
    cfg.INPUT.IMAGE_BACKEND = "cv2"
    with pytest.raises(ConfigError, match="INPUT.IMAGE_BACKEND = 'cv2': expected one of pil, tensor"):
        image_reader(cfg)


def test_unreadable_image_is_named(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match=r"image '.*broken.jpg' cannot be read .* after 3 attempts"):
        read_image(str(path))
    with pytest.raises(DataError, match=r"image '.*broken.jpg' cannot be read .* after 1 attempts"):
        read_pil_image(str(path), attempts=1)
    with pytest.raises(DataError, match="missing.jpg"):
        read_image(str(tmp_path / "missing.jpg"), attempts=1)


def test_gzip_is_not_an_image(tmp_path):
    path = tmp_path / "x.png"
    with gzip.open(path, "wb") as f:
        f.write(b"data")
    with pytest.raises(DataError, match="x.png"):
        read_image(str(path), attempts=2)


def test_default_tokenizer_is_clips(synth_root):
    cfg = small_cfg(synth_root, workers=0)
    bundle = make_dataloaders(cfg)
    batch = next(iter(bundle.val_loader))
    reference = CountingTokenizer()
    text = bundle.dataset.query[0].text
    assert torch.equal(batch["text_tokens"][0], reference([text], 40)[0])
    train = bundle.train_loader.dataset
    long_text = train.samples[0].text
    assert torch.equal(train.text_tokens[train.text_index[0]], reference([long_text], 40)[0])


@pytest.mark.parametrize("padding, flip, erase", [(5, 0.5, 0.0), (10, 0.5, 0.5), (0, 1.0, 0.0), (3, 0.0, 0.3)])
def test_fused_train_transform_equals_the_six_transforms(padding, flip, erase):
    """Images already at the training size take TrainTransform's fused path: the same random draws (torch's and
    Python's generators end in the same state) and bit-identical tensors as resize, flip, pad, crop, /255,
    normalise and erasing applied one after the other."""
    import random

    from datasets.transforms import TrainTransform

    cfg = get_cfg_defaults()
    cfg.INPUT.SIZE_TRAIN = [32, 16]
    cfg.INPUT.PADDING, cfg.INPUT.PROB, cfg.INPUT.RE_PROB = padding, flip, erase
    cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    transform = TrainTransform(cfg)
    images = [torch.randint(0, 256, (3, 32, 16), dtype=torch.uint8) for _ in range(60)]
    outputs = []
    for run in (transform, transform.general):
        torch.manual_seed(1)
        random.seed(1)
        outputs.append(([run(image) for image in images], torch.rand(1), random.random()))
    (fused, fused_torch, fused_python), (general, general_torch, general_python) = outputs
    assert all(torch.equal(a, b) for a, b in zip(fused, general))
    assert torch.equal(fused_torch, general_torch) and fused_python == general_python
    # Another size, or a PIL image, goes through the six transforms.
    other = torch.randint(0, 256, (3, 40, 20), dtype=torch.uint8)
    torch.manual_seed(2)
    random.seed(2)
    resized = transform(other)
    torch.manual_seed(2)
    random.seed(2)
    assert torch.equal(resized, transform.general(other)) and resized.shape == (3, 32, 16)
