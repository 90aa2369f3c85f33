"""CLIP-ReID stage 1 as the training phase "prompt_learning": learn identity-specific text prompts against
frozen image and text encoders, then fix every identity's text feature for stage 2.

Image features never change in this stage (both encoders are frozen and in eval mode), so they are
computed once and cached; every epoch then only runs the text encoder over the prompts of a batch.
"""
import logging
import math
import os
import time

import torch
from tqdm import tqdm

from loss import SupConLoss
from model.checkpoint_fit import load_model_weights
from processor.common import autocast, make_grad_scaler, show_progress, to_device, unwrap
from processor.faults import fault_point
from processor.phases import register_phase
from processor.trainer import DivergedError, restore_rng, rng_states
from solver import make_stage1_optimizer, make_stage1_scheduler
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import all_gather_tensor, get_rank, is_main_process
from utils.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_prompt_features(cfg, model, loader, device):
    """Projected image features and labels of every training image: ``(features (N, D), pids (N,))``."""
    model.eval()
    features, pids, order = [], [], []
    for batch in tqdm(loader, desc="stage 1 features", leave=False, disable=not show_progress(get_rank())):
        batch = to_device(batch, device)
        with autocast(cfg, device):
            features.append(unwrap(model).encode_image_for_prompts(batch["images"]).float())
        pids.append(batch["pids"])
        order.append(batch["index"])
    features = all_gather_tensor(torch.cat(features))
    pids = all_gather_tensor(torch.cat(pids))
    order = all_gather_tensor(torch.cat(order))
    sort = torch.argsort(order)
    order, features, pids = order[sort], features[sort], pids[sort]
    # The distributed sampler pads the ranks' shares with repeated samples; keep each image once.
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = order[1:] != order[:-1]
    return features[first], pids[first]


def _prompt_state(model):
    """The parameters stage 1 trains (the prompt context), by name."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def _load_prompts(model, prompts, path):
    """Copy saved prompt parameters into ``model``; a ``CheckpointError`` when they do not fit."""
    params = dict(model.named_parameters())
    for name, value in prompts.items():
        if name not in params or params[name].shape != value.shape:
            raise CheckpointError(f"{path}: prompt parameter {name} {tuple(value.shape)} does not fit this model "
                                  f"({tuple(params[name].shape) if name in params else 'no such parameter'})")
    with torch.no_grad():
        for name, value in prompts.items():
            params[name].copy_(value)


def train_stage1(cfg, model, loader, device, path=None, state=None):
    """Run stage 1 on ``model`` (a CLIP_ReID, unwrapped). Every rank runs the same deterministic schedule.

    With ``path`` the complete stage-1 state (prompts, optimiser, scheduler, scaler, shuffling and RNG
    states) is written there after every epoch; ``state``, the content of such a file, continues from the
    end of its epoch with the same result as an uninterrupted run.
    """
    stage1 = cfg.SOLVER.STAGE1
    model.freeze_for_stage1()
    features, pids = extract_prompt_features(cfg, model, loader, device)
    logger.info("stage 1: cached %d image features of %d identities", features.shape[0], int(pids.unique().numel()))
    optimizer = make_stage1_optimizer(cfg, model.prompt_parameters())
    scheduler = make_stage1_scheduler(cfg, optimizer)
    scaler = make_grad_scaler(cfg, device)
    supcon = SupConLoss()
    # The same permutation on every rank keeps the prompts identical across processes.
    generator = torch.Generator().manual_seed(cfg.SOLVER.SEED)
    first_epoch = 1
    if state is not None:
        try:
            _load_prompts(model, state["prompts"], path)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            generator.set_state(state["generator"])
            restore_rng(state["rng"])
            first_epoch = int(state["epoch"]) + 1
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot resume stage 1 from {path}: "
                                  f"{' '.join(str(exc).split())[:200]}") from None
        logger.info("stage 1: resumed from %s after epoch %d", path, first_epoch - 1)
    def save(epoch):
        content = {"prompts": _prompt_state(model), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "generator": generator.get_state(), "rng": rng_states(), "epoch": epoch,
                   "complete": epoch == stage1.MAX_EPOCHS, "config": cfg.dump()}
        if is_main_process():
            save_checkpoint(content, path)

    if path and state is None:
        save(0)  # an interruption during the first epoch can then be resumed too
    batch_size = stage1.IMS_PER_BATCH
    for epoch in range(first_epoch, stage1.MAX_EPOCHS + 1):
        start = time.time()
        permutation = torch.randperm(features.shape[0], generator=generator).to(device)
        total, steps = 0.0, 0
        for begin in range(0, features.shape[0], batch_size):
            chosen = permutation[begin:begin + batch_size]
            image_features, labels = features[chosen], pids[chosen]
            optimizer.zero_grad(set_to_none=True)
            with autocast(cfg, device):
                text_features = model.text_features(labels).float()
            loss = supcon(image_features, text_features, labels, labels) + \
                supcon(text_features, image_features, labels, labels)
            steps += 1
            fault_point("stage1", epoch, steps)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item()
        if not math.isfinite(total):
            raise DivergedError(f"stage 1 loss is not finite at epoch {epoch}: stopped; {path or 'nothing'} keeps "
                                f"the state after epoch {epoch - 1} (try a lower SOLVER.STAGE1.BASE_LR)")
        scheduler.step()
        if path:
            save(epoch)
        if epoch % stage1.LOG_PERIOD == 0 or epoch in (1, stage1.MAX_EPOCHS):
            logger.info("stage 1 epoch %d/%d: loss %.4f, lr %.2e, %.1f s", epoch, stage1.MAX_EPOCHS,
                        total / max(steps, 1), optimizer.param_groups[0]["lr"], time.time() - start)
    model.unfreeze_for_stage2()


@torch.no_grad()
def compute_class_text_features(cfg, model, num_classes, device):
    """Text features of every identity's learned prompt, ``(num_classes, D)``, in chunks."""
    model.eval()
    chunks = []
    for begin in range(0, num_classes, cfg.SOLVER.STAGE1.IMS_PER_BATCH):
        labels = torch.arange(begin, min(begin + cfg.SOLVER.STAGE1.IMS_PER_BATCH, num_classes), device=device)
        with autocast(cfg, device):
            chunks.append(model.text_features(labels).float())
    return torch.cat(chunks)


