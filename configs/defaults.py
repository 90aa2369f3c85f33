"""Every configuration key of the framework, with its default and meaning.

Key names follow the reference SVPR-ReID / CLIP-ReID code so that its YAML files merge unchanged. The
reference's keys that have no effect there either are not defined here: ``configs/compat.py`` lists them,
and loading ignores them with one warning. Override any key from a YAML file (``--config_file``) or
from the command line (``KEY VALUE`` pairs after the options).
"""
from yacs.config import CfgNode as CN

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
# Build the backbone with random weights from MODEL.CLIP.* (CLIP models) or MODEL.VIT.* (ImageNet-ViT
# baselines) instead of loading PRETRAIN_PATH (tests, benchmarks and the synthetic quickstart).
_C.MODEL.RANDOM_INIT = False
# Triplet loss without margin (soft-margin form log(1 + exp(d_ap - d_an))). The reference's effective
# default is True, so SOLVER.MARGIN only matters when this is False.
_C.MODEL.NO_MARGIN = True
# Label smoothing (epsilon 0.1) in the identity and view cross-entropy losses: "on" or "off".
_C.MODEL.IF_LABELSMOOTH = "on"
# Add the center loss to the metric loss: "yes" or "no" (same as "center" in METRIC_LOSS_TYPE).
_C.MODEL.IF_WITH_CENTER = "no"
# Weight of the identity (classification) loss.
_C.MODEL.ID_LOSS_WEIGHT = 1.0
# Weight of the triplet loss.
_C.MODEL.TRIPLET_LOSS_WEIGHT = 1.0
# Metric loss: "triplet" or "triplet_center" (adds the center loss).
_C.MODEL.METRIC_LOSS_TYPE = "triplet"
# Weight of CLIP-ReID's stage-2 image-to-text cross-entropy.
_C.MODEL.I2T_LOSS_WEIGHT = 1.0
# ImageNet-ViT baselines only: stochastic-depth rate of the last block (block i gets DROP_PATH * i / (depth - 1)),
_C.MODEL.DROP_PATH = 0.1
# dropout after the positional embedding, the attention projection and the MLP layers,
_C.MODEL.DROP_OUT = 0.0
# and dropout of the attention weights.
_C.MODEL.ATT_DROP_RATE = 0.0
# Patch-embedding stride (rows, columns); smaller than the patch size gives overlapping patches.
_C.MODEL.STRIDE_SIZE = [16, 16]
# Side-information embedding (SIE): scale, and whether camera and/or view ids are embedded.
_C.MODEL.SIE_COE = 3.0
_C.MODEL.SIE_CAMERA = False
_C.MODEL.SIE_VIEW = False
# Freeze the CLIP text tower (token embedding, transformer, positional embedding, final LN, projection).
_C.MODEL.FREEZE_TEXT = False
# Build the text branch and feed per-image texts (SVPR's attribute captions).
_C.MODEL.USE_TEXT = False
# Number of learnable "X" prompt tokens in the attribute text ("A photo of a X X X X person ...").
_C.MODEL.TEXT_PROMPT = 4
# Text context length: the tokenizer pads/truncates to it and the CLIP text positional embedding is
# resized to it (77 is CLIP's own).
_C.MODEL.TEXT_LEN = 77
# Interpolation of CLIP's 14x14 image position grid to the input's patch grid: "bilinear" (the
# reference's, align_corners False, no antialiasing) or "bicubic".
_C.MODEL.POS_EMBED_INTERP = "bilinear"
# CP2108 text source: "attribute" (text built from the attribute labels) or "captions" (caption JSON).
_C.MODEL.TEXT_TYPE = "attribute"
# The noun of the prompts the model writes itself ("person" or "vehicle"): CLIP-ReID's "A photo of a X X X X
# person." and the test caption of FeatureExtractor / tools/export.py. Datasets word their own captions.
_C.MODEL.PROMPT_SUBJECT = "person"
# Use the attribute labels (SVPR's attribute loss and ASMOE).
_C.MODEL.USE_ATTR = False
# Number of learnable "X" prompt tokens in SVPR's view caption ("A photo of a X X X X person from X view.").
_C.MODEL.VIEW_PROMPT = 4
# Recompute transformer blocks in the backward pass to save memory (slower).
_C.MODEL.GRAD_CHECKPOINT = False

