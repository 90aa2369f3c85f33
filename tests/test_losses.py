"""Losses and the training criterion, each checked against a loop-based definition written from its paper
or from the reference's loss (docs/method.md)."""
import math
from types import SimpleNamespace

import pytest
import torch

from configs import get_cfg_defaults
from loss import CenterLoss, Criterion, CrossEntropyLabelSmooth, SupConLoss, TripletLoss, build_criterion
from model import LossSpec, ModelOutput
from model.clip_baseline import CLIP_baseline
from model.clip_reid import CLIP_ReID
from model.svpr import CLIPSVPRReID
from utils.errors import ConfigError


# ---------------------------------------------------------------------------------------------------------
# Reference definitions (plain loops over samples, float64)
# ---------------------------------------------------------------------------------------------------------
def ref_smoothed_ce(logits, targets, epsilon, num_classes=None):
    """mean_b -sum_k q_bk log softmax(z_b)_k with q = (1 - eps) onehot + eps / K (K = the logit width unless
    ``num_classes`` is given: the authors' CrossEntropyLabelSmooth built for another count)."""
    logits = logits.detach().double()
    num_classes = num_classes or logits.shape[1]
    total = 0.0
    for row, target in zip(logits, targets.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in row.tolist()))
        for k, value in enumerate(row.tolist()):
            q = (1 - epsilon) * (k == target) + epsilon / num_classes
            total -= q * (value - log_norm)
    return total / len(targets)


def ref_distance(a, b):
    squared = sum((x - y) ** 2 for x, y in zip(a.tolist(), b.tolist()))
    return math.sqrt(max(squared, 1e-12))


def ref_batch_hard(features, labels):
    """Per anchor: largest distance to a same-label sample, smallest to another label (None if none)."""
    features = features.detach().double()
    labels = labels.tolist()
    d_ap, d_an = [], []
    for i in range(len(labels)):
        dists = [ref_distance(features[i], features[j]) for j in range(len(labels))]
        d_ap.append(max(d for d, label in zip(dists, labels) if label == labels[i]))
        negatives = [d for d, label in zip(dists, labels) if label != labels[i]]
        d_an.append(min(negatives) if negatives else None)
    return d_ap, d_an


def ref_triplet(features, labels, margin):
    d_ap, d_an = ref_batch_hard(features, labels)
    losses = []
    for ap, an in zip(d_ap, d_an):
        if an is None:
            continue
        losses.append(math.log1p(math.exp(ap - an)) if margin is None else max(0.0, ap - an + margin))
    return sum(losses) / len(losses) if losses else 0.0


def ref_supcon(queries, keys, query_labels, key_labels, temperature=1.0):
    """CLIP-ReID stage 1 (Li et al.): logits minus the row max, log-prob, mean over positives, minus mean over rows."""
    queries, keys = queries.detach().double(), keys.detach().double()
    row_losses = []
    for i in range(len(queries)):
        logits = [float(queries[i] @ keys[j]) / temperature for j in range(len(keys))]
        top = max(logits)
        logits = [v - top for v in logits]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        positives = [logits[j] - log_norm for j in range(len(keys)) if key_labels[j] == query_labels[i]]
        if positives:
            row_losses.append(-sum(positives) / len(positives))
    return sum(row_losses) / len(row_losses)


def ref_center(features, labels, centers):
    features, centers = features.detach().double(), centers.detach().double()
    total = 0.0
    for x, y in zip(features, labels.tolist()):
        total += min(max(float(((x - centers[y]) ** 2).sum()), 1e-12), 1e12)
    return total / len(features)


def ref_abs_cos(a, b):
    a, b = a.detach().double(), b.detach().double()
    values = [abs(float(x @ y) / (float(x.norm()) * float(y.norm()))) for x, y in zip(a, b)]
    return sum(values) / len(values)


def pk_labels(num_ids, per_id):
    return torch.arange(num_ids).repeat_interleave(per_id)


