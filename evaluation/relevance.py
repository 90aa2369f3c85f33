"""Relevance maps: which pixels a re-identification model's test feature rests on.

The explained number is the projection ``f(x) . u`` of the image's test feature f(x) (what evaluation
ranks with) on a fixed unit vector u: the image's own direction ``f(x) / |f(x)|`` (held fixed) to explain
its feature, or the direction of another image's feature to explain a match (the similarity of the pair
before the query's length is normalised away; a cosine itself has no first-order relevance to give, its
gradient being orthogonal to f).

Methods (``METHODS``):

* ``relevance`` (default): conservative propagation (Ali, Schnake, Eberle, Montavon, Müller and Wolf,
  "XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022): gradient x input
  at the pixels, with the attention probabilities and the normalisation of every LayerNorm held constant in
  the backward pass (their LRP rules for attention heads and LayerNorm). Without these rules the softmax and
  the normalisation break conservation, and gradient x input misattributes; with them the relevance a layer
  passes down sums to what it received. It needs no knowledge of the model's heads, view tokens or token
  shuffles (autograd follows them), and its pixels are the model's own pixels (overlapping patches need no
  mapping). Positive part, summed over the colour channels; one forward and backward pass.
* ``gradcam``: Grad-CAM (pytorch-grad-cam) on the patch tokens entering the last attention layer the
  whole feature depends on, at the resolution of the patch grid, each patch's value covering its pixels.
* ``integrated_gradients``: Integrated Gradients (captum) from the mean image (zero after
  normalisation), positive part summed over the colour channels; needs no knowledge of the model.

Every image is explained alone (batch of one), in float32 with autocast off: in the reference SVPR-ReID
(MODEL.FIXES off) a feature depends on the other images of its batch, and a map should explain one image.
``evaluation/faithfulness.py`` measures how faithful the maps are; a method whose maps of a model failed it
(``UNFAITHFUL``) is refused for that model.
"""
import contextlib
import logging
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode

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
    """The patch grid of a transformer ReID model, for Grad-CAM and for the faithfulness benchmark's cells.

    ``cam_layer``: a module whose output tokens (B, T, C) the whole feature depends on (Grad-CAM's layer);
    ``num_prefix``: tokens before the patches ([cls] or [cls, view]); ``grid``: (rows, cols) of patches,
    row-major after the prefix; ``patch_size``/``stride``: (h, w) of the patch convolution.
    """

    cam_layer: nn.Module
    num_prefix: int
    grid: Tuple[int, int]
    patch_size: Tuple[int, int]
    stride: Tuple[int, int]


def _clip_layout(visual):
    patch = (visual.patch_size, visual.patch_size)
    return TokenLayout(visual.transformer.resblocks[-1].ln_1, 1, tuple(visual.grid_size), patch, tuple(visual.stride))


def _vit_layout(backbone, cam_layer):
    embed = backbone.patch_embed
    return TokenLayout(cam_layer, backbone.num_prefix_tokens, tuple(embed.grid_size), tuple(embed.patch_size),
                       tuple(embed.proj.stride))


def token_layout(model):
    """The :class:`TokenLayout` of one of the seven built-in models, or None for any other model."""
    if isinstance(model, ClipImageModel):  # CLIP_baseline, CLIP_ReID
        return _clip_layout(model.visual)
    if isinstance(model, CLIPSVPRReID):
        return _clip_layout(model.backbone.visual)
    if isinstance(model, (ViT, VDT)):  # the head reads the final class token only
        return _vit_layout(model.backbone, model.backbone.blocks[-1].norm1)
    if isinstance(model, (TransReID, SeCap)):  # the backbone's tokens feed the last block copies and the heads
        return _vit_layout(model.backbone, model.backbone)
    return None


#: (model class, method) -> why the method's maps of that model are not faithful, as tools/faithfulness.py
#: measured them on the quickstart-trained models (docs/explain.md); the Explainer refuses these. Grad-CAM
#: weighs each channel of the patch tokens by its mean gradient: in these transformers the tokens share large
#: common components, and the weighted sum follows those rather than what a patch adds to the feature.
UNFAITHFUL = {
    (model_class, "gradcam"): "on the quickstart-trained model its maps do not beat random, shifted or transposed "
                              "patch-level maps"
    for model_class in (ClipImageModel, CLIPSVPRReID, ViT, TransReID, VDT, SeCap)
}