# Fixes of defects of the authors' code, one bool each (docs/reference_differences.md). False reproduces the
# reference's model exactly where the fix changes numerics or parameters; fixes that only prevent a crash
# default to True. Flat on purpose: tools/ablation.py --fixes enumerates the keys of this node.
_C.MODEL.FIXES = CN()
# CP2108 captions and attribute labels: the reference gives every image (train, query, gallery) the entry
# of (identity, view 0, time 1); True looks up each image's own (identity, view, time) entry.
_C.MODEL.FIXES.ANNOTATION_PER_IMAGE = False
# CLIP-ReID's prompt: the reference tokenizes it at 77 tokens and crashes when MODEL.TEXT_LEN is not 77
# (False raises a ConfigError there); True tokenizes it at MODEL.TEXT_LEN (identical results at 77).
_C.MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN = True

# CLIP hyper-parameters used only with MODEL.RANDOM_INIT; with a checkpoint they are read from the weights.
_C.MODEL.CLIP = CN()
_C.MODEL.CLIP.EMBED_DIM = 512  # joint image-text embedding size
_C.MODEL.CLIP.VISION_WIDTH = 768  # image transformer width
_C.MODEL.CLIP.VISION_LAYERS = 12  # image transformer depth
_C.MODEL.CLIP.VISION_HEADS = 12  # image transformer heads
_C.MODEL.CLIP.PATCH_SIZE = 16  # patch (kernel) size of the patch embedding
_C.MODEL.CLIP.TEXT_WIDTH = 512  # text transformer width
_C.MODEL.CLIP.TEXT_LAYERS = 12  # text transformer depth
_C.MODEL.CLIP.TEXT_HEADS = 8  # text transformer heads
_C.MODEL.CLIP.VOCAB_SIZE = 49408  # BPE vocabulary size (CLIP's tokenizer needs 49408)

# ImageNet-ViT hyper-parameters used only with MODEL.RANDOM_INIT; with a checkpoint they are read from the
# weights (heads = width / 64, as in every ViT of that family).
_C.MODEL.VIT = CN()
_C.MODEL.VIT.EMBED_DIM = 768  # token width
_C.MODEL.VIT.DEPTH = 12  # number of transformer blocks
_C.MODEL.VIT.NUM_HEADS = 12  # attention heads per block
_C.MODEL.VIT.PATCH_SIZE = 16  # patch (kernel) size of the patch embedding; its stride is MODEL.STRIDE_SIZE

# TransReID's jigsaw patch module (JPM): the patch tokens are rotated left by SHIFT - 1, interleaved from
# SHUFFLE_GROUPS equal parts and cut into NUM_GROUPS local groups (the authors' fixed 5 / 2 / 4).
_C.MODEL.JPM = CN()
_C.MODEL.JPM.SHIFT = 5  # the patch tokens are rotated left by SHIFT - 1
_C.MODEL.JPM.SHUFFLE_GROUPS = 2  # equal parts interleaved after the shift
_C.MODEL.JPM.NUM_GROUPS = 4  # local groups (local branches); the test feature divides each by this number

# VDT and SeCap: weight of the view loss (view classification + |cos(global, view)|).
_C.MODEL.VDT = CN()
_C.MODEL.VDT.VIEW_LOSS_WEIGHT = 0.1  # weight of the view loss of VDT and SeCap

# SeCap: number of learnable prompts recalibrated by PRM, and number of two-way LFRM layers.
_C.MODEL.SECAP = CN()
_C.MODEL.SECAP.PROMPT_LEN = 64  # learnable prompts re-calibrated by PRM
_C.MODEL.SECAP.LFRM_DEPTH = 2  # two-way transformer layers of LFRM

# MODEL.FIXES (continued) for the ImageNet-ViT baselines (docs/baselines.md).
# VDT/SeCap: place the pretrained positional embedding at [cls, view (= cls position), patches] instead of
# the authors' table shifted by one row (view token at patch 0's position, each patch at its right
# neighbour's, last patch on a row the authors leave uninitialised and this code sets to zeros).
_C.MODEL.FIXES.VIEW_POS_EMBED = False
# TransReID: apply the global BNNeck once per training step (the authors apply it twice, so its running
# statistics move twice per step).
_C.MODEL.FIXES.TRANSREID_SINGLE_BN = False
# VDT/SeCap: smooth the view cross-entropy over the V views (targets sum to 1) instead of the authors'
# epsilon / number-of-identities.
_C.MODEL.FIXES.VIEW_LOSS_SMOOTHING = False

