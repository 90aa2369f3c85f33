"""Where a training run's time goes, by phase: data generation, data loading, forward and backward of each
model part (the text path separately), loss, optimiser step, and evaluation (embedding, ranking).

    python tools/profile_training.py [--config_file C] [--iters 20] [--eval] [KEY VALUE ...]

Runs ``--iters`` training iterations of the config's model (the trainer's step) on its training loader
(workers, sampler and transforms as the config says) under ``torch.profiler``; a part of the model is each
direct child module (the image tower's blocks, the text tower, VDFE's text encoder, ASMOE, ...); the backward
of an operation is charged to the part whose forward recorded it (autograd's sequence numbers). With
``--eval`` the training benchmark's own test protocol (``DATASETS.NAMES``) is evaluated once and split into
embedding and ranking. Time outside the named parts (Python, the profiler's own overhead) is shown as
"other". The data generation time is that of this run's ``prepare`` (zero when the dataset already exists:
point ``DATASETS.ROOT_DIR`` at an empty folder to time it). The last line printed is one JSON object.
"""
import argparse
import collections
import contextlib
import json
import time

import torch
from torch.autograd.profiler import record_function

from configs import load_config
from datasets import make_dataloaders
from evaluation import ReIDEvaluator
from evaluation.protocols import protocol_of_bundle
from loss import build_criterion
from processor.launch import DEFAULT_CONFIG
from processor.model_io import build_from_args, model_args_from_dataset
from processor.trainer import Trainer
from utils.device import resolve_device, to_device
from utils.distributed import unwrap
from utils.entrypoint import run_main
from utils.errors import ConfigError

PART_PREFIX = "part: "
# Children of the model that belong to the text path (token embedding + text transformer and its users).
TEXT_PARTS = ("vdfe.text", "attribute_text", "backbone.transformer", "backbone.token_embedding", "prompt_learner")


def model_parts(model):
    """``{name: module}`` of the parts timed separately: the backbone's image and text towers and every other
    direct child of the model (VDFE's text encoder apart from VDFE)."""
    parts = {}
    for name, child in model.named_children():
        if name in ("backbone", "clip") and hasattr(child, "visual"):
            # The image tower is entered through forward_features: time the modules it calls.
            for sub, module in child.visual.named_children():
                parts[f"{name}.visual.{sub}"] = module
            parts[f"{name}.transformer"] = child.transformer
        elif name == "vdfe":
            parts["vdfe.text"] = child.text
            parts["vdfe"] = child
        else:
            parts[name] = child
    return parts


