"""Relevance maps: which pixels a re-identification model's test feature rests on.

The explained number is the projection ``f(x) . u`` of the image's test feature f(x) (what evaluation
ranks with) on a fixed unit vector u: the image's own direction ``f(x) / |f(x)|`` (held fixed) to explain
its feature, or the direction of another image's feature to explain a match (the similarity of the pair
before the query's length is normalised away; a cosine itself has no first-order relevance to give, its
gradient being orthogonal to f).

Methods (``METHODS``):

* ``relevance`` (default): gradient-weighted attention relevance (Chefer, Gur and Wolf, "Generic
  Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021).
  Through every self-attention layer of the backbone the relevance matrix grows as
  ``R <- R + mean_heads((dy/dA * A)^+) R`` (A: the layer's attention probabilities); view tokens subtracted
  from the class token after each block (VDT, SeCap) pass their relevance to it, and tokens appended on
  the way (SVPR-ReID's view token) start with their own. The heads of these models read more than the class
  token (TransReID's jigsaw branches, SVPR-ReID's CVPR/local branches and SeCap's LFRM read the patch
  tokens), so the relevance starts at the tokens the head reads, weighted by their gradient x activation
  (positive part), rather than at the class token alone; for a class-token head this is exactly Chefer's
  class-token row. A patch's relevance covers the pixels of its patch (averaged where patches overlap).
* ``gradcam``: Grad-CAM (pytorch-grad-cam) on the patch tokens entering the last attention layer the
  whole feature depends on.
* ``integrated_gradients``: Integrated Gradients (captum) from the mean image (zero after
  normalisation), positive part summed over the colour channels; needs no knowledge of the model.

Every image is explained alone (batch of one): in the reference SVPR-ReID (MODEL.FIXES off) a feature
depends on the other images of its batch, and a map should explain one image.
"""
import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from datasets import collate
from model.clip_baseline import ClipImageModel
from model.svpr.model import CLIPSVPRReID
from model.vit import VDT, SeCap, TransReID, ViT
from utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

METHODS = ("relevance", "gradcam", "integrated_gradients")
#: Integration steps of ``integrated_gradients``.
IG_STEPS = 32
_OPTIONAL = {"gradcam": ("pytorch_grad_cam", "grad-cam"), "integrated_gradients": ("captum", "captum")}


@dataclass
class TokenLayout:
    """Where a transformer ReID model keeps what the token-based methods need.

    ``attentions``: its backbone's self-attention modules in the order they run (each with a ``fused_attn``
    switch); ``readout``: the module whose output (B, T, C) are the tokens the model's head reads;
    ``cam_layer``: a module whose output tokens the whole feature depends on (Grad-CAM's layer);
    ``num_prefix``: tokens before the patches ([cls] or [cls, view]); ``grid``: (rows, cols) of patches;
    ``patch_size``/``stride``: (h, w) of the patch convolution; ``subtract_view``: the view token is
    subtracted from the class token after every block.
    """

    attentions: Sequence[nn.Module]
    readout: nn.Module
    cam_layer: nn.Module
    num_prefix: int
    grid: Tuple[int, int]
    patch_size: Tuple[int, int]
    stride: Tuple[int, int]
    subtract_view: bool = False


def _clip_layout(visual):
    blocks = visual.transformer.resblocks
    patch = (visual.patch_size, visual.patch_size)
    return TokenLayout([block.attn for block in blocks], visual.ln_post, blocks[-1].ln_1, 1, tuple(visual.grid_size),
                       patch, tuple(visual.stride))


def _vit_layout(backbone, cam_layer, subtract_view):
    embed = backbone.patch_embed
    return TokenLayout([block.attn for block in backbone.blocks], backbone, cam_layer, backbone.num_prefix_tokens,
                       tuple(embed.grid_size), tuple(embed.patch_size), tuple(embed.proj.stride), subtract_view)


