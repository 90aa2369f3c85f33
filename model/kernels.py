"""Operations whose fastest formulation depends on the precision they run in.

In fp32, and in fp16 (the authors' CUDA autocast), each runs the formulation of the authors' code, so that
features match theirs. Under bf16, where a different formulation of the same function is several times
faster, that one runs instead; it differs from the other only by rounding (tests/test_precision.py):

* ``attention``: PyTorch's fused attention, except when training in bf16 on a CPU, where its backward kernel
  is 3-10x slower than the written-out attention: two bf16 matrix products (the 1/sqrt(d) scale applied
  inside the first) around a softmax in fp32, whose fp32 probabilities its backward uses;
* ``quick_gelu``: CLIP's ``x * sigmoid(1.702 x)``, or when training in bf16 ``silu(1.702 x) / 1.702`` (one
  fused backward instead of three operations' backwards);
* ``quick_gelu_mlp``: ``proj(quick_gelu(fc(x)))``, or when training in bf16 the same MLP with the 1.702 folded
  into the two weight matrices, so that the (tokens x 4 width) activation is written once (``silu``) instead
  of three times;
* ``patch_embedding``: the patch convolution, or under bf16 autocast on a CPU the same product as one matrix
  multiplication of the image patches (the CPU's bf16 convolution backward is 3-4x slower than fp32's);
* ``linear``: ``F.linear`` with an optional GELU or SiLU after it, or at inference (no gradient) under bf16
  autocast on a CPU one oneDNN product that adds the bias and applies the activation to its fp32 accumulator
  before rounding to bf16: autocast's bf16 ``addmm`` first copies the broadcast bias into the output and
  accumulates onto it, which with a separate activation pass made ViT-B/16's MLP 2.4x slower than the fused
  product (``quick_gelu_mlp`` and ``model.mlp.Mlp`` use it);
* ``fp32_under_bf16``: the context in which a model computes a discrete decision (which tokens, experts or
  attributes a top-k keeps) in fp32 when it runs under bf16 autocast, whose rounding would flip near ties.
"""
import contextlib

import torch
import torch.nn.functional as F

QUICK_GELU_SCALE = 1.702


def _bf16_autocast(device_type):
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def fp32_under_bf16(device_type):
    """A context that turns bf16 autocast off on ``device_type`` (inputs are then cast with ``.float()`` by
    the caller); a null context otherwise, so that fp32 and the authors' fp16 run as they do."""
    return torch.autocast(device_type, enabled=False) if _bf16_autocast(device_type) else contextlib.nullcontext()