@contextlib.contextmanager
def labelled_forwards(parts):
    """Wrap the forward of each part in a profiler range ``part: <name>`` (innermost part wins)."""
    handles, open_ranges = [], collections.defaultdict(list)

    def enter(name):
        def hook(module, args):
            scope = record_function(PART_PREFIX + name)
            scope.__enter__()
            open_ranges[name].append(scope)
        return hook

    def leave(name):
        def hook(module, args, output):
            open_ranges[name].pop().__exit__(None, None, None)
        return hook

    for name, module in parts.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _part_of(event):
    """The innermost ``part:`` range around a profiler event, or None."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(PART_PREFIX):
            return parent.name[len(PART_PREFIX):]
        parent = parent.cpu_parent
    return None


def attribute(events):
    """Seconds per (phase, part) from the profiler events of the labelled training steps."""
    seconds = collections.Counter()
    part_of_sequence = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            part = _part_of(event)
            if part is not None:
                part_of_sequence.setdefault(event.sequence_nr, part)
    for event in events:
        if event.name.startswith("step: "):
            seconds[("step", event.name[6:])] += event.cpu_time_total / 1e6
        if event.name.startswith(PART_PREFIX):
            seconds[("forward", event.name[len(PART_PREFIX):])] += event.cpu_time_total / 1e6
        if event.name.startswith("autograd::engine::evaluate_function"):
            part = part_of_sequence.get(event.sequence_nr, "loss and glue")
            seconds[("backward", part)] += event.cpu_time_total / 1e6
    return seconds


def nested_forward_seconds(events):
    """Forward seconds of parts nested in other parts (e.g. the text tower called by VDFE's text encoder),
    to subtract from their callers."""
    nested = collections.Counter()
    for event in events:
        if event.name.startswith(PART_PREFIX):
            outer = _part_of(event)
            if outer is not None:
                nested[(outer, event.name[len(PART_PREFIX):])] += event.cpu_time_total / 1e6
    return nested


def profile_training(cfg, bundle, device, iters):
    """Train ``iters`` iterations (the trainer's ``run_step`` on its loader) under the profiler; return
    ({(phase, part): seconds}, wall seconds, model).

    Training phases before the main loop (CLIP-ReID's prompt learning) are not run: the model fills what they
    would leave with fixed random values (``stand_in_for_phases``), which time the same.
    """
    model_args = model_args_from_dataset(bundle.dataset)
    model = build_from_args(cfg, model_args, device)
    model.stand_in_for_phases(torch.Generator().manual_seed(0))
    criterion = build_criterion(cfg, model, model_args["num_classes"]).to(device)
    trainer = Trainer(cfg, model, criterion, bundle.train_loader, None, device, model_args, hooks=[])
    trainer.train_model.train()
    parts = model_parts(model)
    seconds = collections.Counter()
    iterator = iter(bundle.train_loader)
    original_step = trainer.optimizer.step

    def labelled_step(*args, **kwargs):
        with record_function("step: optimiser"):
            return original_step(*args, **kwargs)

    trainer.optimizer.step = labelled_step
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, labelled_forwards(parts):
        for _ in range(iters):
            tick = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(bundle.train_loader)
                batch = next(iterator)
            seconds[("data", "loader wait")] += time.perf_counter() - tick
            with record_function("step: forward, loss, backward, optimiser"):
                trainer.run_step(to_device(batch, device))
    wall = time.perf_counter() - start
    trainer.optimizer.step = original_step
    events = prof.events()
    seconds.update(attribute(events))
    for (outer, inner), value in nested_forward_seconds(events).items():
        seconds[("forward", outer)] -= value
    return seconds, wall, model


def profile_evaluation(cfg, model, bundle, device):
    """Seconds of embedding (data apart) and of ranking the training benchmark's own test protocol."""
    protocol = protocol_of_bundle(bundle)
    model.eval()
    evaluator = ReIDEvaluator(protocol.num_query, cfg)
    tick = time.perf_counter()
    data_wait = 0.0
    iterator = iter(protocol.loader)
    with torch.no_grad():
        while True:
            wait = time.perf_counter()
            batch = next(iterator, None)
            data_wait += time.perf_counter() - wait
            if batch is None:
                break
            batch = to_device(batch, device)
            features = model(batch["images"], **unwrap(model).forward_inputs(batch))  # fp32, as TEST.AMP off
            evaluator.update(features.float(), batch["pids"], batch["camids"], batch["viewids"], batch["timeids"],
                             index=batch["index"])
    embed = time.perf_counter() - tick
    tick = time.perf_counter()
    evaluator.compute(view_mode=protocol.view_mode, time_mode=cfg.TEST.TIME_MODE)
    return {("evaluation", "data wait"): data_wait, ("evaluation", "embedding forward"): embed - data_wait,
            ("evaluation", "ranking"): time.perf_counter() - tick}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", default=DEFAULT_CONFIG)
    parser.add_argument("--iters", type=int, default=20, help="profiled training iterations (default 20)")
    parser.add_argument("--eval", action="store_true", help="also evaluate the first test protocol once")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE")
    args = parser.parse_args()
    if args.iters < 1:
        raise ConfigError("--iters must be >= 1")
    cfg = load_config(args.config_file, args.opts)
    device = resolve_device(cfg.MODEL.DEVICE)
    torch.manual_seed(cfg.SOLVER.SEED)
    tick = time.perf_counter()
    bundle = make_dataloaders(cfg)
    seconds = collections.Counter({("data", "generation + dataset"): time.perf_counter() - tick})
    train_seconds, wall, model = profile_training(cfg, bundle, device, args.iters)
    seconds.update(train_seconds)
    named = sum(v for (phase, _), v in train_seconds.items() if phase in ("data", "forward", "backward"))
    named += train_seconds[("step", "optimiser")]
    seconds[("other", "python glue")] = max(0.0, wall - named)
    if args.eval:
        seconds.update(profile_evaluation(cfg, model, bundle, device))
    per_iter = {f"{phase}/{part}": round(value / args.iters, 5) for (phase, part), value in seconds.items()
                if phase not in ("evaluation",) and part != "generation + dataset"}
    print(f"{cfg.MODEL.ARCH_NAME}, batch {cfg.SOLVER.IMS_PER_BATCH}, {args.iters} iterations, "
          f"{torch.get_num_threads()} threads, {cfg.DATALOADER.NUM_WORKERS} workers; seconds per iteration:")
    for (phase, part), value in sorted(seconds.items(), key=lambda item: -item[1]):
        scale = 1 if phase == "evaluation" or part == "generation + dataset" else 1 / args.iters
        print(f"  {phase:<10} {part:<28} {value * scale:9.4f}{'  (once)' if scale == 1 else ''}")
    print(json.dumps({"config": args.config_file, "iters": args.iters, "wall_per_iter": round(wall / args.iters, 5),
                      "per_iter": per_iter,
                      "once": {f"{p}/{q}": round(v, 4) for (p, q), v in seconds.items()
                               if p == "evaluation" or q == "generation + dataset"}}))


if __name__ == "__main__":
    run_main(main)
