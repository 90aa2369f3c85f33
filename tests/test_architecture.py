"""The architecture's promises: one registry per kind, a model and a dataset added from outside the
repository's folders (here, this file) train and evaluate through the normal config path, and the
packages import only downwards, without cycles."""
import ast
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from configs import load_config
from datasets import DATASETS, register_dataset
from datasets.bases import ReIDDataset, Sample, list_images
from loss import LOSSES
from model import MODELS, LossSpec, ModelOutput, ReIDModel, register_model
from processor import run_training
from tests.fixtures import REPO_ROOT, run_script
from utils.errors import ConfigError
from utils.registry import Registry, RegistryError

# ---------------------------------------------------------------------------------------------------------
# A toy model and a toy dataset, defined here and nowhere else
# ---------------------------------------------------------------------------------------------------------


@register_model("ToyNet")
class ToyNet(ReIDModel):
    """A two-layer conv net with one BNNeck-free linear head: the smallest model that honours the contract."""

    batch_inputs = ("viewids",)

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.view_embedding = nn.Embedding(max(num_views, 1), 16)
        self.classifier = nn.Linear(16, num_classes)
        self.embedding_dim = self.feature_dim = 16

    def loss_specs(self, cfg):
        return [LossSpec("id", 1.0), LossSpec("triplet", 0.5)]

    def forward(self, images, viewids=None):
        feature = self.body(images) + self.view_embedding(viewids)  # (B, 16)
        if not self.training:
            return feature
        return ModelOutput({"global": self.classifier(feature)}, {"global": feature})


@register_dataset("ToyAG")
class ToyAG(ReIDDataset):
    """``<root>/ToyAG/{train,query,gallery}/<pid>_<camera>_<k>.jpg``; cameras >= 2 are aerial."""

    @property
    def dataset_dir(self):
        return os.path.join(self.root, "ToyAG")

    def read_split(self, split):
        samples = []
        for path in list_images(self.require_dir(os.path.join(self.dataset_dir, split), "ToyAG/<split>/")):
            pid, camera, _ = os.path.basename(path).split("_")
            samples.append(Sample(path, int(pid), int(camera), int(int(camera) >= 2), 0))
        return samples


def write_toy_tree(root, num_ids=8, images_per_split=4):
    """JPEGs whose colour depends on the identity, so the toy model can learn them."""
    rng = torch.Generator().manual_seed(0)
    for split, pids in (("train", range(num_ids)), ("query", range(num_ids, 2 * num_ids)),
                        ("gallery", range(num_ids, 2 * num_ids))):
        folder = os.path.join(root, "ToyAG", split)
        os.makedirs(folder, exist_ok=True)
        for pid in pids:
            for k in range(images_per_split):
                camera = k % 4 if split == "gallery" else (k + 1) % 4
                colour = [int(c) for c in (torch.rand(3, generator=rng) * 40 + torch.tensor([pid * 15 % 255, 80, 160]))]
                Image.new("RGB", (16, 32), tuple(c % 256 for c in colour)).save(
                    os.path.join(folder, f"{pid}_{camera}_{k}.jpg"), quality=95)


