"""Trainer hooks (detectron2 style): each owns its state and its part of the checkpoint.

A hook sees the :class:`~ddkit.engine.trainer.Trainer` as ``self.trainer`` and may implement ``before_train``,
``before_step``, ``after_step``, ``after_train`` (only after a complete loop), ``on_interrupt`` (Ctrl-C, SIGTERM;
``trainer.stopped_by`` says which) and ``close`` (always). A hook with a ``state_key`` stores ``state_dict()``
under that key of the checkpoint and gets it back through ``load_state_dict`` on resume.

* :class:`LogHook`: the window of per-term loss means, ``metrics.jsonl`` records (and ``metrics.csv`` rows),
  ``train.log`` lines, the bar;
* :class:`EvalHook`: evaluation every ``eval_every`` iterations (before the checkpoint of the same iteration);
* :class:`CheckpointHook`: ``checkpoints/last.pt`` every ``checkpoint_every`` iterations, on Ctrl-C or SIGTERM and
  at the end;
* :class:`FinalHook`: when the schedule is complete, the last evaluation, ``model.pt`` and the final record.
* :class:`~ddkit.engine.ema.EMAHook` (``train.ema_decay``): a moving average of the weights, evaluated and
  saved as the model.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ddkit.engine.checkpoint import LAST, save_checkpoint, save_model
from ddkit.engine.task import model_info, unwrap_model
from ddkit.errors import DDKitError
from ddkit.io import atomic_write_text

log = logging.getLogger("ddkit.train")


def _rate(per_s: float) -> str:
    """Samples per second for the log: whole numbers, but two digits below 10 (a slow CPU step is not "0")."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"


class TrainingDiverged(DDKitError):
    """The loss became NaN or infinite."""


class RunLog:
    """The run folder's logs, written by rank 0 only: readable ``train.log`` lines (also to the ``ddkit.train``
    logger, or through tqdm while a bar is shown), ``metrics.jsonl`` records and, for the training-log records,
    ``metrics.csv`` rows.

    ``metrics.csv`` has fixed columns: ``iteration, lr, loss``, every loss term known at start (``loss_names``),
    the other values of the first record (e.g. a term's sub-losses), ``samples_per_s``; a value that a later
    record adds is only in the jsonl, a missing one is an empty cell (a term outside its stage). An evaluation's
    metrics are ``eval/NAME`` columns, added by the first evaluation (as Ultralytics' ``results.csv``): filled on
    the row of the iteration they were measured at, empty on the others.
    """

    def __init__(self, run_dir: Path, is_main: bool, loss_names: Sequence[str] = ()):
        self.is_main = is_main
        self.path = run_dir / "train.log"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.csv_path = run_dir / "metrics.csv"
        self.loss_names = list(loss_names)
        self._header: list[str] | None = None

    def __call__(self, message: str, echo: bool = True) -> None:
        if not self.is_main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as fh:
            fh.write(f"{stamp} {message}\n")
        if echo:
            log.info(message)
        else:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def record(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if "losses" in record:
            self._csv_row(record)
        elif record.get("eval") and not record.get("final"):  # the final record repeats the last evaluation
            self._csv_eval(record["iteration"], record["eval"])

    def _csv_row(self, record: dict[str, Any]) -> None:
        values = {"iteration": record["iteration"], "lr": record["lr"], "loss": record["loss"],
                  "samples_per_s": record.get("samples_per_s"), **record["losses"]}
        if self._header is None:
            self._header = self._csv_header_on_disk()
        if self._header is None:
            known = ["iteration", "lr", "loss", *self.loss_names]
            self._header = known + [k for k in record["losses"] if k not in known] + ["samples_per_s"]
            with open(self.csv_path, "w", newline="") as fh:
                csv.writer(fh, lineterminator="\n").writerow(self._header)
        row = ["" if values.get(c) is None else values[c] for c in self._header]
        with open(self.csv_path, "a", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerow(row)

    def _csv_eval(self, iteration: int, metrics: dict[str, Any]) -> None:
        """Put an evaluation's metrics on the row of ``iteration`` (a new row if none), widening the header by
        the ``eval/NAME`` columns it lacks; the file is rewritten (it is small: one row per log interval)."""
        header = self._header or self._csv_header_on_disk() or ["iteration", "lr", "loss", *self.loss_names,
                                                                 "samples_per_s"]
        rows = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as fh:
                rows = list(csv.reader(fh))[1:]
        self._header = header + [f"eval/{k}" for k in metrics if f"eval/{k}" not in header]
        rows = [r + [""] * (len(self._header) - len(r)) for r in rows]
        if not rows or rows[-1][0] != str(iteration):
            rows.append([str(iteration)] + [""] * (len(self._header) - 1))
        for k, v in metrics.items():
            rows[-1][self._header.index(f"eval/{k}")] = v
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([self._header, *rows])
        atomic_write_text(self.csv_path, buffer.getvalue())

    def _csv_header_on_disk(self) -> list[str] | None:
        """The header of a ``metrics.csv`` being continued (a resumed run keeps its columns)."""
        if not self.csv_path.is_file():
            return None
        with open(self.csv_path, newline="") as fh:
            first = next(csv.reader(fh), None)
        return first or None

    def truncate(self, iteration: int) -> None:
        """Drop records written after ``iteration`` (by the run that is being resumed) and a torn last line."""
        if not self.is_main:
            return
        if self.metrics_path.is_file():
            keep = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
                if rec.get("iteration", 0) <= iteration and not rec.get("final"):
                    keep.append(line)
            atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))
        self._truncate_csv(iteration)

    def _truncate_csv(self, iteration: int) -> None:
        if not self.csv_path.is_file():
            return
        text = self.csv_path.read_text()
        lines = text.split("\n")[:-1]  # the part after the last newline is empty or a torn row: dropped
        if not lines:
            self.csv_path.unlink()
            return
        header = next(csv.reader([lines[0]]))
        keep = [lines[0]]
        for line in lines[1:]:
            row = next(csv.reader([line]), [])
            if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= iteration:
                keep.append(line)
        atomic_write_text(self.csv_path, "".join(k + "\n" for k in keep))

    def reset(self) -> None:
        if self.is_main:
            for path in (self.metrics_path, self.csv_path):
                path.unlink(missing_ok=True)


