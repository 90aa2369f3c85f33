"""SVPR-ReID model and components on a tiny random-weight CLIP (64x32 input, 2 layers)."""
import copy
import functools

import pytest
import torch
from torch import nn

from model import build_model
from text import tokenize
from model.svpr.asmoe import AttributeScatterMoE, MixtureOfExperts
from model.svpr.cvpr import ContextVisionProgressiveRefinement, gather_tokens, scatter_tokens
from model.svpr.layers import SingleKeyAttention
from model.svpr.text import PROMPT_START, encode_unique
from model.svpr.vdfe import VIEW_WORDS, ViewBidirectionalDecoupling, ViewTextEncoder
from utils.checkpoint import load_checkpoint
from utils.errors import ConfigError
from tests import fixtures

ATTRIBUTES = (("gender", 2), ("upper color", 4), ("hat", 2))
TEXT_LEN = 32
CLIP_SIZES = {"EMBED_DIM": 64, "VISION_WIDTH": 96, "VISION_HEADS": 4, "TEXT_HEADS": 4}
TINY = ["MODEL.TEXT_LEN", str(TEXT_LEN), "MODEL.USE_TEXT", "True", "MODEL.USE_ATTR", "True", "MODEL.TEXT_PROMPT", "4",
        "MODEL.VIEW_PROMPT", "4"]
WIDTH = 96
# Every MODEL.FIXES switch that changes the reference's numerics or parameters, on.
NUMERIC_FIXES = ("CVPR_PER_SAMPLE_KEY", "CVPR_SCATTER_ORDER", "CVPR_PROGRESSIVE_KEYS", "CVPR_SEPARATE_BLOCKS",
                 "VIEW_WORDS", "VIEW_HEAD_CLASSES", "DROP_UNUSED_PARAMETERS")
FIXED = tuple(v for name in NUMERIC_FIXES for v in (f"MODEL.FIXES.{name}", "True"))


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_cfg(*opts):
    return fixtures.tiny_cfg("CLIP_SVPR_ReID", opts=TINY + list(opts), clip=CLIP_SIZES, frozen=True)


def fixes(*names):
    """The MODEL.FIXES node with ``names`` on and the other numeric fixes off."""
    return tiny_cfg(*[v for name in names for v in (f"MODEL.FIXES.{name}", "True")]).MODEL.FIXES


@functools.lru_cache(maxsize=None)
def _built(opts, num_views, attributes):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts), num_classes=5, num_cameras=3, num_views=num_views, attributes=attributes)


def tiny_model(*opts, num_views=2, attributes=ATTRIBUTES):
    """A fresh copy (train mode, no gradients) of the tiny model for ``opts``; each is built once."""
    return copy.deepcopy(_built(opts, num_views, attributes))


def batch(size=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 64, 32, generator=generator)
    viewids = torch.arange(size) % 2
    captions = [f"A photo of a X X X X person. The person is {'male' if i % 3 else 'female'}." for i in range(size)]
    return images, viewids, tokenize(captions, context_length=TEXT_LEN)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("opts, view_classes", [((), 3), (FIXED, 2)], ids=["reference", "fixed"])
def test_full_model_shapes_and_every_trainable_parameter_gets_a_gradient(opts, view_classes):
    model = tiny_model(*opts)
    images, viewids, tokens = batch()
    out = model(images, camids=torch.zeros(6, dtype=torch.long), viewids=viewids, text_tokens=tokens)
    assert {name: t.shape for name, t in out.id_logits.items()} == {name: (6, 5) for name in ("inv", "cvpr", "local")}
    assert list(out.features) == ["inv", "cvpr", "local", "penultimate"]
    assert all(t.shape == (6, WIDTH) for t in out.features.values())
    aux = out.aux
    assert aux["view_logits"].shape == (6, view_classes)
    assert aux["view_feat"].shape == aux["inv_feat"].shape == (6, WIDTH)
    assert [t.shape for t in aux["attr_logits"]] == [(6, 2), (6, 4), (6, 2)]
    loss = sum(t.logsumexp(-1).mean() for t in [*out.id_logits.values(), *aux["attr_logits"], aux["view_logits"]])
    loss = loss + sum(t.square().mean() for t in [*out.features.values(), aux["view_feat"]])
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.vdfe.text.view_prompt.grad.abs().sum() > 0  # through the frozen text tower
    assert model.attribute_text.text_prompt.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.backbone.transformer.parameters())  # FREEZE_TEXT
    model.eval()
    with torch.no_grad():
        embedding = model(images, viewids=viewids, text_tokens=tokens)
    assert embedding.shape == (6, 4 * WIDTH) and model.embedding_dim == 4 * WIDTH


