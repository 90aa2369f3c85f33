"""CLIP-ReID's stage 1, prompt learning: identity-specific text prompts learned against frozen image and text
encoders; afterwards every identity's text feature is fixed for stage 2.

Image features never change in this stage (both encoders are frozen and in eval mode), so they are computed
once and cached; every epoch then only runs the text encoder over the prompts of a batch: a random
permutation of the cached features (the same on every process) cut into SOLVER.STAGE1.IMS_PER_BATCH pieces,
the last smaller one included, each trained with the supervised contrastive loss image->text + text->image.
The engine (``processor/phase_runner.py``) runs the epochs, checkpoints and resume.
"""
import logging

import torch
from tqdm import tqdm

from configs import CN, check_count, declare_config
from datasets import build_test_transform, make_loader, per_rank_batch, shuffled_sampler
from loss import SupConLoss
from model.checkpoint_fit import load_model_weights
from model.contract import TrainingPhase
from solver import WarmupCosineLR, build_optimizer
from utils.amp import autocast
from utils.checkpoint import load_checkpoint
from utils.device import to_device
from utils.distributed import all_gather_tensor, get_rank, get_world_size
from utils.errors import CheckpointError, ConfigError
from utils.logger import show_progress

logger = logging.getLogger(__name__)


def _check_stage1_config(cfg):
    for key in ("SOLVER.STAGE1.IMS_PER_BATCH", "SOLVER.STAGE1.LOG_PERIOD"):
        check_count(cfg, key, 1)
    check_count(cfg, "SOLVER.STAGE1.MAX_EPOCHS", 0)


@declare_config(check=_check_stage1_config)
def add_prompt_learning_config(cfg):
    """The keys of CLIP-ReID's stage 1 (SOLVER.STAGE1)."""
    # CLIP-ReID stage 1 (prompt learning).
    cfg.SOLVER.STAGE1 = CN()
    # Run stage 1 before stage 2 (CLIP_ReID only).
    cfg.SOLVER.STAGE1.TRAIN = False
    # Stage-1 weights to load when stage 1 is not trained here (CLIP_ReID only).
    cfg.SOLVER.STAGE1.PRETRAIN_PATH = ""
    cfg.SOLVER.STAGE1.IMS_PER_BATCH = 64  # stage-1 batch size
    cfg.SOLVER.STAGE1.OPTIMIZER_NAME = "Adam"  # stage-1 optimiser
    cfg.SOLVER.STAGE1.MAX_EPOCHS = 100  # stage-1 epochs
    cfg.SOLVER.STAGE1.BASE_LR = 0.0003  # stage-1 learning rate
    cfg.SOLVER.STAGE1.MOMENTUM = 0.9  # stage-1 SGD momentum
    cfg.SOLVER.STAGE1.WEIGHT_DECAY = 0.0005  # stage-1 weight decay
    cfg.SOLVER.STAGE1.WARMUP_EPOCHS = 5  # linear warm-up epochs of the stage-1 cosine schedule
    cfg.SOLVER.STAGE1.WARMUP_LR_INIT = 0.00001  # learning rate at the start of the warm-up
    cfg.SOLVER.STAGE1.LR_MIN = 1e-6  # final learning rate of the cosine schedule
    cfg.SOLVER.STAGE1.LOG_PERIOD = 100  # stage-1 log period in iterations
    # The reference cuts every stage-1 epoch into N // IMS_PER_BATCH + 1 batches, so when the number of training
    # images N is a multiple of the batch size the last one is empty and it crashes (False raises a ConfigError
    # there); True never forms an empty batch (the same batches otherwise).
    cfg.MODEL.FIXES.STAGE1_EMPTY_BATCH = True


@torch.no_grad()
def extract_prompt_features(cfg, model, loader, device):
    """Projected image features and labels of every training image: ``(features (N, D), pids (N,))``, in the
    order of the training split (gathered from every process)."""
    model.eval()
    features, pids, order = [], [], []
    for batch in tqdm(loader, desc="stage 1 features", leave=False, disable=not show_progress(get_rank())):
        batch = to_device(batch, device)
        with autocast(cfg, device):
            features.append(model.encode_image_for_prompts(batch["images"]).float())
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


