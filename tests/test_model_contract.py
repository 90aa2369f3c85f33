"""Every registered model, checked the same way (as timm and open_clip test every model): it builds from its
Synthetic config, runs its extra training phases, takes one training step, returns a test feature of
``embedding_dim``, converts to the authors' layout and back unchanged, and exports to TorchScript with the same
features. A new model is covered by adding it to the registry and shipping its Synthetic config."""
import glob
import os

import pytest
import torch

from configs import load_config
from datasets import make_dataloaders
from datasets.synthetic import SynthConfig, generate_synthag
from loss import build_criterion
from model import MODELS
from processor.model_io import build_from_args, model_args_from_dataset
from processor.phase_runner import run_phases
from solver import make_optimizer
from tests.fixtures import REPO_ROOT
from tools.export import build_wrapper

BUILT_IN = sorted(name for name in MODELS.names() if MODELS.get(name).__module__.startswith("model."))
SYNTHETIC = {load_config(path).MODEL.ARCH_NAME: path
             for path in sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "Synthetic", "*.yml")))
             if not os.path.basename(path).startswith("Base-")}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=12, images_per_id=8, height=64, width=32, seed=3), num_workers=1)
    return root


def test_every_model_ships_a_synthetic_config():
    assert BUILT_IN and set(BUILT_IN) <= set(SYNTHETIC), sorted(set(BUILT_IN) - set(SYNTHETIC))


def small_config(name, synth_root, output_dir):
    """``name``'s Synthetic config on the small SynthAG of ``synth_root``, on the CPU in fp32."""
    return load_config(SYNTHETIC[name], [
        "MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2",
        "DATASETS.ROOT_DIR", synth_root, "DATASETS.AUTO_GENERATE", "False", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2", "SOLVER.STAGE1.MAX_EPOCHS", "1",
        "SOLVER.STAGE1.IMS_PER_BATCH", "16", "SOLVER.AMP", "False", "OUTPUT_DIR", str(output_dir)])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", BUILT_IN)
def test_stand_in_for_phases_lets_the_main_loop_run_without_them(name, synth_root, tmp_path):
    """What the benchmarks and the profiler do: no extra training phases, the model's fixed random stand-ins in
    their place (``stand_in_for_phases``); the same generator seed gives the same training outputs."""
    cfg = small_config(name, synth_root, tmp_path)
    bundle = make_dataloaders(cfg)
    model_args = model_args_from_dataset(bundle.dataset)
    batch = next(iter(bundle.train_loader))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_from_args(cfg, model_args, torch.device("cpu"))
        model.stand_in_for_phases(torch.Generator().manual_seed(0))
        model.train()
        runs.append(model(batch["images"], **model.forward_inputs(batch)))
    first, second = runs
    for part in ("id_logits", "features", "aux"):  # nested dicts and lists of tensors, compared exactly
        torch.testing.assert_close(getattr(second, part), getattr(first, part), rtol=0, atol=0)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", BUILT_IN)
def test_model_honours_the_contract(name, synth_root, tmp_path):
    cfg = small_config(name, synth_root, tmp_path)
    device = torch.device("cpu")
    bundle = make_dataloaders(cfg)
    model_args = model_args_from_dataset(bundle.dataset)
    torch.manual_seed(0)
    model = build_from_args(cfg, model_args, device)
    run_phases(cfg, model, bundle.dataset, device)

    # One training step moves the weights, with finite loss terms of the names the model asked for.
    criterion = build_criterion(cfg, model, model_args["num_classes"])
    optimizer = make_optimizer(cfg, model)
    batch = next(iter(bundle.train_loader))
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    outputs = model(batch["images"], **model.forward_inputs(batch))
    terms = criterion(outputs, batch)
    assert set(terms) == {spec.name for spec in model.loss_specs(cfg)}
    assert all(torch.isfinite(value) for value in terms.values())
    first_logits = next(iter(outputs.id_logits.values()))
    assert first_logits.shape == (len(batch["pids"]), model_args["num_classes"])
    sum(terms.values()).backward()
    optimizer.step()
    assert any(not torch.equal(before[key], value) for key, value in model.state_dict().items())

    # The test feature has the declared width.
    model.eval()
    with torch.no_grad():
        feature = model(batch["images"], **model.forward_inputs(batch))
    assert feature.shape == (len(batch["pids"]), model.embedding_dim)

    # The authors' layout and back is the identity, and their layout tells the model's sizes.
    state = model.state_dict()
    reference = type(model).to_reference_state_dict(state, cfg)
    back = type(model).from_reference_state_dict(reference, cfg)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[key], state[key]) for key in state)
    sizes = type(model).reference_model_args(reference, cfg)
    assert sizes["num_classes"] == model_args["num_classes"]

    # The TorchScript export computes the same features.
    wrapper = build_wrapper(cfg, model).eval()
    inputs = (batch["images"], *(batch[name] for name in wrapper.id_inputs))
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
        torch.testing.assert_close(traced(*inputs), wrapper(*inputs), rtol=1e-5, atol=1e-5)
