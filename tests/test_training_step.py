"""One training step of every model through the real trainer, against the authors' step written here from
their training code's description: the loss terms with their weights, reductions and label smoothing
(loss/make_loss.py ReIDLoss and make_loss), the parameter groups (solver/make_optimizer_prompt.py: one learning
rate and weight decay per parameter by name) and the learning rate of epoch 1 (WarmupMultiStepLR stepped after
each epoch, or before it in CLIP-ReID's stage 2), then torch's Adam / SGD update of a first step.

Tiny random-weight models on a fixed batch; dropout and stochastic depth off, so both forwards are equal.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from loss import build_criterion
from model import build_model
from processor.hooks import HookBase
from processor.trainer import Trainer
from solver import make_optimizer
from tests.fixtures import tiny_cfg
from text import tokenize

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES, ATTRIBUTES, EPSILON = 5, (("hat", 2), ("bag", 3), ("sex", 2)), 0.1
# P x K = 2 identities x 4 images; views and cameras vary.
PIDS = torch.tensor([3, 3, 3, 3, 1, 1, 1, 1])
VIEWS = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
CAMERAS = torch.tensor([0, 2, 1, 2, 2, 0, 1, 2])
# The shipped optimisers: Adam for the CLIP models, SGD with momentum for the ImageNet-ViT ones; groups that
# differ (bias factor, bias weight decay, large-FC learning rate on for the ViT family).
CLIP_SOLVER = {"SOLVER.OPTIMIZER_NAME": "Adam", "SOLVER.BASE_LR": 5e-6, "SOLVER.WARMUP_FACTOR": 0.1,
               "SOLVER.WEIGHT_DECAY": 1e-4, "SOLVER.WEIGHT_DECAY_BIAS": 5e-4, "SOLVER.LARGE_FC_LR": False}
VIT_SOLVER = {"SOLVER.OPTIMIZER_NAME": "SGD", "SOLVER.BASE_LR": 0.008, "SOLVER.WARMUP_FACTOR": 0.01,
              "SOLVER.WEIGHT_DECAY": 1e-4, "SOLVER.WEIGHT_DECAY_BIAS": 5e-4, "SOLVER.LARGE_FC_LR": True}
# Weight decays for the one-step comparison, large enough for the decay term to show in one step. With the
# shipped ones SGD's decay moves a weight by lr * 1e-4 * w, about 1e-10, a thousand times below the comparison's
# tolerance, and Adam's direction sign(g + decay * w) almost never flips: zeroing the decay would go unseen.
# Here SGD's decay moves a weight by about 1e-6 and Adam's direction flips wherever decay * |w| outweighs |g|.
VISIBLE_DECAY = {"SOLVER.WEIGHT_DECAY": 0.5, "SOLVER.WEIGHT_DECAY_BIAS": 2.0}
COMMON = {"SOLVER.MAX_EPOCHS": 1, "SOLVER.WARMUP_ITERS": 10, "SOLVER.WARMUP_METHOD": "linear", "SOLVER.STEPS": (40,),
          "SOLVER.BIAS_LR_FACTOR": 2, "SOLVER.AMP": False, "MODEL.DROP_PATH": 0.0, "MODEL.SIE_CAMERA": True,
          "MODEL.NO_MARGIN": True, "MODEL.IF_LABELSMOOTH": "on"}
SETTINGS = {
    "CLIP_SVPR_ReID": {**CLIP_SOLVER, "MODEL.ID_LOSS_WEIGHT": 0.25, "MODEL.USE_TEXT": True, "MODEL.USE_ATTR": True,
                       "MODEL.TEXT_LEN": 77},
    "CLIP_baseline": CLIP_SOLVER,
    "CLIP_ReID": CLIP_SOLVER,
    "ViT": VIT_SOLVER, "TransReID": VIT_SOLVER, "VDT": VIT_SOLVER, "SeCap": VIT_SOLVER,
}


# ---- the authors' loss, written from their description -------------------------------------------------------
def smoothed_ce(logits, targets, count):
    """Their CrossEntropyLabelSmooth(num_classes=count): mean over the batch of -sum_k q_k log softmax_k, with
    q = (1 - eps) onehot + eps / count (count is the number of identities, whatever the logits' width)."""
    q = (1 - EPSILON) * F.one_hot(targets, logits.shape[1]).float() + EPSILON / count
    return -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_triplet(features, targets):
    """Their TripletLoss() without margin: batch-hard Euclidean distances, soft margin log(1 + exp(d_ap - d_an))."""
    squared = (features ** 2).sum(1, keepdim=True)
    dist = (squared + squared.t() - 2 * features @ features.t()).clamp(min=1e-12).sqrt()
    same = targets[:, None] == targets[None, :]
    hardest_positive = (dist * same).max(dim=1).values
    hardest_negative = dist.masked_fill(same, float("inf")).min(dim=1).values
    return F.softplus(hardest_positive - hardest_negative).mean()


def combine(values, first_plus_mean):
    """ReIDLoss add_type: 'sum', or 'other' (the first branch plus the mean of the others)."""
    if first_plus_mean:
        return values[0] + (torch.stack(values[1:]).mean() if len(values) > 1 else 0.0)
    return torch.stack(values).sum()


def view_loss(out, weight):
    """get_view_loss: weight * (identity-count smoothed CE of the view logits + mean |cos(f_inv, f_view)|)."""
    cosine = F.cosine_similarity(out.aux["inv_feat"], out.aux["view_feat"], dim=1).abs().mean()
    return weight * (smoothed_ce(out.aux["view_logits"], VIEWS, NUM_CLASSES) + cosine)


def authors_loss(arch, cfg, out):
    """The total loss of the authors' loop for ``arch`` (processor_clipreid_xhao.do_train,
    processor_clipreid_stage2.do_train_stage2)."""
    first_plus_mean = arch in ("CLIP_SVPR_ReID", "TransReID")
    ids = [smoothed_ce(logits, PIDS, NUM_CLASSES) for logits in out.id_logits.values()]
    triplets = [soft_triplet(features, PIDS) for features in out.features.values()]
    loss = cfg.MODEL.ID_LOSS_WEIGHT * combine(ids, first_plus_mean) + \
        cfg.MODEL.TRIPLET_LOSS_WEIGHT * combine(triplets, first_plus_mean)
    if arch == "CLIP_SVPR_ReID":
        attrs = sum(F.cross_entropy(logits, ATTR_LABELS[:, a]) for a, logits in enumerate(out.aux["attr_logits"]))
        loss = loss + view_loss(out, 1.0) + 0.05 * attrs
    elif arch in ("VDT", "SeCap"):
        loss = loss + view_loss(out, 0.1)
    elif arch == "CLIP_ReID":
        loss = loss + cfg.MODEL.I2T_LOSS_WEIGHT * smoothed_ce(out.aux["i2t_logits"], PIDS, NUM_CLASSES)
    return loss


# ---- their optimiser groups and learning rate ----------------------------------------------------------------
def authors_lr_and_decay(cfg, name, step_at_start):
    """make_optimizer: BASE_LR and WEIGHT_DECAY; "bias" in the name: x BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS;
    with LARGE_FC_LR, "classifier" or "arcface" in the name: 2 x BASE_LR. Times the warm-up of epoch 1."""
    solver = cfg.SOLVER
    lr, decay = solver.BASE_LR, solver.WEIGHT_DECAY
    if "bias" in name:
        lr, decay = solver.BASE_LR * solver.BIAS_LR_FACTOR, solver.WEIGHT_DECAY_BIAS
    if solver.LARGE_FC_LR and ("classifier" in name or "arcface" in name):
        lr = solver.BASE_LR * 2
    t = 1 if step_at_start else 0
    alpha = t / solver.WARMUP_ITERS
    return lr * (solver.WARMUP_FACTOR * (1 - alpha) + alpha), decay


def first_step(cfg, param, grad, lr, decay):
    """torch's Adam (L2 weight decay) or SGD with momentum, first step from zero state."""
    grad = grad + decay * param
    if cfg.SOLVER.OPTIMIZER_NAME == "Adam":
        return param - lr * grad / (grad.abs() + 1e-8)  # m / (1 - b1) = g, sqrt(v / (1 - b2)) = |g|
    return param - lr * grad  # the momentum buffer starts as the gradient


# ---- the test ----------------------------------------------------------------------------------------------
ATTR_LABELS = torch.tensor([[0, 1, 0], [1, 2, 1], [0, 0, 0], [1, 1, 1], [0, 2, 1], [1, 0, 0], [0, 1, 1], [1, 2, 0]])


def fixed_batch(cfg):
    generator = torch.Generator().manual_seed(5)
    batch = {"images": torch.randn(len(PIDS), 3, 64, 32, generator=generator), "pids": PIDS, "camids": CAMERAS,
             "viewids": VIEWS, "timeids": torch.ones_like(PIDS), "attrs": ATTR_LABELS,
             "index": torch.arange(len(PIDS)), "text_tokens": None}
    if cfg.MODEL.USE_TEXT:
        batch["text_tokens"] = tokenize(["a person wearing a red coat"] * len(PIDS), context_length=cfg.MODEL.TEXT_LEN,
                                        truncate=True).long()
    return batch


class _Terms(HookBase):
    def after_step(self, batch, outputs, terms):
        self.total = float(sum(value.detach() for value in terms.values()))


def tiny_model(arch, **keys):
    """The frozen config (COMMON, the arch's SETTINGS, then ``keys``) and its tiny model from seed 0, without
    dropout, and the attributes it was built with."""
    cfg = tiny_cfg(arch, **{**COMMON, **SETTINGS[arch], **keys})
    cfg.freeze()
    torch.manual_seed(0)
    attributes = ATTRIBUTES if arch == "CLIP_SVPR_ReID" else ()
    model = build_model(cfg, num_classes=NUM_CLASSES, num_cameras=3, num_views=2, attributes=attributes)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return cfg, model, attributes


@pytest.mark.parametrize("arch", list(SETTINGS))
def test_one_training_step_equals_the_authors(arch):
    cfg, model, attributes = tiny_model(arch, **VISIBLE_DECAY)
    if arch == "CLIP_ReID":  # stage 2: prompts and text frozen, every identity's text feature fixed
        model.unfreeze_for_stage2()
        model.set_class_text_features(torch.randn(NUM_CLASSES, model.clip.embed_dim))
    reference = copy.deepcopy(model)
    batch = fixed_batch(cfg)

    terms = _Terms()
    model_args = {"num_classes": NUM_CLASSES, "num_cameras": 3, "num_views": 2,
                  "attributes": [list(a) for a in attributes]}
    trainer = Trainer(cfg, model, build_criterion(cfg, model, NUM_CLASSES), [copy.deepcopy(batch)], None,
                      torch.device("cpu"), model_args, hooks=[terms])
    trainer.fit()

    reference.train()
    out = reference(batch["images"], **reference.forward_inputs(batch))
    loss = authors_loss(arch, cfg, out)
    loss.backward()
    assert terms.total == pytest.approx(float(loss.detach()), rel=1e-5)

    step_at_start = arch == "CLIP_ReID"  # the authors' CLIP-ReID stage 2 steps its schedule before the epoch
    trained = dict(model.named_parameters())
    moved = decayed = nonzero = 0  # optimised parameters; those the decay visibly moves; those not all zero
    for name, param in reference.named_parameters():
        if param.grad is None:
            assert torch.equal(trained[name], param), name  # not optimised: unchanged
            continue
        lr, decay = authors_lr_and_decay(cfg, name, step_at_start)
        expected = first_step(cfg, param.detach(), param.grad, lr, decay)
        # Adam moves every element by about lr * sign(g); where |g| is float noise near its eps (1e-8), e.g. the
        # key biases of attention, whose exact gradient is 0, the direction is noise in either code.
        clear = (param.grad + decay * param).abs() > 1e-6 if cfg.SOLVER.OPTIMIZER_NAME == "Adam" else \
            torch.ones_like(param, dtype=torch.bool)
        got = trained[name].detach()
        torch.testing.assert_close(got[clear], expected[clear], rtol=1e-5, atol=lr * 1e-4, msg=name)
        assert ((got - param)[~clear].abs() <= lr * 1.0001).all(), name
        moved += 1
        # The same comparison tells the step without weight decay apart: the decay term is visible (except on
        # tensors that start at zero, such as biases, which no decay moves in a first step).
        undecayed = first_step(cfg, param.detach(), param.grad, lr, 0.0)
        decayed += not torch.allclose(undecayed[clear], expected[clear], rtol=1e-5, atol=lr * 1e-4)
        nonzero += bool(param.detach().abs().max() > 0)
    assert moved > 10
    assert decayed > nonzero // 2  # on most non-zero parameters, not only on a few


def their_supcon(queries, keys, query_labels, key_labels):
    """Their stage-1 SupConLoss (loss/supcontrast.py, temperature 1): minus the mean over queries of the mean
    log-softmax (over all keys) of the keys with the query's label."""
    mask = (query_labels[:, None] == key_labels[None, :]).float()
    log_prob = F.log_softmax(queries @ keys.t(), dim=1)
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def test_one_prompt_learning_step_equals_the_authors(tmp_path):
    """CLIP-ReID stage 1 (processor_clipreid_stage1.py): cached image features, the prompts' text features,
    SupCon image->text + text->image, Adam on the prompt context only, at the timm cosine schedule's value
    for epoch 1 (stepped with the epoch number before it): WARMUP_LR_INIT + (BASE_LR - WARMUP_LR_INIT) / W."""
    from model.clip_reid import PromptLearning
    from processor.phase_runner import run_phase

    cfg = tiny_cfg("CLIP_ReID", **{"SOLVER.STAGE1.MAX_EPOCHS": 1, "SOLVER.STAGE1.WARMUP_EPOCHS": 5,
                                   "SOLVER.STAGE1.BASE_LR": 3.5e-4, "SOLVER.STAGE1.WARMUP_LR_INIT": 1e-5,
                                   "SOLVER.STAGE1.WEIGHT_DECAY": 5e-4, "SOLVER.STAGE1.TRAIN": True,
                                   "SOLVER.AMP": False, "OUTPUT_DIR": str(tmp_path)})
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=NUM_CLASSES)
    image_features = torch.randn(len(PIDS), model.clip.embed_dim, generator=torch.Generator().manual_seed(3))

    class FixedBatch(PromptLearning):
        def setup(self):  # the cached features of the training images, without reading a dataset
            self.model.freeze_for_stage1()
            self.features, self.pids = image_features, PIDS

        def batches(self, epoch):
            yield torch.arange(len(PIDS))

        def finish(self):
            pass

    reference = copy.deepcopy(model)
    run_phase(cfg, FixedBatch(cfg, model, None, torch.device("cpu")))

    reference.freeze_for_stage1()
    text = reference.text_features(PIDS)
    loss = their_supcon(image_features, text, PIDS, PIDS) + their_supcon(text, image_features, PIDS, PIDS)
    loss.backward()
    stage1 = cfg.SOLVER.STAGE1
    lr = stage1.WARMUP_LR_INIT + (stage1.BASE_LR - stage1.WARMUP_LR_INIT) / stage1.WARMUP_EPOCHS
    grad = reference.cls_ctx.grad + stage1.WEIGHT_DECAY * reference.cls_ctx.detach()
    expected = reference.cls_ctx.detach() - lr * grad / (grad.abs() + 1e-8)
    clear = grad.abs() > 1e-6  # (prompts of identities without an image move by their weight decay alone)
    torch.testing.assert_close(model.cls_ctx.detach()[clear], expected[clear], rtol=1e-5, atol=lr * 1e-4)
    before = dict(reference.named_parameters())
    assert {name for name, p in model.named_parameters() if not torch.equal(p, before[name])} == {"cls_ctx"}