def token_layout(model):
    """The :class:`TokenLayout` of one of the seven built-in models, or None for any other model."""
    if isinstance(model, ClipImageModel):  # CLIP_baseline, CLIP_ReID
        return _clip_layout(model.visual)
    if isinstance(model, CLIPSVPRReID):
        return _clip_layout(model.backbone.visual)
    if isinstance(model, (ViT, VDT)):  # the head reads the final class token only
        return _vit_layout(model.backbone, model.backbone.blocks[-1].norm1, isinstance(model, VDT))
    if isinstance(model, (TransReID, SeCap)):  # the backbone's tokens feed the last block copies and the heads
        return _vit_layout(model.backbone, model.backbone, isinstance(model, SeCap))
    return None


def _probability_point(attention):
    """The module whose output is the attention probabilities: CLIP's ``attn_probs``, timm's ``attn_drop``."""
    point = getattr(attention, "attn_probs", None)
    return point if point is not None else attention.attn_drop


@contextlib.contextmanager
def _explicit_attention(model, layout):
    """Record (in lists) every attention probability tensor of ``layout`` and its readout tokens while the
    attention runs written out; gradient checkpointing (which would run the hooks twice) is off meanwhile."""
    probabilities, readouts = [], []
    handles = [_probability_point(a).register_forward_hook(lambda _m, _i, out: probabilities.append(out))
               for a in layout.attentions]
    handles.append(layout.readout.register_forward_hook(lambda _m, _i, out: readouts.append(out)))
    fused = [(attention, attention.fused_attn) for attention in layout.attentions]
    with _no_checkpointing(model):
        try:
            for attention, _ in fused:
                attention.fused_attn = False
            yield probabilities, readouts
        finally:
            for handle in handles:
                handle.remove()
            for attention, value in fused:
                attention.fused_attn = value


@contextlib.contextmanager
def _no_checkpointing(model):
    switched = [module for module in model.modules() if getattr(module, "grad_checkpointing", False) is True]
    try:
        for module in switched:
            module.grad_checkpointing = False
        yield
    finally:
        for module in switched:
            module.grad_checkpointing = True


def rollout(probabilities, gradients, subtract_view=False):
    """(B, T, T) relevance of each token on the tokens entering the first layer (Chefer et al.'s rule;
    see the module docstring). ``probabilities``/``gradients``: per layer in order, (B, H, T, T) each; a
    layer with more tokens than the one before it has them appended at the end."""
    relevance = None
    for probs, grads in zip(probabilities, gradients):
        weighted = (grads * probs).clamp(min=0).mean(dim=1)  # (B, T, T)
        batch, tokens = weighted.shape[0], weighted.shape[-1]
        grown = torch.eye(tokens, dtype=weighted.dtype, device=weighted.device).repeat(batch, 1, 1)
        if relevance is not None:
            known = relevance.shape[-1]
            grown[:, :known, :known] = relevance
        relevance = grown + weighted @ grown
        if subtract_view:  # cls <- cls - view: the class token now carries the view token's sources too
            relevance = torch.cat([relevance[:, :1] + relevance[:, 1:2], relevance[:, 1:]], dim=1)
    return relevance


def patches_to_pixels(patch_map, image_size, patch_size, stride):
    """(B, H, W) pixel map of a (B, rows, cols) patch map: each pixel gets the mean relevance of the
    patches covering it (0 in a margin no patch covers)."""
    ones = patch_map.new_ones(1, 1, *patch_size)
    summed = F.conv_transpose2d(patch_map[:, None], ones, stride=stride)  # (B, 1, H', W')
    coverage = F.conv_transpose2d(torch.ones_like(patch_map[:1, None]), ones, stride=stride)
    pixels = summed / coverage.clamp(min=1)
    height, width = image_size
    pixels = F.pad(pixels, (0, width - pixels.shape[-1], 0, height - pixels.shape[-2]))
    return pixels[:, 0]


