"""Export the test-time model of a checkpoint to ONNX, TorchScript or safetensors.

    python tools/export.py --weights outputs/x/model_final.pth --format onnx --out x.onnx
    python tools/export.py --weights outputs/x/model_final.pth --format safetensors --out x.safetensors

The config stored in the checkpoint is used unless ``--config_file`` is given; ``KEY VALUE`` overrides apply
to either. ONNX and TorchScript models take ``images`` (B, 3, H, W) float32, normalised as in testing, plus
one int64 (B,) tensor per id the model reads (``camids``, ``viewids``, ...; see the printed input names)
and return ``features`` (B, E); the batch axis is dynamic. A model that reads captions gets the generic
test caption baked in. A ``.safetensors`` file holds the model's state dict with the config and the model
sizes as metadata; ``TEST.WEIGHT x.safetensors`` evaluates it. docs/outputs.md has examples.
"""
import argparse
import json
import logging
import os
import re
import warnings

import torch
from torch import nn

from configs import config_from_checkpoint
from processor.model_io import load_trained_model
from text import prompts, tokenize
from utils.checkpoint import load_checkpoint
from utils.entrypoint import run_main
from utils.errors import CheckpointError, ConfigError, UserError
from utils.io import atomic_write
from utils.logger import setup_logger

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "safetensors")
# Batch entries an exported model takes as (B,) int64 inputs; texts are baked in, attributes are labels.
ID_INPUTS = ("camids", "viewids", "timeids")
EXAMPLE_BATCH = 2  # batch size of the example input; the exported batch axis stays dynamic


class ExportError(UserError):
    """The exporter cannot translate the model (reported as one ``error:`` line, exit code 2)."""


class ExportWrapper(nn.Module):
    """``forward(images (B, 3, H, W), *ids (B,)) -> (B, E)``: the model in eval mode with its fixed inputs.

    ``text_tokens`` (1, L), when given, is the caption every image is read with (a buffer, so it travels
    with the exported model).
    """

    def __init__(self, model, text_tokens=None):
        super().__init__()
        self.model = model
        self.id_inputs = [name for name in model.batch_inputs if name in ID_INPUTS]
        self.register_buffer("text_tokens", text_tokens, persistent=False)
        self.eval()

    def forward(self, images, *ids):
        inputs = dict(zip(self.id_inputs, ids))
        if self.text_tokens is not None:
            inputs["text_tokens"] = self.text_tokens.expand(images.shape[0], -1)  # (B, L)
        return self.model(images, **inputs)


def build_wrapper(cfg, model, caption=None):
    """The :class:`ExportWrapper` of ``model``: it reads the test caption when the model takes texts and
    ``MODEL.USE_TEXT`` is on (as ``processor.inference.FeatureExtractor`` does)."""
    tokens = None
    if "text_tokens" in model.batch_inputs and cfg.MODEL.USE_TEXT:
        text = caption if caption is not None else prompts.model_test_caption(cfg)
        tokens = tokenize(text, context_length=cfg.MODEL.TEXT_LEN, truncate=True).long()  # (1, L)
    return ExportWrapper(model, tokens)


def example_inputs(cfg, wrapper):
    """The tracing example: EXAMPLE_BATCH random images of INPUT.SIZE_TEST and zero ids."""
    height, width = cfg.INPUT.SIZE_TEST
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(EXAMPLE_BATCH, 3, height, width, generator=generator)
    return (images,) + tuple(torch.zeros(EXAMPLE_BATCH, dtype=torch.int64) for _ in wrapper.id_inputs)


def _root_cause(exc):
    """First line of the innermost exception of ``exc``'s chain (ANSI colours removed), at most 300 characters."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def export_onnx(wrapper, inputs, out):
    """ONNX through torch's exporter (``torch.export`` graph), opset 18, dynamic batch axis."""
    names = ["images"] + wrapper.id_inputs
    batch = torch.export.Dim("batch", min=1)
    try:
        # dynamic_shapes mirrors forward(images, *ids): the images' spec, then a tuple for the ids.
        torch.onnx.export(wrapper, inputs, out, input_names=names, output_names=["features"],
                          dynamic_shapes=({0: batch}, tuple({0: batch} for _ in inputs[1:])), dynamo=True,
                          opset_version=18, verbose=False)
    except Exception as exc:  # the exporter raises many types, wrapping the one naming the operator
        raise ExportError(f"ONNX export of {type(wrapper.model).__name__} failed: {_root_cause(exc)}") from None
    return names