@pytest.mark.parametrize("switch, module", [("VDFE", "vdfe"), ("ASMOE", "asmoe"), ("CVPR", "cvpr"),
                                            ("LOCAL", "local")])
def test_each_switch_removes_its_branch(switch, module):
    full = tiny_model()
    reduced = tiny_model(f"MODEL.SVPR.{switch}", "False")
    assert getattr(reduced, module) is None
    removed = count(getattr(full, module))
    if switch == "ASMOE":
        removed += count(full.attribute_text)
    if switch in ("CVPR", "LOCAL"):
        removed += count(getattr(full, f"head_{module}"))
    assert count(full) - count(reduced) == removed > 0
    # Without VDFE the CLS feature takes f_inv's place; every other switch removes one embedding part.
    assert reduced.embedding_dim == full.embedding_dim - (0 if switch == "VDFE" else WIDTH)
    images, viewids, tokens = batch()
    out = reduced(images, viewids=viewids, text_tokens=tokens)
    expected_heads = 3 - (switch in ("CVPR", "LOCAL"))
    assert len(out.id_logits) == expected_heads and len(out.features) == expected_heads + 1
    assert ("view_logits" in out.aux) == (switch != "VDFE") and ("attr_logits" in out.aux) == (switch != "ASMOE")
    reduced.eval()
    with torch.no_grad():
        assert reduced(images, viewids=viewids, text_tokens=tokens).shape == (6, reduced.embedding_dim)


def test_all_switches_off_is_the_cls_baseline():
    off = [f"MODEL.SVPR.{name}" for name in ("VDFE", "ASMOE", "CVPR", "LOCAL")]
    model = tiny_model(*[v for name in off for v in (name, "False")])
    images, viewids, tokens = batch()
    out = model(images, viewids=viewids, text_tokens=tokens)
    assert not out.aux and list(out.id_logits) == ["inv"]
    model.eval()
    with torch.no_grad():
        embedding = model(images)
        reference = model.backbone.visual.forward_features(images).tokens[:, 0]
    assert model.embedding_dim == WIDTH
    torch.testing.assert_close(embedding, reference)
    assert not any(p.requires_grad for p in model.backbone.transformer.parameters())  # unused text tower


