"""What the test modules share: the repository's location, running its scripts as real subprocesses, free
ports for torchrun, the Synthetic configs and the overrides that shrink them, and tiny random-weight model
configs. (``conftest.py`` holds the pytest fixtures; helpers live here so that test modules never import each
other.)"""
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import torch
from PIL import Image

from configs import get_cfg_defaults, read_config
from utils.checkpoint import load_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE = "configs/Synthetic/clip_baseline.yml"
CLIPREID = "configs/Synthetic/clipreid.yml"
SVPR = "configs/Synthetic/svpr_reid.yml"

#: Small CLIP and ImageNet-ViT backbones (config sizes) for models built in a test.
TINY_CLIP = {"EMBED_DIM": 32, "VISION_WIDTH": 64, "VISION_LAYERS": 2, "VISION_HEADS": 2, "TEXT_WIDTH": 64,
             "TEXT_LAYERS": 2, "TEXT_HEADS": 2}
TINY_VIT = {"EMBED_DIM": 48, "DEPTH": 2, "NUM_HEADS": 3}
#: MODEL.NAME of the ImageNet-ViT baselines: the backbone with a view token for VDT and SeCap.
VIT_BACKBONES = {"ViT": "vit_base_patch16_224_TransReID", "TransReID": "vit_base_patch16_224_TransReID",
                 "VDT": "vit_base_patch16_224_VDT", "SeCap": "vit_base_patch16_224_VDT"}


def run_script(args, cwd=REPO_ROOT, env=None, timeout=600):
    """Run a Python script of the repository as a real subprocess; return the CompletedProcess.

    The child starts with SIGINT's default action, as from an interactive shell: a suite started in the
    background (``pytest &``) would otherwise pass on the ignored SIGINT, and the interruption tests with it."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_default_sigint)


def children(pid):
    """Process ids of the children of ``pid`` (empty once it has ended; Linux ``/proc``)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def final_weights(output_dir):
    """The model weights of ``OUTPUT_DIR/model_final.pth``."""
    return load_checkpoint(os.path.join(output_dir, "model_final.pth"))["model"]


def assert_bit_identical(a, b):
    """Two state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@contextlib.contextmanager
def process_state_restored():
    """Run an entry point in this process: afterwards the logging handlers, the SIGTERM handler and the cached
    fault plan are as before (``run_main`` installs its own)."""
    from processor import faults

    root = logging.getLogger()
    handlers, sigterm = root.handlers[:], signal.getsignal(signal.SIGTERM)
    faults._planned.cache_clear()
    try:
        yield
    finally:
        faults._planned.cache_clear()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        signal.signal(signal.SIGTERM, sigterm)


def check_ok(result):
    """Assert that a ``run_script`` result exited 0, showing the ends of its output otherwise."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_one_error_line(code, lines, *needles):
    """An entry point's exit ``code`` and non-empty stderr ``lines``: exit code 2 and one ``error:`` line that
    contains every one of ``needles``."""
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def free_port():
    """A TCP port nothing listens on now (for ``torchrun --master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_keys(cfg, overrides):
    """Set dotted config keys (``{"MODEL.SIE_CAMERA": True}``) to Python values in an unfrozen config."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value


def tiny_cfg(arch, config_file=None, opts=(), clip=None, vit=None, size=(64, 32), frozen=False, **keys):
    """A config for a tiny random-weight ``arch`` on the CPU: ``config_file`` (default: the framework
    defaults), the small backbones (``clip`` / ``vit`` update :data:`TINY_CLIP` / :data:`TINY_VIT`), input
    ``size``, then ``opts`` (``KEY VALUE`` strings, as on the command line) and ``keys`` (dotted keys to Python
    values). ``frozen`` freezes it."""
    cfg = read_config(config_file, freeze=False)[0] if config_file else get_cfg_defaults()
    cfg.MODEL.ARCH_NAME = arch
    cfg.MODEL.RANDOM_INIT = True
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.FREEZE_TEXT = True
    set_keys(cfg, {f"MODEL.CLIP.{key}": value for key, value in {**TINY_CLIP, **(clip or {})}.items()})
    set_keys(cfg, {f"MODEL.VIT.{key}": value for key, value in {**TINY_VIT, **(vit or {})}.items()})
    if arch in VIT_BACKBONES:
        cfg.MODEL.NAME = VIT_BACKBONES[arch]
        cfg.MODEL.SECAP.PROMPT_LEN = 4
    cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_TEST = list(size), list(size)
    cfg.merge_from_list(list(opts))
    set_keys(cfg, keys)
    if frozen:
        cfg.freeze()
    return cfg


