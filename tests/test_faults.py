"""Nothing lost under any fault (docs/failures.md, "Runs, checkpoints and disks"): a run killed many times at
random moments, a second run into a live run's folder, damaged checkpoints, a full disk, a killed evaluation
and training data changed before a resume. Real processes, real signals, real files and, as root, a real
size-limited file system (tmpfs).

Every training here is the same tiny CLIP-ReID run (3 prompt-learning epochs, then 4 epochs, 2 loader workers),
so that one uninterrupted run, the module's ``reference``, is what every interrupted one must end with, bit for
bit. (An epoch's augmentations depend on the number of loader workers, so runs without workers are interrupted
before they complete an epoch: the epochs that survive are trained with 2, as in the reference.)
"""
import contextlib
import errno
import gc
import hashlib
import importlib
import io
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from configs import get_cfg_defaults
from datasets.bases import Sample
from datasets.loader import ReIDDataLoader
from evaluation.embedding import plot_embedding
from evaluation.html_report import write_html_report
from model import build_model
from processor.inference import FeatureExtractor
from processor.metrics_log import COLUMNS, MetricsLogHook, plot_curves, read_metrics
from processor.preflight import check_disk_space, check_resume_data, checkpoint_space
from processor.run_state import describe_data_change, training_data_fingerprint
from tests.fixtures import (CLIPREID, REPO_ROOT, assert_bit_identical, check_ok, final_weights,
                            process_state_restored, run_script, temporaries, tiny, tiny_cfg)
from utils.checkpoint import load_checkpoint, load_newest_intact, save_checkpoint
from utils.entrypoint import run_main
from utils.errors import CheckpointError, DataError
from utils.io import DiskFullError, atomic_write

pytestmark = pytest.mark.slow

FAULT_PLAN = "SVPR_TEST_INTERRUPT"
EPOCHS, STAGE1_EPOCHS = 4, 3
MIN_ITERATIONS = 5  # every epoch of the tiny run has at least this many batches
HANG_GUARD = 300  # seconds; only against hangs, never a timing assertion
EXIT_CODES = {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}
WORKERS = 2  # loader workers of the reference run


