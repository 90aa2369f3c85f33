"""The framework's configuration keys, with their defaults and meanings.

Keys of one model, dataset, loss term or training phase are declared next to its code
(``configs/schema.py``); ``get_cfg_defaults`` adds them to these, and ``python -m configs`` lists every key
with the module that declares it. Key names follow the reference SVPR-ReID / CLIP-ReID code so that its
YAML files merge unchanged. The reference's keys that have no effect there either are not defined:
``configs/compat.py`` lists them, and loading ignores them with one warning. Override any key from a YAML
file (``--config_file``) or from the command line (``KEY VALUE`` pairs after the options).
"""
from yacs.config import CfgNode as CN

from configs.schema import add_declared_keys, declared_names

_C = CN()

# ---------------------------------------------------------------------------------------------------
# MODEL
# ---------------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Where to run: "auto" (CUDA if available, else CPU), "cuda" (falls back to CPU with a warning), "cpu".
_C.MODEL.DEVICE = "auto"
# Backbone name: "ViT-B-16" (CLIP ViT-B/16) for the CLIP models; for the ImageNet-ViT baselines
# "vit_base_patch16_224_TransReID" ([cls, patches]; ViT, TransReID) or "vit_base_patch16_224_VDT"
# ([cls, view, patches]; VDT, SeCap). Also the prefix of periodic checkpoint files.
_C.MODEL.NAME = "ViT-B-16"
# Model class in the model registry: "CLIP_SVPR_ReID", "CLIP_ReID", "CLIP_baseline", or the ImageNet-ViT
# baselines "ViT", "TransReID", "VDT", "SeCap" (docs/baselines.md).
_C.MODEL.ARCH_NAME = "CLIP_SVPR_ReID"
# Pretrained backbone weights. CLIP models: OpenAI CLIP checkpoint (TorchScript archive such as
# ViT-B-16.pt, or a plain state dict). ImageNet-ViT baselines: the original jx_vit_base_p16_224-80ecf9dd.pth
# or a timm ViT weight file (.pth or .safetensors). Required unless MODEL.RANDOM_INIT is True.
_C.MODEL.PRETRAIN_PATH = ""
# What PRETRAIN_PATH holds and what a training run takes from it: "imagenet" (the default; the name is the
# authors') the backbone weights above; "self" a whole model, either a checkpoint of this framework or a
# state dict in the authors' layout (converted on the fly), every weight of it continued; "finetune" the same
# kind of file, every weight but the identity classifiers (and CLIP-ReID's identity prompts), for another
# training set. With "self"/"finetune" the backbone's sizes are read from the checkpoint: no backbone file
# is needed (processor/model_io.py).
_C.MODEL.PRETRAIN_CHOICE = "imagenet"
# Build the backbone with random weights from MODEL.CLIP.* (CLIP models) or MODEL.VIT.* (ImageNet-ViT
# baselines) instead of loading PRETRAIN_PATH (tests, benchmarks and the synthetic quickstart).
_C.MODEL.RANDOM_INIT = False
# Patch-embedding stride (rows, columns); smaller than the patch size gives overlapping patches.
_C.MODEL.STRIDE_SIZE = [16, 16]
# Side-information embedding (SIE): scale, and whether camera and/or view ids are embedded.
_C.MODEL.SIE_COE = 3.0
_C.MODEL.SIE_CAMERA = False
_C.MODEL.SIE_VIEW = False
# Build the text branch and feed per-image texts (SVPR's attribute captions).
_C.MODEL.USE_TEXT = False
# Number of learnable "X" prompt tokens in the attribute text ("A photo of a X X X X person ...").
_C.MODEL.TEXT_PROMPT = 4
# Text context length: the tokenizer pads/truncates to it and the CLIP text positional embedding is
# resized to it (77 is CLIP's own).
_C.MODEL.TEXT_LEN = 77
# The noun of the prompts the model writes itself ("person" or "vehicle"): CLIP-ReID's "A photo of a X X X X
# person." and the test caption of FeatureExtractor / tools/export.py. Datasets word their own captions.
_C.MODEL.PROMPT_SUBJECT = "person"
# Use the attribute labels (SVPR's attribute loss and ASMOE).
_C.MODEL.USE_ATTR = False
# Recompute transformer blocks in the backward pass to save memory (slower).
_C.MODEL.GRAD_CHECKPOINT = False