STAGE1_CHECKPOINT = "stage1.pth"


@register_phase("prompt_learning")
class PromptLearning:
    """Stage 1 of CLIP-ReID: train the prompts (SOLVER.STAGE1.TRAIN), or load them from
    SOLVER.STAGE1.PRETRAIN_PATH, or (resuming) from this run's ``stage1.pth``, which is written after every
    stage-1 epoch (an interrupted stage 1 continues from its last epoch); then set the class text features
    stage 2 classifies against."""

    def __init__(self, cfg, model, data, device):
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.path = os.path.join(cfg.OUTPUT_DIR, STAGE1_CHECKPOINT)

    def run(self, resume=False):
        cfg, model, device = self.cfg, self.model, self.device
        state = load_checkpoint(self.path, map_location=device) if resume and os.path.isfile(self.path) else None
        if state is not None and "model" in state:  # written by an earlier version: the whole model
            load_model_weights(model, state["model"], cfg)
            logger.info("stage 1: loaded this run's result from %s", self.path)
        elif state is not None and state.get("complete"):
            model.freeze_for_stage1()
            _load_prompts(model, state["prompts"], self.path)
            restore_rng(state["rng"])
            logger.info("stage 1: loaded this run's result from %s", self.path)
        elif cfg.SOLVER.STAGE1.TRAIN:
            train_stage1(cfg, model, self.data.train_loader_stage1, device, path=self.path, state=state)
        elif cfg.SOLVER.STAGE1.PRETRAIN_PATH:
            state = load_checkpoint(cfg.SOLVER.STAGE1.PRETRAIN_PATH, map_location=device)
            if "prompts" in state:
                model.freeze_for_stage1()
                _load_prompts(model, state["prompts"], cfg.SOLVER.STAGE1.PRETRAIN_PATH)
            else:
                load_model_weights(model, state.get("model", state), cfg)
            logger.info("stage 1: loaded prompts from %s", cfg.SOLVER.STAGE1.PRETRAIN_PATH)
        else:
            raise ConfigError(f"MODEL.ARCH_NAME {cfg.MODEL.ARCH_NAME} learns prompts first: set SOLVER.STAGE1.TRAIN "
                              "True or give SOLVER.STAGE1.PRETRAIN_PATH with stage-1 weights")
        # Stage 2 trains the image side only, however the prompts were obtained; the trainer's optimiser is
        # built after this for exactly these parameters.
        model.unfreeze_for_stage2()
        model.set_class_text_features(compute_class_text_features(cfg, model, self.data.dataset.num_train_pids,
                                                                  device))
