"""Our CLIP modules against OpenAI's reference code on small models, and the ReID adaptations."""

import pytest
import torch

from configs.defaults import get_cfg_defaults
from model.backbone import build_clip_from_config
from model.clip import CLIP, SideInfoEmbedding, VisualFeatures, build_clip
from text import tokenize
from tests.fixtures import openai_clip_module

SMALL = dict(embed_dim=64, vision_width=128, vision_layers=3, vision_heads=2, text_width=128, text_heads=2,
             text_layers=2)

@pytest.fixture(scope="module")
def pair():
    """OpenAI's CLIP (64x64 images, patch 16, context 77) and ours with the same weights."""
    torch.manual_seed(0)
    reference = openai_clip_module("model").CLIP(64, 64, 3, 128, 16, 77, 49408, 128, 2, 2).eval()
    ours = build_clip(64, image_size=(64, 64), patch_size=16, stride=16, vision_width=128, vision_layers=3,
                      vision_heads=2, text_width=128, text_heads=2, text_layers=2).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def test_encoders_match_openai(pair):
    reference, ours = pair
    images = torch.randn(3, 3, 64, 64)
    tokens = tokenize(["a photo of a man", "ground aerial", "a woman in a red coat, walking"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), reference.encode_image(images),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=1e-5)
        logits, _ = ours(images, tokens)
        reference_logits, _ = reference(images, tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-5)


def test_attributes_follow_the_contract(pair):
    _, ours = pair
    assert isinstance(ours, CLIP)
    assert ours.visual.width == 128 and ours.visual.output_dim == 64 == ours.embed_dim
    assert ours.visual.grid_size == (4, 4) and ours.visual.num_patches == 16
    assert ours.text_width == 128 and ours.context_length == 77


def test_forward_features_without_extras_matches_openai(pair):
    reference, ours = pair
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = ours.visual.forward_features(images)
        visual = reference.visual
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_pre(x).transpose(0, 1)  # OpenAI's blocks are sequence-first
        x = visual.transformer.resblocks[:-1](x)
        penultimate = x.transpose(0, 1)
        last = visual.ln_post(visual.transformer.resblocks[-1](x).transpose(0, 1))
    assert isinstance(features, VisualFeatures)
    assert features.penultimate.shape == (2, 17, 128) and features.projected.shape == (2, 17, 64)
    torch.testing.assert_close(features.penultimate, penultimate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.tokens, last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.projected, last @ visual.proj, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.projected[:, 0], ours.encode_image(images), atol=1e-5, rtol=1e-5)