def test_eval_embedding_does_not_depend_on_the_rest_of_the_batch_with_the_per_sample_key():
    model = tiny_model("MODEL.FIXES.CVPR_PER_SAMPLE_KEY", "True").eval()
    images, viewids, tokens = batch(size=5)
    with torch.no_grad():
        together = model(images, viewids=viewids, text_tokens=tokens)
        alone = torch.cat([model(images[i:i + 1], viewids=viewids[i:i + 1], text_tokens=tokens[i:i + 1])
                           for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_missing_text_tokens_drop_the_caption_query_without_crashing():
    model = tiny_model()
    images, viewids, tokens = batch()
    without = model(images, viewids=viewids)
    assert [t.shape for t in without.aux["attr_logits"]] == [(6, 2), (6, 4), (6, 2)]
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(images, viewids=viewids), model(images, viewids=viewids, text_tokens=tokens))
    no_text = tiny_model("MODEL.USE_TEXT", "False")
    assert no_text.attribute_text is None and no_text.asmoe is not None
    no_text(images, viewids=viewids, text_tokens=tokens)


def test_no_attributes_or_no_use_attr_builds_no_asmoe():
    images, viewids, tokens = batch()
    for model in (tiny_model(attributes=()), tiny_model("MODEL.USE_ATTR", "False")):
        assert model.asmoe is None and model.attribute_text is None
        assert "attr_logits" not in model(images, viewids=viewids, text_tokens=tokens).aux


def test_vdfe_needs_view_ids_and_a_known_number_of_views():
    model = tiny_model()
    images, _, tokens = batch()
    with pytest.raises(ValueError, match="view ids"):
        model(images, text_tokens=tokens)
    three = tiny_model(*FIXED, num_views=3)
    assert three.vdfe.head.classifier.out_features == 3 and three.vdfe.text.words == VIEW_WORDS[3]
    three(images, viewids=torch.tensor([0, 1, 2, 2, 1, 0]), text_tokens=tokens)
    with pytest.raises(ConfigError, match="MODEL.SVPR.VDFE"):
        tiny_model(*FIXED, num_views=1)
    with pytest.raises(ConfigError, match="MODEL.FIXES.VIEW_WORDS"):
        tiny_model(num_views=4)


def test_local_weights_follow_the_real_patch_grid():
    model = tiny_model("INPUT.SIZE_TRAIN", "[96, 48]", "INPUT.SIZE_TEST", "[96, 48]")
    assert model.local.weight.shape == (18, WIDTH)
    model(torch.randn(4, 3, 96, 48), viewids=torch.tensor([0, 1, 0, 1]))


def test_sie_embeds_cameras_and_views():
    model = tiny_model("MODEL.SIE_CAMERA", "True", "MODEL.SIE_VIEW", "True").eval()
    images, viewids, tokens = batch()
    with torch.no_grad():
        cam0 = model(images, camids=torch.zeros(6, dtype=torch.long), viewids=viewids, text_tokens=tokens)
        cam2 = model(images, camids=torch.full((6,), 2), viewids=viewids, text_tokens=tokens)
    assert not torch.allclose(cam0, cam2)


# ---- text branch: reference computations written from the reference code --------------------------------

def test_attribute_caption_encoding_matches_the_reference_and_deduplication_is_exact():
    model = tiny_model().eval()
    clip_model, encoder = model.backbone, model.attribute_text
    _, _, tokens = batch(size=6)
    # Reference: prompts added to the embeddings of the four "X" (positions 5..8), EOT + prompt-mean pooling.
    embeds = clip_model.token_embedding(tokens).clone()
    embeds[:, PROMPT_START:PROMPT_START + 4] += encoder.text_prompt[0]
    feats = clip_model.encode_text(tokens, token_embeds=embeds, return_all=True)
    reference = feats[torch.arange(6), tokens.argmax(-1)] + feats[:, 5:9].mean(1)
    (reference.square().sum()).backward()
    reference_grad = encoder.text_prompt.grad.clone()
    encoder.text_prompt.grad = None
    deduplicated = encode_unique(lambda t: encoder.encode_captions(clip_model, t), tokens)
    deduplicated.square().sum().backward()
    assert len(torch.unique(tokens, dim=0)) == 2
    torch.testing.assert_close(deduplicated, reference, rtol=1e-5, atol=1e-5)
    # fp32 tolerance relative to the gradient's scale (sums are reduced in a different order)
    torch.testing.assert_close(encoder.text_prompt.grad, reference_grad, rtol=1e-4,
                               atol=1e-4 * float(reference_grad.abs().max()))
    torch.testing.assert_close(encoder(clip_model, tokens), encoder.inverse(reference))


def test_view_caption_encoding_matches_the_reference_and_deduplication_is_exact():
    model = tiny_model().eval()
    clip_model, encoder = model.backbone, model.vdfe.text
    template = tokenize("A photo of a X X X X person from X view.", context_length=TEXT_LEN)
    words = tokenize("ground aerial", context_length=TEXT_LEN)[0, 1:3]
    viewids = torch.tensor([1, 0, 0, 1, 1])
    # Reference: template embeddings with the prompts REPLACING positions 5..8 and the view word at 11.
    tokens = template.expand(5, -1).clone()
    tokens[:, 11] = words[viewids]
    length = encoder.caption_tokens.shape[1]
    assert length == 15 and torch.equal(encoder.caption_tokens[viewids], tokens[:, :length])
    assert not tokens[:, length:].any()  # only padding was trimmed
    embeds = clip_model.token_embedding(tokens).clone()
    embeds[:, 5:9] = encoder.view_prompt[0]
    feats = clip_model.encode_text(tokens, token_embeds=embeds, return_all=True)
    prompts, word = feats[:, 5:9], feats[:, 11]
    reference = encoder.fusion((encoder.word_to_prompt(prompts, word[:, None]) + prompts).flatten(1))
    reference.square().sum().backward()
    reference_grads = [p.grad.clone() for p in (encoder.view_prompt, encoder.fusion.weight)]
    encoder.zero_grad()
    deduplicated = encode_unique(lambda ids: encoder.encode_views(clip_model, ids), viewids)
    deduplicated.square().sum().backward()
    torch.testing.assert_close(deduplicated, reference, rtol=1e-5, atol=1e-5)
    for param, grad in zip((encoder.view_prompt, encoder.fusion.weight), reference_grads):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))