def _token_patches(tokens, layout):
    """(B, rows, cols) of the patch tokens of (B, T) token values."""
    rows, cols = layout.grid
    return tokens[:, layout.num_prefix:layout.num_prefix + rows * cols].reshape(-1, rows, cols)


class _Projection:
    """pytorch-grad-cam target: the projection of one image's feature on ``direction`` (E,)."""

    def __init__(self, direction):
        self.direction = direction

    def __call__(self, feature):
        return (feature * self.direction).sum()


class _WithInputs(nn.Module):
    """``model`` as a function of the images alone (its other forward inputs fixed)."""

    def __init__(self, model, inputs):
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, images):
        return self.model(images, **self.inputs)


class Explainer:
    """Relevance maps of ``model``'s test feature with ``method`` (one of ``METHODS``).

    ``explainer(images (B, 3, H, W), inputs, directions=None)`` returns ``(maps (B, H, W), features (B, E))``
    on the CPU: non-negative maps at the input size (larger = more relevant) and the test features;
    ``inputs`` are the model's other forward inputs (``model.forward_inputs(batch)``), ``directions``
    (B, E) the unit vectors to project on (default: each image's own feature direction).
    """

    def __init__(self, model, method="relevance"):
        if method not in METHODS:
            raise ConfigError(f"relevance method {method!r}: expected one of {', '.join(METHODS)}")
        self.model = model
        self.method = method
        self.layout = token_layout(model)
        if method != "integrated_gradients" and self.layout is None:
            raise UserError(f"relevance method {method!r} needs a transformer backbone it knows (the seven built-in "
                            f"models); {type(model).__name__} has none: use integrated_gradients")
        if method in _OPTIONAL:
            module, package = _OPTIONAL[method]
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"relevance method {method!r} needs the {package} package: pip install "
                                f"{package}") from None

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def features(self, images, inputs):
        """Test features (B, E) of ``images``, one image at a time (as the maps explain them)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return torch.cat([self.model(images[i:i + 1], **_slice(inputs, i)).float() for i in range(len(images))])
        finally:
            self.model.train(was_training)

    def __call__(self, images, inputs, directions=None):
        images = images.to(self.device).float()
        features = self.features(images, inputs)
        if directions is None:
            directions = features
        directions = F.normalize(torch.as_tensor(directions, dtype=torch.float32, device=self.device), dim=-1)
        explain = {"relevance": self._relevance, "gradcam": self._gradcam,
                   "integrated_gradients": self._integrated_gradients}[self.method]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                maps = [explain(images[i:i + 1], _slice(inputs, i), directions[i:i + 1])
                        for i in range(len(images))]
        finally:
            self.model.train(was_training)
        return torch.cat(maps).detach().float().cpu(), features.cpu()

    def _relevance(self, image, inputs, direction):
        layout = self.layout
        image = image.detach().requires_grad_(True)  # every attention tensor then has a gradient
        with _explicit_attention(self.model, layout) as (probabilities, readouts):
            target = (self.model(image, **inputs) * direction).sum()
            if not probabilities or not readouts:
                raise RuntimeError(f"{type(self.model).__name__}: no attention probabilities or readout tokens "
                                   f"were recorded; its token layout does not match its forward")
            tokens = readouts[-1]
            gradients = torch.autograd.grad(target, [*probabilities, tokens], allow_unused=True)
        gradients = [torch.zeros_like(t) if g is None else g for t, g in zip([*probabilities, tokens], gradients)]
        relevance = rollout(probabilities, gradients[:-1], layout.subtract_view)  # (1, T, T)
        seeds = (gradients[-1] * tokens).sum(-1).clamp(min=0)  # (1, T): gradient x activation of each read token
        if seeds.shape[-1] != relevance.shape[-1]:
            raise RuntimeError(f"{type(self.model).__name__}: {seeds.shape[-1]} readout tokens but the attention "
                               f"layers carry {relevance.shape[-1]}")
        token_map = (seeds[:, None] @ relevance)[:, 0]  # (1, T)
        return patches_to_pixels(_token_patches(token_map, layout), image.shape[-2:], layout.patch_size,
                                 layout.stride)

    def _gradcam(self, image, inputs, direction):
        from pytorch_grad_cam import GradCAM

        layout = self.layout
        rows, cols = layout.grid

        def to_grid(tokens):  # (B, T, C) -> (B, C, rows, cols)
            patches = tokens[:, layout.num_prefix:layout.num_prefix + rows * cols]
            return patches.reshape(tokens.shape[0], rows, cols, -1).permute(0, 3, 1, 2)

        with _no_checkpointing(self.model), GradCAM(_WithInputs(self.model, inputs), [layout.cam_layer],
                                                    reshape_transform=to_grid) as cam:
            maps = cam(input_tensor=image, targets=[_Projection(direction[0])])  # (1, H, W) in [0, 1]
        self.model.zero_grad(set_to_none=True)  # Grad-CAM backpropagates into the parameters
        return torch.from_numpy(np.ascontiguousarray(maps)).float()

    def _integrated_gradients(self, image, inputs, direction):
        from captum.attr import IntegratedGradients

        def projection(images):
            return (self.model(images, **inputs) * direction).sum(dim=1)

        attributions = IntegratedGradients(projection).attribute(
            image, baselines=torch.zeros_like(image), n_steps=IG_STEPS, internal_batch_size=1)
        return attributions.sum(dim=1).clamp(min=0)  # (1, H, W)


def _slice(inputs, index):
    """The forward inputs of image ``index`` of a batch (tensors sliced, other values kept)."""
    return {key: value[index:index + 1] if isinstance(value, torch.Tensor) else value
            for key, value in inputs.items()}


def resize_map(relevance, size):
    """A (H, W) map resized (bilinear, kept non-negative) to ``size`` (h, w), as a float32 numpy array."""
    relevance = torch.as_tensor(relevance, dtype=torch.float32)[None, None]
    return F.interpolate(relevance, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].clamp(
        min=0).numpy()


def overlay(image, relevance, alpha=0.5):
    """``image`` (PIL) with ``relevance`` (h, w, at the image's size) over it: scaled to [0, 1] by its maximum
    and coloured with matplotlib's 'jet' (blue: none, red: most relevant). Needs matplotlib."""
    from matplotlib import colormaps

    relevance = np.asarray(relevance, dtype=np.float64)
    peak = relevance.max()
    scaled = relevance / peak if peak > 0 else np.zeros_like(relevance)
    colours = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(colours), alpha)