def probe_inputs(cfg, wrapper, id_counts):
    """A batch unlike the tracing example: another size, and every value of each id input (``id_counts``:
    input name -> number of distinct ids; inputs not named get zeros)."""
    size = max([EXAMPLE_BATCH + 1] + list(id_counts.values())) + 1
    height, width = cfg.INPUT.SIZE_TEST
    images = torch.randn(size, 3, height, width, generator=torch.Generator().manual_seed(1))
    return (images,) + tuple(torch.arange(size) % max(1, int(id_counts.get(name, 1))) for name in wrapper.id_inputs)


def export_torchscript(wrapper, inputs, probe, out):
    """TorchScript by tracing ``inputs``; refused (``ExportError``) when the trace does not reproduce the
    model on ``probe``: a trace fixes Python control flow and tensor-derived Python numbers at the example's
    values, which is only right when they depend on the image size and caption alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # checked on the probe batch below
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
    name = type(wrapper.model).__name__
    try:
        difference = float((traced(*probe) - wrapper(*probe)).abs().max())
    except RuntimeError as exc:
        raise ExportError(f"TorchScript trace of {name} fails on a batch with other ids: "
                          f"{_root_cause(exc)}; use --format onnx") from None
    if difference > 1e-4:
        raise ExportError(f"TorchScript trace of {name} differs from the model by {difference:.3g} on a batch "
                          f"with other ids (it depends on values the trace fixed); use --format onnx")
    atomic_write(out, lambda handle: torch.jit.save(traced, handle))


def export_safetensors(cfg, model, model_args, epoch, out):
    """The state dict (every tensor its own contiguous copy: safetensors refuses shared storage) with the
    config YAML, ``model_args`` JSON and epoch as metadata."""
    from safetensors.torch import save

    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in model.state_dict().items()}
    metadata = {"format": "pt", "config": cfg.dump(), "model_args": json.dumps(model_args),
                "epoch": "" if epoch is None else str(int(epoch))}
    # Serialised in memory (the size of the weights), then written atomically with the umask's mode
    # (safetensors' own save_file creates files readable by the owner only).
    atomic_write(out, save(tensors, metadata=metadata))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="checkpoint (model_final.pth, model_best.pth, ...)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--config_file", default="", help="training config (default: the one in the checkpoint)")
    parser.add_argument("--caption", default=None,
                        help="caption baked into models that read texts (default: the generic test caption)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides as KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_logger()
    state = load_checkpoint(args.weights)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {args.weights}: expected a dict of weights, got {type(state).__name__}")
    cfg, _ = config_from_checkpoint(args.weights, args.config_file, args.opts, state=state)
    # Exports are built on the CPU: traced graphs would otherwise record the device of their constants.
    model, epoch = load_trained_model(cfg, args.weights, torch.device("cpu"), state=state)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    model_args = state.get("model_args")
    if args.format == "safetensors":
        if model_args is None:
            raise ConfigError(f"checkpoint {args.weights} stores no model_args (a bare state dict): export the "
                              f"model_final.pth or model_best.pth written by training")
        export_safetensors(cfg, model, model_args, epoch, args.out)
        print(f"wrote {args.out}: {len(model.state_dict())} tensors + config and model_args metadata")
        return
    wrapper = build_wrapper(cfg, model, args.caption)
    inputs = example_inputs(cfg, wrapper)
    with torch.no_grad():
        if args.format == "onnx":
            names = export_onnx(wrapper, inputs, args.out)
        else:
            counts = {"camids": (model_args or {}).get("num_cameras", 1),
                      "viewids": (model_args or {}).get("num_views", 1)}
            export_torchscript(wrapper, inputs, probe_inputs(cfg, wrapper, counts), args.out)
            names = ["images"] + wrapper.id_inputs
    print(f"wrote {args.out}: inputs {', '.join(names)} -> features (B, {model.embedding_dim})")


if __name__ == "__main__":
    run_main(main)