class HookBase:
    trainer: Any = None
    state_key: str | None = None

    def before_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_train(self) -> None: ...

    def on_interrupt(self) -> None: ...

    def close(self) -> None: ...


def _float(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


def diverged(what: str, lr: float) -> TrainingDiverged:
    return TrainingDiverged(f"the loss became {what}; lower train.lr (now {lr}), raise train.warmup or set "
                            "train.clip_grad_norm")


class LogHook(HookBase):
    """Means of the loss and of each term over the last ``log_every`` steps. The window is float64 sums on the
    device (no host sync per step) and is checkpointed, so that a resumed run logs identical records."""

    state_key = "log_window"

    def __init__(self, runlog: RunLog, log_every: int, progress: bool, describe: Callable[[], str]):
        self.runlog, self.log_every, self.progress, self.describe = runlog, log_every, progress, describe
        self.window: dict[str, torch.Tensor] = {}
        self.n = 0
        self.bar: Any = None

    def before_train(self) -> None:
        t = self.trainer
        self.runlog(self.describe())
        if self.progress and t.stop > t.start:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=t.stop, initial=t.start, desc=f"train {t.task.name}", unit="it",
                            dynamic_ncols=True)
        self.t_window, self.samples_seen = time.perf_counter(), 0

    def after_step(self) -> None:
        t = self.trainer
        for k, v in t.step_values.items():
            v = v.detach().double()
            self.window[k] = self.window[k] + v if k in self.window else v
        self.n += 1
        self.samples_seen += t.step_samples
        done = t.iter + 1
        if self.bar is not None:
            self.bar.update(1)
        if self.log_every and done % self.log_every == 0 or done == t.total:
            self._write(done)

    def _write(self, done: int) -> None:
        t = self.trainer
        now = time.perf_counter()
        means = {k: float(v) / max(self.n, 1) for k, v in self.window.items()}
        if not math.isfinite(means["loss"]):
            raise diverged(f"{means['loss']} between iterations {done - self.n} and {done}", t.cfg.lr)
        rec = {"iteration": done, "lr": t.optimizer.param_groups[0]["lr"], "loss": means.pop("loss"),
               "losses": means, "samples_per_s": round(self.samples_seen / max(now - self.t_window, 1e-9), 2)}
        self.runlog.record(rec)
        if self.runlog.is_main:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.3g}")
            self.runlog(f"it {done}/{t.total}  lr {rec['lr']:.4g}  loss {rec['loss']:.4f}  ("
                        + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                        + f")  {_rate(rec['samples_per_s'])} samples/s", echo=self.bar is None)
        self.window, self.n, self.t_window, self.samples_seen = {}, 0, now, 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.window.items()}, "n": self.n}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.window = {k: torch.tensor(v, dtype=torch.float64, device=self.trainer.device)
                       for k, v in state.get("sums", {}).items()}
        self.n = int(state.get("n", 0))


