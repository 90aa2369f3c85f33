"""Shared test helpers."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, cwd=REPO_ROOT, env=None, timeout=600):
    """Run a Python script of the repository as a real subprocess; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def set_keys(cfg, overrides):
    """Set dotted config keys (``{"MODEL.SIE_CAMERA": True}``) to Python values in an unfrozen config."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value


@pytest.fixture
def repo_root():
    return REPO_ROOT


def openai_clip_module(name):
    """A module (``"model"`` or ``"simple_tokenizer"``) of OpenAI's installed ``openai-clip`` package.

    Loaded by file path: the package's ``__init__`` needs ``pkg_resources``, which modern setuptools lacks.
    """
    folder = importlib.util.find_spec("clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(f"openai_clip_{name}", os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny tensors gain nothing from two, and waiting for a busy core does cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
