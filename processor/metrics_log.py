"""Training curves on disk: ``metrics.csv``, ``curves.png`` and TensorBoard event files (rank 0 only).

``metrics.csv`` is in long format, one value per row, columns ``kind,epoch,iteration,step,name,value``:

* ``kind=train`` rows come from every ``after_log`` call (``iteration`` within the epoch, ``step`` the
  number of batches trained since the start, counted over the epochs' actual lengths); names
  ``loss/<term>`` (mean since the epoch began), ``loss`` (their sum), ``accuracy`` (fraction), ``lr`` and
  ``images_per_second``;
* ``kind=eval`` rows come from each new ``trainer.last_eval`` after an epoch; names ``<protocol>/mAP``,
  ``<protocol>/R1``, ``<protocol>/R5``, ``<protocol>/R10`` and ``<protocol>/mINP`` in percent, at the
  ``iteration``/``step`` of the epoch's end.

A resumed run first drops the rows of the epochs it trains again, so the file never holds duplicates.

``curves.png`` is drawn after the first epoch, after every epoch that evaluated, after any other epoch once
``CURVES_REDRAW_SECONDS`` have passed since the last drawing, and at the end of training: drawing it takes
about 0.3 s, which after every one of short epochs (the quickstart's take about 10 s) came to 2-3% of the
run. ``metrics.csv`` and TensorBoard get every row as it comes.
"""
import csv
import io
import logging
import os
import time

from processor.hooks import HookBase
from utils.distributed import is_main_process
from utils.io import atomic_write, write_error

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
#: Between evaluations, ``curves.png`` is redrawn at most this often (seconds).
CURVES_REDRAW_SECONDS = 60.0
COLUMNS = ("kind", "epoch", "iteration", "step", "name", "value")
EVAL_NAMES = (("mAP", lambda m: m["mAP"]), ("R1", lambda m: m["cmc"][0]), ("R5", lambda m: m["cmc"][4]),
              ("R10", lambda m: m["cmc"][9]), ("mINP", lambda m: m["mINP"]))


def read_metrics(path):
    """Rows of a ``metrics.csv`` as dicts with ``epoch``/``iteration``/``step`` int and ``value`` float. A
    last row cut short (the run was killed while appending it) is left out."""
    rows = []
    with open(path, newline="") as stream:
        for row in csv.DictReader(stream):
            try:
                rows.append({"kind": row["kind"], "epoch": int(row["epoch"]), "iteration": int(row["iteration"]),
                             "step": int(row["step"]), "name": row["name"], "value": float(row["value"])})
            except (TypeError, ValueError):
                continue
    return rows


def _csv_text(rows, header):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({**row, "value": repr(float(row["value"]))} for row in rows)
    return buffer.getvalue()


def _append_csv(path, rows):
    try:
        with open(path, "a", newline="") as stream:
            stream.write(_csv_text(rows, header=False))
    except OSError as exc:
        raise write_error(path, exc) from None