# Fixes of defects of the authors' code, one bool each (docs/reference_differences.md), declared by the
# component that honours it. False reproduces the reference exactly where the fix changes numerics or
# parameters; fixes that only prevent a crash default to True. Flat on purpose: tools/ablation.py --fixes
# enumerates the switches a model lists in its ``fixes``.
_C.MODEL.FIXES = CN()

# ---------------------------------------------------------------------------------------------------
# INPUT
# ---------------------------------------------------------------------------------------------------
_C.INPUT = CN()
# Image size (height, width) for training and testing; also fixes the patch grid of the backbone.
_C.INPUT.SIZE_TRAIN = [256, 128]
_C.INPUT.SIZE_TEST = [256, 128]
# Probability of a random horizontal flip.
_C.INPUT.PROB = 0.5
# Probability of random erasing (timm-style, per-pixel normal noise).
_C.INPUT.RE_PROB = 0.5
# Zero padding (pixels) before the random crop back to SIZE_TRAIN.
_C.INPUT.PADDING = 10
# Normalisation mean and std (the shipped configs use 0.5 for both, CLIP-ReID style).
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
# Decoder and resize: "pil" decodes and resizes with Pillow exactly as the reference's transforms do
# (pixel-identical inputs at any image size); "tensor" uses torchvision's decoder and uint8-tensor resize,
# faster but up to ~20 grey levels apart from the reference where images are shrunk (datasets/transforms.py).
_C.INPUT.IMAGE_BACKEND = "pil"

# ---------------------------------------------------------------------------------------------------
# DATASETS
# ---------------------------------------------------------------------------------------------------
_C.DATASETS = CN()
# Dataset (protocol) to train on, by registry name, e.g. "CP2108_ALL", "CARGO", "AGReID", "SynthAG_ALL".
_C.DATASETS.NAMES = "SynthAG_ALL"
# Folder holding the dataset folders (CP2108/, CARGO/, AGReID/, AGReID.v2/, SynthAG/).
_C.DATASETS.ROOT_DIR = "./data"
# Protocols evaluated at the end of training and by test_svpr.py; the first is also used for the
# periodic evaluation during training.
_C.DATASETS.TESTS = ("SynthAG_ALL",)

# ---------------------------------------------------------------------------------------------------
# DATALOADER
# ---------------------------------------------------------------------------------------------------
_C.DATALOADER = CN()
# Worker processes per data loader.
_C.DATALOADER.NUM_WORKERS = 8
# "softmax_triplet" (identity-balanced P x K batches) or "softmax" (plain shuffling).
_C.DATALOADER.SAMPLER = "softmax_triplet"
# Images per identity (K) in a P x K batch.
_C.DATALOADER.NUM_INSTANCE = 16
# Before training, decode every image of every split (not only check that it exists): slower, but a
# corrupt file stops the run at startup instead of mid-training.
_C.DATALOADER.CHECK_IMAGES = False
# Decode every image once, when its loader is built, and keep the pixels in memory (H x W x 3 bytes an image,
# shared with the loader workers): later epochs and other test protocols with the same images do not decode
# again. Same inputs, same results; refused with one clear error when the images would take more than half of
# the free memory. Pays off where decoding is a visible share of a step (small models, few or no workers).
_C.DATALOADER.CACHE_IMAGES = False