def test_extra_tokens_only_enter_the_last_block(pair):
    _, ours = pair
    images = torch.randn(2, 3, 64, 64)
    extra = torch.randn(2, 3, 128)
    with torch.no_grad():
        plain = ours.visual.forward_features(images)
        with_extra = ours.visual.forward_features(images, extra_tokens=extra)
        # Reference for the last block: the same block applied to [penultimate, extra].
        last_block = ours.visual.transformer.resblocks[-1]
        expected = ours.visual.ln_post(last_block(torch.cat([plain.penultimate, extra], 1)))
    assert with_extra.tokens.shape == (2, 1 + 16 + 3, 128) and with_extra.projected.shape == (2, 20, 64)
    assert torch.equal(with_extra.penultimate, plain.penultimate)
    torch.testing.assert_close(with_extra.tokens, expected, atol=1e-5, rtol=1e-5)
    # The extra tokens are attended to in the last block, so the CLS token does change.
    assert not torch.allclose(with_extra.tokens[:, 0], plain.tokens[:, 0], atol=1e-4)


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_num_outputs_gives_the_first_tokens_of_the_full_last_block_and_their_gradients(pair, num_outputs):
    reference, ours = pair
    images = torch.randn(2, 3, 64, 64)
    extra = torch.randn(2, 1, 128)
    visual = reference.visual
    with torch.no_grad():  # OpenAI's blocks on [penultimate, extra], all tokens
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        x = visual.transformer.resblocks[:-1](visual.ln_pre(x).transpose(0, 1))
        x = torch.cat([x, extra.transpose(0, 1)], 0)
        last = visual.ln_post(visual.transformer.resblocks[-1](x).transpose(0, 1))
        first = ours.visual.forward_features(images, extra_tokens=extra, num_outputs=num_outputs)
    assert first.tokens.shape == (2, num_outputs, 128) and first.projected.shape == (2, num_outputs, 64)
    torch.testing.assert_close(first.tokens, last[:, :num_outputs], atol=1e-5, rtol=1e-5)

    def gradients(**kwargs):
        ours.zero_grad()
        features = ours.visual.forward_features(images, extra_tokens=extra, **kwargs)
        (features.tokens[:, :num_outputs].square().sum() + features.penultimate[:, 0].sum()).backward()
        return {name: p.grad.clone() for name, p in ours.visual.named_parameters() if p.grad is not None}

    full, partial = gradients(), gradients(num_outputs=num_outputs)
    assert full.keys() == partial.keys() and len(full) > 10
    for name in full:
        torch.testing.assert_close(partial[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_side_embedding_is_added_to_the_cls_token_only(pair):
    _, ours = pair
    images = torch.randn(2, 3, 64, 64)
    side = torch.randn(2, 128)
    visual = ours.visual
    with torch.no_grad():
        plain = visual.forward_features(images)
        zero = visual.forward_features(images, side_embed=torch.zeros(2, 128))
        with_side = visual.forward_features(images, side_embed=side)
        expected = []
        original = visual.class_embedding.detach().clone()
        for b in range(2):  # the same as shifting the class embedding by that image's vector
            visual.class_embedding.copy_(original + side[b])
            expected.append(visual.forward_features(images[b:b + 1]).tokens)
        visual.class_embedding.copy_(original)
    assert torch.equal(zero.tokens, plain.tokens) and torch.equal(zero.penultimate, plain.penultimate)
    torch.testing.assert_close(with_side.tokens, torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_side.penultimate, plain.penultimate, atol=1e-3)


def test_text_encoder_token_embeds_and_return_all(pair):
    _, ours = pair
    tokens = tokenize(["a photo of a X X X X person.", "ground aerial"])
    with torch.no_grad():
        eot = ours.encode_text(tokens)
        embeds = ours.token_embedding(tokens)
        torch.testing.assert_close(ours.encode_text(tokens, token_embeds=embeds), eot, atol=0, rtol=0)
        every = ours.encode_text(tokens, return_all=True)
        assert every.shape == (2, 77, 64)
        torch.testing.assert_close(every[torch.arange(2), tokens.argmax(-1)], eot, atol=1e-6, rtol=1e-6)
        prompt = embeds.clone()
        prompt[:, 5:9] += torch.randn(4, 128)
        changed = ours.encode_text(tokens, token_embeds=prompt, return_all=True)
    # Causal attention: positions before the prompt vectors are untouched, later ones change.
    torch.testing.assert_close(changed[:, :5], every[:, :5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed[:, 9], every[:, 9], atol=1e-4)


def test_non_square_input_and_overlapping_patches():
    model = build_clip(32, image_size=(64, 32), patch_size=16, stride=(12, 8), vision_width=64, vision_layers=2,
                       text_width=64, text_layers=1, context_length=20)
    assert model.visual.grid_size == ((64 - 16) // 12 + 1, (32 - 16) // 8 + 1) == (5, 3)
    features = model.visual.forward_features(torch.randn(2, 3, 64, 32))
    assert features.tokens.shape == (2, 16, 64)
    with pytest.raises(Exception, match="64x64 .*built for 64x32"):
        model.encode_image(torch.randn(1, 3, 64, 64))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    model = build_clip(32, image_size=(32, 32), patch_size=16, vision_width=64, vision_layers=2,
                       text_width=64, text_layers=2, context_length=16)
    images, tokens = torch.randn(2, 3, 32, 32), tokenize(["a b c", "d"], context_length=16)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        (model.encode_image(images).sum() + model.encode_text(tokens).square().sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_init_follows_openai_scheme():
    torch.manual_seed(0)
    model = build_clip(256, vision_width=256, vision_layers=2, text_width=512, text_layers=4, text_heads=8)
    width, layers = 512, 4
    block = model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(width ** -0.5, rel=0.02)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(width ** -0.5 * (2 * layers) ** -0.5, rel=0.02)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())


def test_side_info_embedding_table_layout():
    torch.manual_seed(0)
    cams, views = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])
    both = SideInfoEmbedding(num_cameras=3, num_views=2, width=8, coefficient=3.0)
    assert both.table.shape == (6, 8)
    torch.testing.assert_close(both(cams, views), 3.0 * both.table[cams * 2 + views])
    cameras_only = SideInfoEmbedding(num_cameras=3, num_views=1, width=8, coefficient=2.0)
    torch.testing.assert_close(cameras_only(cams, views), 2.0 * cameras_only.table[cams])
    views_only = SideInfoEmbedding(num_cameras=0, num_views=2, width=8, coefficient=1.0)
    torch.testing.assert_close(views_only(cams, views), views_only.table[views])
    assert SideInfoEmbedding(num_cameras=1, num_views=1, width=8)(cams, views) is None
    big = SideInfoEmbedding(num_cameras=100, num_views=50, width=64)
    assert big.table.std().item() == pytest.approx(0.02, rel=0.05) and big.table.abs().max() <= 2.0


def test_build_clip_from_config_random_init_freezes_text():
    cfg = get_cfg_defaults()
    cfg.MODEL.RANDOM_INIT = True
    cfg.MODEL.FREEZE_TEXT = True
    cfg.MODEL.GRAD_CHECKPOINT = True
    cfg.MODEL.TEXT_LEN = 30
    cfg.INPUT.SIZE_TRAIN = [64, 32]
    for key, value in dict(EMBED_DIM=32, VISION_WIDTH=64, VISION_LAYERS=2, VISION_HEADS=2, TEXT_WIDTH=64,
                           TEXT_LAYERS=1, TEXT_HEADS=2).items():
        cfg.MODEL.CLIP[key] = value
    model = build_clip_from_config(cfg)
    assert model.visual.grid_size == (4, 2) and model.context_length == 30
    assert model.positional_embedding.shape == (30, 64)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    text_names = {name for name, _ in model.named_parameters()
                  if name.startswith(("token_embedding", "transformer.", "ln_final"))
                  or name in ("positional_embedding", "text_projection")}
    assert frozen == text_names
    assert all(p.requires_grad for name, p in model.named_parameters() if name.startswith("visual."))
    assert model.logit_scale.requires_grad
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing


def test_side_info_embedding_needs_the_ids_it_embeds():
    sie = SideInfoEmbedding(num_cameras=3, num_views=2, width=8)
    with pytest.raises(ValueError, match="needs camera ids and view ids"):
        sie(torch.tensor([0]), None)