def tiny(root, output_dir, epochs=2, workers=0, extra=()):
    """Command-line overrides that shrink a Synthetic config to seconds on a CPU."""
    return [
        "MODEL.DEVICE", "cpu", "MODEL.CLIP.EMBED_DIM", "32", "MODEL.CLIP.VISION_WIDTH", "64",
        "MODEL.CLIP.VISION_LAYERS", "2", "MODEL.CLIP.VISION_HEADS", "2", "MODEL.CLIP.TEXT_WIDTH", "32",
        "MODEL.CLIP.TEXT_LAYERS", "1", "MODEL.CLIP.TEXT_HEADS", "2", "MODEL.TEXT_LEN", "90",
        "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "4",
        "DATASETS.ROOT_DIR", root, "DATASETS.AUTO_GENERATE", "False",
        "DATALOADER.NUM_WORKERS", str(workers), "DATALOADER.NUM_INSTANCE", "4", "SOLVER.IMS_PER_BATCH", "16",
        "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_EPOCHS", str(epochs),
        "SOLVER.EVAL_PERIOD", "1", "SOLVER.LOG_PERIOD", "2", "SOLVER.STAGE1.MAX_EPOCHS", "2",
        "SOLVER.STAGE1.IMS_PER_BATCH", "16", "TEST.IMS_PER_BATCH", "32", "OUTPUT_DIR", output_dir,
        # fp32 whatever the CPU: the same numerics on every machine (tests/test_precision.py covers the others).
        "SOLVER.CPU_AMP", "float32", *extra]