def unfaithful_reason(model, method):
    """Why ``method``'s maps of ``model`` are not faithful (``UNFAITHFUL``), or None."""
    for (model_class, unfaithful_method), reason in UNFAITHFUL.items():
        if unfaithful_method == method and isinstance(model, model_class):
            return reason
    return None


def _faithful_alternative(model):
    return " or ".join(f"--method {method}" for method in METHODS if unfaithful_reason(model, method) is None)


def attention_with_constant_probabilities(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                          scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` (same arguments, no dropout: models are explained in eval mode) whose
    attention probabilities pass no gradient: (B, H, Lq, Lk) probabilities times the values."""
    if enable_gqa:
        raise NotImplementedError("relevance maps of grouped-query attention")
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1).detach() @ value


def layer_norm_with_constant_scale(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` whose division by the standard deviation passes no gradient (the centring does)."""
    dims = tuple(range(-(1 if isinstance(normalized_shape, int) else len(normalized_shape)), 0))
    centred = x - x.mean(dim=dims, keepdim=True)
    scale = (centred.pow(2).mean(dim=dims, keepdim=True) + eps).rsqrt()
    out = centred * scale.detach()
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


class ConservativePropagation(TorchFunctionMode):
    """While active, every ``scaled_dot_product_attention`` and ``layer_norm`` holds its attention
    probabilities / normalisation constant in the backward pass (Ali et al. 2022's rules); the forward values
    are those of the fused functions up to float rounding."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return attention_with_constant_probabilities(*args, **kwargs)
        if func is F.layer_norm:
            return layer_norm_with_constant_scale(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _fused_attention(model):
    """Every attention module with a ``fused_attn`` switch (timm's, CLIP's) runs ``scaled_dot_product_attention``
    meanwhile, where :class:`ConservativePropagation` sees it."""
    switched = [(module, module.fused_attn) for module in model.modules() if hasattr(module, "fused_attn")]
    try:
        for module, _ in switched:
            module.fused_attn = True
        yield
    finally:
        for module, value in switched:
            module.fused_attn = value


@contextlib.contextmanager
def _no_checkpointing(model):
    """Gradient checkpointing off (its recomputation in the backward pass would run outside the explainer's
    rules and hooks)."""
    switched = [module for module in model.modules() if getattr(module, "grad_checkpointing", False) is True]
    try:
        for module in switched:
            module.grad_checkpointing = False
        yield
    finally:
        for module in switched:
            module.grad_checkpointing = True


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
    (B, E) the unit vectors to project on (default: each image's own feature direction). A method found
    unfaithful for the model (``UNFAITHFUL``) is a ``UserError`` unless ``refuse_unfaithful`` is False (the
    faithfulness benchmark measures it anyway).
    """

    def __init__(self, model, method="relevance", refuse_unfaithful=True):
        if method not in METHODS:
            raise ConfigError(f"relevance method {method!r}: expected one of {', '.join(METHODS)}")
        reason = unfaithful_reason(model, method)
        if reason is not None and refuse_unfaithful:
            raise UserError(f"relevance method {method!r} draws no faithful maps of {type(model).__name__}: {reason} "
                            f"(docs/explain.md); use {_faithful_alternative(model)}")
        self.model = model
        self.method = method
        self.layout = token_layout(model)
        self._independent = None  # whether a feature is the same in any batch (``features``)
        if method == "gradcam" and self.layout is None:
            raise UserError(f"relevance method 'gradcam' needs a transformer backbone it knows (the seven built-in "
                            f"models); {type(model).__name__} has none: use relevance or integrated_gradients")
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
    def features(self, images, inputs, chunk=1):
        """Test features (B, E) of ``images`` in float32, each as if alone (as the maps explain them): ``chunk``
        images per forward pass where the model's features do not depend on the rest of their batch (checked
        once, on two unlike images), else one at a time."""
        images = images.to(self.device).float()
        if chunk > 1 and not self._batch_independent(images[0], slice_inputs(inputs, 0)):
            chunk = 1
        with self._explaining():
            return torch.cat([self.model(images[i:i + chunk], **slice_inputs(inputs, i, chunk)).float()
                              for i in range(0, len(images), chunk)])

    def _batch_independent(self, image, inputs):
        if self._independent is None:
            pair = torch.stack([image, torch.zeros_like(image)])  # an image and the mean image
            inputs = slice_inputs(inputs, 0, 1, repeat=2)
            together = self.features(pair, inputs)  # one at a time
            with self._explaining():
                batched = self.model(pair, **inputs).float()
            self._independent = bool(torch.allclose(batched, together, rtol=1e-4, atol=1e-5 * float(
                together.abs().max())))
        return self._independent

    def __call__(self, images, inputs, directions=None):
        images = images.to(self.device).float()
        features = self.features(images, inputs)
        if directions is None:
            directions = features
        directions = F.normalize(torch.as_tensor(directions, dtype=torch.float32, device=self.device), dim=-1)
        explain = {"relevance": self._relevance, "gradcam": self._gradcam,
                   "integrated_gradients": self._integrated_gradients}[self.method]
        with self._explaining(), torch.enable_grad():
            maps = [explain(images[i:i + 1], slice_inputs(inputs, i), directions[i:i + 1])
                    for i in range(len(images))]
        return torch.cat(maps).detach().float().cpu(), features.cpu()

    @contextlib.contextmanager
    def _explaining(self):
        """The model in eval mode with autocast off: maps and features are computed in float32 whatever
        precision the model was trained in; its training mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.autocast(device_type=self.device.type, enabled=False):
                yield
        finally:
            self.model.train(was_training)

    def _relevance(self, image, inputs, direction):
        image = image.detach().requires_grad_(True)
        with _fused_attention(self.model), _no_checkpointing(self.model), ConservativePropagation():
            target = (self.model(image, **inputs) * direction).sum()
        (gradient,) = torch.autograd.grad(target, image)
        return (gradient * image).sum(dim=1).clamp(min=0)  # (1, H, W)

    def _gradcam(self, image, inputs, direction):
        layout = self.layout
        rows, cols = layout.grid

        def to_grid(tokens):  # (B, T, C) -> (B, C, rows, cols)
            patches = tokens[:, layout.num_prefix:layout.num_prefix + rows * cols]
            return patches.reshape(tokens.shape[0], rows, cols, -1).permute(0, 3, 1, 2)

        with _no_checkpointing(self.model), _patch_grid_cam()(_WithInputs(self.model, inputs), [layout.cam_layer],
                                                          reshape_transform=to_grid) as cam:
            grid = cam(input_tensor=image, targets=[_Projection(direction[0])])  # (1, rows, cols) in [0, 1]
        self.model.zero_grad(set_to_none=True)  # Grad-CAM backpropagates into the parameters
        grid = torch.from_numpy(np.ascontiguousarray(grid)).float()
        return patches_to_pixels(grid, image.shape[-2:], layout.patch_size, layout.stride)

    def _integrated_gradients(self, image, inputs, direction):
        from captum.attr import IntegratedGradients

        def projection(images):  # the images of the path, each with the image's other inputs
            return (self.model(images, **slice_inputs(inputs, 0, 1, repeat=len(images))) * direction).sum(dim=1)

        # The whole path in one batch, unless a feature depends on its batch.
        steps_per_pass = IG_STEPS if self._batch_independent(image[0], inputs) else 1
        attributions = IntegratedGradients(projection).attribute(
            image, baselines=torch.zeros_like(image), n_steps=IG_STEPS, internal_batch_size=steps_per_pass)
        return attributions.sum(dim=1).clamp(min=0)  # (1, H, W)


def _patch_grid_cam():
    """pytorch-grad-cam's GradCAM returning the map on the patch grid (its own resizing to the image would
    place patches by interpolation; ``patches_to_pixels`` places them exactly, overlapping patches included)."""
    from pytorch_grad_cam import GradCAM

    class PatchGridCAM(GradCAM):
        def get_target_width_height(self, input_tensor):
            rows, cols = self.activations_and_grads.activations[0].shape[-2:]
            return cols, rows

    return PatchGridCAM


def slice_inputs(inputs, index, count=1, repeat=1):
    """The forward inputs of images ``index`` .. ``index + count - 1`` of a batch (tensors sliced, other values
    kept), each repeated ``repeat`` times."""
    return {key: value[index:index + count].repeat_interleave(repeat, dim=0) if isinstance(value, torch.Tensor)
            else value for key, value in inputs.items()}


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
    method is not faithful for the model or matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (the overlay's colours)
    except ImportError:
        logger.info("no relevance maps in the ranked lists: drawing them needs matplotlib (pip install matplotlib)")
        return None
    reason = unfaithful_reason(model, "relevance")
    if reason is not None:
        logger.info("no relevance maps in the ranked lists: the relevance method draws no faithful maps of %s: %s",
                    type(model).__name__, reason)
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