def test_a_model_and_a_dataset_defined_outside_the_repository_train_and_evaluate(tmp_path):
    root, out = str(tmp_path / "data"), str(tmp_path / "run")
    write_toy_tree(root)
    cfg = load_config(None, [
        "MODEL.ARCH_NAME", "ToyNet", "MODEL.DEVICE", "cpu", "DATASETS.NAMES", "ToyAG", "DATASETS.TESTS", "('ToyAG',)",
        "DATASETS.ROOT_DIR", root, "INPUT.SIZE_TRAIN", "[32, 16]", "INPUT.SIZE_TEST", "[32, 16]", "INPUT.PADDING", "2",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.NUM_INSTANCE", "2", "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.OPTIMIZER_NAME", "SGD", "SOLVER.BASE_LR", "0.05", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_EPOCHS", "2",
        "SOLVER.EVAL_PERIOD", "1", "TEST.IMS_PER_BATCH", "16", "OUTPUT_DIR", out])
    results = run_training(cfg, torch.device("cpu"))
    assert set(results) == {"ToyAG"} and 0.0 <= results["ToyAG"]["mAP"] <= 1.0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        document = json.load(handle)
    assert document["protocols"]["ToyAG"]["num_query"] == 32 and document["protocols"]["ToyAG"]["benchmark"] == "ToyAG"
    for name in ("checkpoint_last.pth", "model_best.pth", "model_final.pth", "results.csv"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(RegistryError, match="registered twice"):
        register_model("ToyNet")(type("OtherToyNet", (ReIDModel,), {}))
    register_model("ToyNet")(ToyNet)  # the same class again is harmless (e.g. a module imported twice)


@pytest.mark.parametrize("registry, name, close", [
    (MODELS, "CLIP_SVPR_REID", "CLIP_SVPR_ReID"), (DATASETS, "CP2108_ALLL", "CP2108_ALL"),
    (LOSSES, "tripplet", "triplet")])
def test_an_unknown_name_lists_the_close_matches(registry, name, close):
    with pytest.raises(ConfigError, match=f"did you mean '{close}'"):
        registry.get(name)


def test_registry_lists_its_builtin_entries():
    assert {"CLIP_SVPR_ReID", "CLIP_ReID", "CLIP_baseline", "ToyNet"} <= set(MODELS.names())
    assert {"id", "triplet", "view", "attr", "i2t", "center"} <= set(LOSSES.names())
    fresh = Registry("widget", "WIDGET.NAME")
    assert fresh.names() == [] and "x" not in fresh


# ---------------------------------------------------------------------------------------------------------
# Import layers
# ---------------------------------------------------------------------------------------------------------
# A package may import itself and the packages of lower layers; peers of one layer never import each other.
LAYERS = {"utils": 0, "configs": 1, "text": 2, "loss": 3, "solver": 3, "datasets": 3, "model": 4,
          "evaluation": 5, "processor": 6, "tools": 7}


def _module_imports():
    """{module: [(imported module, line)]} for every module of the packages in LAYERS (lazy imports too)."""
    graph = {}
    for package in LAYERS:
        for folder, _, files in os.walk(os.path.join(REPO_ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                tree = ast.parse(open(path, encoding="utf-8").read())
                imported = []
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        imported += [(alias.name, node.lineno) for alias in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        if node.level:  # relative: resolve against this module's package
                            base = module.split(".")[:len(module.split(".")) - node.level +
                                                      (1 if name == "__init__.py" else 0)]
                            target = ".".join(base + ([node.module] if node.module else []))
                        else:
                            target = node.module
                        imported.append((target, node.lineno))
                graph[module] = [(target, line) for target, line in imported if target.split(".")[0] in LAYERS]
    return graph


def test_packages_import_only_downwards():
    wrong = []
    for module, imports in _module_imports().items():
        own = module.split(".")[0]
        for target, line in imports:
            other = target.split(".")[0]
            if other != own and LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_modules():
    graph = _module_imports()
    modules = set(graph)

    def resolve(target):
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target

    edges = {m: {resolve(t) for t, _ in imports} - {None, "", m} for m, imports in graph.items()}
    # A package's __init__ re-exports its modules; only cycles that do not pass through an __init__ count.
    packages = {m for m in modules if os.path.isfile(os.path.join(REPO_ROOT, *m.split("."), "__init__.py"))}
    state, cycle = {}, []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt in packages:
                continue
            if state.get(nxt) == 1:
                cycle.append(path + [nxt])
            elif not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(modules - packages):
        if not state.get(module):
            visit(module, [module])
    assert not cycle, cycle


@pytest.mark.parametrize("form", ["script", "module"])
def test_tools_run_without_path_edits_from_any_folder(form, tmp_path):
    """The editable install makes the packages importable: no tool edits sys.path."""
    script = os.path.join(REPO_ROOT, "tools", "dataset_stats.py")
    target = [script] if form == "script" else ["-m", "tools.dataset_stats"]
    result = run_script([*target, "--help"], cwd=str(tmp_path))
    assert result.returncode == 0 and "CP2108_ALL" in result.stdout, result.stderr
    for name in os.listdir(os.path.join(REPO_ROOT, "tools")):
        if name.endswith(".py"):
            assert "sys.path" not in open(os.path.join(REPO_ROOT, "tools", name), encoding="utf-8").read(), name


# ---------------------------------------------------------------------------------------------------------
# The worked example of docs/architecture.md, copied into a fresh checkout
# ---------------------------------------------------------------------------------------------------------
def example_blocks():
    """``{path: text}`` of the fenced blocks of docs/architecture.md whose first line names a model, dataset or
    Synthetic config file (``# model/<name>.py``, ...)."""
    text = open(os.path.join(REPO_ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    blocks = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        first = block.splitlines()[0]
        match = re.fullmatch(r"# (model/\w+\.py|datasets/\w+\.py|configs/Synthetic/\w+\.yml)", first)
        if match:
            blocks[match.group(1)] = block
    return blocks


def test_the_worked_example_trains_and_evaluates_in_a_fresh_checkout(tmp_path):
    blocks = example_blocks()
    assert sorted(path.split("/")[0] for path in blocks) == ["configs", "datasets", "model"], sorted(blocks)
    checkout = tmp_path / "checkout"
    # The files of this working tree that git would commit (tracked, and new files it does not ignore).
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                             capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and os.path.isfile(os.path.join(REPO_ROOT, name)):
            os.makedirs(checkout / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO_ROOT, name), checkout / name)
    for path, text in blocks.items():
        assert not (checkout / path).exists(), f"{path} would replace a file of the repository"
        (checkout / path).write_text(text, encoding="utf-8")
    config = next(path for path in blocks if path.startswith("configs/"))
    result = run_script(["train_svpr.py", "--config_file", config], cwd=str(checkout),
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = yaml.safe_load((checkout / config).read_text())["OUTPUT_DIR"]
    document = json.load(open(checkout / output / "results.json", encoding="utf-8"))
    (protocol, metrics), = document["protocols"].items()
    assert protocol == "SynthAG_Swapped" and 0 < metrics["mAP"] <= 100
    saved = yaml.safe_load((checkout / output / "config.yaml").read_text())
    assert saved["MODEL"]["ARCH_NAME"] == "TinyCNN" and saved["MODEL"]["TINY_CNN"]["WIDTH"] == 32