# ---------------------------------------------------------------------------------------------------------
# Single losses
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [3, 17])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_definition_over_logit_width(num_classes, epsilon):
    gen = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(8, num_classes, generator=gen) * 3
    targets = torch.randint(num_classes, (8,), generator=gen)
    loss = CrossEntropyLabelSmooth(epsilon)(logits, targets)
    assert loss.item() == pytest.approx(ref_smoothed_ce(logits, targets, epsilon), rel=1e-5)


def test_label_smoothing_rejects_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        CrossEntropyLabelSmooth(1.0)


@pytest.mark.parametrize("margin", [None, 0.3])
@pytest.mark.parametrize("labels", [
    pk_labels(4, 4).tolist(),                          # P x K batch
    [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4],              # unequal positives, a singleton
    [5, 1, 5, 1, 1, 9, 5, 9],                          # unsorted labels
], ids=["pk", "unequal", "unsorted"])
def test_triplet_matches_brute_force(labels, margin):
    labels = torch.tensor(labels)
    features = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(len(labels)))
    loss, d_ap, d_an = TripletLoss(margin)(features, labels, return_distances=True)
    ref_ap, ref_an = ref_batch_hard(features, labels)
    assert d_ap.tolist() == pytest.approx(ref_ap, rel=1e-4, abs=1e-5)
    assert d_an.tolist() == pytest.approx(ref_an, rel=1e-4)
    assert loss.item() == pytest.approx(ref_triplet(features, labels, margin), rel=1e-4)


def test_triplet_gradient_matches_brute_force_autograd():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    features = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                           requires_grad=True)
    TripletLoss(None)(features, labels).backward()
    ours = features.grad.clone()

    features.grad = None
    terms = []
    for i in range(len(labels)):
        dists = [((features[i] - features[j]) ** 2).sum().clamp(min=1e-12).sqrt() for j in range(len(labels))]
        pos = torch.stack([d for d, label in zip(dists, labels) if label == labels[i]]).max()
        neg = torch.stack([d for d, label in zip(dists, labels) if label != labels[i]]).min()
        terms.append(torch.nn.functional.softplus(pos - neg))
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(ours, features.grad)


def test_triplet_without_negatives_is_zero_and_differentiable():
    features = torch.randn(4, 3, requires_grad=True)
    loss = TripletLoss(None)(features, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_triplet_half_precision_features_give_float32_loss():
    labels = pk_labels(3, 2)
    features = torch.randn(6, 4)
    loss = TripletLoss(0.3)(features.half(), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_triplet(features.half().float(), labels, 0.3), rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_supcon_matches_loop_definition(temperature):
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(8, 5, generator=gen)
    texts = torch.randn(8, 5, generator=gen)
    pids = torch.tensor([3, 3, 1, 1, 0, 0, 2, 2])
    loss_fn = SupConLoss(temperature)
    i2t = loss_fn(images, texts, pids, pids)
    t2i = loss_fn(texts, images, pids, pids)
    assert i2t.item() == pytest.approx(ref_supcon(images, texts, pids.tolist(), pids.tolist(), temperature),
                                       rel=1e-5)
    assert t2i.item() == pytest.approx(ref_supcon(texts, images, pids.tolist(), pids.tolist(), temperature),
                                       rel=1e-5)


def test_supcon_skips_queries_without_positive_and_trains():
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(5, 4, generator=gen, requires_grad=True)
    keys = torch.randn(6, 4, generator=gen)
    query_labels = [0, 1, 2, 7, 1]
    key_labels = [0, 0, 1, 2, 2, 1]
    loss = SupConLoss()(queries, keys, torch.tensor(query_labels), torch.tensor(key_labels))
    assert loss.item() == pytest.approx(ref_supcon(queries, keys, query_labels, key_labels), rel=1e-5)
    loss.backward()
    assert torch.equal(queries.grad[3], torch.zeros(4))  # label 7 has no key
    assert queries.grad[[0, 1, 2, 4]].abs().sum() > 0
    with pytest.raises(ValueError, match="no query"):
        SupConLoss()(queries, keys, torch.tensor([8, 9, 8, 9, 8]), torch.tensor(key_labels))


def test_center_loss_matches_definition_and_trains_centres():
    torch.manual_seed(0)
    center = CenterLoss(num_classes=5, feat_dim=4)
    features = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 3, 3, 4, 1])
    loss = center(features, labels)
    assert loss.item() == pytest.approx(ref_center(features, labels, center.centers), rel=1e-5)
    loss.backward()
    moved = center.centers.grad.abs().sum(1) > 0
    assert moved.tolist() == [True, True, False, True, True]  # only the batch's classes get gradients
    assert [name for name, _ in center.named_parameters()] == ["centers"]