def openai_clip_module(name):
    """A module (``"model"`` or ``"simple_tokenizer"``) of OpenAI's installed ``openai-clip`` package.

    Loaded by file path: the package's ``__init__`` needs ``pkg_resources``, which modern setuptools lacks.
    """
    folder = importlib.util.find_spec("clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- tiny benchmarks on disk, made of real JPEG files -----------------------------------------------------
def jpeg(path, shade=0):
    """A small real JPEG at ``path`` (folders created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 16), (shade % 256, 60, 120)).save(path, quality=90)



# (pid, camera, time) per split; cameras < 23 ground, >= 23 aerial. pid 300 is a query-only identity.
TRAIN = [(10, 1, 1), (10, 23, 1), (3, 2, 0), (3, 24, 1), (3, 24, 0), (7, 5, 1), (7, 30, 1), (-1, 4, 1)]
GALLERY = [(100, 1, 1), (100, 25, 1), (100, 2, 0), (101, 3, 1), (101, 26, 0), (102, 7, 1)]
QUERY = [(100, 23, 1), (100, 4, 1), (101, 8, 1), (101, 27, 1), (102, 31, 0), (300, 9, 1), (300, 28, 1)]
VALUES = {"Accessories": ["backpack", "none", "unknown"], "Feet": ["boots", "sneakers", "unknown"],
          "Glasses": ["yes", "no", "unknown"], "Head Accessories": ["hat", "none", "unknown"],
          "Holding Phone": ["yes", "no", "unknown"], "Lower Clothing": ["pants", "skirt", "unknown"],
          "Lower Color": ["black", "blue", "unknown"], "Lower Style": ["plain", "striped", "unknown"],
          "Pose": ["standing", "walking", "unknown"], "Upper Clothing": ["shirt", "coat", "unknown"],
          "Upper Color": ["red", "green", "unknown"], "Upper Style": ["plain", "logo", "unknown"]}


def name_of(pid, camera, time, index):
    if pid < 0:
        return f"-1_{camera:02d}_{time}_0_{index:03d}.jpg"
    return f"{pid:04d}_{camera:02d}_{time}_{index % 3}_{index:03d}.jpg"


def entry(pid, view, time):
    """A full annotation, different for each (pid, view, time), with 'Pose' missing for view 1."""
    values = {name: choices[(pid + 2 * view + time) % 2] for name, choices in VALUES.items()}
    if view == 1:
        del values["Pose"]
    return values


def make_cp2108_tree(root, layout="versioned", folder="CP2108", annotations=True, missing_keys=()):
    """CP2108 fixture: real JPEGs, split files, attribute JSONs (some (pid, view, time) keys left out)."""
    base = os.path.join(root, folder)
    images = os.path.join(base, "images_v100" if layout == "versioned" else "images")
    os.makedirs(os.path.join(images, "sub"))
    splits = {}
    index = 0
    for split, rows in (("train", TRAIN), ("gallery", GALLERY), ("query", QUERY)):
        lines = []
        for pid, camera, time in rows:
            name = name_of(pid, camera, time, index)
            Image.new("RGB", (16, 32), ((pid * 7) % 256, camera * 5, time * 200)).save(
                os.path.join(images, "sub", name), quality=90)
            lines.append(f"sub/{name}")
            index += 1
        splits[split] = lines
    for split, lines in splits.items():
        if layout == "versioned":
            os.makedirs(os.path.join(base, "split_v100"), exist_ok=True)
            path = os.path.join(base, "split_v100", f"{split}_v100.txt")
        else:
            path = os.path.join(base, f"{split}.txt")
            lines = [f"images/{line}" for line in lines]  # the released files carry the folder
        with open(path, "w") as f:
            f.write("\r\n".join(lines) + "\r\n\n")
    if annotations:
        keys = {(p, int(c >= 23), t) for p, c, t in TRAIN + GALLERY + QUERY if p >= 0}
        labels = {f"{p}_{v}_{t}": entry(p, v, t) for p, v, t in sorted(keys) if (p, v, t) not in missing_keys}
        with open(os.path.join(base, "attributes_labeled_qwen.json"), "w") as f:
            json.dump(labels, f)
        with open(os.path.join(base, "attr_translation_idx.json"), "w") as f:
            json.dump({name: {v: i for i, v in enumerate(choices)} for name, choices in VALUES.items()}, f)
        with open(os.path.join(base, "attribute_captions_doubao.json"), "w") as f:
            json.dump({f"{p}_{v}_{t}": f"caption {p} {v} {t}" for p, v, t in sorted(keys)}, f)
    return base



def make_vehicleid_tree(root, num_test=30, per_vehicle=4):
    """VehicleID fixture: 3 training vehicles, ``num_test`` test vehicles of ``per_vehicle`` images each."""
    base = os.path.join(root, "VehicleID_V1.0")
    split_dir = os.path.join(base, "train_test_split")
    os.makedirs(split_dir)
    index = 0

    def add(pid):
        nonlocal index
        index += 1
        jpeg(os.path.join(base, "image", f"{index:07d}.jpg"), shade=index)
        return f"{index:07d} {pid}"

    train = [add(pid) for pid in (30, 30, 8, 8, 1000)]
    test = [add(2000 + v) for v in range(num_test) for _ in range(per_vehicle)]
    other = [add(5000 + v) for v in range(2) for _ in range(2)]
    for name, lines in (("train_list.txt", train), ("test_list_800.txt", test), ("test_list_1600.txt", other)):
        with open(os.path.join(split_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return base


def temporaries(folder):
    """Files below ``folder`` that look like a temporary file of an interrupted write (``.tmp`` in the name)."""
    return [os.path.join(path, name) for path, _, names in os.walk(folder) for name in names
            if name.startswith(".tmp") or ".tmp" in name]


def current_umask():
    """This process's umask (set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_entry_point(main, argv, capsys):
    """``(exit code, stdout, stderr lines)`` of a tool's ``main(argv)`` in this process under the entry points'
    error contract (``utils.entrypoint.run_main``); 0 when it returns."""
    from utils.entrypoint import run_main

    capsys.readouterr()
    try:
        run_main(lambda: main(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()