def overrides(root, output_dir, workers):
    # One evaluation, at the end; no TensorBoard (its import is a tenth of a start's cost): what is tested
    # here are checkpoints, results, pictures and metrics.
    return tiny(root, output_dir, EPOCHS, workers, extra=[
        "SOLVER.STAGE1.MAX_EPOCHS", str(STAGE1_EPOCHS), "SOLVER.LOG_PERIOD", "1", "SOLVER.EVAL_PERIOD", "100",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TESTS", "('SynthAG_AG',)", "SOLVER.TENSORBOARD", "False"])


def train_args(root, output_dir, workers=WORKERS, resume=False):
    return ["train_svpr.py", "--config_file", CLIPREID, *(["--resume"] if resume else []),
            *overrides(root, output_dir, workers)]


def train(root, output_dir, resume=False):
    return run_script(train_args(root, output_dir, resume=resume), env={"OMP_NUM_THREADS": "1", FAULT_PLAN: ""})


def run_in_process(script, args):
    """``(exit code, stderr)`` of ``python <script>.py args`` run in this process, for runs that stop before they
    train (no worker, no signal; a start saved is seconds of imports). Logging, the SIGTERM handler and
    ``sys.argv`` are restored afterwards; a run that got as far as locking its OUTPUT_DIR keeps it locked for
    as long as this process lives, as any run does."""
    argv, plan = sys.argv, os.environ.pop(FAULT_PLAN, None)
    sys.argv = [f"{script}.py", *args]
    stderr = io.StringIO()
    try:
        with process_state_restored(), contextlib.redirect_stderr(stderr):
            run_main(importlib.import_module(script).main)
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
        if plan is not None:
            os.environ[FAULT_PLAN] = plan
    return code, stderr.getvalue()


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LiveRun:
    """A script of the repository running as a real subprocess; the test can wait for its output lines or for
    it to stop itself (a ``SIGSTOP`` fault plan), and signal it."""

    def __init__(self, args, plan=""):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **{FAULT_PLAN: plan})
        # A session of its own, as a job started from a shell: Ctrl-C reaches its whole process group.
        self.process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
                                        start_new_session=True)
        self.lines, self.errors = [], []
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.process.stdout, self.lines), (self.process.stderr, self.errors))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, lines):
        for line in stream:
            with self.changed:
                lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for_line(self, pattern):
        """Whether a line matching ``pattern`` was printed (False once the process ended without one)."""
        regex = re.compile(pattern)
        with self.changed:
            return self.changed.wait_for(lambda: any(regex.search(line) for line in self.lines) or
                                         not self.readers[0].is_alive(), HANG_GUARD) and \
                any(regex.search(line) for line in self.lines)

    def wait_stopped(self):
        """Wait until the process has stopped itself (state T); False when it ended instead."""
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with open(f"/proc/{self.process.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                    return True
            time.sleep(0.02)
        raise TimeoutError("the run never stopped itself")

    def interrupt(self, sent):
        """SIGINT to the process group, as Ctrl-C in a terminal; SIGTERM and SIGKILL to the process alone, as a
        scheduler or the kernel's out-of-memory killer send them (its loader workers notice and exit)."""
        with contextlib.suppress(ProcessLookupError):
            if sent == signal.SIGINT:
                os.killpg(self.process.pid, sent)
            else:
                os.kill(self.process.pid, sent)

    def finish(self):
        self.process.wait(HANG_GUARD)
        for reader in self.readers:
            reader.join(HANG_GUARD)
        self.stdout, self.stderr = "".join(self.lines), "".join(self.errors)
        return self


def the_error_line(returncode, stderr):
    """The one ``error:`` line of a run that must have stopped with exit code 2 and no traceback (the lines
    before it are warnings of libraries)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2 and "Traceback" not in stderr and lines and lines[-1].startswith("error: ") and \
        len([line for line in lines if line.startswith("error:")]) == 1, stderr[-3000:]
    return lines[-1]


def snapshot(folder):
    """{relative path: SHA-256 of the bytes} of every file below ``folder``."""
    found = {}
    for path, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(path, name), "rb") as handle:
                found[os.path.relpath(os.path.join(path, name), folder)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def stage2_epochs_done(output_dir):
    """Epochs of stage 2 in the newest intact checkpoint (-1 before stage 2)."""
    paths = [os.path.join(output_dir, name) for name in ("checkpoint_last.pth", "checkpoint_prev.pth")]
    if not any(os.path.isfile(path) for path in paths):
        return -1
    return load_newest_intact(paths, log=False)[0]["epoch"]


def flip_byte_inside_largest_tensor(path):
    """Change one byte in the middle of the largest tensor record of a torch zip file; the archive stays valid."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        offset = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x10]))


def check_finished(live):
    assert live.process.returncode == 0, live.stdout[-3000:] + live.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory):
    """The uninterrupted run every other training must equal. It stops itself (SIGSTOP) in stage-2 epoch 2;
    meanwhile a fresh run and a ``--resume`` into its folder are started, and the folder's content is taken
    before and after them; then it continues (SIGCONT) and finishes."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    live = LiveRun(train_args(synth_root, out), plan="stage2:epoch=2:iter=1:signal=SIGSTOP")
    assert live.wait_stopped(), live.finish().stderr[-3000:]
    before = snapshot(out)
    intruders = [run_in_process("train_svpr", train_args(synth_root, out, resume=resume)[1:])
                 for resume in (False, True)]
    after = snapshot(out)
    os.kill(live.process.pid, signal.SIGCONT)
    check_finished(live.finish())
    return {"out": out, "weights": final_weights(out), "pid": live.process.pid, "intruders": intruders,
            "before": before, "after": after, "live": live}


# ------------------------------------------------------------------------------------ one run per folder
def test_a_second_run_into_a_live_runs_folder_exits_2_and_changes_nothing(reference):
    for code, stderr in reference["intruders"]:  # (run by this test's process, a second process)
        line = the_error_line(code, stderr)
        assert line.startswith(f"error: OUTPUT_DIR '{reference['out']}' is in use by another run: pid "
                               f"{reference['pid']} on host {socket.gethostname()}") and "train_svpr.py" in line
    assert reference["before"] == reference["after"]  # not one file written, changed or removed
    assert "checkpoint_last.pth" in reference["before"] and "stage1.pth" in reference["before"]
    assert "interrupted" not in reference["live"].stdout


# ----------------------------------------------------------------------------------------------- soak
def test_kill_soak_ends_bit_identical(reference, synth_root, tmp_path):
    """Five ``--resume`` runs in a row (the first a fresh one), each interrupted by a real signal from this test;
    then a last ``--resume`` must end with the reference's weights and leave no temporary file, and after every
    round each checkpoint present must be intact.

    Rounds 1 to 3 stop themselves at a seeded-random batch (a SIGSTOP fault plan); the test sends the signal and
    lets them continue: Ctrl-C (SIGINT to the process group, loader workers included) in stage 1, SIGTERM in
    stage 2 without workers (in the run's first epoch, so that it completes none: see the module docstring),
    SIGKILL in stage 2 with 2 workers. Rounds 4 and 5, with 2 workers, get a seeded-random signal a seeded-random delay
    after the log line of a seeded-random batch: anywhere in training, checkpoint writing, curve drawing,
    evaluation or the final results (a run that ends first is tolerated)."""
    out = str(tmp_path / "soak")
    rng = random.Random(30)
    at_batches = iter([(signal.SIGINT, WORKERS), (signal.SIGTERM, 0), (signal.SIGKILL, WORKERS)])
    for round_number in range(5):
        done = stage2_epochs_done(out)
        resume = round_number > 0
        if round_number < 3:  # at a batch, through the fault plan
            sent, workers = next(at_batches)
            if round_number == 0:
                where = f"stage1:epoch={rng.randint(2, STAGE1_EPOCHS)}:iter=1"
            else:
                epoch = max(done, 0) + 1 if workers != WORKERS else rng.randint(max(done, 0) + 1, EPOCHS)
                where = f"stage2:epoch={epoch}:iter={rng.randint(1, MIN_ITERATIONS)}"
            live = LiveRun(train_args(synth_root, out, workers, resume), plan=f"{where}:signal=SIGSTOP")
            assert live.wait_stopped(), (where, live.finish().stderr[-3000:])
            live.interrupt(sent)
            os.killpg(live.process.pid, signal.SIGCONT)
            live.finish()
            assert live.process.returncode == EXIT_CODES[sent], (where, sent, live.stderr[-3000:])
            if workers != WORKERS:
                assert f"--resume with DATALOADER.NUM_WORKERS 0 instead of {WORKERS}: each loader worker" in live.stdout
        elif done < EPOCHS:  # a random moment after a batch's log line, one epoch before the last where possible
            sent, workers = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL]), WORKERS
            epoch = rng.randint(max(done, 0) + 1, max(done + 1, EPOCHS - 1))
            iteration, delay = rng.randint(1, MIN_ITERATIONS), rng.uniform(0.0, 0.4)
            where = f"{delay:.2f} s after epoch {epoch} iter {iteration}"
            live = LiveRun(train_args(synth_root, out, workers, resume))
            assert live.wait_for_line(rf"epoch {epoch} iter {iteration}/"), live.finish().stderr[-3000:]
            time.sleep(delay)
            live.interrupt(sent)
            live.finish()
            assert live.process.returncode in (EXIT_CODES[sent], 0), (where, sent, live.stderr[-3000:])
        else:
            break
        if sent != signal.SIGKILL:
            assert "Traceback" not in live.stderr, (where, sent, live.stderr[-3000:])
        else:  # at once, a second process can take the killed run's lock
            probe = subprocess.run([sys.executable, "-c", f"from utils.run_lock import claim_folder; "
                                    f"claim_folder({out!r})"], cwd=REPO_ROOT, capture_output=True, text=True)
            assert probe.returncode == 0, (where, probe.stderr)
        for name in os.listdir(out):  # a kill never leaves a damaged checkpoint
            if name.endswith(".pth"):
                load_checkpoint(os.path.join(out, name))
    check_ok(train(synth_root, out, resume=True))
    assert_bit_identical(reference["weights"], final_weights(out))
    assert not temporaries(out)


def test_an_interrupt_while_loader_workers_start_comes_after_and_leaves_no_half_built_loader(monkeypatch):
    """Ctrl-C just as an epoch's loader starts its workers (found by the soak: PyTorch's half-built iterator
    then printed "Exception ignored ... AttributeError: '_workers_status'" with a traceback)."""
    class InterruptedBatches(torch.utils.data.Sampler):
        def __iter__(self):  # runs while the loader's iterator is being built
            signal.raise_signal(signal.SIGINT)
            return iter([[0, 1], [2, 3]])

        def __len__(self):
            return 2

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    # Python's own Ctrl-C handler, also when the tests run in the background (which starts them with SIGINT ignored).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        loader = ReIDDataLoader(list(range(4)), batch_sampler=InterruptedBatches(), num_workers=2)
        with pytest.raises(KeyboardInterrupt):
            next(iter(loader))
        gc.collect()
        assert not unraisable, [str(item.exc_value) for item in unraisable]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


# ---------------------------------------------------------------------------------- damaged checkpoints
def test_checksum_catches_a_changed_tensor_byte_and_a_truncated_file(tmp_path):
    path = str(tmp_path / "checkpoint_last.pth")
    weights = OrderedDict(w=torch.arange(4096.0), b=torch.ones(3))
    weights._metadata = OrderedDict({"": {"version": 1}})
    save_checkpoint({"model": weights, "epoch": 3, "config": "A: 1\n"}, path)
    loaded = load_checkpoint(path)
    assert list(loaded) == ["model", "epoch", "config"] and torch.equal(loaded["model"]["w"], weights["w"])
    flip_byte_inside_largest_tensor(path)
    changed = torch.load(path, weights_only=True)  # the zip is still valid: torch.load alone does not notice
    assert not torch.equal(changed["model"]["w"], weights["w"])
    with pytest.raises(CheckpointError, match="is damaged: its content does not match the SHA-256 checksum"):
        load_checkpoint(path)
    truncated = str(tmp_path / "truncated.pth")
    save_checkpoint({"model": weights, "epoch": 3}, truncated)
    with open(truncated, "r+b") as handle:
        handle.truncate(os.path.getsize(truncated) // 2)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(truncated)
    foreign = str(tmp_path / "authors.pth")  # a file without a checksum, as the authors' releases
    torch.save({"w": torch.ones(2)}, foreign)
    assert torch.equal(load_checkpoint(foreign)["w"], torch.ones(2))
    with pytest.raises(CheckpointError) as error:
        load_newest_intact([path, truncated])
    message = str(error.value)
    assert message.startswith("every checkpoint to resume from is damaged") and path in message and \
        truncated in message and "\n" not in message


def test_resume_falls_back_from_a_damaged_checkpoint_and_ends_bit_identical(reference, synth_root, tmp_path):
    out = str(tmp_path / "damaged")
    shutil.copytree(reference["out"], out)
    assert load_checkpoint(os.path.join(out, "checkpoint_prev.pth"))["epoch"] == EPOCHS - 1
    flip_byte_inside_largest_tensor(os.path.join(out, "checkpoint_last.pth"))
    result = train(synth_root, out, resume=True)
    check_ok(result)
    assert f"resuming from {os.path.join(out, 'checkpoint_prev.pth')} instead, the state after epoch {EPOCHS - 1}" \
        in result.stdout
    assert f"epoch {EPOCHS} done" in result.stdout
    assert_bit_identical(reference["weights"], final_weights(out))
    # The damaged file is set aside, not kept as the next checkpoint's previous version.
    assert os.path.isfile(os.path.join(out, "checkpoint_last.pth.damaged"))
    kept = ("checkpoint_last.pth", "checkpoint_prev.pth")
    assert [load_checkpoint(os.path.join(out, name))["epoch"] for name in kept] == [EPOCHS, EPOCHS - 1]

    with open(os.path.join(out, "checkpoint_last.pth"), "r+b") as handle:  # now both damaged
        handle.truncate(1000)
    flip_byte_inside_largest_tensor(os.path.join(out, "checkpoint_prev.pth"))
    before = snapshot(out)
    line = the_error_line(*run_in_process("train_svpr", train_args(synth_root, out, resume=True)[1:]))
    assert line.startswith("error: every checkpoint to resume from is damaged")
    assert "checkpoint_last.pth" in line and "checkpoint_prev.pth" in line
    assert all(before[name] == digest for name, digest in snapshot(out).items() if name.endswith(".pth"))


def test_test_script_and_feature_extractor_refuse_damaged_weights(reference, tmp_path):
    weights = str(tmp_path / "model_final.pth")
    shutil.copy(os.path.join(reference["out"], "model_final.pth"), weights)
    flip_byte_inside_largest_tensor(weights)
    line = the_error_line(*run_in_process("test_svpr", ["--weights", weights]))
    assert line == f"error: checkpoint {weights} is damaged: its content does not match the SHA-256 checksum " \
                   "stored in it (bytes changed on disk)"
    assert not os.path.exists(tmp_path / "test" / "results.json")
    with pytest.raises(CheckpointError, match="is damaged"):
        FeatureExtractor.from_checkpoint(weights)


# ----------------------------------------------------------------------------------------- atomic writes
def test_every_writer_uses_its_own_temporary_file_and_leaves_none(tmp_path):
    """Each writer of a run's files writes through a uniquely named temporary file: files at the fixed names
    earlier versions used (another writer's file in progress, e.g. a second run's) are left alone. A write
    that fails leaves no temporary file and the old content."""
    out = str(tmp_path)
    others = {name: f"another writer's {name}" for name in ("curves.png.tmp.png", "embedding_P.png.tmp.png",
                                                             "report.html.tmp", "metrics.csv.tmp")}
    for name, text in others.items():
        (tmp_path / name).write_text(text)
    rows = [{"kind": "train", "epoch": 1, "iteration": 2, "step": 2, "name": "loss", "value": 1.5}]
    assert plot_curves(rows, os.path.join(out, "curves.png"))
    plot_embedding(os.path.join(out, "embedding_P.png"), np.random.default_rng(0).normal(size=(20, 8)),
                   np.arange(20) % 2, 10, title="P")
    write_html_report(out, {"protocols": {}})
    hook = MetricsLogHook()
    hook.trainer = types.SimpleNamespace(output_dir=out, start_epoch=2, cfg=get_cfg_defaults())
    hook.trainer.cfg.SOLVER.TENSORBOARD = False
    with open(os.path.join(out, "metrics.csv"), "w") as handle:  # a row cut short by a killed run at the end
        handle.write(",".join(COLUMNS) + "\ntrain,1,2,2,loss,1.5\ntrain,1,4,4,lo")
    hook.before_train()
    assert read_metrics(os.path.join(out, "metrics.csv")) == rows
    for name, text in others.items():
        assert (tmp_path / name).read_text() == text
    for name in ("curves.png", "embedding_P.png"):
        assert (tmp_path / name).read_bytes().endswith(b"IEND\xaeB`\x82")
    assert (tmp_path / "report.html").read_text().rstrip().endswith("</html>")

    # Two writers of one file at the same time: the second starts while the first is half way.
    target = os.path.join(out, "results.json")

    def first_writer(handle):
        handle.write(b'{"first": ')
        atomic_write(target, b'{"second": 2}')
        handle.write(b"1}")

    atomic_write(target, first_writer)
    assert (tmp_path / "results.json").read_text() == '{"first": 1}'

    def failing_writer(handle):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"disk full: no space left in '{out}' to write results.json"):
        atomic_write(target, failing_writer)
    assert (tmp_path / "results.json").read_text() == '{"first": 1}'
    assert sorted(os.listdir(out)) == sorted([*others, "curves.png", "embedding_P.png", "report.html", "metrics.csv",
                                              "results.json"])


# ------------------------------------------------------------------------------------------- full disk
@contextlib.contextmanager
def small_file_system(folder, megabytes):
    """A tmpfs of ``megabytes`` mounted on ``folder`` (root only; the test is skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    os.makedirs(folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", folder],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=True)


def fill(folder, leave_bytes):
    """A file that takes all the free space of ``folder``'s file system but ``leave_bytes``."""
    path = os.path.join(folder, "filler")
    free = shutil.disk_usage(folder).free
    with open(path, "wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))
    return path


def test_disk_full_mid_run_is_one_line_keeps_the_last_checkpoint_and_resumes_bit_identical(reference, synth_root,
                                                                                            tmp_path):
    with small_file_system(str(tmp_path / "disk"), 64) as disk:
        out = os.path.join(disk, "run")
        # The run stops itself in stage-2 epoch 2; the disk is filled to 256 KiB; it continues and fails to
        # write the checkpoint after that epoch (2 MB).
        live = LiveRun(train_args(synth_root, out), plan="stage2:epoch=2:iter=1:signal=SIGSTOP")
        assert live.wait_stopped(), live.finish().stderr[-3000:]
        filler = fill(disk, 256 * 1024)
        os.kill(live.process.pid, signal.SIGCONT)
        live.finish()
        line = the_error_line(live.process.returncode, live.stderr)
        assert line.startswith(f"error: disk full: no space left in '{out}' to write checkpoint_last.pth")
        assert not temporaries(out)
        assert load_checkpoint(os.path.join(out, "checkpoint_last.pth"))["epoch"] == 1
        assert load_checkpoint(os.path.join(out, "checkpoint_prev.pth"))["epoch"] == 0
        os.remove(filler)
        check_ok(train(synth_root, out, resume=True))
        assert_bit_identical(reference["weights"], final_weights(out))
        assert not temporaries(out)


def test_a_folder_without_room_for_the_checkpoints_is_refused_before_training(tmp_path):
    with small_file_system(str(tmp_path / "disk"), 8) as disk:
        cfg = tiny_cfg("CLIP_ReID", OUTPUT_DIR=os.path.join(disk, "run"), **{"SOLVER.MAX_EPOCHS": 4,
                                                                          "SOLVER.CHECKPOINT_PERIOD": 2})
        os.makedirs(cfg.OUTPUT_DIR)
        model = build_model(cfg, num_classes=8, num_cameras=2, num_views=2)
        # As docs/failures.md defines it: 3 training states (model + 2 values per trainable parameter) and 4
        # weights files (best, final, 2 periodic), plus 10% and 16 MiB.
        weights = sum(value.numel() * value.element_size() for value in model.state_dict().values())
        state = weights + 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        needed, _ = checkpoint_space(cfg, model)
        assert needed == int((3 * state + 4 * weights) * 1.1) + 16 * 2 ** 20
        with pytest.raises(DiskFullError) as error:
            check_disk_space(cfg, model)
        match = re.fullmatch(rf"not enough disk space in OUTPUT_DIR '{re.escape(cfg.OUTPUT_DIR)}': this run needs "
                             r"about ([\d.]+) MiB for its checkpoints \(3 x [\d.]+ MiB of training state "
                             r"\(checkpoint_last.pth, checkpoint_prev.pth, one being written\) \+ 4 x [\d.]+ MiB of "
                             r"weights .*\), and ([\d.]+) MiB are free; free space or choose another OUTPUT_DIR",
                             str(error.value))
        assert match and abs(float(match[1]) - needed / 2 ** 20) < 0.1 and 7.5 < float(match[2]) <= 8, error.value
        cfg.OUTPUT_DIR = str(tmp_path / "roomy")
        os.makedirs(cfg.OUTPUT_DIR)
        check_disk_space(cfg, model)


# ---------------------------------------------------------------------------------- killed evaluation
def complete(path):
    """Whether ``path`` is a whole file of its kind."""
    with open(path, "rb") as handle:
        data = handle.read()
    if path.endswith(".png"):
        return data.endswith(b"IEND\xaeB`\x82")
    if path.endswith(".json"):
        import json
        json.loads(data)
        return True
    if path.endswith(".html"):
        return data.rstrip().endswith(b"</html>")
    if path.endswith(".csv"):
        return data.endswith(b"\n")
    return True


def test_killed_evaluation_leaves_only_complete_files_and_runs_again(reference, tmp_path):
    weights = os.path.join(str(tmp_path), "weights", "model_final.pth")
    os.makedirs(os.path.dirname(weights))
    shutil.copy(os.path.join(reference["out"], "model_final.pth"), weights)
    out = os.path.join(os.path.dirname(weights), "test")
    command = ["test_svpr.py", "--weights", weights, "TEST.VISUALIZE_TOPK", "3",
               "DATASETS.TESTS", "('SynthAG_AG', 'SynthAG_GA')"]
    # A test run into a folder another process holds is refused, naming it.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from utils.run_lock import lock_folder; "
                               f"lock_folder({out!r}); print('locked', flush=True); sys.stdin.read()"],
                              cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = run_in_process("test_svpr", command[1:])
    finally:
        holder.stdin.close()
        holder.wait(HANG_GUARD)
    assert f"is in use by another run: pid {holder.pid} on host" in the_error_line(*refused)

    # SIGKILL a seeded-random moment after a seeded-random log line of the evaluation: in the first protocol's
    # embedding or pictures, or in the second protocol's (the results and the report come after these).
    rng = random.Random(6)
    anchor = rng.choice([r"loaded .*model_final\.pth", r"wrote \d+ ranked-list pictures of SynthAG_AG",
                         r"test SynthAG_AG: embedded"])
    live = LiveRun(command)
    assert live.wait_for_line(anchor), live.finish().stderr[-3000:]
    time.sleep(rng.uniform(0.0, 0.3))
    os.kill(live.process.pid, signal.SIGKILL)
    assert live.finish().process.returncode == -9, (anchor, live.stdout[-3000:])
    found = [os.path.join(path, name) for path, _, names in os.walk(out) for name in names]
    assert not [path for path in found if not os.path.basename(path).startswith(".tmp-") and not complete(path)]
    # An evaluation stopped after results.json was written (here because report.html cannot be written).
    os.makedirs(os.path.join(out, "report.html"))
    failed = run_script(command)
    line = the_error_line(failed.returncode, failed.stderr)
    assert "report.html" in line and complete(os.path.join(out, "results.json"))
    os.rmdir(os.path.join(out, "report.html"))

    with contextlib.redirect_stdout(io.StringIO()) as stdout:  # the same command again (in this process)
        code, stderr = run_in_process("test_svpr", command[1:])
    assert code == 0, stderr[-3000:]
    assert "an earlier evaluation into" in stdout.getvalue()
    assert not temporaries(out) and not os.path.exists(os.path.join(out, ".evaluation-in-progress"))
    assert all(complete(os.path.join(path, name)) for path, _, names in os.walk(out) for name in names)


# --------------------------------------------------------------------------------- changed training data
def samples(count=24, per_identity=4):
    return [Sample(f"/data/images/{index:03d}.jpg", index // per_identity, index % 2, index % 2, 0, f"caption {index}")
            for index in range(count)]


def test_data_changes_are_described():
    before = training_data_fingerprint(samples(), "/data")
    assert describe_data_change(before, before) == ""
    moved = training_data_fingerprint([s._replace(path=s.path.replace("/data", "/elsewhere")) for s in samples()],
                                      "/elsewhere")
    assert describe_data_change(before, moved) == ""  # the dataset folder itself may move
    fewer = [s._replace(pid=s.pid - 1) for s in samples() if s.pid != 0 and s.path[-7:] not in ("009.jpg", "010.jpg")]
    assert describe_data_change(before, training_data_fingerprint(fewer, "/data")) == \
        "6 images removed; 1 identity removed (6 -> 5 identities)"
    edited = [s._replace(pid=5) if s.path.endswith("001.jpg") else s._replace(camid=9) if s.path.endswith("002.jpg")
              else s for s in samples()] + [Sample("/data/images/new.jpg", 6, 0, 0, 0)]
    assert describe_data_change(before, training_data_fingerprint(edited, "/data")) == \
        "1 image added, 1 relabelled, 1 changed in size or labels; 1 identity added (6 -> 7 identities)"


def test_resume_data_check_and_its_override(tmp_path, caplog):
    path = str(tmp_path / "checkpoint_last.pth")
    save_checkpoint({"epoch": 1, "training_data": training_data_fingerprint(samples(), "/data")}, path)
    cfg = get_cfg_defaults()
    check_resume_data(cfg, path, training_data_fingerprint(samples(), "/data"))
    fewer = training_data_fingerprint(samples()[:-1], "/data")
    with pytest.raises(DataError, match=r"differ from those .* was trained on \(1 image removed\)"):
        check_resume_data(cfg, path, fewer)
    cfg.SOLVER.RESUME_ALLOW_DATA_CHANGE = True
    with caplog.at_level("WARNING"):
        check_resume_data(cfg, path, fewer)
    assert "resuming on changed training data (1 image removed; SOLVER.RESUME_ALLOW_DATA_CHANGE)" in caplog.text
    with pytest.raises(DataError, match="needs the same number of identities for its classifier"):
        check_resume_data(cfg, path, training_data_fingerprint(samples()[:-4], "/data"))


def test_resume_refuses_changed_training_data(reference, synth_root, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    shutil.copytree(synth_root, data)
    shutil.copytree(reference["out"], out)
    split = os.path.join(data, "SynthAG", "train.txt")
    with open(split) as handle:
        names = handle.read().split()
    first, second = sorted({name[:4] for name in names})[:2]
    kept = [name for name in names if not name.startswith(first)]
    kept.remove(next(name for name in kept if name.startswith(second)))
    with open(split, "w") as handle:
        handle.write("\n".join(kept) + "\n")
    before = snapshot(out)
    line = the_error_line(*run_in_process("train_svpr", train_args(data, out, resume=True)[1:]))
    assert line.startswith(f"error: --resume: the training data differ from those {out}/checkpoint_last.pth "
                               f"was trained on (13 images removed; 1 identity removed (8 -> 7 identities))")
    assert "SOLVER.RESUME_ALLOW_DATA_CHANGE True" in line
    assert {name: digest for name, digest in snapshot(out).items() if name.endswith(".pth")} == \
        {name: digest for name, digest in before.items() if name.endswith(".pth")}