def prompt_state(model):
    """The parameters prompt learning trains (the prompt context), by name."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def load_prompts(model, prompts, source):
    """Copy saved prompt parameters into ``model``; a ``CheckpointError`` naming ``source`` when they do not fit."""
    params = dict(model.named_parameters())
    for name, value in prompts.items():
        if name not in params or params[name].shape != value.shape:
            raise CheckpointError(f"{source}: prompt parameter {name} {tuple(value.shape)} does not fit this model "
                                  f"({tuple(params[name].shape) if name in params else 'no such parameter'})")
    with torch.no_grad():
        for name, value in prompts.items():
            params[name].copy_(value)


class PromptLearning(TrainingPhase):
    """Stage 1 of CLIP-ReID: train the prompts (SOLVER.STAGE1.TRAIN), or load them from
    SOLVER.STAGE1.PRETRAIN_PATH; then fix the class text features stage 2 classifies against. Every process
    runs the same deterministic schedule, so the prompts stay identical across processes."""

    name = "stage1"
    title = "stage 1"
    checkpoint_name = "stage1.pth"
    resume_may_change = ("SOLVER.STAGE1.LOG_PERIOD",)

    def __init__(self, cfg, model, dataset, device):
        super().__init__(cfg, model, dataset, device)
        self.supcon = SupConLoss()
        # The permutations of every epoch come from this generator (same seed on every process).
        self.generator = torch.Generator().manual_seed(cfg.SOLVER.SEED)
        self.features = self.pids = None

    @property
    def max_epochs(self):
        return self.cfg.SOLVER.STAGE1.MAX_EPOCHS

    @property
    def log_period(self):
        return self.cfg.SOLVER.STAGE1.LOG_PERIOD

    def trains(self):
        return bool(self.cfg.SOLVER.STAGE1.TRAIN)

    def load_result(self):
        path = self.cfg.SOLVER.STAGE1.PRETRAIN_PATH
        if not path:
            raise ConfigError(f"MODEL.ARCH_NAME {self.cfg.MODEL.ARCH_NAME} learns prompts first: set "
                              "SOLVER.STAGE1.TRAIN True or give SOLVER.STAGE1.PRETRAIN_PATH with stage-1 weights")
        state = load_checkpoint(path, map_location=self.device)
        if "prompts" in state:
            self.model.freeze_for_stage1()
            load_prompts(self.model, state["prompts"], path)
        else:
            load_model_weights(self.model, state.get("model", state), self.cfg)
        logger.info("stage 1: loaded prompts from %s", path)

    def setup(self):
        cfg, model = self.cfg, self.model
        model.freeze_for_stage1()
        num_train = len(self.dataset.train)
        size = cfg.SOLVER.STAGE1.IMS_PER_BATCH
        if not cfg.MODEL.FIXES.STAGE1_EMPTY_BATCH and num_train % size == 0:
            raise ConfigError(f"stage 1: the {num_train} training images are a multiple of SOLVER.STAGE1.IMS_PER_BATCH "
                              f"= {size}, where the reference's last batch is empty and it crashes; set "
                              "MODEL.FIXES.STAGE1_EMPTY_BATCH True or another batch size")
        loader = make_loader(cfg, self.dataset.train, build_test_transform(cfg),
                             per_rank_batch(cfg.SOLVER.STAGE1.IMS_PER_BATCH, "SOLVER.STAGE1.IMS_PER_BATCH"),
                             shuffled_sampler(num_train, cfg.SOLVER.SEED + 1, get_rank(), get_world_size()), offset=1)
        self.features, self.pids = extract_prompt_features(cfg, model, loader, self.device)
        logger.info("stage 1: cached %d image features of %d identities", self.features.shape[0],
                    int(self.pids.unique().numel()))

    def make_optimizer(self):
        stage1 = self.cfg.SOLVER.STAGE1
        params = [p for p in self.model.prompt_parameters() if p.requires_grad]
        if not params:
            raise ConfigError("stage 1 has no trainable prompt parameters to optimise")
        group = {"params": params, "lr": stage1.BASE_LR, "weight_decay": stage1.WEIGHT_DECAY, "name": "prompts"}
        return build_optimizer(stage1.OPTIMIZER_NAME, "SOLVER.STAGE1.OPTIMIZER_NAME", [group], stage1.BASE_LR,
                               stage1.MOMENTUM)

    def make_scheduler(self, optimizer):
        stage1 = self.cfg.SOLVER.STAGE1
        if stage1.MAX_EPOCHS < 1 or stage1.WARMUP_EPOCHS < 0:
            raise ConfigError(f"SOLVER.STAGE1.MAX_EPOCHS must be >= 1 and SOLVER.STAGE1.WARMUP_EPOCHS >= 0, got "
                              f"{stage1.MAX_EPOCHS} and {stage1.WARMUP_EPOCHS}")
        return WarmupCosineLR(optimizer, stage1.MAX_EPOCHS, warmup_epochs=stage1.WARMUP_EPOCHS,
                              warmup_lr_init=stage1.WARMUP_LR_INIT, lr_min=stage1.LR_MIN)

    def batches(self, epoch):
        permutation = torch.randperm(self.features.shape[0], generator=self.generator).to(self.device)
        size = self.cfg.SOLVER.STAGE1.IMS_PER_BATCH
        for begin in range(0, self.features.shape[0], size):
            yield permutation[begin:begin + size]

    def loss(self, chosen):
        image_features, labels = self.features[chosen], self.pids[chosen]
        with autocast(self.cfg, self.device):
            text_features = self.model.text_features(labels).float()
        return self.supcon(image_features, text_features, labels, labels) + \
            self.supcon(text_features, image_features, labels, labels)

    def state_dict(self):
        return {"prompts": prompt_state(self.model), "generator": self.generator.get_state()}

    def load_state_dict(self, state, source):
        try:
            self.model.freeze_for_stage1()
            load_prompts(self.model, state["prompts"], source)
            self.generator.set_state(state["generator"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot resume stage 1 from {source}: {' '.join(str(exc).split())[:200]}") \
                from None

    def finish(self):
        # Stage 2 trains the image side only, however the prompts were obtained; its optimiser is built after
        # this for exactly these parameters.
        model = self.model
        model.unfreeze_for_stage2()
        model.set_class_text_features(compute_class_text_features(self.cfg, model, self.dataset.num_train_pids,
                                                                  self.device))