def test_prompt_learning_never_forms_the_authors_empty_last_batch():
    """The authors cut a stage-1 epoch into N // B + 1 batches: with N a multiple of B the last is empty and
    their SupCon crashes. Ours cuts the same batches without the empty one (MODEL.FIXES.STAGE1_EMPTY_BATCH);
    without the fix that case is a one-line ConfigError."""
    from types import SimpleNamespace

    from model.clip_reid import PromptLearning
    from utils.errors import ConfigError

    dataset = SimpleNamespace(train=[None] * 8)
    for fixed, images in ((True, 8), (True, 7), (False, 7)):
        cfg = tiny_cfg("CLIP_ReID", **{"SOLVER.STAGE1.IMS_PER_BATCH": 4, "MODEL.FIXES.STAGE1_EMPTY_BATCH": fixed})
        phase = PromptLearning(cfg, None, dataset, torch.device("cpu"))
        phase.features = torch.zeros(images, 3)
        sizes = [len(chosen) for chosen in phase.batches(1)]
        assert sizes == ([4, 4] if images == 8 else [4, 3])  # the authors': [4, 4, 0] and [4, 3]
    cfg = tiny_cfg("CLIP_ReID", **{"SOLVER.STAGE1.IMS_PER_BATCH": 4, "MODEL.FIXES.STAGE1_EMPTY_BATCH": False})
    model = build_model(cfg, num_classes=NUM_CLASSES)
    with pytest.raises(ConfigError, match="the 8 training images are a multiple of SOLVER.STAGE1.IMS_PER_BATCH = 4"):
        PromptLearning(cfg, model, dataset, torch.device("cpu")).setup()