# ---------------------------------------------------------------------------------------------------
# SOLVER (stage 2, i.e. ReID fine-tuning; SVPR-ReID has only this stage)
# ---------------------------------------------------------------------------------------------------
_C.SOLVER = CN()
# Random seed for python, numpy and torch.
_C.SOLVER.SEED = 1111
# Optimiser: "SGD", "Adam", "AdamW" (or any torch.optim class name).
_C.SOLVER.OPTIMIZER_NAME = "Adam"
# Number of training epochs.
_C.SOLVER.MAX_EPOCHS = 50
# Base learning rate.
_C.SOLVER.BASE_LR = 0.00035
# Twice the base learning rate for classifier layers.
_C.SOLVER.LARGE_FC_LR = False
# Learning-rate multiplier for bias parameters.
_C.SOLVER.BIAS_LR_FACTOR = 2
# SGD momentum.
_C.SOLVER.MOMENTUM = 0.9
# Weight decay for weights and for biases.
_C.SOLVER.WEIGHT_DECAY = 0.0001
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0001
# Run the optimiser as PyTorch's fused kernel where it has one (Adam, AdamW, SGD, ... on CPU and CUDA): one
# pass over each parameter and its state instead of one per operation (Adam over ViT-B/16: 4-6x faster on
# one CPU thread). The same update rule; values differ from the per-operation loop of the authors' code only
# by float rounding: over 40 steps of five of the models, no more than 1-ulp noise on the input images moves
# the weights (SGD's fused kernel gave the loop's bits). False runs the per-operation loop.
_C.SOLVER.FUSED_OPTIMIZER = True
# Multi-step schedule: decay factor and the epochs at which it applies.
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.STEPS = (40, 70)
# Warm-up: start factor, length in epochs, "linear" or "constant".
_C.SOLVER.WARMUP_FACTOR = 0.01
_C.SOLVER.WARMUP_ITERS = 10
_C.SOLVER.WARMUP_METHOD = "linear"
# Periods in epochs for checkpoints (<MODEL.NAME>_<epoch>.pth) and evaluation; LOG_PERIOD is in iterations.
_C.SOLVER.CHECKPOINT_PERIOD = 50
_C.SOLVER.LOG_PERIOD = 10
_C.SOLVER.EVAL_PERIOD = 1
# Also write TensorBoard event files of the training curves to OUTPUT_DIR/tensorboard/ (when the tensorboard
# package is installed; metrics.csv and curves.png are written either way).
_C.SOLVER.TENSORBOARD = True
# --resume refuses training data that differ from those the checkpoint was trained on (images added, removed,
# relabelled or of another size: docs/failures.md), since the result could not equal an uninterrupted run's.
# True resumes on the new data anyway, with a warning (the number of identities must stay the same).
_C.SOLVER.RESUME_ALLOW_DATA_CHANGE = False
# Training batch size (P x K) over all processes.
_C.SOLVER.IMS_PER_BATCH = 64
# Mixed precision (utils/amp.py). False: fp32 on every device. True: autocast to AMP_DTYPE on CUDA; on the CPU
# as CPU_AMP says.
_C.SOLVER.AMP = True
# The autocast dtype on CUDA: "float16" (with a gradient scaler; the authors' setting) or "bfloat16"
# (with CPU_AMP "float32", "bfloat16" autocasts bf16 on the CPU too, as it did before CPU_AMP existed).
_C.SOLVER.AMP_DTYPE = "float16"
# Mixed precision on the CPU: "float32" (no autocast, the authors' numerics), "auto" (bf16 autocast where the
# CPU has native bf16 matrix units, AMX-BF16 or AVX512-BF16, which multiply bf16 3-8x faster than fp32; fp32
# elsewhere, with the reason logged), "bfloat16" (forced), "float16" (fp16 autocast with the gradient scaler:
# the CUDA default's CPU twin, slow without fp16 units). Under bf16 the loss terms, attention softmaxes,
# LayerNorm statistics, the optimiser and the master weights stay fp32 (docs/performance.md).
_C.SOLVER.CPU_AMP = "float32"
# The gradient scaler's first scale under fp16 (torch's default 2^16). A step whose scaled gradients overflow
# is skipped and the scale halves (the log counts skipped steps per epoch); it doubles after 2000 clean steps.
_C.SOLVER.AMP_INIT_SCALE = 65536.0
# Compile the training forward with torch.compile (TorchInductor; a C++ compiler on the CPU, Triton on CUDA):
# fused kernels, faster on a GPU after a compilation of a minute or more at the start. Losses and gradients
# equal eager mode's up to float rounding; evaluation runs eagerly.
_C.SOLVER.COMPILE = False
# Multi-process training (torchrun): BatchNorm statistics over the batch of all processes (SyncBatchNorm on
# CUDA, its CPU twin on gloo), and batch-hard triplet mining over that global batch. With both, a DDP step
# computes the loss and gradients one process would on the whole P x K batch (see docs/distributed.md).
_C.SOLVER.SYNC_BN = True
_C.SOLVER.GLOBAL_TRIPLET = True