# SVPR-ReID components (MODEL.ARCH_NAME CLIP_SVPR_ReID). Each switch removes its branch entirely.
_C.MODEL.SVPR = CN()
# View-Decoupled Feature Extractor: view caption prompts, view token and View Bidirectional Decoupling.
_C.MODEL.SVPR.VDFE = True
# Attribute-Scattered Mixture of Experts (needs attribute labels: MODEL.USE_ATTR and a dataset with them).
_C.MODEL.SVPR.ASMOE = True
# Context-Vision Progressive Refinement of the patch tokens.
_C.MODEL.SVPR.CVPR = True
# Learned per-patch weighting of the (refined) patch tokens into a local feature.
_C.MODEL.SVPR.LOCAL = True
# Number of CVPR refinement stages; each keeps the top CVPR_TOPK fraction of the previous selection.
_C.MODEL.SVPR.CVPR_LAYERS = 3
_C.MODEL.SVPR.CVPR_TOPK = 0.5
# Weight of the refined patches added back to the patch tokens (F + w * F_refined).
_C.MODEL.SVPR.PATCH_UPDATE = 0.1
# ASMOE: number of experts, experts used per input, fraction of attributes kept by the router.
_C.MODEL.SVPR.NUM_EXPERTS = 4
_C.MODEL.SVPR.EXPERT_TOPK = 3
_C.MODEL.SVPR.ATTR_TOPK = 0.7
# Loss weights of the view loss (VDFE) and of the summed attribute cross-entropies (ASMOE).
_C.MODEL.SVPR.VIEW_LOSS_WEIGHT = 1.0
_C.MODEL.SVPR.ATTR_LOSS_WEIGHT = 0.05

# SVPR CVPR: the reference adds f_asmoe (B, C) to f_inv (B, 1, C), a (B, B, C) semantic key, so every image's
# CVPR query attends over the whole batch's attribute features. True: a per-sample (B, 1, C) key.
_C.MODEL.FIXES.CVPR_PER_SAMPLE_KEY = False
# SVPR CVPR: the reference reads the selected tokens in position order but writes the refined ones back in
# score order (to permuted patches). True: each refined token goes back to the patch it was read from.
_C.MODEL.FIXES.CVPR_SCATTER_ORDER = False
# SVPR CVPR: every reference stage ranks and refines the original backbone patches of the remaining
# candidates. True: each stage reads the tokens the previous stage refined (progressive refinement).
_C.MODEL.FIXES.CVPR_PROGRESSIVE_KEYS = False
# SVPR CVPR: the reference uses one block for all stages (weights shared). True: one block per stage.
_C.MODEL.FIXES.CVPR_SEPARATE_BLOCKS = False
# SVPR view caption: the reference words view id v as token v+1 of "ground aerial" (0 ground, 1 aerial, 2 the
# end-of-text token: AG-ReID.v2's wearable becomes "aerial", its UAV EOT). True: ground/aerial for two views,
# cctv/wearable/uav for three.
_C.MODEL.FIXES.VIEW_WORDS = False
# SVPR view head: the reference always has 3 view classes. True: as many classes as the dataset has views.
_C.MODEL.FIXES.VIEW_HEAD_CLASSES = False
# SVPR: the reference builds parameters its forward never uses (q/k projections of attentions over a single
# key, LayerNorms never applied: CrossAttention "normy", MLP "norm_layer", CVPR "ln_norm"). True: they are
# not built (same outputs; fewer parameters, a state dict that no longer matches the reference's).
_C.MODEL.FIXES.DROP_UNUSED_PARAMETERS = False
# SVPR: the reference crashes when the dataset has no attribute labels (CARGO). True: ASMOE is not built.
_C.MODEL.FIXES.NO_ATTRIBUTES = True
# SVPR: the reference hard-codes 128 local weights (256x128 inputs, stride 16) and crashes on other sizes.
# True: one weight row per real patch (identical for 256x128).
_C.MODEL.FIXES.LOCAL_PATCH_COUNT = True

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
# CP2108 split version (split_v{V}/ and images_v{V}/).
_C.DATASETS.VERSION = 100
# Generate the synthetic benchmark under ROOT_DIR when it is missing (SynthAG datasets only).
_C.DATASETS.AUTO_GENERATE = True
# VehicleID: test set size, picks train_test_split/test_list_<size>.txt (800, 1600 or 2400).
_C.DATASETS.VEHICLEID_TEST_SIZE = 800
# VehicleID: number of random query/gallery draws (trials) the results are averaged over.
_C.DATASETS.VEHICLEID_TRIALS = 10
# VehicleID: seed of the gallery draws; trial t draws with (seed, t), so a seed fixes every trial.
_C.DATASETS.VEHICLEID_SEED = 0

