"""Inference: feature extraction over a query+gallery loader and evaluation of one protocol, and the
``FeatureExtractor`` for using a trained checkpoint from Python code."""
import contextlib
import logging
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs import config_from_checkpoint
from datasets import ImageDataset, Sample, build_test_transform, collate, image_reader
from evaluation import ReIDEvaluator
from evaluation.embedding import embedding_file, plot_embedding
from evaluation.relevance import overlay_drawer
from evaluation.ranking import removal_mask
from evaluation.visualize import write_rank_lists
from model.kernels import bf16_weight_cache
from processor.model_io import load_trained_model
from text import prompts
from utils.amp import precision_context, test_precision
from utils.checkpoint import load_checkpoint
from utils.device import resolve_device, to_device
from utils.distributed import get_rank, is_main_process, unwrap
from utils.logger import show_progress

logger = logging.getLogger(__name__)

RANK_LIST_FOLDER = "rank_lists"


@contextlib.contextmanager
def test_autocast(cfg, device):
    """Autocast for embedding test images (``utils.amp.test_precision``: the training precision with TEST.AMP,
    fp32 without, as the reference). Enter it once around every batch of an evaluation: autocast (and
    ``model.kernels.linear``'s ``bf16_weight_cache``) then cast each weight once for all of them instead of
    once a batch."""
    with precision_context(test_precision(cfg, device), device), bf16_weight_cache():
        yield


# The field of a datasets.bases.Sample that each model batch input comes from.
SAMPLE_FIELD = {"camids": "camid", "viewids": "viewid", "timeids": "timeid", "text_tokens": "text", "attrs": "attrs"}


def embedding_key(loader, model):
    """What decides the features ``model`` (fixed weights, eval mode) gives a loader's batches: its image
    files in order with the sample fields behind the model's ``test_feature_inputs``, and its batch size (a
    feature may depend on its batch). None for loaders without a sample list."""
    samples = getattr(getattr(loader, "dataset", None), "samples", None)
    if samples is None:
        return None
    fields = [SAMPLE_FIELD[name] for name in unwrap(model).test_feature_inputs()]
    return loader.batch_size, tuple((sample.path, *(getattr(sample, field) for field in fields)) for sample in samples)


def _embed(cfg, model, val_loader, device, desc):
    """Per batch of ``val_loader``: ``(features (B, E) fp32, evaluator labels)`` of the model in eval mode."""
    batches, embedded = tqdm(val_loader, desc=desc, leave=False, disable=not show_progress(get_rank())), []
    with test_autocast(cfg, device):
        for batch in batches:
            batch = to_device(batch, device)
            features = model(batch["images"], **unwrap(model).forward_inputs(batch))
            embedded.append((features.float(), dict(
                pids=batch["pids"], camids=batch["camids"], viewids=batch["viewids"], timeids=batch["timeids"],
                index=batch["index"], paths=batch.get("paths"), attrs=batch.get("attrs"))))
    return embedded


def _labels(dataset, index):
    """The evaluator labels of the samples ``index`` of an ``ImageDataset``, as its loader's batches give them."""
    index = index.cpu()
    pids, camids, viewids, timeids = dataset.labels[index].unbind(1)
    return dict(pids=pids, camids=camids, viewids=viewids, timeids=timeids, index=index,
                paths=[dataset.samples[i].path for i in index.tolist()],
                attrs=None if dataset.attrs is None else dataset.attrs[index])


