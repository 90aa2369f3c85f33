"""Shared test helpers."""
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, cwd=REPO_ROOT, env=None, timeout=600):
    """Run a Python script of the repository as a real subprocess; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def repo_root():
    return REPO_ROOT