# ---------------------------------------------------------------------------------------------------
# TEST
# ---------------------------------------------------------------------------------------------------
_C.TEST = CN()
# Test batch size (over all processes).
_C.TEST.IMS_PER_BATCH = 128
# k-reciprocal re-ranking of the distance matrix, and its parameters.
_C.TEST.RE_RANKING = False
_C.TEST.RR_K1 = 20
_C.TEST.RR_K2 = 6
_C.TEST.RR_LAMBDA = 0.3
# Checkpoint evaluated by test_svpr.py (full training checkpoint or bare state dict).
_C.TEST.WEIGHT = ""
# L2-normalise features before computing distances: "yes" or "no".
_C.TEST.FEAT_NORM = "yes"
# Distance: "euclidean" (squared Euclidean, as the reference) or "cosine" (1 - cosine similarity).
_C.TEST.DIST_METRIC = "euclidean"
# Time filter: "mix" (all), "cross" (only gallery from another time), "same" (only the same time).
_C.TEST.TIME_MODE = "mix"
# Largest rank of the reported CMC curve.
_C.TEST.MAX_RANK = 50
# Mixed precision of the test features: True embeds in the training precision of the device (SOLVER.AMP,
# AMP_DTYPE, CPU_AMP); False (the reference) embeds in fp32 even when training used mixed precision.
_C.TEST.AMP = False
# Write each protocol's query and gallery features with their ids, cameras, views, times and image paths
# to OUTPUT_DIR/features_<protocol>.npz.
_C.TEST.SAVE_FEATURES = False
# Ranked-list pictures after each evaluation: the top-k kept gallery images of the worst, best and some
# random queries of every protocol, under OUTPUT_DIR/rank_lists/ (docs/outputs.md); 0 writes none.
_C.TEST.VISUALIZE_TOPK = 0

# ---------------------------------------------------------------------------------------------------
# DIST (processes: torchrun ranks, runs sharing a machine, and what each process holds)
# ---------------------------------------------------------------------------------------------------
_C.DIST = CN()
# How long a process waits for the others at a collective operation (gradient all-reduce, barrier,
# gather) before it stops with an error naming the fault: a stalled or dead rank ends the run after
# this many minutes instead of hanging it. A float (write 5.0, not 5); fractions such as 0.5 work.
_C.DIST.TIMEOUT_MINUTES = 10.0
# CPU threads of each process (intra-op). 0 sizes them from the machine: its cores divided by the
# processes of this framework running on it (torchrun ranks and separately started runs alike; each run
# re-checks every epoch), less the data workers on CUDA, where they do the CPU work; see utils/threads.py.
# Oversubscribed cores make every parallel operation wait for a descheduled thread (two default-sized runs
# on 2 cores ran 15-20x slower than one). OMP_NUM_THREADS, when set, is used as given; so is a value > 0.
_C.DIST.CPU_THREADS = 0
# Keep freed CPU memory in the process (glibc's mmap and trim thresholds raised) so that every step reuses
# the pages of the last one instead of faulting fresh ones in (ViT-B/16 inference on one thread: 8% faster).
# The process keeps its peak footprint. Only glibc on Linux; see utils/allocator.py.
_C.DIST.KEEP_FREED_CPU_MEMORY = True

# Output folder: logs, config.yaml, checkpoints, results.json/results.csv.
_C.OUTPUT_DIR = "./outputs/default"

_assembled = {}

def get_cfg_defaults():
    """A fresh, mutable copy of the default configuration: the framework's keys above plus every key a
    component declares (``configs/schema.py``)."""
    known = tuple(declared_names())
    if known not in _assembled:
        cfg = _C.clone()
        add_declared_keys(cfg)
        _assembled.clear()
        _assembled[known] = cfg
    return _assembled[known].clone()