@torch.no_grad()
def evaluate(cfg, model, val_loader, num_query, device, view_mode="mix", desc="eval", name=None, embedded=None):
    """Embed every query and gallery image and return the protocol's metrics (fractions in [0, 1]).

    Features from all ranks are gathered by the evaluator; every rank returns the same dictionary. With
    ``name`` the embedding picture is written to OUTPUT_DIR/embedding_<name>.png, with TEST.SAVE_FEATURES the
    features to OUTPUT_DIR/features_<name>.npz, and with TEST.VISUALIZE_TOPK the ranked lists (with the
    relevance map of each drawn query) to OUTPUT_DIR/rank_lists/. ``embedded``: a list shared by the
    protocols of one evaluation of the same weights, of ``(embedding_key, features)``; a loader whose images
    and batches were embedded before reuses those features (e.g. CP2108_ALL and CP2108_AGAG, which rank the
    same images with different filters).
    """
    was_training = model.training
    model.eval()
    evaluator = ReIDEvaluator(num_query, cfg)
    start, key = time.time(), embedding_key(val_loader, model) if embedded is not None else None
    batches = next((features for seen, features in embedded or () if key is not None and seen == key), None)
    if batches is not None:
        # The features of the same images and batches; the labels (e.g. camera ids, which AGAG-style protocols
        # replace by views) are this protocol's own.
        batches = [(features, _labels(val_loader.dataset, labels["index"])) for features, labels in batches]
        logger.info("%s: the features of the same images and batches embedded before are reused", desc)
    else:
        batches = _embed(cfg, model, val_loader, device, desc)
        if key is not None:
            embedded.append((key, batches))
    num_images = 0
    for features, labels in batches:
        evaluator.update(features, labels["pids"], labels["camids"], labels["viewids"], labels["timeids"],
                         index=labels["index"], paths=labels["paths"], attrs=labels["attrs"])
        num_images += labels["pids"].numel()
    extract_seconds = time.time() - start
    metrics = evaluator.compute(view_mode=view_mode, time_mode=cfg.TEST.TIME_MODE)
    if cfg.TEST.SAVE_FEATURES and name and is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        path = evaluator.save_features(os.path.join(cfg.OUTPUT_DIR, f"features_{name}.npz"))
        logger.info("wrote %s", path)
    if name and is_main_process():
        feats, labels, _ = evaluator.features
        feats = torch.nn.functional.normalize(feats, dim=1) if evaluator.feat_norm else feats
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        plot_embedding(os.path.join(cfg.OUTPUT_DIR, embedding_file(name)), feats.numpy(), labels[:, 2].numpy(),
                       num_query, title=name)
    if cfg.TEST.VISUALIZE_TOPK > 0 and name and is_main_process():
        distmat, query, gallery = evaluator.ranking_inputs()
        _, removed = removal_mask(query, gallery, view_mode, cfg.TEST.TIME_MODE)
        written = write_rank_lists(os.path.join(cfg.OUTPUT_DIR, RANK_LIST_FOLDER), name, distmat, query, gallery,
                                   removed, topk=cfg.TEST.VISUALIZE_TOPK,
                                   query_overlay=overlay_drawer(unwrap(model), val_loader.dataset))
        logger.info("wrote %d ranked-list pictures of %s (grid: %s)", len(written), name, written[-1])
    logger.info("%s: embedded %d images (%d-d) in %.1f s on rank %d", desc, num_images,
                unwrap(model).embedding_dim, extract_seconds, get_rank())
    model.train(was_training)
    return metrics


class FeatureExtractor:
    """Test-time features of image files with a trained checkpoint, for use from Python code.

    ``FeatureExtractor.from_checkpoint("model_final.pth")(paths, viewids)`` returns the (N, E) float tensor
    (on the CPU) that evaluation ranks with: same model, pre-processing, precision (TEST.AMP) and test
    caption. ``viewids`` is one view id per image (or one for all): 0 ground / 1 aerial, or 0 CCTV /
    1 wearable / 2 UAV on AG-ReID.v2 — SVPR-ReID is told the platform. Images are embedded in batches of
    TEST.IMS_PER_BATCH in the given order, as evaluation batches them: in the reference's SVPR-ReID
    (``MODEL.FIXES`` off) a feature depends on the other images of its batch.
    ``normalize=True`` L2-normalises the features (evaluation does with TEST.FEAT_NORM "yes").
    """

    def __init__(self, cfg, weight, device=None, state=None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.MODEL.DEVICE)
        self.model, self.epoch = load_trained_model(cfg, weight, self.device, state=state)
        self.transform = build_test_transform(cfg)
        self.text = prompts.model_test_caption(cfg)

    @classmethod
    def from_checkpoint(cls, path, device=None, opts=()):
        """An extractor for a checkpoint written by this framework, configured by the config stored in it
        (``opts``: ``KEY VALUE`` overrides, e.g. ``["MODEL.DEVICE", "cpu"]``). The file is read once."""
        state = load_checkpoint(path, map_location="cpu")
        cfg, _ = config_from_checkpoint(path, opts=list(opts), state=state)
        return cls(cfg, path, device=torch.device(device) if isinstance(device, str) else device, state=state)

    def batches(self, paths, viewids=0, batch_size=None):
        """Pre-processed batches (dicts on the extractor's device, as evaluation builds them) of image files
        ``paths`` in order, ``viewids`` one per image or one for all."""
        paths = list(paths)
        viewids = [viewids] * len(paths) if isinstance(viewids, int) else list(viewids)
        if len(viewids) != len(paths):
            raise ValueError(f"got {len(viewids)} view ids for {len(paths)} images")
        samples = [Sample(path, -1, 0, int(viewid), 0, self.text, None) for path, viewid in zip(paths, viewids)]
        loader = DataLoader(ImageDataset(samples, self.transform, text_len=self.cfg.MODEL.TEXT_LEN,
                                         reader=image_reader(self.cfg)),
                            batch_size=batch_size or self.cfg.TEST.IMS_PER_BATCH, collate_fn=collate)
        return (to_device(batch, self.device) for batch in loader)

    @torch.no_grad()
    def __call__(self, paths, viewids=0, batch_size=None, normalize=False):
        features = []
        with test_autocast(self.cfg, self.device):
            for batch in self.batches(paths, viewids, batch_size):
                features.append(self.model(batch["images"], **self.model.forward_inputs(batch)).float().cpu())
        features = torch.cat(features) if features else torch.empty(0, self.model.embedding_dim)
        return torch.nn.functional.normalize(features, dim=1) if normalize else features