# Synthetic aerial-ground benchmark generator settings (used when it is generated).
_C.DATASETS.SYNTH = CN()
_C.DATASETS.SYNTH.NUM_IDS = 200  # identities in total (split into train and test identities)
_C.DATASETS.SYNTH.IMAGES_PER_ID = 40  # images per identity across all cameras
_C.DATASETS.SYNTH.HEIGHT = 128  # image height in pixels
_C.DATASETS.SYNTH.WIDTH = 64  # image width in pixels
_C.DATASETS.SYNTH.SEED = 0  # generator seed; same seed gives identical files

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
# Triplet margin (only with MODEL.NO_MARGIN False).
_C.SOLVER.MARGIN = 0.3
# Center loss: SGD learning rate of the centres and weight of the loss.
_C.SOLVER.CENTER_LR = 0.5
_C.SOLVER.CENTER_LOSS_WEIGHT = 0.0005
# Weight decay for weights and for biases.
_C.SOLVER.WEIGHT_DECAY = 0.0001
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0001
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
# Training batch size (P x K) over all processes.
_C.SOLVER.IMS_PER_BATCH = 64
# Mixed precision on CUDA: True uses autocast with AMP_DTYPE. On CPU only "bfloat16" autocasts;
# "float16" runs in fp32 there.
_C.SOLVER.AMP = True
# "float16" (with a gradient scaler) or "bfloat16".
_C.SOLVER.AMP_DTYPE = "float16"
# Multi-process training (torchrun): BatchNorm statistics over the batch of all processes (SyncBatchNorm on
# CUDA, its CPU twin on gloo), and batch-hard triplet mining over that global batch. With both, a DDP step
# computes the loss and gradients one process would on the whole P x K batch (see docs/distributed.md).
_C.SOLVER.SYNC_BN = True
_C.SOLVER.GLOBAL_TRIPLET = True

# CLIP-ReID stage 1 (prompt learning).
_C.SOLVER.STAGE1 = CN()
# Run stage 1 before stage 2 (CLIP_ReID only).
_C.SOLVER.STAGE1.TRAIN = False
# Stage-1 weights to load when stage 1 is not trained here (CLIP_ReID only).
_C.SOLVER.STAGE1.PRETRAIN_PATH = ""
_C.SOLVER.STAGE1.IMS_PER_BATCH = 64  # stage-1 batch size
_C.SOLVER.STAGE1.OPTIMIZER_NAME = "Adam"  # stage-1 optimiser
_C.SOLVER.STAGE1.MAX_EPOCHS = 100  # stage-1 epochs
_C.SOLVER.STAGE1.BASE_LR = 0.0003  # stage-1 learning rate
_C.SOLVER.STAGE1.MOMENTUM = 0.9  # stage-1 SGD momentum
_C.SOLVER.STAGE1.WEIGHT_DECAY = 0.0005  # stage-1 weight decay
_C.SOLVER.STAGE1.WARMUP_EPOCHS = 5  # linear warm-up epochs of the stage-1 cosine schedule
_C.SOLVER.STAGE1.WARMUP_LR_INIT = 0.00001  # learning rate at the start of the warm-up
_C.SOLVER.STAGE1.LR_MIN = 1e-6  # final learning rate of the cosine schedule
_C.SOLVER.STAGE1.LOG_PERIOD = 100  # stage-1 log period in iterations

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
# Mixed precision at test time. False (the reference) embeds in fp32 even when training used AMP.
_C.TEST.AMP = False
# Write each protocol's query and gallery features with their ids, cameras, views, times and image paths
# to OUTPUT_DIR/features_<protocol>.npz.
_C.TEST.SAVE_FEATURES = False
# Ranked-list pictures after each evaluation: the top-k kept gallery images of the worst, best and some
# random queries of every protocol, under OUTPUT_DIR/rank_lists/ (docs/outputs.md); 0 writes none.
_C.TEST.VISUALIZE_TOPK = 0

# ---------------------------------------------------------------------------------------------------
# DIST (multi-process training under torchrun)
# ---------------------------------------------------------------------------------------------------
_C.DIST = CN()
# How long a process waits for the others at a collective operation (gradient all-reduce, barrier,
# gather) before it stops with an error naming the fault: a stalled or dead rank ends the run after
# this many minutes instead of hanging it. A float (write 5.0, not 5); fractions such as 0.5 work.
_C.DIST.TIMEOUT_MINUTES = 10.0

# Output folder: logs, config.yaml, checkpoints, results.json/results.csv.
_C.OUTPUT_DIR = "./outputs/default"


def get_cfg_defaults():
    """Return a fresh, mutable copy of the default configuration."""
    return _C.clone()