def test_view_words_are_single_tokens_at_the_view_slot():
    for num_views, words in VIEW_WORDS.items():
        encoder = ViewTextEncoder(num_views, 4, 64, 64, 96, TEXT_LEN, fixes("VIEW_WORDS"))
        for view, word in enumerate(words):
            word_id = tokenize(word, context_length=TEXT_LEN)[0, 1]
            assert encoder.caption_tokens[view, 11] == word_id
            assert encoder.word_weights[view].nonzero().flatten().tolist() == [11]


# ---- single-key attention, VBD, MoE, ASMOE, CVPR against references --------------------------------

def _mha_from(single, dim, heads=4):
    """nn.MultiheadAttention whose value/output projections are those of ``single``; random q/k."""
    mha = nn.MultiheadAttention(dim, heads, batch_first=True, bias=single.v.bias is not None)
    with torch.no_grad():
        mha.in_proj_weight[2 * dim:] = single.v.weight
        if single.v.bias is not None:
            mha.in_proj_bias[2 * dim:] = single.v.bias
        mha.out_proj.weight.copy_(single.proj.weight)
        mha.out_proj.bias.copy_(single.proj.bias)
    return mha


def test_single_key_attention_equals_multihead_attention_with_one_key():
    torch.manual_seed(0)
    single = SingleKeyAttention(32, bias=True)
    mha = _mha_from(single, 32)
    query, key = torch.randn(3, 5, 32), torch.randn(3, 1, 32)
    expected, _ = mha(query, key, key)
    torch.testing.assert_close(single(key).expand(-1, 5, -1), expected, rtol=1e-5, atol=1e-6)


def test_view_bidirectional_decoupling_matches_the_reference():
    torch.manual_seed(0)
    vbd = ViewBidirectionalDecoupling(32, drop_unused=True)
    with torch.no_grad():
        vbd.alpha.fill_(0.7)
    v2c, c2v = _mha_from(vbd.view_to_cls, 32), _mha_from(vbd.cls_to_view, 32)
    f_cls, f_view = torch.randn(4, 32), torch.randn(4, 32)
    a, _ = v2c(f_cls[:, None], f_view[:, None], f_view[:, None])
    f_inv = f_cls - 0.7 * a[:, 0]
    b, _ = c2v(f_view[:, None], f_inv[:, None], f_inv[:, None])
    f_view_ref = vbd.mlp(vbd.norm(f_view - b[:, 0]))
    got_inv, got_view = vbd(f_cls, f_view)
    torch.testing.assert_close(got_inv, f_inv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_view, f_view_ref, rtol=1e-5, atol=1e-6)


def _expert_reference(moe, e, x):
    hidden = x @ moe.fc1_weight[e] + moe.fc1_bias[e]
    hidden = hidden * torch.sigmoid(1.702 * hidden)
    out = hidden @ moe.fc2_weight[e] + moe.fc2_bias[e]
    out = out * torch.sigmoid(1.702 * out)
    return nn.functional.layer_norm(out, (out.shape[-1],), moe.norm_weight[e, 0], moe.norm_bias[e, 0], eps=1e-6)


def test_batched_mixture_of_experts_matches_a_per_expert_loop():
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, num_experts=4, top_k=3)
    with torch.no_grad():
        moe.fc1_bias.normal_()
        moe.norm_weight.normal_()
    x = torch.randn(10, 16)
    probs = torch.softmax(moe.gate(x), dim=-1)
    expected = torch.zeros(10, 16)
    for n in range(10):
        for e in probs[n].topk(3).indices.tolist():  # top-3 weights, not renormalised
            expected[n] += probs[n, e] * _expert_reference(moe, e, x[n:n + 1])[0]
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


