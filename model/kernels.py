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

    Training under bf16 autocast it runs as ``silu(x (1.702 W1)^T + 1.702 b1) (W2 / 1.702)^T + b2``, the same
    function with the 1.702 moved into the (bf16 copies of the) weights (``folds_quick_gelu``).
    The (tokens, H) activation is then written by one element-wise operation and its backward by one, where
    the unfolded form takes three each; on a CPU those passes over memory cost more than the products.
    """
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