def test_center_loss_follows_the_module_and_checks_width():
    center = CenterLoss(3, 4).to(torch.float64)
    assert center.centers.dtype == torch.float64
    assert center(torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 2])).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        center(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 2]))


# ---------------------------------------------------------------------------------------------------------
# Criterion
# ---------------------------------------------------------------------------------------------------------
NUM_CLASSES = 4
FEAT_DIM = 8
ATTR_SIZES = (2, 5, 3)


def make_cfg(**overrides):
    cfg = get_cfg_defaults()
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    cfg.freeze()
    return cfg


def cfg_opts(**overrides):
    """Keyword names with "__" standing for "." -> config override pairs."""
    return {key.replace("__", "."): value for key, value in overrides.items()}


def random_outputs(num_id=3, num_feats=4, view=True, attr=True, i2t=False, seed=0):
    """A ModelOutput of random leaf tensors and the batch (labels) to score it against."""
    gen = torch.Generator().manual_seed(seed)
    batch = 8

    def rand(*shape):
        return torch.randn(*shape, generator=gen, requires_grad=True)

    outputs = ModelOutput({f"b{i}": rand(batch, NUM_CLASSES) for i in range(num_id)},
                          {f"f{i}": rand(batch, FEAT_DIM) for i in range(num_feats)})
    if view:
        outputs.aux.update(view_logits=rand(batch, 3), view_feat=rand(batch, FEAT_DIM), inv_feat=rand(batch, FEAT_DIM))
    if attr:
        outputs.aux["attr_logits"] = [rand(batch, n) for n in ATTR_SIZES]
    if i2t:
        outputs.aux["i2t_logits"] = rand(batch, NUM_CLASSES)
    labels = {
        "pids": pk_labels(NUM_CLASSES, 2),
        "viewids": torch.randint(3, (batch,), generator=gen),
        "attrs": torch.stack([torch.randint(n, (batch,), generator=gen) for n in ATTR_SIZES], dim=1),
    }
    return outputs, labels


def svpr_like(vdfe=True, asmoe=True):
    """An object with SVPR-ReID's real ``loss_specs`` (branches switched by ``vdfe``/``asmoe``)."""
    stub = SimpleNamespace(vdfe=object() if vdfe else None, asmoe=object() if asmoe else None, feature_dim=FEAT_DIM)
    stub.loss_specs = lambda cfg: CLIPSVPRReID.loss_specs(stub, cfg)
    return stub


def baseline_like(arch):
    """An object with CLIP_baseline's or CLIP_ReID's real ``loss_specs``."""
    stub = SimpleNamespace(feature_dim=FEAT_DIM)
    cls = CLIP_ReID if arch == "CLIP_ReID" else CLIP_baseline
    stub.loss_specs = lambda cfg: cls.loss_specs(stub, cfg)
    return stub


