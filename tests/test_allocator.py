"""DIST.KEEP_FREED_CPU_MEMORY: freed CPU buffers stay in the process, so a step that allocates the same large
buffers again does not fault fresh pages in (counted with getrusage in a real subprocess). That a training run
applies and logs it is checked in test_threads.py, next to the thread sizing of the same process set-up."""
import json
import subprocess
import sys

import pytest

from tests.fixtures import REPO_ROOT
from utils.allocator import has_glibc_allocator

# A 'step': allocate and write four 48 MB buffers, free them; the faults of 5 steps after 4 first ones (the
# heap settles into its layout over the first two or three).
PROBE = r"""
import json, resource, sys
import torch
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "keep":
    from utils.allocator import retain_freed_cpu_memory
    assert retain_freed_cpu_memory()
def step():
    buffers = [torch.empty(12 * 2 ** 20).fill_(1.0) for _ in range(4)]
    return sum(float(b[0]) for b in buffers)
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode):
    result = subprocess.run([sys.executable, "-c", PROBE, REPO_ROOT, mode], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not has_glibc_allocator(), reason="the thresholds exist only in glibc's allocator")
def test_freed_buffers_are_reused_without_page_faults():
    pages = 5 * 4 * 48 * 2 ** 20 // 4096  # what faulting every buffer in anew costs
    default, kept = _faults("default"), _faults("keep")
    assert default > pages // 2, default
    assert kept < pages // 50, kept