def test_asmoe_matches_a_per_attribute_reference_and_gradients_agree():
    torch.manual_seed(0)
    attributes = (("a", 2), ("b", 3), ("c", 2), ("d", 4))
    asmoe = AttributeScatterMoE(32, attributes, attr_top_k=0.7).eval()
    f_inv, patches, text = torch.randn(3, 32, requires_grad=True), torch.randn(3, 7, 32), torch.randn(3, 32)
    f_asmoe, logits = asmoe(f_inv, patches, text)
    grad = torch.autograd.grad(f_asmoe.square().sum() + sum(l.sum() for l in logits), f_inv)[0]

    m = asmoe.cross_attention(text[:, None], patches)[:, 0]
    outs, scores, ref_logits = [], [], []
    for a, head in enumerate(asmoe.heads.values()):
        u = m + asmoe.attribute_prompts[0, a] + f_inv
        o = asmoe.moe(u)
        outs.append(o)
        scores.append(asmoe.router(u).mean(-1))
        ref_logits.append(head(o)[0])
    outs, scores = torch.stack(outs, 1), torch.stack(scores, 1)
    top = scores.topk(int(4 * 0.7), dim=-1)  # 2 of 4 attributes
    weights = top.values.softmax(-1)
    expected = torch.stack([(weights[b, :, None] * outs[b, top.indices[b]]).sum(0) for b in range(3)])
    ref_grad = torch.autograd.grad(expected.square().sum() + sum(l.sum() for l in ref_logits), f_inv)[0]
    torch.testing.assert_close(f_asmoe, expected, rtol=1e-5, atol=1e-5)
    for got, ref in zip(logits, ref_logits):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_gather_scatter_round_trip_keeps_order():
    tokens = torch.randn(2, 6, 3)
    indices = torch.tensor([[4, 0, 2], [1, 5, 3]])
    picked = gather_tokens(tokens, indices)
    assert torch.equal(picked[1, 0], tokens[1, 1]) and torch.equal(picked[0, 0], tokens[0, 4])
    assert torch.equal(scatter_tokens(tokens, indices, picked), tokens)
    written = scatter_tokens(tokens, indices, picked + 1)
    assert torch.equal(gather_tokens(written, indices), picked + 1)
    untouched = torch.ones(2, 6, dtype=torch.bool).scatter(1, indices, False)
    assert torch.equal(written[untouched], tokens[untouched])


def test_cvpr_writes_each_refined_token_back_to_its_own_patch():
    torch.manual_seed(0)
    cvpr = ContextVisionProgressiveRefinement(32, fixes("CVPR_SCATTER_ORDER", "CVPR_PER_SAMPLE_KEY"), num_layers=1,
                                              topk=0.5).eval()
    f_inv, patches, f_sem = torch.randn(2, 32), torch.randn(2, 8, 32), torch.randn(2, 32)
    f_cvpr, refined = cvpr(f_inv, patches, f_sem)
    query = cvpr.semantic_fuse(cvpr.query_token.expand(2, -1, -1), (f_inv + f_sem)[:, None])
    order = cvpr.scorer(query, patches)
    assert order.shape == (2, 4)
    new_query, tokens = cvpr.blocks[0](query, gather_tokens(patches, order))
    for b in range(2):
        for i, position in enumerate(order[b].tolist()):
            torch.testing.assert_close(refined[b, position], tokens[b, i])
        kept = [p for p in range(8) if p not in order[b].tolist()]
        assert torch.equal(refined[b, kept], patches[b, kept])
    gate = cvpr.gate(new_query)
    torch.testing.assert_close(f_cvpr, (gate * new_query + (1 - gate) * cvpr.query_token)[:, 0])


def test_cvpr_stages_shrink_the_selection_and_shared_blocks_share_weights():
    torch.manual_seed(0)
    separate = ContextVisionProgressiveRefinement(32, fixes("CVPR_SEPARATE_BLOCKS"), num_layers=3, topk=0.5)
    shared = ContextVisionProgressiveRefinement(32, fixes(), num_layers=3, topk=0.5)
    block = count(separate.blocks[0])
    assert count(separate) - count(shared) == 2 * block
    patches = torch.randn(2, 16, 32)
    _, refined = separate(torch.randn(2, 32), patches)
    changed = (refined != patches).any(-1).sum(-1)
    assert changed.tolist() == [8, 8]  # stages keep 8 -> 4 -> 2 patches, all inside the first selection


def test_checkpoint_round_trip_restores_the_embedding(tmp_path):
    model = tiny_model().eval()
    torch.save(model.state_dict(), tmp_path / "svpr.pth")
    torch.manual_seed(123)
    restored = build_model(tiny_cfg(), num_classes=5, num_cameras=3, num_views=2, attributes=ATTRIBUTES)
    restored.load_state_dict(load_checkpoint(str(tmp_path / "svpr.pth")))
    restored.eval()
    images, viewids, tokens = batch(size=3)
    with torch.no_grad():
        torch.testing.assert_close(restored(images, viewids=viewids, text_tokens=tokens),
                                   model(images, viewids=viewids, text_tokens=tokens))