@pytest.mark.parametrize("fixed", [False, True])
def test_svpr_total_matches_reference_formula(fixed):
    """The reference's SVPR loss with the shipped weights: L = 0.25 [CE(s_inv) + (CE(s_cvpr) + CE(s_local)) / 2]
    + [T(f_inv) + (T(f_cvpr) + T(f_local) + T(x11)) / 3] + CE'(s_view) + mean|cos(f_inv, f_view)|
    + 0.05 sum_a CE(attr_a), where CE' is the identity loss's smoothing (eps / number of identities on each
    of the 3 view logits) unless MODEL.FIXES.VIEW_LOSS_SMOOTHING (eps / 3)."""
    cfg = make_cfg(**cfg_opts(MODEL__ID_LOSS_WEIGHT=0.25, MODEL__TRIPLET_LOSS_WEIGHT=1.0,
                              MODEL__FIXES__VIEW_LOSS_SMOOTHING=fixed))
    outputs, labels = random_outputs()
    terms = build_criterion(cfg, svpr_like(), NUM_CLASSES)(outputs, labels)
    view = "view" if fixed else "view_identity_smoothing"
    assert sorted(terms) == sorted(["attr", "id", "triplet", view])

    pids = labels["pids"]
    ce = [ref_smoothed_ce(s, pids, 0.1) for s in outputs.id_logits.values()]
    tri = [ref_triplet(f, pids, None) for f in outputs.features.values()]
    aux = outputs.aux
    expected = {
        "id": 0.25 * (ce[0] + (ce[1] + ce[2]) / 2),
        "triplet": 1.0 * (tri[0] + (tri[1] + tri[2] + tri[3]) / 3),
        view: ref_smoothed_ce(aux["view_logits"], labels["viewids"], 0.1, None if fixed else NUM_CLASSES)
        + ref_abs_cos(aux["inv_feat"], aux["view_feat"]),
        "attr": 0.05 * sum(ref_smoothed_ce(s, labels["attrs"][:, a], 0.0)
                           for a, s in enumerate(aux["attr_logits"])),
    }
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    total = sum(terms.values())
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)

    total.backward()
    for tensors in (outputs.id_logits.values(), outputs.features.values(), aux["attr_logits"]):
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors)
    for name in ("view_logits", "view_feat", "inv_feat"):
        assert aux[name].grad.abs().sum() > 0, name


def test_svpr_single_branch_has_no_mean_term():
    cfg = make_cfg(**cfg_opts(MODEL__ID_LOSS_WEIGHT=0.5))
    outputs, labels = random_outputs(num_id=1, num_feats=1, view=False, attr=False)
    terms = build_criterion(cfg, svpr_like(vdfe=False, asmoe=False), NUM_CLASSES)(outputs, labels)
    assert sorted(terms) == ["id", "triplet"]
    assert terms["id"].item() == pytest.approx(0.5 * ref_smoothed_ce(outputs.id_logits["b0"], labels["pids"], 0.1),
                                               rel=1e-5)
    assert terms["triplet"].item() == pytest.approx(ref_triplet(outputs.features["f0"], labels["pids"], None),
                                                    rel=1e-5)


def test_baselines_sum_branches_and_use_config_switches():
    """CLIP-ReID stage 2: summed branches, plain CE without smoothing, margin triplet, weighted i2t."""
    cfg = make_cfg(**cfg_opts(MODEL__IF_LABELSMOOTH="off", MODEL__NO_MARGIN=False,
                              SOLVER__MARGIN=0.2, MODEL__ID_LOSS_WEIGHT=0.7, MODEL__TRIPLET_LOSS_WEIGHT=0.9,
                              MODEL__I2T_LOSS_WEIGHT=1.5))
    outputs, labels = random_outputs(num_id=2, num_feats=3, view=False, attr=False, i2t=True, seed=4)
    pids = labels["pids"]
    terms = build_criterion(cfg, baseline_like("CLIP_ReID"), NUM_CLASSES)(outputs, labels)
    assert sorted(terms) == ["i2t", "id", "triplet"]
    assert terms["id"].item() == pytest.approx(
        0.7 * sum(ref_smoothed_ce(s, pids, 0.0) for s in outputs.id_logits.values()), rel=1e-5)
    assert terms["triplet"].item() == pytest.approx(
        0.9 * sum(ref_triplet(f, pids, 0.2) for f in outputs.features.values()), rel=1e-5)
    assert terms["i2t"].item() == pytest.approx(1.5 * ref_smoothed_ce(outputs.aux["i2t_logits"], pids, 0.0),
                                                rel=1e-5)