def _train(arch, fused, nudge_images, steps=40):
    """Initial and trained parameters of ``steps`` steps on the fixed batch, learning rates x20 so that the
    weights move visibly; ``nudge_images`` moves every pixel to the next float (one ulp)."""
    cfg, model, _ = tiny_model(arch, **{"SOLVER.FUSED_OPTIMIZER": fused})
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    criterion = build_criterion(cfg, model, NUM_CLASSES)
    optimizer = make_optimizer(cfg, model)
    assert bool(optimizer.defaults.get("fused")) is fused
    for group in optimizer.param_groups:
        group["lr"] *= 20
    batch = fixed_batch(cfg)
    if nudge_images:
        batch["images"] = torch.nextafter(batch["images"], torch.full_like(batch["images"], float("inf")))
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        sum(criterion(model(batch["images"], **model.forward_inputs(batch)), batch).values()).backward()
        optimizer.step()
    return initial, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["CLIP_baseline", "CLIP_SVPR_ReID", "SeCap"])
def test_fused_optimiser_moves_training_less_than_one_ulp_of_input_noise(arch):
    """SOLVER.FUSED_OPTIMIZER (the default) against the authors' per-operation loop over 40 steps: the weights
    differ by float rounding only, no more than a one-ulp perturbation of the images makes them differ."""
    initial, loop = _train(arch, False, False)
    _, fused = _train(arch, True, False)
    _, nudged = _train(arch, False, True)
    names = [name for name in loop if not torch.equal(loop[name], initial[name])]

    def distance(a, b):
        return torch.cat([(a[name] - b[name]).flatten() for name in names]).norm()

    trained = distance(loop, initial)
    assert trained > 0.5
    assert distance(fused, loop) <= 2 * distance(nudged, loop)
    assert distance(nudged, loop) < 0.05 * trained