def plot_curves(rows, path):
    """Save the curves of ``rows`` (``read_metrics`` format) as a PNG: losses, accuracy, lr and the
    evaluation scores against (fractional) epochs. Returns False when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(12, 8), dpi=80)
    axes = figure.subplots(2, 2).ravel()
    panels = ((axes[0], "losses", lambda n: n == "loss" or n.startswith("loss/")),
              (axes[1], "training accuracy", lambda n: n == "accuracy"),
              (axes[2], "learning rate", lambda n: n == "lr"))
    train = [r for r in rows if r["kind"] == "train"]
    per_epoch = {}
    for row in train:  # iterations per epoch, to place train rows at fractional epochs
        per_epoch[row["epoch"]] = max(per_epoch.get(row["epoch"], 1), row["iteration"])
    for axis, title, wanted in panels:
        for name in sorted({r["name"] for r in train if wanted(r["name"])}):
            points = [(r["epoch"] - 1 + r["iteration"] / per_epoch[r["epoch"]], r["value"]) for r in train
                      if r["name"] == name]
            axis.plot(*zip(*points), label=name, marker="." if len(points) < 50 else None)
        axis.set_title(title)
        axis.set_xlabel("epoch")
    axes[0].legend(fontsize="small")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    evals = [r for r in rows if r["kind"] == "eval"]
    for name in sorted({r["name"] for r in evals}):
        points = [(r["epoch"], r["value"]) for r in evals if r["name"] == name]
        axes[3].plot(*zip(*points), label=name, marker="o")
    axes[3].set_title("evaluation (%)")
    axes[3].set_xlabel("epoch")
    if evals:
        axes[3].legend(fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    return True


class MetricsLogHook(HookBase):
    """Writes ``OUTPUT_DIR/metrics.csv`` (see the module docstring), redraws ``curves.png`` (after evaluations,
    at most every ``CURVES_REDRAW_SECONDS`` between them, and at the end) and, with ``SOLVER.TENSORBOARD``,
    logs the same scalars to ``OUTPUT_DIR/tensorboard/``.

    Register it after ``EvalHook`` so that ``trainer.last_eval`` already holds the epoch's evaluation.
    """

    def __init__(self):
        self.rows = []
        self.writer = None
        self._warned_matplotlib = False
        self._offset = 0  # global step at the end of the previous epoch
        self._epoch_iterations = 0  # batches of the current epoch (the identity sampler's count varies)
        self._drawn_at = None  # time.monotonic() of the last drawing of curves.png
        self._drawn_rows = 0  # rows it showed

    def _path(self, name):
        return os.path.join(self.trainer.output_dir, name)

    def before_train(self):
        if not is_main_process():
            return
        os.makedirs(self.trainer.output_dir, exist_ok=True)
        start = self.trainer.start_epoch
        path = self._path(METRICS_FILE)
        self.rows = [r for r in read_metrics(path) if r["epoch"] < start] if os.path.isfile(path) else []
        # Every epoch logs its last iteration, so the kept rows end at the step where the resumed run begins.
        self._offset = max((r["step"] for r in self.rows), default=0)
        # Rewritten atomically: an interruption leaves the old file, never a truncated one.
        atomic_write(path, _csv_text(self.rows, header=True))
        if self.trainer.cfg.SOLVER.TENSORBOARD:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("SOLVER.TENSORBOARD: the tensorboard package is not installed; no event files "
                            "(pip install tensorboard)")
            else:
                # purge_step drops events a previous run logged for the epochs trained again.
                self.writer = SummaryWriter(self._path(TENSORBOARD_DIR), purge_step=self._offset + 1)

    def _add(self, rows):
        self.rows.extend(rows)
        _append_csv(self._path(METRICS_FILE), rows)
        if self.writer is not None:
            for row in rows:
                self.writer.add_scalar(f"{row['kind']}/{row['name']}", row["value"], row["step"])

    def after_log(self, info):
        if not is_main_process():
            return
        self._epoch_iterations = info["num_iterations"]
        base = {"kind": "train", "epoch": info["epoch"], "iteration": info["iteration"],
                "step": self._offset + info["iteration"]}
        values = {f"loss/{term}": value for term, value in info["losses"].items()}
        values.update(loss=info["loss"], accuracy=info["accuracy"], lr=info["lr"],
                      images_per_second=info["images_per_second"])
        self._add([dict(base, name=name, value=float(value)) for name, value in values.items()])

    def after_epoch(self, epoch):
        if not is_main_process():
            return
        end = self._offset + self._epoch_iterations
        eval_epoch, metrics = self.trainer.last_eval
        evaluated = eval_epoch == epoch and metrics is not None
        if evaluated:
            protocol = self.trainer.eval_data.name
            base = {"kind": "eval", "epoch": epoch, "iteration": self._epoch_iterations, "step": end}
            self._add([dict(base, name=f"{protocol}/{name}", value=100 * float(read(metrics)))
                       for name, read in EVAL_NAMES])
        self._offset, self._epoch_iterations = end, 0
        if self.writer is not None:
            self.writer.flush()
        if evaluated or self._drawn_at is None or time.monotonic() - self._drawn_at >= CURVES_REDRAW_SECONDS:
            self._draw()

    def _draw(self):
        self._drawn_at, self._drawn_rows = time.monotonic(), len(self.rows)
        if not plot_curves(self.rows, self._path(CURVES_FILE)) and not self._warned_matplotlib:
            self._warned_matplotlib = True
            logger.info("matplotlib is not installed: no %s (metrics.csv has the numbers; pip install "
                        "matplotlib)", CURVES_FILE)

    def after_train(self):
        if is_main_process() and len(self.rows) != self._drawn_rows:
            self._draw()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