def test_softmax_sampler_drops_triplet_and_view_weight_applies():
    cfg = make_cfg(**cfg_opts(DATALOADER__SAMPLER="softmax", MODEL__SVPR__VIEW_LOSS_WEIGHT=0.1))
    outputs, labels = random_outputs(num_id=1, num_feats=1, view=True, attr=False)
    terms = build_criterion(cfg, svpr_like(asmoe=False), NUM_CLASSES)(outputs, labels)
    assert sorted(terms) == ["id", "view_identity_smoothing"]
    expected_view = 0.1 * (ref_smoothed_ce(outputs.aux["view_logits"], labels["viewids"], 0.1, NUM_CLASSES)
                           + ref_abs_cos(outputs.aux["inv_feat"], outputs.aux["view_feat"]))
    assert terms["view_identity_smoothing"].item() == pytest.approx(expected_view, rel=1e-5)


def test_missing_model_output_or_labels_is_an_error():
    outputs, labels = random_outputs(view=False, attr=True)
    with pytest.raises(ValueError, match="view loss needs the model output"):
        build_criterion(make_cfg(), svpr_like(asmoe=False), NUM_CLASSES)(outputs, labels)
    with pytest.raises(ValueError, match="attribute labels"):
        build_criterion(make_cfg(), svpr_like(vdfe=False), NUM_CLASSES)(outputs, dict(labels, attrs=None))


def test_unknown_loss_term_names_close_matches():
    model = SimpleNamespace(feature_dim=FEAT_DIM, loss_specs=lambda cfg: [LossSpec("tripplet", 1.0)])
    with pytest.raises(ConfigError, match="did you mean 'triplet'"):
        build_criterion(make_cfg(), model, NUM_CLASSES)


@pytest.mark.parametrize("opts", [{"MODEL.METRIC_LOSS_TYPE": "triplet_center"}, {"MODEL.IF_WITH_CENTER": "yes"}])
def test_center_term_and_its_parameters_follow_the_criterion(opts):
    cfg = make_cfg(**opts, **{"SOLVER.CENTER_LOSS_WEIGHT": 0.01})
    criterion = build_criterion(cfg, baseline_like("CLIP_baseline"), NUM_CLASSES)
    center_loss = criterion.terms["center"].center_loss
    assert isinstance(criterion, Criterion) and isinstance(center_loss, CenterLoss)
    assert list(criterion.state_dict()) == ["terms.center.center_loss.centers"]
    criterion.to(torch.float64)
    assert center_loss.centers.dtype == torch.float64

    outputs, labels = random_outputs(view=False, attr=False, seed=2)
    outputs = ModelOutput({k: t.detach().double().requires_grad_() for k, t in outputs.id_logits.items()},
                          {k: t.detach().double().requires_grad_() for k, t in outputs.features.items()})
    terms = criterion(outputs, labels)
    assert sorted(terms) == ["center", "id", "triplet"]
    expected = 0.01 * ref_center(outputs.features["f0"], labels["pids"], center_loss.centers)
    assert terms["center"].item() == pytest.approx(expected, rel=1e-9)
    sum(terms.values()).backward()
    assert center_loss.centers.grad.abs().sum() > 0


def test_no_center_loss_by_default():
    criterion = build_criterion(make_cfg(), baseline_like("CLIP_baseline"), NUM_CLASSES)
    assert "center" not in criterion.terms
    assert list(criterion.parameters()) == []