def autocast_dtype(tensor):
    """The dtype autocast casts matrix-product inputs to on ``tensor``'s device, or ``tensor.dtype`` outside
    autocast: a tensor cast to it once before it is broadcast (e.g. to several experts) is not cast again
    per copy."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


# oneDNN's fused linear (PyTorch's CPU builds with oneDNN; TorchInductor emits it for CPU graphs).
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
# linear's activations: the oneDNN post-op (with its algorithm) and the eager function.
_ACTIVATIONS = {None: ("none", "", None), "gelu": ("gelu", "none", F.gelu), "silu": ("swish", "", F.silu)}


# While a ``bf16_weight_cache`` block runs: {(id(weight), scale): (weight, its _version, bf16 copy)}.
_bf16_copies = None


@contextlib.contextmanager
def bf16_weight_cache():
    """Within the block, :func:`linear` casts each weight (and bias) to bf16 once and reuses the copy while the
    tensor is unchanged (its version counter), as autocast caches its own casts within one autocast region.
    Enter it around many inference batches (``processor.inference.test_autocast`` does)."""
    global _bf16_copies
    outer, _bf16_copies = _bf16_copies, ({} if _bf16_copies is None else _bf16_copies)
    try:
        yield
    finally:
        _bf16_copies = outer


def _scaled_bf16(tensor, scale):
    # Scaled in the tensor's own precision, then rounded once.
    return tensor.to(torch.bfloat16) if scale is None else (tensor * scale).to(torch.bfloat16)


def _as_bf16(tensor, scale=None):
    """``tensor`` (times ``scale``) in bf16, from the ``bf16_weight_cache`` when one is active."""
    if tensor is None:
        return None
    if _bf16_copies is None:
        return _scaled_bf16(tensor, scale)
    key = (id(tensor), scale)
    cached = _bf16_copies.get(key)
    if cached is None or cached[0] is not tensor or cached[1] != tensor._version:
        cached = (tensor, tensor._version, _scaled_bf16(tensor, scale))
        _bf16_copies[key] = cached
    return cached[2]


def fuses_linear_epilogue(x):
    """Whether :func:`linear` on ``x`` runs as one oneDNN product with the bias and activation applied to its
    fp32 accumulator: inference (no gradient recorded) under bf16 autocast on a CPU with oneDNN."""
    return (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
            and _bf16_autocast("cpu"))


def linear(x, weight, bias=None, activation=None, scale=None, bias_scale=None):
    """``activation(F.linear(x, scale * weight, bias_scale * bias))`` with ``activation`` None, ``"gelu"`` (erf)
    or ``"silu"`` (``scale``, ``bias_scale``: None or a number multiplying the weight's or the bias's bf16 copy,
    for folding a constant into it).

    At inference under bf16 autocast on a CPU (``fuses_linear_epilogue``) it is one oneDNN product of the bf16
    operands whose bias and activation act on the fp32 accumulator (bf16 output, as autocast's): the same
    function with one rounding fewer, at the cost of the product alone. The bf16 weights come from the
    ``bf16_weight_cache`` when one is active.
    """
    attr, algorithm, function = _ACTIVATIONS[activation]
    if fuses_linear_epilogue(x):
        return _ONEDNN_LINEAR(x.to(torch.bfloat16), _as_bf16(weight, scale), _as_bf16(bias, bias_scale), attr, [],
                              algorithm)
    weight = weight if scale is None else weight * scale
    bias = bias if bias is None or bias_scale is None else bias * bias_scale
    out = F.linear(x, weight, bias)
    return out if function is None else function(out)


def attention(q, k, v, is_causal=False, dropout_p=0.0):
    """Softmax attention of ``q`` (B, H, Lq, D) over ``k``/``v`` (B, H, Lk, D) -> (B, H, Lq, D), as
    ``F.scaled_dot_product_attention`` (scale 1/sqrt(D); ``is_causal`` masks later keys; ``dropout_p`` drops
    attention weights)."""
    if not (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)
    # The products in bf16 on the matrix units, the scale applied to the fp32 accumulator before rounding.
    *batch, length_q, head_dim = q.shape
    scores = torch.baddbmm(q.new_zeros(()), q.reshape(-1, length_q, head_dim), k.reshape(-1, k.shape[-2], head_dim)
                           .transpose(1, 2), beta=0, alpha=head_dim ** -0.5)  # (B H, Lq, Lk)
    if is_causal:
        later = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(later, float("-inf"))
    # The softmax in fp32, as GPU autocast runs it. Its backward, P * (dP - sum(P dP)), subtracts the
    # probability-weighted mean of the incoming gradient, which is often much larger than the result (a single
    # query, values with a common component): from probabilities rounded to bf16 (a bf16 softmax saves its
    # bf16 output) that difference loses most of its bits, and the gradients of q and k with it.
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v.reshape(-1, v.shape[-2], head_dim)).view(*batch, length_q, head_dim)


def quick_gelu(x, inplace=False):
    """``x * sigmoid(1.702 x)`` (CLIP's activation); ``inplace`` overwrites ``x`` when no gradient is recorded."""
    if x.dtype == torch.bfloat16 and torch.is_grad_enabled():
        # silu's backward is one fused kernel; the three operations below would each record their own.
        return F.silu(x * QUICK_GELU_SCALE) * (1 / QUICK_GELU_SCALE)
    gate = (QUICK_GELU_SCALE * x).sigmoid_()  # in place on a temporary: one large allocation fewer
    return x.mul_(gate) if inplace and not torch.is_grad_enabled() else x * gate


def folds_quick_gelu(x):
    """Whether an MLP on ``x`` runs QuickGELU with its 1.702 folded into the weights (training under bf16
    autocast): ``silu(1.702 z) / 1.702 = quick_gelu(z)``, so ``silu`` of the product with 1.702 W and 1.702 b is
    1.702 times the activation, and the next layer takes W / 1.702 (or a layer norm eps * 1.702^2)."""
    return torch.is_grad_enabled() and _bf16_autocast(x.device.type)


def quick_gelu_mlp(x, fc, proj):
    """``proj(quick_gelu(fc(x)))`` for the linear layers ``fc`` (C -> H) and ``proj`` (H -> C).

    Under bf16 autocast it runs as ``silu(x (1.702 W1)^T + 1.702 b1) (W2 / 1.702)^T + b2``, the same
    function with the 1.702 moved into the (bf16 copies of the) weights: in training (``folds_quick_gelu``), and
    at inference with the bias and silu fused into the products (``linear``).
    The (tokens, H) activation is then written by one element-wise operation and its backward by one, where
    the unfolded form takes three each; on a CPU those passes over memory cost more than the products.
    """
    if fuses_linear_epilogue(x):  # inference: the same folding, with silu and the biases fused into the products
        hidden = linear(x, fc.weight, fc.bias, "silu", scale=QUICK_GELU_SCALE, bias_scale=QUICK_GELU_SCALE)
        return linear(hidden, proj.weight, proj.bias, scale=1 / QUICK_GELU_SCALE)
    if not folds_quick_gelu(x):
        return proj(quick_gelu(fc(x), inplace=True))  # in place only without a recorded gradient
    hidden = F.linear(x, fc.weight.to(torch.bfloat16) * QUICK_GELU_SCALE, fc.bias.to(torch.bfloat16) * QUICK_GELU_SCALE)
    return F.linear(F.silu(hidden), proj.weight.to(torch.bfloat16) * (1 / QUICK_GELU_SCALE), proj.bias)


def patch_embedding(images, weight, bias=None, stride=None):
    """Patch tokens (B, N, C), row-major over the patch grid, of ``images`` (B, 3, H, W): the convolution
    ``F.conv2d(images, weight, bias, stride)`` flattened, with ``weight`` (C, 3, p, p) and ``stride`` (sh, sw)
    (default: the patch size)."""
    patch = tuple(weight.shape[-2:])
    stride = tuple(stride) if stride is not None else patch
    if not (images.device.type == "cpu" and _bf16_autocast("cpu")):
        return F.conv2d(images, weight, bias, stride=stride).flatten(2).transpose(1, 2)
    batch, channels, height, width = images.shape
    rows, cols = (height - patch[0]) // stride[0] + 1, (width - patch[1]) // stride[1] + 1
    if stride == patch:  # non-overlapping: the patches are a reshape of the (cropped) image
        crop = images[:, :, :rows * patch[0], :cols * patch[1]]
        columns = crop.reshape(batch, channels, rows, patch[0], cols, patch[1]).permute(0, 2, 4, 1, 3, 5)
        columns = columns.reshape(batch, rows * cols, -1)  # (B, N, 3 p p)
    else:
        columns = F.unfold(images, patch, stride=stride).transpose(1, 2)  # (B, N, 3 p p)
    return F.linear(columns, weight.reshape(weight.shape[0], -1), bias)  # (B, N, C)