class EvalHook(HookBase):
    """Evaluates the student (its average, under :class:`~ddkit.engine.ema.EMAHook`) every ``eval_every``
    iterations on rank 0 (the others wait)."""

    def __init__(self, runlog: RunLog, eval_set: Any, eval_every: int, batch_size: int):
        self.runlog, self.eval_set, self.eval_every, self.batch_size = runlog, eval_set, eval_every, batch_size

    def evaluate(self, it: int) -> dict[str, float]:
        t = self.trainer
        model = t.averaged if t.averaged is not None else unwrap_model(t.student)
        metrics = t.task.evaluate(model, self.eval_set, self.batch_size) if t.is_main else {}
        t.student.train()
        self.runlog.record({"iteration": it, "eval": metrics})
        self.runlog(f"eval @ {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        t.ddp.barrier()
        t.metrics = metrics
        return metrics

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.eval_every and done % self.eval_every == 0 and done < self.trainer.total and self.eval_set is not None:
            self.evaluate(done)  # before the checkpoint: a resumed run never misses this record


class CheckpointHook(HookBase):
    """``checkpoints/last.pt`` (atomic, weights-only) every ``checkpoint_every`` iterations, on Ctrl-C or SIGTERM
    and at the end; stale temporary files of a killed writer are removed on start."""

    def __init__(self, runlog: RunLog, ckpt_dir: Path, checkpoint_every: int):
        self.runlog, self.ckpt_dir, self.every = runlog, ckpt_dir, checkpoint_every
        self.last = ckpt_dir / LAST

    def save(self, it: int) -> Path:
        t = self.trainer
        return save_checkpoint(self.last, t.student, **t.state_dict(it))

    def after_step(self) -> None:
        t = self.trainer
        done = t.iter + 1
        if self.every and done % self.every == 0 and done < t.stop and t.is_main:
            self.save(done)

    def on_interrupt(self) -> None:
        """A checkpoint of the whole steps done (under DDP every rank stopped after the same step, and the others
        wait for rank 0's write); none when stopped mid-step (a second Ctrl-C): a step half applied would resume to
        another result, so the last periodic checkpoint stands."""
        t = self.trainer
        if not t.is_main:
            return
        if t.whole_steps and t.iter > t.start:
            self.save(t.iter)
            self.runlog(f"interrupted ({t.stopped_by}) at iteration {t.iter}; checkpoint written: re-run the same "
                        f"`ddkit run` command, or `ddkit train` with --resume, to resume")
        else:
            kept = f"the checkpoint {self.last} stands" if self.last.exists() else "no checkpoint was written"
            self.runlog(f"interrupted ({t.stopped_by}) during iteration {t.iter}; {kept} (a step cut in the middle "
                        f"is not saved)")

    def after_train(self) -> None:
        t = self.trainer
        if t.is_main and (t.stop > t.start or not self.last.exists()):
            t.checkpoint_path = self.save(t.stop)
        elif self.last.exists():
            t.checkpoint_path = self.last


class FinalHook(HookBase):
    """When the schedule is complete: the last evaluation, ``model.pt`` (student only) and the final record."""

    def __init__(self, runlog: RunLog, model_path: Path, evaluate: Callable[[int], Any] | None):
        self.runlog, self.model_path, self.evaluate = runlog, model_path, evaluate

    def after_train(self) -> None:
        t = self.trainer
        if t.stop < t.total:
            self.runlog(f"stopped at iteration {t.stop} of {t.total} (max_iterations); continue with resume")
            return
        if self.evaluate is not None:
            self.evaluate(t.total)
        if t.is_main:
            t.model_path = save_model(t.student, self.model_path)
            self.runlog.record({"iteration": t.total, "final": True, "eval": t.metrics,
                                "train_time_s": round(t.train_time, 3)})
            self.runlog(f"done: {t.total} iterations in {t.train_time:.1f}s; model {t.model_path}")


def describe_run(task: Any, student: Any, total: int, batch_size: int, world: int, device: Any,
                 sizes: list[int], ratio: list[float], names: list[str], start: int) -> str:
    """The first ``train.log`` line of a run."""
    return (f"training {task.name} model {model_info(student)[0].get('name')!r} for {total} iterations "
            f"(batch {batch_size}, {world} process(es), {device}); sources {sizes}"
            + (f" at ratio {ratio[:len(sizes)]}" if len(sizes) > 1 else "")
            + f"; losses {names}" + (f"; resuming at {start}" if start else ""))
