"""CPU threads per process: the sizing rule, real processes sharing the cores of this machine, and a training
run that logs the threads it uses."""
import os
import re
import subprocess
import sys

import pytest

from datasets.synthetic import SynthConfig, generate_synthag
from tests.fixtures import BASELINE, REPO_ROOT, check_ok, run_script, tiny
from utils.allocator import has_glibc_allocator
from utils.threads import available_cores, plan_threads


@pytest.mark.parametrize("cores, processes, workers, device, expected", [
    (16, 1, 8, "cpu", 16),  # on the CPU the main process computes: its whole share
    (16, 2, 8, "cpu", 8),  # two processes: half each
    (2, 3, 0, "cpu", 1),  # never below one
    (16, 2, 4, "cuda", 4),  # on CUDA the data workers take their cores from the share
    (16, 4, 8, "cuda", 1),
])
def test_each_process_takes_its_share_of_the_cores(cores, processes, workers, device, expected):
    plan = plan_threads(cores, processes, workers, device)
    assert plan.threads == expected
    assert f"{cores} cores shared by {processes}" in plan.reason


def test_the_config_and_omp_num_threads_override_the_share():
    assert plan_threads(16, 4, 0, "cpu", requested=3, env_threads=5) == (3, "set by the config")
    assert plan_threads(16, 4, 0, "cpu", env_threads=5) == (5, "set by OMP_NUM_THREADS")


# A process that takes its share, signals it, waits for the other, re-plans, and reports.
SHARER = """
import os, sys, time, torch
from utils.threads import start_core_share, rebalance_core_share
folder, me, other = sys.argv[1:4]

def signal(name):
    open(os.path.join(folder, name), "w").close()

def wait(name):
    while not os.path.exists(os.path.join(folder, name)):
        time.sleep(0.02)

start_core_share(folder=folder)
signal("ready-" + me)
wait("ready-" + other)
both = rebalance_core_share()
print("both", both.threads, torch.get_num_threads(), flush=True)
signal("both-" + me)
wait("both-" + other)
if me == "a":
    sys.exit(0)  # unregisters at exit
deadline = time.time() + 60
while time.time() < deadline and len([n for n in os.listdir(folder) if n.isdigit()]) > 1:
    time.sleep(0.02)  # until process a has unregistered
alone = rebalance_core_share()
print("alone", alone.threads, torch.get_num_threads(), flush=True)
"""


def test_two_real_processes_share_the_cores_and_the_survivor_takes_them_back(tmp_path):
    folder = tmp_path / "shares"
    script = tmp_path / "sharer.py"
    script.write_text(SHARER)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = REPO_ROOT
    procs = {me: subprocess.Popen([sys.executable, str(script), str(folder), me, other], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
             for me, other in (("a", "b"), ("b", "a"))}
    outputs = {me: proc.communicate(timeout=120) for me, proc in procs.items()}
    for me, proc in procs.items():
        assert proc.returncode == 0, outputs[me][1][-2000:]
    cores = available_cores()
    shared = max(1, cores // 2)
    assert f"both {shared} {shared}" in outputs["a"][0]
    assert f"both {shared} {shared}" in outputs["b"][0]
    assert f"alone {cores} {cores}" in outputs["b"][0]
    assert not [name for name in os.listdir(folder) if name.isdigit()]  # both unregistered at exit


def test_a_registration_of_an_ended_process_is_ignored_and_removed(tmp_path):
    folder = tmp_path / "shares"
    folder.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (folder / str(ended.pid)).write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = REPO_ROOT
    code = ("import sys, torch; from utils.threads import start_core_share; "
            "plan = start_core_share(folder=sys.argv[1]); print(plan.threads, torch.get_num_threads())")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(available_cores())] * 2
    assert not (folder / str(ended.pid)).exists()


@pytest.mark.parametrize("setting", ["auto", "config"])
def test_a_training_run_logs_the_threads_it_uses(setting, tmp_path):
    root = str(tmp_path / "data")
    generate_synthag(root, SynthConfig(num_ids=8, images_per_id=8, height=64, width=32, seed=0), num_workers=1)
    out = str(tmp_path / "run")
    extra = ["DIST.CPU_THREADS", "1", "DIST.KEEP_FREED_CPU_MEMORY", "False"] if setting == "config" else []
    # An empty OMP_NUM_THREADS counts as unset (run_script passes this environment on otherwise).
    result = run_script(["train_svpr.py", "--config_file", BASELINE, *tiny(root, out, epochs=1, extra=extra)],
                        env={"OMP_NUM_THREADS": ""})
    check_ok(result)
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    if setting == "config":
        assert "CPU threads: 1 per process (set by the config)" in log
        assert "CPU memory" not in log
        return
    assert ("stay in the process for reuse" if has_glibc_allocator() else "has no effect") in log
    # Other runs of this framework on the machine may hold a share at the same time: the rule, not a number.
    match = re.search(r"CPU threads: (\d+) per process \((\d+) cores shared by (\d+) process", log)
    assert match, log[-2000:]
    threads, cores, processes = map(int, match.groups())
    assert cores == available_cores() and processes >= 1 and threads == max(1, cores // processes)