def overlay_drawer(model, dataset):
    """A function of an item index of ``dataset`` (a ``datasets.ImageDataset``) giving its relevance overlay
    (:func:`sample_overlay`, default method), for ranked-list pictures; None, with one log line, when the
    model is not one the method knows or matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (the overlay's colours)
    except ImportError:
        logger.info("no relevance maps in the ranked lists: drawing them needs matplotlib (pip install matplotlib)")
        return None
    if token_layout(model) is None:
        logger.info("no relevance maps in the ranked lists: %s has no transformer backbone the relevance method "
                    "knows", type(model).__name__)
        return None
    explainer = Explainer(model)
    return lambda index: sample_overlay(explainer, dataset, index)


def sample_overlay(explainer, dataset, index):
    """The relevance overlay (PIL, at the image's own size) of item ``index`` of a ``datasets.ImageDataset``
    (its pre-processing, ids and caption), explaining the image's own feature."""
    batch = collate([dataset[index]])
    batch = {key: value.to(explainer.device) if isinstance(value, torch.Tensor) else value
             for key, value in batch.items()}
    maps, _ = explainer(batch["images"], explainer.model.forward_inputs(batch))
    with Image.open(dataset.samples[index].path) as image:
        image = image.convert("RGB")
    return overlay(image, resize_map(maps[0], (image.height, image.width)))
