"""Inference: feature extraction over a query+gallery loader and evaluation of one protocol."""
import logging
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import ImageDataset, Sample, build_test_transform, collate
from text import prompts
from processor.common import autocast, show_progress, to_device, unwrap
from processor.model_io import load_trained_model
from utils.distributed import get_rank
from evaluation import ReIDEvaluator

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(cfg, model, val_loader, num_query, device, view_mode="mix", desc="eval"):
    """Embed every query and gallery image and return the protocol's metrics (fractions in [0, 1]).

    Features from all ranks are gathered by the evaluator; every rank returns the same dictionary.
    """
    was_training = model.training
    model.eval()
    evaluator = ReIDEvaluator(num_query, cfg)
    start, num_images = time.time(), 0
    batches = tqdm(val_loader, desc=desc, leave=False, disable=not show_progress(get_rank()))
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(cfg, device):
            features = model(batch["images"], **unwrap(model).forward_inputs(batch))
        evaluator.update(features.float(), batch["pids"], batch["camids"], batch["viewids"], batch["timeids"],
                         index=batch["index"], paths=batch.get("paths"))
        num_images += batch["pids"].numel()
    extract_seconds = time.time() - start
    metrics = evaluator.compute(view_mode=view_mode, time_mode=cfg.TEST.TIME_MODE)
    logger.info("%s: embedded %d images (%d-d) in %.1f s on rank %d", desc, num_images,
                unwrap(model).embedding_dim, extract_seconds, get_rank())
    model.train(was_training)
    return metrics


class FeatureExtractor:
    """Retrieval embeddings of image files with a trained checkpoint, for use from Python code.

    ``FeatureExtractor(cfg, weight)(paths, viewid=0) -> (N, E)`` float tensor on the CPU. SVPR-ReID is told
    the platform of the images (``viewid``: 0 ground, 1 aerial; 0/1/2 CCTV/wearable/UAV on AG-ReID.v2) and
    reads the generic test caption, as in evaluation.
    """

    def __init__(self, cfg, weight, device=None):
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.model, self.epoch = load_trained_model(cfg, weight, self.device)
        self.transform = build_test_transform(cfg)
        self.text = prompts.test_caption(cfg.MODEL.TEXT_PROMPT) if cfg.MODEL.USE_TEXT else None

    @torch.no_grad()
    def __call__(self, paths, viewid=0, batch_size=64):
        samples = [Sample(path, -1, 0, viewid, 0, self.text, None) for path in paths]
        loader = DataLoader(ImageDataset(samples, self.transform, text_len=self.cfg.MODEL.TEXT_LEN),
                            batch_size=batch_size, collate_fn=collate)
        features = []
        for batch in loader:
            batch = to_device(batch, self.device)
            with autocast(self.cfg, self.device):
                features.append(self.model(batch["images"], **self.model.forward_inputs(batch)).float().cpu())
        return torch.cat(features) if features else torch.empty(0, self.model.embedding_dim)
