"""``ddkit run``: a recipe from labeled + unlabeled data to a better student, stage by stage, in one run folder.

Stages, each a folder of ``<run.out_dir>`` with a ``stage.json`` marker written (atomically) when it completes::

    teacher                 train the teacher on the labeled part              (recipe section ``teacher``)
    teacher_2 ... teacher_N ``teacher.ensemble: N``: more teachers (seeds run.seed + 1000 k); all of them label
    label                   multi-transform pseudo-labelling of the unlabeled  (``label`` but its selector)
    select                  pseudo-labels selected from the label stage's shards, written in ``label/``
    student                 retrain a student on labeled + pseudo, mixed       (``student``)
    label_r2, select_r2, student_r2  ``rounds: 2``: the student of round k labels for round k + 1
    baseline_labeled        the student's model on the labeled part alone      (``baselines.labeled_only``)
    baseline_full           ... on labeled + unlabeled with its true labels    (``baselines.fully_labeled``)
    kd_<variant>            knowledge distillation variants of the student     (``kd.variants``)
    tta_<stage>             multi-transform evaluation of a model on the test part (``evaluate.tta``; the views and
                            aggregator of ``evaluate`` / ``label``; its model through ``reads``)

A stage whose marker exists and whose inputs (the recipe sections it reads, the same with every strategy's defaults
written out, and the data files, hashed: those of the data parts and, for the stages from ``label`` on, the label
source's images) are unchanged is skipped;
``force`` redoes a stage and every stage after it. Before any stage runs, the finished stages that will be redone
are removed, with the results files. A marker also records a digest of the stage's output and those of the earlier
stages' outputs it read (``reads``): when an earlier stage ran again and its output changed (new pseudo-labels, a
retrained model), the stages that read it are removed and redone when the run reaches them; an output that came
back the same redoes nothing. An interrupted stage resumes from its own checkpoints or shards.
The results table, ``results.json`` and ``report.html`` are rewritten at the end of every run.

Under ``torchrun`` (an initialised process group) every process runs every stage but ``select``: the training
stages are data-parallel (as ``ddkit train``), the labelling stages split the shards between the processes, and
rank 0 alone writes the markers and results (the others wait for it, then read the stage's result from its marker).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ddkit.config import save_config, with_strategy_defaults
from ddkit.engine.as_built import check_as_built
from ddkit.engine.checkpoint import load_model
from ddkit.engine.evaluate import check_same_classes
from ddkit.engine.environment import save_environment
from ddkit.engine.data import (ConcatDataset, HiddenLabels, Splits, TransferOnly, build_data, item_file,
                              label_overlap_warnings, labeled_anywhere)
from ddkit.engine.label import (LABEL_STAGE_KEYS, ShardedLabels, check_label_section, label_dataset, label_stage,
                               make_source, parse_label_config, select_stage)
from ddkit.engine.keypoint_meta import SIGMAS_DEFAULT, check_train_flip
from ddkit.engine.losses import SetupContext, check_term_contract
from ddkit.engine.prediction_kinds import PROBS, prediction_kind
from ddkit.engine.pseudo import load_pseudo_dataset
from ddkit.engine.run_folder import read_marker
from ddkit.engine.recipe import validate_recipe, with_defaults
from ddkit.engine.report import error_change
from ddkit.engine.run_lock import RunLock
from ddkit.engine.teacher_cache import dataset_fingerprint, files_fingerprint
from ddkit.engine.train import check_cache_config, parse_train_config, resolve_device, total_iterations, train_model
from ddkit.engine.train_config import HARMLESS_KEYS
from ddkit.errors import DEBUG_ENV, ConfigError, DDKitError, DegenerateResultError, StageError
from ddkit.io import atomic_write_json, atomic_write_text, file_sha256
from ddkit.registry import Registry, _to_plain
from ddkit.runtime import dist_info

log = logging.getLogger("ddkit.run")


@dataclass
class Stage:
    name: str
    inputs: tuple[str, ...]  # recipe sections whose content decides the stage's output
    fn: Callable[[], dict[str, Any]]
    ignore: tuple[str, ...] = ()  # keys of those sections that do not decide it (``section.key``)
    writer_only: bool = False  # under torchrun rank 0 alone runs it (it only reads files and writes its own)
    trains: bool = False  # it trains a model (its resume check may refuse the run before anything is written)
    reads: tuple[str, ...] = ()  # earlier stages whose output it reads: a changed output (not only a re-run) redoes it
    unlabeled: bool = False  # it reads the label source's image files (label.images / label.coco): in its key
    output: str | None = None  # the result key naming its output file, whose content is its digest (trains: model)

    def __post_init__(self) -> None:
        if self.output is None and self.trains:
            self.output = "model"


# what a stage's result holds that changes from one identical run to the next: not in its output digest
TIMINGS = ("seconds", "train_time_s")


# how many unlabeled image files are opened before the teacher trains, to find a folder none of which reads
READ_CHECK = 16

# the label keys a TTA stage evaluates with (its views and their ensemble); the selection is its own (keep all)
TTA_LABEL_KEYS = ("transforms", "aggregator", "batch_size", "keypoints")

# what one teacher's training reads: the number of teachers (``teacher.ensemble``) matters only to the labelling
ONE_TEACHER = ("teacher.ensemble",)


# how often a stage logs, evaluates or checkpoints and how many loader workers it uses change nothing it produces:
# left out of its fingerprint, as `ddkit train --resume` accepts them (max_iterations, which does, stays in)
CADENCE_KEYS = frozenset(HARMLESS_KEYS) - {"max_iterations"}
_CADENCE = object()


def _without_cadence(path: str, value: Any) -> Any:
    """``value`` (the recipe at dotted ``path``) less every ``train`` block's cadence keys and
    ``label.num_workers``; :data:`_CADENCE` where ``path`` itself is one."""
    parent, _, key = path.rpartition(".")
    if path == "label.num_workers" or (parent.rpartition(".")[2] == "train" and key in CADENCE_KEYS):
        return _CADENCE
    if isinstance(value, dict):
        kept = {k: _without_cadence(f"{path}.{k}", v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _CADENCE}
    return value


def _dropping_null_variants(kd: dict[str, Any]) -> dict[str, Any]:
    """``kd.variants.X: null`` drops variant X (the way to remove one that ``defaults:`` brought in); ``X: {}`` is a
    student with the default loss."""
    variants = kd.get("variants") or {}
    return {**kd, "variants": {k: v for k, v in variants.items() if v is not None}} if variants else kd


def _section(cfg: DictConfig, key: str) -> Any:
    return _to_plain(cfg.get(key)) if cfg.get(key) is not None else None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Runs the stages of one recipe; see the module docstring."""

    def __init__(self, cfg: DictConfig, source: str = "recipe", registry: Registry | None = None,
                 force: Sequence[str] = (), progress: bool | None = None, lock: RunLock | None = None):
        if registry is None:
            from ddkit.plugin_manager import get_registry

            registry = get_registry()
        validate_recipe(cfg, registry, source=source)
        self.cfg, self.source, self.registry, self.progress = cfg, source, registry, progress
        self.lock = lock or RunLock(enabled=False)  # the command's, taken where the run folder is first written
        self.run = _section(cfg, "run") or {}
        self.out = Path(self.run.get("out_dir") or f"runs/{self.run.get('name') or 'ddkit'}")
        blocking = next((p for p in (self.out, *self.out.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ConfigError(f"{source}: run.out_dir {self.out}: {blocking} is a file, not a folder; give another "
                              f"run.out_dir")
        self.seed = int(self.run.get("seed", 0) or 0)
        self.device = resolve_device(self.run.get("device", "auto"))
        self.rank, self.world = dist_info()  # torchrun: every rank runs the stages, rank 0 writes
        self.is_main = self.rank == 0
        for key in ("task", "data", "teacher"):
            if cfg.get(key) is None:
                raise ConfigError(f"{source}: ddkit run needs a {key!r} section")
        self.teacher_cfg = _section(cfg, "teacher")
        self.student_cfg = _section(cfg, "student")
        self.label_cfg = _section(cfg, "label")
        self.baselines = _section(cfg, "baselines") or {}
        self.evaluate_cfg = _section(cfg, "evaluate") or {}
        self.kd = _dropping_null_variants(_section(cfg, "kd") or {})
        self.kd_baseline = self._kd_baseline_variant()
        self.rounds = cfg.get("rounds") or 1
        if self.student_cfg is None and (self.label_cfg is not None or self.kd):
            raise ConfigError(f"{source}: 'label' and 'kd' need a 'student' section (its model and train blocks)")
        checkpoint = self.teacher_cfg.get("checkpoint")
        self._check_teacher_checkpoint(checkpoint)
        if checkpoint:  # one file, one teacher: named relatively or absolutely, every stage's digest sees one path
            self.teacher_cfg["checkpoint"] = str(Path(checkpoint).resolve())
            OmegaConf.update(cfg, "teacher.checkpoint", self.teacher_cfg["checkpoint"])
        # Everything is known good: now build the task and read the data (nothing is read before this point).
        self.task = registry.build("tasks", cfg.task, where=f"{source}: task")
        self.splits: Splits = build_data(cfg.data, registry=registry, where=f"{source}: data")
        self._check_teacher_shape()
        self.label_files_key: str | None = None  # the label source's files (path, size, mtime), set by its check
        if self.splits.test is None:
            raise ConfigError(f"{source}: data.split needs a test part (e.g. test: 0.2) to measure the results")
        self._check_later_stages()
        self.data_key = self._data_fingerprint()
        self.stages = self._plan()
        unknown = [s for s in force if s not in {st.name for st in self.stages}]
        if unknown:
            raise ConfigError(f"--force {unknown[0]!r}: no such stage in this recipe. Stages: "
                              f"{', '.join(st.name for st in self.stages)}")
        self.force_from = min((i for i, st in enumerate(self.stages) if st.name in force), default=None)
        self.results: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, str | None] = {}  # each done stage's output digest (its marker's ``digest``)
        self._recipe_saved = False

    def _check_later_stages(self) -> None:
        """What a later stage would otherwise find wrong only after the teacher has trained: the unlabeled images,
        the student's mixing ratio, the label and TTA strategies against the task, the batch split under torchrun,
        every model block (built once here, so a bad one fails now) and the loss terms against those models."""
        in_memory = self._check_unlabeled()
        self._check_strategies()
        fmt = (self.label_cfg or {}).get("format") or "coco"
        if fmt != "coco" and in_memory:
            raise ConfigError(f"{self.source}: label.format: {fmt} writes a YOLO dataset of image files, but the "
                              f"unlabeled images are made in memory (no files); use format: coco")
        self._check_ddp_batches()
        self._check_train_flips()
        self._check_transfer_sets()
        self._check_upper_bound()
        self._check_loss_terms(self._build_models())
        self._warn_student_is_teacher()

    def _check_unlabeled(self) -> bool:
        """The images the label stage reads, and a student ratio that samples them; returns whether those images are
        made in memory (no files, as generated shapes)."""
        if self.label_cfg is None:
            return False
        try:  # the label stage's own reader: the folder or COCO file named, or the unlabeled part
            label_cfg = parse_label_config(self.label_cfg)
            source = make_source(label_cfg, self.splits.unlabeled, self.splits.info)
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {err}") from None
        field = "label.coco" if label_cfg.coco else "label.images"
        files = source.image_files()
        self.splits.warnings += label_overlap_warnings(files, self.splits, field, self.source)
        if files:  # a folder or COCO file (the unlabeled part of data.split is in the data parts' fingerprint)
            coco = [str(Path(label_cfg.coco).resolve())] if label_cfg.coco else []  # its hidden labels, its list
            self.label_files_key = files_fingerprint(files + coco)
        if len(source) == 0:
            described = source.describe()
            where = described.get("file") or described.get("root") or "the unlabeled part"
            raise ConfigError(f"{self.source}: label: nothing to label, {where} holds no images")
        if files:
            self._check_readable(source, field)
        ratio = (self.student_cfg.get("train") or {}).get("ratio")
        if ratio is not None and len(ratio) < 2:
            raise ConfigError(f"{self.source}: student.train.ratio {list(ratio)} needs an entry for each of the "
                              f"student's two sources, labeled and pseudo-labeled (e.g. [6, 4])")
        if ratio is not None and not ratio[1] > 0:  # the student would be the labeled-only baseline again
            raise ConfigError(f"{self.source}: student.train.ratio {list(ratio)} never samples the pseudo-labels: "
                              f"the student would train on the labeled part alone; give them a share (e.g. [6, 4])")
        return not (files or item_file(self.splits.unlabeled, 0))

    def _check_transfer_sets(self) -> None:
        """A KD variant that distils on the unlabeled part too: that part exists, and the task either leaves its
        items out of the native loss (``trains_on_unlabeled``) while a loss term reads the teacher on them, or
        labels them with the teacher (``teacher_targets``); both asked of the task plugin."""
        for variant in self.kd.get("variants") or {}:
            if "unlabeled" not in self._transfer_parts(variant):
                continue
            where = f"{self.source}: kd.variants.{variant}.transfer_set"
            if self.splits.unlabeled is None:  # an unlabeled part that is there is never empty (build_data)
                raise ConfigError(f"{where} names the unlabeled part, but the data has none; give "
                                  f"data.split.unlabeled a fraction (or data.unlabeled a dataset)")
            if self._teacher_labels_transfer():
                continue
            if not getattr(self.task, "trains_on_unlabeled", False):
                raise ConfigError(f"{where}: the {self.task.name} task's loss cannot leave out images without labels "
                                  f"(it would read them as having none); distil on [labeled]")
            if not self._reads_teacher(self._kd_variant(variant)[1]):
                raise ConfigError(f"{where}: no loss term of the variant reads the teacher, so the unlabeled images "
                                  f"would teach nothing; add one (e.g. soft_target) or distil on [labeled]")

    def _check_upper_bound(self) -> None:
        """``baselines.fully_labeled`` trains on the unlabeled part's hidden labels: a part without any (a folder of
        images alone, a COCO file without one annotation) is refused now, not after the teacher and the students
        trained (it would train on every image as background)."""
        truth = getattr(self.splits.unlabeled, "ground_truth", None)
        if self.baselines.get("fully_labeled") and (truth is None or not labeled_anywhere(truth)):
            raise ConfigError(f"{self.source}: baselines.fully_labeled trains on the unlabeled part's hidden labels, "
                              f"but {'it has none' if truth is not None else 'the data has no unlabeled part'}; "
                              f"set it to false")

    def _check_readable(self, source: Any, field: str) -> None:
        """Unlabeled image files that cannot be read at all, found before the teacher trains: up to
        :data:`READ_CHECK` of them are opened (spread over the list), stopping at the first that reads, so a large
        folder costs a few decodes. A source of that many images or fewer is refused when none reads; a larger one
        whose sample does not read is warned about (the label stage skips what it cannot read)."""
        n = len(source)
        picks = range(n) if n <= READ_CHECK else sorted({k * n // READ_CHECK for k in range(READ_CHECK)})
        first = None
        for i in picks:
            item = source.load(i)
            if item.image is not None:
                return
            first = first or item
        said = f"{first.file_name}: {first.reason}"
        if n <= READ_CHECK:
            raise ConfigError(f"{self.source}: {field}: none of the {n} unlabeled image(s) could be read; first: "
                              f"{said}")
        log.warning("%s: %s: none of %d unlabeled images opened as a check (of %d) could be read; first: %s",
                    self.source, field, len(picks), n, said)

    def _check_strategies(self) -> None:
        """The label section (and the TTA stages' views) as their stages build them: an aggregator or selector that
        does not fit the task's predictions, or a YOLO output for image labels, fails now."""
        sections = {"label": self.label_cfg} if self.label_cfg is not None else {}
        if self.evaluate_cfg.get("tta"):
            sections["evaluate"] = self._tta_label_cfg()
        for where, section in sections.items():
            try:
                check_label_section(parse_label_config(section, where=where), self.task, self.splits.info,
                                    self.registry, where=where)
            except ConfigError as err:
                raise ConfigError(f"{self.source}: {err}") from None

    def _train_blocks(self) -> dict[str, tuple[Any, Any]]:
        """``{where: (model block, train block)}`` of every model the run trains from the recipe's blocks: the
        teacher (unless a checkpoint gives it), the student and each KD variant (its own model, else the student's)."""
        student = self.student_cfg or {}
        blocks = {}
        if not self.teacher_cfg.get("checkpoint"):
            blocks["teacher"] = (self.teacher_cfg.get("model"), self.teacher_cfg.get("train"))
        if self.student_cfg is not None:
            blocks["student"] = (student.get("model"), student.get("train"))
        for variant, block in (self.kd.get("variants") or {}).items():
            block = block or {}
            blocks[f"kd.variants.{variant}"] = (block.get("model") or student.get("model"),
                                                {**(student.get("train") or {}), **(block.get("train") or {})})
        return blocks

    def _check_train_flips(self) -> None:
        """``train.hflip > 0`` on keypoints without known left/right pairs: refused now, not at the first flipped
        image of a stage (or never, when no image happened to be flipped)."""
        for where, (_, train) in self._train_blocks().items():
            tcfg = parse_train_config(train)
            if where == "teacher" and tcfg.as_built:
                continue
            try:
                check_train_flip(self.splits.info, tcfg.hflip, f"{where}.train")
            except ConfigError as err:
                raise ConfigError(f"{self.source}: {err}") from None

    def _warn_student_is_teacher(self) -> None:
        """A student whose ``pretrained`` names the teacher's weights file (its ``model.pretrained`` or its
        ``checkpoint``) starts as the teacher (a recipe's ``student.model: ${teacher.model}`` with the teacher's own
        best.pt): said unless ``train.init: teacher``."""
        teacher = self.teacher_cfg.get("model")
        files = (teacher.get("pretrained") if isinstance(teacher, Mapping) else None,
                 self.teacher_cfg.get("checkpoint"))
        teachers = {Path(f).resolve(): f for f in files if isinstance(f, str) and Path(f).is_file()}
        if not teachers:
            return
        for where, (model, train) in self._train_blocks().items():
            ours = model.get("pretrained") if isinstance(model, Mapping) else None
            said_for_student = where.startswith("kd.") and model is (self.student_cfg or {}).get("model")
            if where == "teacher" or said_for_student or not isinstance(ours, str) \
                    or parse_train_config(train).init == "teacher":
                continue
            theirs = teachers.get(Path(ours).resolve())
            if theirs is not None:
                note = (f"{self.source}: {where}.model.pretrained is the teacher's weights file ({theirs}): the "
                        f"student starts as the teacher; set its own pretrained or none")
                log.warning("%s", note)
                self.splits.warnings.append(note)

    def _build_models(self) -> dict[str, Any]:
        """Every model block of the recipe built once (``student``, ``teacher`` unless a checkpoint gives it, and
        each KD variant's own ``model``): a bad block fails now, naming its field."""
        student_train = (self.student_cfg or {}).get("train") or {}
        blocks = {"student.model": ((self.student_cfg or {}).get("model"), student_train)}
        if not self.teacher_cfg.get("checkpoint"):
            blocks["teacher.model"] = (self.teacher_cfg.get("model"), self.teacher_cfg.get("train"))
        for variant, block in (self.kd.get("variants") or {}).items():
            blocks[f"kd.variants.{variant}.model"] = ((block or {}).get("model"),
                                                      {**student_train, **((block or {}).get("train") or {})})
        models = {}
        for where, (model_cfg, train) in blocks.items():
            if model_cfg is not None:
                try:
                    models[where] = self.task.build_model(model_cfg, self.splits.info)
                except ConfigError as err:
                    raise ConfigError(f"{self.source}: {where}: {err}") from None
                self._check_outputs(where, models[where])
                if parse_train_config(train).as_built:  # used as its weights build it: no random head
                    check_as_built(lambda: self.task.build_model(model_cfg, self.splits.info),
                                   f"{self.source}: {where.removesuffix('.model')}")
        return models

    def _check_outputs(self, where: str, model: Any) -> None:
        """For one label per image (probs, where a forward costs milliseconds): a dry forward of one labeled image
        must give one score per class, so a head of the wrong size fails now, not after teacher, label and select."""
        if prediction_kind(self.task) is not PROBS or not len(self.splits.labeled):
            return
        num_classes = len(self.splits.info.categories)
        image = self.splits.labeled[0][0]
        try:
            out = self.task.predict(model, [image])[0]
        except Exception as err:  # the model's own forward: named, in one line
            raise ConfigError(f"{self.source}: {where}: a forward pass on one {tuple(image.shape)} image failed: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        if tuple(out.shape) != (num_classes,):
            raise ConfigError(f"{self.source}: {where}: the model gives {tuple(out.shape)} outputs per image, but the "
                              f"data has {num_classes} classes; its head must have info.num_classes outputs")

    def _check_loss_terms(self, models: Mapping[str, Any]) -> None:
        """Each student's loss terms asked (through their own ``check_models``, any plugin's) whether they work with
        the built student and teacher, e.g. that a hint's layers exist: found now, not when that student starts."""
        student_train = (self.student_cfg or {}).get("train") or {}
        students = {"student": ((self.student_cfg or {}).get("losses"), models.get("student.model"), student_train)}
        for variant, block in (self.kd.get("variants") or {}).items():
            model = models.get(f"kd.variants.{variant}.model") or models.get("student.model")
            train = {**student_train, **((block or {}).get("train") or {})}
            students[f"kd.variants.{variant}"] = ((block or {}).get("losses"), model, train)
        if not any(losses for losses, _, _ in students.values()):
            return
        teacher = models.get("teacher.model")
        if teacher is None and self.teacher_cfg.get("checkpoint"):
            teacher = load_model(self.teacher_cfg["checkpoint"], registry=self.registry)[1]
        dry = self._dry_batch()  # read once: every term's setup sees the same two labeled items
        for where, (losses, student, train) in students.items():
            terms = [self._check_term(f"{where}.losses[{i}]", block, student, teacher, dry)
                     for i, block in enumerate(losses or [])]
            try:
                check_cache_config(parse_train_config(train, f"{where}.train"), teacher, terms)
            except ConfigError as err:
                raise ConfigError(f"{self.source}: {where}.train: {err}") from None

    def _check_term(self, where: str, block: Any, student: Any, teacher: Any, dry: dict[str, Any]) -> Any:
        """One loss term, built and asked whether it fits: its contract, its own ``check_models``, and its ``setup``
        on a dry batch of two labeled items (hint shapes, paired detectors), as the training stage will call it."""
        entry, _ = self.registry.params("losses", block, where=f"{self.source}: {where}")
        term = self.registry.build("losses", block, where=f"{self.source}: {where}")
        check = getattr(term, "check_models", None)
        try:
            check_term_contract(term, f"{self.source}: {where}: loss {entry.spec.name!r} ({entry.provider})",
                                self.task.name, self._losses_for_task())
            if check is not None and student is not None:
                check(student, teacher)
            if getattr(term, "setup", None) is not None and student is not None and teacher is not None:
                term.setup(SetupContext(self.task, student, teacher, dry, torch.device("cpu"), 1))
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {where}: {err}") from None
        finally:
            getattr(term, "close", lambda: None)()
        return term

    def _dry_batch(self) -> dict[str, Any]:
        items = [self.splits.labeled[i] for i in range(min(2, len(self.splits.labeled)))]
        return self.task.collate([(image, {**target, "_index": i}) for i, (image, target) in enumerate(items)])

    def _losses_for_task(self) -> list[str]:
        """The registered losses whose declared ``tasks`` (asked of each factory) include this recipe's task."""
        return [e.spec.name for e in self.registry.entries("losses")
                if self.task.name in (getattr(e.spec.factory, "tasks", None) or (self.task.name,))]

    def _check_ddp_batches(self) -> None:
        """Under torchrun every training stage splits its batch over the ranks: a batch size that the number of
        processes does not divide is refused now, not when that stage starts."""
        if self.world <= 1:
            return
        student_train = self._student_like().get("train") or {}
        blocks = {"student.train": student_train}
        if not self.teacher_cfg.get("checkpoint"):
            blocks["teacher.train"] = self.teacher_cfg.get("train") or {}
        for variant, block in (self.kd.get("variants") or {}).items():
            blocks[f"kd.variants.{variant}.train"] = {**student_train, **((block or {}).get("train") or {})}
        for where, block in blocks.items():
            size = parse_train_config(block).batch_size
            if size % self.world:
                raise ConfigError(f"{self.source}: {where}.batch_size {size} is not divisible by the {self.world} "
                                  f"torchrun processes; give a multiple of {self.world}")

    def _data_fingerprint(self) -> dict[str, str]:
        """What every stage reads from the data: each part's targets and image files (path, size, mtime),
        the unlabeled part's hidden labels included (they make the upper bound and the quality report)."""
        parts = {"labeled": self.splits.labeled, "test": self.splits.test,
                 "unlabeled": getattr(self.splits.unlabeled, "ground_truth", None)}
        return {k: dataset_fingerprint(d) for k, d in parts.items() if d is not None}

    def _check_teacher_checkpoint(self, checkpoint: str | None) -> None:
        """A trained teacher must exist and lie outside this run's own teacher folder, which the run replaces when
        the teacher stage's inputs change."""
        if not checkpoint:
            return
        if not Path(checkpoint).is_file():
            raise ConfigError(f"{self.source}: teacher.checkpoint {str(checkpoint)!r} is not a file; give a model.pt "
                              "written by ddkit train / run, or remove the key to train the teacher")
        if (self.out / "teacher").resolve() in Path(checkpoint).resolve().parents:
            raise ConfigError(f"{self.source}: teacher.checkpoint {str(checkpoint)!r} lies in this run's own teacher "
                              f"folder ({self.out / 'teacher'}), which the run would replace; copy it elsewhere or "
                              "use another run.out_dir")

    def _check_teacher_shape(self) -> None:
        """A ``teacher.checkpoint``'s input shape (its info's, as ``ddkit eval CKPT`` reads it) against the data's:
        other channels are refused now, not by its first layer once the stage runs; another size is warned about,
        since the teacher is then scored and labels at the data's size (neither adapts images to a model), and
        refused when a dry forward at that size fails (a fixed-size model)."""
        checkpoint = self.teacher_cfg.get("checkpoint")
        ours = (self.splits.info.extra or {}).get("image_shape")
        if not checkpoint or not ours:
            return
        _, teacher, info = load_model(checkpoint, registry=self.registry)
        theirs, ours = [int(v) for v in (info.extra or {}).get("image_shape") or []], [int(v) for v in ours]
        if not theirs or theirs == ours:
            return
        said = f"teacher.checkpoint {checkpoint} takes images of shape {theirs} (C, H, W), the data {ours}"
        if theirs[0] != ours[0]:
            raise ConfigError(f"{self.source}: {said}: other channels; read the data with {theirs[0]} channel(s) "
                              f"(an image folder's grayscale) or give a teacher trained on {ours[0]}-channel images")
        self._check_outputs(f"teacher.checkpoint (images of shape {theirs})", teacher)
        note = (f"{self.source}: {said}: the teacher is scored and labels at {ours[1]} x {ours[2]}, not at its own "
                f"{theirs[1]} x {theirs[2]}; set the data's image size to {theirs[1:]} or train the teacher here")
        log.warning("%s", note)
        self.splits.warnings.append(note)

    def _kd_baseline_variant(self) -> str | None:
        """The KD variant the others are measured against: ``kd.baseline`` when the recipe names one, else the one
        variant that uses no teacher (no loss term reads it and no transfer set's unlabeled images need its boxes:
        the student alone), else none."""
        variants = self.kd.get("variants") or {}
        named = self.kd.get("baseline")
        if named is not None:
            if named not in variants:
                raise ConfigError(f"{self.source}: kd.baseline {named!r} is not a kd variant; variants: "
                                  f"{', '.join(variants) or 'none'}")
            return named
        alone = [v for v, block in variants.items() if "unlabeled" not in self._transfer_parts(v)
                 and not self._reads_teacher((block or {}).get("losses") or [{"name": "hard_label"}])]
        return alone[0] if len(alone) == 1 else None

    # ---------------------------------------------------------------------------------------------- the plan
    def _plan(self) -> list[Stage]:
        base = ("task", "data", "run.seed")
        stages = [Stage("teacher", base + ("teacher",), self._train_teacher, ONE_TEACHER, trains=True)]
        stages += [Stage(name, base + ("teacher",), lambda k=k: self._train_extra_teacher(k), ONE_TEACHER,
                         trains=True) for k, name in enumerate(self._teacher_stages()[1:], start=1)]
        if self.label_cfg is not None:  # data distillation
            for r in range(1, self.rounds + 1):
                stages += self._round_stages(base, r)
        if self.baselines.get("labeled_only"):
            same = ("teacher",) if self._baseline_is_teacher() else ()  # its result is the teacher's
            stages.append(Stage("baseline_labeled", base + ("teacher", "student"), self._baseline_labeled,
                                ONE_TEACHER, trains=True, reads=same))
        if self.baselines.get("fully_labeled"):
            stages.append(Stage("baseline_full", base + ("teacher", "student"), self._baseline_full, ONE_TEACHER,
                                trains=True))
        for variant in (self.kd.get("variants") or {}):
            # one variant's own block: adding or changing another variant does not redo this one
            stages.append(Stage(f"kd_{variant}", base + ("teacher", "student", f"kd.variants.{variant}"),
                                lambda v=variant: self._kd(v), ONE_TEACHER, trains=True,
                                reads=("teacher",) if self._kd_reads_teacher(variant) else ()))
        if self.evaluate_cfg.get("tta"):
            others = tuple(f"label.{k}" for k in (self.label_cfg or {}) if k not in TTA_LABEL_KEYS)
            for st in [s.name for s in stages if not s.name.startswith(("label", "select"))]:
                if st == "baseline_labeled" and self._baseline_is_teacher():
                    continue  # the same model as the teacher's: its TTA row is the teacher's
                # its model is what it reads (``reads``): the recipe's other sections, a KD variant's included, do
                # not decide it, only the views and aggregator it evaluates with
                stages.append(Stage(f"tta_{st}", base + ("label", "evaluate"), lambda s=st: self._tta(s),
                                    ignore=others, reads=(st,)))
        return stages

    def _round_stages(self, base: tuple[str, ...], r: int) -> list[Stage]:
        """Round ``r``'s label, select and student stages: each reads the previous one's output (the models that
        label, the shards, the pseudo-labels) and the label source's images."""
        sfx = "" if r == 1 else f"_r{r}"
        prev = self._teacher_stages() if r == 1 else ["student" if r == 2 else f"student_r{r - 1}"]
        models = base + (("teacher", "student") if r > 1 else ("teacher",))
        s = self.student_cfg
        # the label stage reads every label key but the selection's: another selector re-uses the shards
        return [Stage(f"label{sfx}", models + LABEL_STAGE_KEYS, lambda: self._label(prev, sfx), reads=tuple(prev),
                      unlabeled=True),
                Stage(f"select{sfx}", models + ("label",), lambda: self._select(sfx), writer_only=True,
                      reads=(f"label{sfx}",), unlabeled=True, output="pseudo_labels"),
                Stage(f"student{sfx}", base + ("teacher", "label", "student"), lambda: self._train_student(sfx),
                      trains=True, unlabeled=True,
                      reads=(f"select{sfx}",) + self._teacher_read(s.get("losses"), s.get("train")))]

    # ------------------------------------------------------------------------------------------------ running
    def execute(self) -> dict[str, Any]:
        keys = [self._key(st) for st in self.stages]
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire(self.out)  # refused while another command writes the folder
            self._remove_stale(keys)
        self._barrier()  # every rank sees the same markers from here on
        for i, stage in enumerate(self.stages):
            marker = self.out / stage.name / "stage.json"
            if self.is_main:
                self._remove_if_read_changed(stage, marker)
            self._barrier()
            if marker.is_file():
                log.info("stage %s: complete, skipped (--force %s to redo)", stage.name, stage.name)
                self._say(f"{stage.name}: done earlier, skipped")
                record = read_marker(marker)  # _remove_stale dropped unreadable ones
                self.results[stage.name], self.digests[stage.name] = record["result"], record.get("digest")
                continue
            self._run_stage(i, stage, keys[i])
        return self._write_results() if self.is_main else self.summarize()

    def _key(self, stage: Stage) -> dict[str, str]:
        """A stage's digests: ``inputs``, the recipe sections it reads and the data files (a changed file re-runs
        it), with the label source's images for the stages that read them; ``defaults``, the strategies of those
        sections with every parameter written out (a plugin's changed default re-runs it)."""
        files = {"data files": self.data_key}
        if stage.unlabeled and self.label_files_key is not None:
            files["label files"] = self.label_files_key
        sections = self._inputs(stage)
        return {"inputs": _digest({**sections, **files}),
                "defaults": _digest(with_strategy_defaults(sections, self.registry))}

    def _read_digests(self, stage: Stage) -> dict[str, str | None]:
        """The output digests of the earlier stages a stage reads, as they are now."""
        return {name: self.digests.get(name) for name in stage.reads}

    def _remove_if_read_changed(self, stage: Stage, marker: Path) -> None:
        """Remove a finished stage when the output of an earlier stage it read differs from the one it ran on (that
        stage ran again and gave, e.g., other pseudo-labels): known only once the earlier stages are done."""
        record = read_marker(marker) if stage.reads and marker.is_file() else None
        recorded = (record or {}).get("reads")
        if recorded is None:  # nothing read, or a marker written before ``reads`` was recorded: kept
            return
        now = self._read_digests(stage)
        changed = [name for name in stage.reads if recorded.get(name) != now[name]]
        if changed:
            shutil.rmtree(marker.parent)
            self._say(f"{stage.name}: the output of {', '.join(changed)} changed since it ran; its old outputs were "
                      f"removed")
            self._remove_results()

    def _output_digest(self, stage: Stage, result: Mapping[str, Any]) -> str:
        """What a later stage that reads this one compares: the content of its output file (a model, the
        pseudo-labels), else its result less the timings (the label stage's shard fingerprint and provenance)."""
        path = result.get(stage.output) if stage.output else None
        if isinstance(path, str) and Path(path).is_file():
            return file_sha256(path)[:16]
        return _digest({k: v for k, v in result.items() if k not in TIMINGS})

    def _run_stage(self, index: int, stage: Stage, key: dict[str, str]) -> None:
        """Run one stage (every rank, or rank 0 alone for a ``writer_only`` one) and record its result: rank 0
        writes the marker, the other ranks then read the result from it, so every rank holds the same results."""
        folder, marker = self.out / stage.name, self.out / stage.name / "stage.json"
        if self.is_main and self._forced(index) and folder.exists():
            shutil.rmtree(folder)  # redo from scratch, not resume
        self._barrier()
        self._say(f"{stage.name}: running")
        if not stage.trains:  # a training stage saves the recipe once its resume check has passed (_train)
            self._save_recipe()
        t0 = time.perf_counter()
        result: dict[str, Any] = {}
        if self.is_main or not stage.writer_only:
            try:
                result = stage.fn()
            except DegenerateResultError as err:  # the finished stages' results are written, say why it stopped
                if self.is_main:
                    self._write_results(f"stage {stage.name}: {err}")
                raise
            except (DDKitError, OSError):  # one line already (a full disk: the CLI's own message)
                raise
            except Exception as err:  # a strategy's own code, often a plugin's: which stage, and where
                if os.environ.get(DEBUG_ENV):
                    raise
                raise StageError(stage_failure(stage.name, err)) from err
        if self.is_main:
            self._save_recipe()  # a stage that wrote nothing of its own (a teacher given by teacher.checkpoint)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(marker, {"stage": stage.name, **key, "result": result,
                                       "run_dir": str(self.out.resolve()), "outputs": self._output_sizes(result),
                                       "digest": self._output_digest(stage, result),
                                       "reads": self._read_digests(stage)})
        self._barrier()
        record = read_marker(marker)  # the other ranks read what rank 0 wrote
        self.results[stage.name] = result if self.is_main else record["result"]
        self.digests[stage.name] = record.get("digest")

    def _save_recipe(self) -> None:
        """``config.yaml`` (every default written) and ``environment.json``, once, when the first stage starts
        work: a run that a stage then refuses (an interrupted stage of another recipe) leaves the old ones."""
        if self.is_main and not self._recipe_saved:
            save_config(with_defaults(self.cfg, self.registry), self.out)
            save_environment(_to_plain(self.cfg), self.registry, self.out)
            self._recipe_saved = True

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _say(self, line: str) -> None:
        """One console line per run, not one per torchrun process."""
        if self.is_main:
            print(f"[ddkit run] {line}")

    def _forced(self, index: int) -> bool:
        return self.force_from is not None and index >= self.force_from

    def _remove_stale(self, keys: Sequence[dict[str, str]]) -> None:
        """Before any stage runs, remove every finished stage whose inputs changed (or that is forced), and the
        results that describe them: an interrupted run then leaves no stale model for ``export`` / ``predict`` to
        find, nor a table of stages that no longer exist in this form."""
        stale = []
        for i, stage in enumerate(self.stages):
            marker = self.out / stage.name / "stage.json"
            if not marker.is_file():
                continue
            record = read_marker(marker)
            if record is None:  # truncated (a copy cut short): the stage runs again, resuming from its own files
                marker.unlink()
                self._say(f"{stage.name}: its stage.json could not be read (truncated?); the stage runs again")
                continue
            if self._forced(i) or self._inputs_changed(record, keys[i]) or self._lost_output(record):
                stale.append(stage.name)
                shutil.rmtree(marker.parent)
        if stale:
            print(f"[ddkit run] {', '.join(stale)}: inputs changed, forced or an output file deleted or changed; "
                  f"their old outputs were removed")
            self._remove_results()

    @staticmethod
    def _inputs_changed(record: Mapping[str, Any], key: Mapping[str, str]) -> bool:
        """A marker's digests differ from the stage's now (one written before markers held ``defaults`` is judged
        on its ``inputs`` alone)."""
        return record.get("inputs") != key["inputs"] or record.get("defaults", key["defaults"]) != key["defaults"]

    def _remove_results(self) -> None:
        """The results files describe stages that are being redone: removed until the run rewrites them."""
        for name in ("results.json", "results.md", "report.html"):
            (self.out / name).unlink(missing_ok=True)

    def _output_files(self, result: Mapping[str, Any]) -> list[Path]:
        """A stage result's model and pseudo-label files inside the run folder (a file given by the recipe, such
        as ``teacher.checkpoint``, is checked when the recipe is validated)."""
        paths = [Path(result[k]) for k in ("model", "pseudo_labels") if isinstance(result.get(k), str)]
        return [p for p in paths if p.resolve().is_relative_to(self.out.resolve())]

    def _output_sizes(self, result: Mapping[str, Any]) -> dict[str, int]:
        """``{path below the run folder: size in bytes}`` of a finished stage's output files."""
        return {str(p.resolve().relative_to(self.out.resolve())): p.stat().st_size
                for p in self._output_files(result) if p.is_file()}

    def _lost_output(self, record: Mapping[str, Any]) -> bool:
        """Whether a finished stage's output file was deleted, or changed size (cut short by a copy), since."""
        if any(not p.is_file() for p in self._output_files(record.get("result") or {})):
            return True
        sizes = record.get("outputs") or {}
        return any(not (self.out / f).is_file() or (self.out / f).stat().st_size != n for f, n in sizes.items())

    def _inputs(self, stage: Stage) -> dict[str, Any]:
        """The recipe sections a stage reads, less the keys it ignores and the cadence keys: what its digest
        hashes."""
        values = {k: _without_cadence(k, _to_plain(OmegaConf.select(self.cfg, k))) for k in stage.inputs}
        values = {k: v for k, v in values.items() if v is not _CADENCE}
        for dotted in stage.ignore:
            section, _, key = dotted.partition(".")
            if isinstance(values.get(section), dict):
                values[section].pop(key, None)
        return values

    def _write_results(self, stopped: str | None = None) -> dict[str, Any]:
        """``results.json``, ``results.md`` and ``report.html`` of the stages done so far (``stopped``: why the
        run stopped early)."""
        summary = self.summarize()
        if stopped:
            summary["stopped"] = stopped
        warnings = list(self.splits.warnings) + [r["warning"] for r in self.results.values() if r.get("warning")]
        warnings += summary.pop("warnings", [])
        if self.splits.info.extra.get(SIGMAS_DEFAULT):  # keypoint AP with guessed OKS sigmas is only indicative
            warnings.append(self.splits.info.extra[SIGMAS_DEFAULT])
        if warnings:
            summary["warnings"] = warnings
        atomic_write_json(self.out / "results.json", summary)
        atomic_write_text(self.out / "results.md", results_markdown(summary) + "\n")
        try:
            from ddkit.engine.report import write_report

            write_report(self.out, summary, info=self.splits.info, task_name=self.task.name,
                         unlabeled=self.splits.unlabeled)
        except ImportError:  # pragma: no cover - the report module is part of ddkit
            pass
        return summary

    # ---------------------------------------------------------------------------------------------- the stages
    def _train(self, stage: str, model_cfg: Any, train_cfg: Any, train_sets: list[Any], losses: Any = None,
               teacher: Any = None, seed_offset: int = 0) -> dict[str, Any]:
        train_seed = (train_cfg or {}).get("seed")  # overrides run.seed for this stage (init and batches)
        seed = (self.seed if train_seed is None else int(train_seed)) + seed_offset
        if train_seed is not None:  # train_model reads train.seed: give it the offset one (an extra teacher's)
            train_cfg = {**train_cfg, "seed": seed}
        torch.manual_seed(seed)
        model = self.task.build_model(model_cfg, self.splits.info)
        out = train_model(self.task, model, train_sets, train_cfg, self.out / stage, teacher=teacher,
                          losses=losses, eval_set=self.splits.test, resume=True, seed=seed,
                          device=self.device, progress=self.progress, on_start=self._save_recipe)
        if not out.get("finished"):
            raise ConfigError(f"stage {stage} stopped before the end of its schedule (max_iterations?); "
                              f"re-run to resume it")
        return {"model": out["model_path"], "metrics": out["metrics"], "iterations": out["iterations"],
                "train_time_s": out.get("train_time_s"),
                "eval_batch_size": parse_train_config(train_cfg, f"{stage}.train").evaluation_batch_size}

    def _train_teacher(self) -> dict[str, Any]:
        t = self.teacher_cfg
        if t.get("checkpoint"):
            return self._trained_teacher(Path(t["checkpoint"]))
        return self._train("teacher", t["model"], t.get("train"), [self.splits.labeled], t.get("losses"))

    def _teacher_stages(self) -> list[str]:
        """``teacher`` and, with ``teacher.ensemble: N``, ``teacher_2`` ... ``teacher_N``: the models that label."""
        n = int(self.teacher_cfg.get("ensemble") or 1)
        return ["teacher"] + [f"teacher_{k}" for k in range(2, n + 1)]

    def _train_extra_teacher(self, k: int) -> dict[str, Any]:
        """Ensemble member ``k`` (1, 2, ...): the teacher's recipe at seed ``run.seed + 1000 k`` (or
        ``teacher.train.seed + 1000 k``; its init and batches; the split stays the run's)."""
        t = self.teacher_cfg
        return self._train(self._teacher_stages()[k], t["model"], t.get("train"), [self.splits.labeled],
                           t.get("losses"), seed_offset=1000 * k)

    def _trained_teacher(self, path: Path) -> dict[str, Any]:
        """``teacher.checkpoint``: a teacher trained elsewhere (e.g. one teacher for several student seeds) is used
        as it is and evaluated on the test part for the table, with the teacher section's evaluation batch size
        (``teacher.train.eval_batch_size``, else its ``batch_size``) as a trained teacher would be."""
        _, model, info = load_model(path, device=self.device, registry=self.registry)
        check_same_classes(info, self.splits.info, str(path), self.source,
                           fix="give a teacher.checkpoint trained on the recipe's classes")
        batch = parse_train_config(self.teacher_cfg.get("train"), "teacher.train").evaluation_batch_size
        metrics = self.task.evaluate(model, self.splits.test, batch) if self.is_main else {}  # the others: the marker
        return {"model": str(path.resolve()), "metrics": metrics, "iterations": 0, "eval_batch_size": batch}

    def _model_path(self, stage: str) -> Path:
        return Path(self.results[stage]["model"])

    def _label(self, teacher_stages: list[str], sfx: str) -> dict[str, Any]:
        """Label the unlabeled part into shards (``label{sfx}/shards``) with the models of ``teacher_stages``
        (several: their predictions of every view are ensembled); the select stage writes the rest."""
        paths = [self._model_path(st) for st in teacher_stages]
        teachers = [load_model(p, device=self.device, registry=self.registry)[1] for p in paths]
        out = self.out / f"label{sfx}"
        res = label_stage(self.task, teachers, self.splits.info, self.splits.unlabeled, self.label_cfg, out,
                          teacher_checkpoint=paths, device=self.device, progress=bool(self.progress) and self.is_main,
                          registry=self.registry, seed=self.seed)
        if not res.complete and self.is_main:  # under torchrun the other ranks label their part only
            raise ConfigError(f"stage label{sfx}: not every shard is labelled; re-run to resume it")
        earlier = res.shards.num_shards - len(res.shards_done)
        if earlier and self.world == 1:  # a resumed stage: say what was kept (under torchrun each rank has a share)
            self._say(f"label{sfx}: resumed: {earlier} of {res.shards.num_shards} shard(s) labelled earlier (an "
                      f"interrupted run, or ddkit label) were kept, {len(res.shards_done)} labelled now")
        named = [str(p) for p in paths]
        return {**res.to_dict(), "pseudo_labels": str(out / "pseudo_labels.json"),
                "teacher": named[0] if len(named) == 1 else named}

    def _select(self, sfx: str) -> dict[str, Any]:
        """Select pseudo-labels from the label stage's shards; its files go beside them (``label{sfx}/``)."""
        sharded = ShardedLabels.from_dict(self.results[f"label{sfx}"])
        res = select_stage(sharded, self.task, self.splits.info, self.splits.labeled, self.label_cfg,
                           self.out / f"label{sfx}", registry=self.registry)
        out = {"pseudo_labels": str(res.pseudo_path), "summary": res.summary, "quality": res.quality}
        skipped = res.summary["images"]["skipped"]
        if skipped:  # said on the console and at the head of the results, not only in the label folder's files
            out["warning"] = f"label{sfx}: {skipped} unlabeled image(s) could not be read and were skipped " \
                             f"(see {res.skipped_path})"
            self._say(out["warning"])
        if res.yolo_path is not None:
            out["yolo_dataset"] = str(res.yolo_path)
        return out

    def _reads_teacher(self, losses: Any) -> bool:
        """Whether any loss term (any plugin's) reads the teacher: asked of the built terms, never their names."""
        terms = [self.registry.build("losses", b, where=f"{self.source}: losses") for b in (losses or [])]
        needs = any(getattr(t, "teacher_outputs", "none") != "none" for t in terms)
        for t in terms:
            getattr(t, "close", lambda: None)()
        return needs

    def _uses_teacher(self, losses: Any, train: Any) -> bool:
        """Whether a student of these loss terms and train block reads the teacher's model: a term reads it, or the
        student starts from it."""
        return self._reads_teacher(losses) or parse_train_config(train).init == "teacher"

    def _teacher_for(self, losses: Any, train: Any) -> Path | None:
        """The teacher checkpoint such a student is given (:meth:`_uses_teacher`), else None."""
        return self._model_path("teacher") if self._uses_teacher(losses, train) else None

    def _teacher_read(self, losses: Any, train: Any) -> tuple[str, ...]:
        """``("teacher",)`` for a stage's ``reads`` when such a student uses the teacher's model, else ``()``."""
        return ("teacher",) if self._uses_teacher(losses, train) else ()

    def _train_student(self, sfx: str) -> dict[str, Any]:
        s = self.student_cfg
        kept = (self.results[f"select{sfx}"].get("summary") or {}).get("pseudo_labels")
        if kept == 0:  # the student would train on the labeled part alone and be reported as distilled
            raise DegenerateResultError(
                f"label{sfx} selected 0 pseudo-labels (see {self.out / f'label{sfx}' / 'summary.json'}); the "
                f"student would train on labeled data alone. Check the teacher's metrics and the selector "
                f"(label.selector), then re-run")
        pseudo = load_pseudo_dataset(self.results[f"label{sfx}"]["pseudo_labels"], source=self.splits.unlabeled)
        pseudo.check_files()
        pseudo.info = self.splits.info
        return self._train(f"student{sfx}", s["model"], s.get("train"), [self.splits.labeled, pseudo],
                           s.get("losses"), teacher=self._teacher_for(s.get("losses"), s.get("train")))

    def _student_like(self) -> dict[str, Any]:
        return self.student_cfg or self.teacher_cfg

    def _teacher_untrained(self) -> bool:
        """A teacher not trained here: used as built (``teacher.train.iterations: 0``) or given by
        ``teacher.checkpoint`` (trained elsewhere, on data the run does not know). Its schedule is no baseline's."""
        return bool(self.teacher_cfg.get("checkpoint")) or parse_train_config(self.teacher_cfg.get("train")).as_built

    def _baseline_is_teacher(self) -> bool:
        """Whether the labeled-only baseline is the teacher's own training (same model, plain losses, trained here
        on the labeled part)."""
        return (self._student_like()["model"] == self.teacher_cfg.get("model") and not self.teacher_cfg.get("losses")
                and not self._teacher_untrained())

    def _baseline_labeled(self) -> dict[str, Any]:
        """The student's model on the labeled part alone, with the teacher's schedule (the paper's baseline), or the
        student's when the teacher was not trained here (used as built, or a ``teacher.checkpoint``)."""
        s = self._student_like()
        if self._baseline_is_teacher():
            return {**self.results["teacher"], "same_as": "teacher"}  # the same training: do not repeat it
        train = s.get("train") if self._teacher_untrained() else self.teacher_cfg.get("train")
        return self._train("baseline_labeled", s["model"], train, [self.splits.labeled])

    def _baseline_full(self) -> dict[str, Any]:
        """The upper bound: the unlabeled part with its true labels, as many iterations as the student."""
        s = self._student_like()
        tcfg = parse_train_config(s.get("train"))
        full = ConcatDataset([self.splits.labeled, self.splits.unlabeled.ground_truth])
        iters = total_iterations(tcfg, [len(self.splits.labeled), len(self.splits.unlabeled)])
        block = {**(s.get("train") or {}), "iterations": iters, "scale_with_data": False, "epochs": None}
        return self._train("baseline_full", s["model"], block, [full])

    def _kd_variant(self, variant: str) -> tuple[Any, list[Any], dict[str, Any]]:
        """A KD variant's ``(model, loss terms, train block)``: the student's, updated by the variant's own."""
        v, s = self._variant_block(variant), self._student_like()
        return (v.get("model") or s["model"], v.get("losses") or [{"name": "hard_label"}],
                {**(s.get("train") or {}), **(v.get("train") or {})})

    def _variant_block(self, variant: str) -> dict[str, Any]:
        return (self.kd.get("variants") or {})[variant] or {}

    def _transfer_parts(self, variant: str) -> list[str]:
        return list(self._variant_block(variant).get("transfer_set") or ["labeled"])

    def _teacher_labels_transfer(self) -> bool:
        """Whether the task gives a transfer set's unlabeled items targets read from the teacher."""
        return callable(getattr(self.task, "teacher_targets", None))

    def _kd_reads_teacher(self, variant: str) -> bool:
        """Whether a KD variant's student uses the teacher's model: its terms or init do, or the teacher labels the
        unlabeled part of its transfer set."""
        _, losses, train = self._kd_variant(variant)
        labels = self._teacher_labels_transfer() and "unlabeled" in self._transfer_parts(variant)
        return labels or self._uses_teacher(losses, train)

    def _kd(self, variant: str) -> dict[str, Any]:
        """A KD variant trained on its transfer set: the labeled part, and the unlabeled part where it names it
        (each image drawn equally often unless the variant's own ``train.ratio`` says otherwise)."""
        model, losses, train = self._kd_variant(variant)
        sets = [self.splits.labeled]
        if "unlabeled" in self._transfer_parts(variant):  # the student's own ratio is labeled : pseudo-labeled
            sets.append(TransferOnly(self.splits.unlabeled, self.splits.info))
            own = (self._variant_block(variant).get("train") or {}).get("ratio")
            train = {**train, "ratio": own or [len(s) for s in sets]}
        teacher = self._model_path("teacher") if self._kd_reads_teacher(variant) else None
        return self._train(f"kd_{variant}", model, train, sets, losses, teacher=teacher)

    def _tta(self, stage: str) -> dict[str, Any]:
        """Evaluate a stage's model on the test part with the multi-transform ensemble, beside one view."""
        path = self._model_path(stage)
        _, model, _ = load_model(path, device=self.device, registry=self.registry)
        label = self._tta_label_cfg()
        res = label_dataset(self.task, model, self.splits.info, HiddenLabels(self.splits.test), self.splits.labeled,
                            label, self.out / f"tta_{stage}", teacher_checkpoint=path, device=self.device,
                            registry=self.registry, seed=self.seed)
        quality = res.quality or {}
        return {"single": quality.get("single"), "ensemble": quality.get("ensemble")}

    def _tta_label_cfg(self) -> dict[str, Any]:
        """The label section a TTA stage runs: the label views and aggregator (or ``evaluate``'s), every view's
        prediction kept (threshold 0), with the quality report."""
        label = dict(self.label_cfg or {})
        for key in ("transforms", "aggregator"):
            if self.evaluate_cfg.get(key) is not None:
                label[key] = self.evaluate_cfg[key]
        if not label.get("transforms"):
            raise ConfigError(f"{self.source}: evaluate.tta needs evaluate.transforms (or label.transforms)")
        label = {k: v for k, v in label.items() if k in TTA_LABEL_KEYS}
        label.update(selector={"name": "score_threshold", "threshold": 0.0}, quality=True)
        return label

    # ------------------------------------------------------------------------------------------------ results
    def summarize(self) -> dict[str, Any]:
        names = {"teacher": "teacher", "baseline_labeled": "baseline (labeled only)",
                 "student": "student (data distillation)" if self.rounds == 1 else "student round 1",
                 "baseline_full": "fully labeled (upper bound)"}
        names.update({st: f"teacher {k} (ensemble)" for k, st in enumerate(self._teacher_stages()[1:], start=2)})
        rows = []
        for stage, res in self.results.items():
            if "metrics" not in res:
                continue
            label = names.get(stage) or (f"student round {stage.split('_r')[-1]}" if stage.startswith("student_r")
                                         else f"student {stage[3:]} (KD)" if stage.startswith("kd_") else stage)
            row = {"model": label, "stage": stage, **self.task.table_row(res["metrics"] or {})}
            row.update(self._tta_columns(self.results.get(f"tta_{res.get('same_as', stage)}")))
            row["iterations"] = res.get("iterations")
            rows.append(row)
        key = self.task.headline
        summary: dict[str, Any] = {"task": self.task.name, "metric": key.removesuffix(" %"), "rows": rows,
                                   "seed": self.seed, "run_dir": str(self.out)}
        by = {r["stage"]: r for r in rows}
        final = "student" if self.rounds == 1 else f"student_r{self.rounds}"  # the last round's student
        if all(s in by for s in ("baseline_labeled", final, "baseline_full")):
            base, full = by["baseline_labeled"][key], by["baseline_full"][key]
            if (full > base) != self.task.higher_is_better or full == base:  # no gap: a share of it means nothing
                summary["warnings"] = [f"the fully labeled model ({key} {full}) is not better than the labeled-only "
                                       f"baseline ({key} {base}): there is no gap for data distillation to close"]
            else:
                summary["gap_closed"] = round((base - by[final][key]) / (base - full), 3)
                if self.rounds > 1:
                    summary["gap_closed_by_round"] = {
                        s: round((base - by[s][key]) / (base - full), 3) for s in by if s.startswith("student")}
        summary.update(self._kd_gains(by, key))
        chance = self._chance_warning(by.get("teacher"), key)
        if chance:
            summary.setdefault("warnings", []).insert(0, chance)
        label = self.results.get("select")  # the select stage writes the quality report
        if label and label.get("quality"):
            summary["pseudo_label_quality"] = {k: label["quality"].get(k) for k in ("single", "ensemble")}
        return summary

    def _chance_warning(self, teacher: Mapping[str, Any] | None, key: str) -> str | None:
        """A teacher within 2 points of what a model that learnt nothing scores (asked of the task:
        ``chance_level``, in its headline's units): its pseudo-labels are noise, whatever the student's row says."""
        chance = getattr(self.task, "chance_level", None)
        if chance is None or teacher is None or key not in teacher:
            return None
        level, value = float(chance(self.splits.info)), float(teacher[key])
        better = value - level if self.task.higher_is_better else level - value
        if better >= 2.0:
            return None
        return (f"the teacher is at chance level ({key} {value}; a model that learnt nothing scores {level:.1f}): its "
                f"pseudo-labels are noise and the student's figures mean nothing; check its training (iterations, lr) "
                f"or its weights (teacher.checkpoint, model.pretrained)")

    def _tta_columns(self, tta: Mapping[str, Any] | None) -> dict[str, float]:
        """``<metric> 1 view`` and ``<metric> TTA`` columns from a TTA stage's quality report (the task says which
        metric; keypoint AP is called ``kp_AP`` there and ``AP`` in the table)."""
        if not tta or not tta.get("ensemble"):
            return {}
        key = self.task.quality_metric(tta["ensemble"])
        single, ens = tta["single"].get(key), tta["ensemble"].get(key)
        if single is None or ens is None:
            return {}
        scale = 100 if ens <= 1 else 1
        name = key.removeprefix("kp_")
        return {f"{name} 1 view": round(scale * float(single), 2), f"{name} TTA": round(scale * float(ens), 2)}

    def _kd_gains(self, by: Mapping[str, Mapping[str, Any]], key: str) -> dict[str, Any]:
        """Each KD variant against the recipe's baseline variant (``kd.baseline``): the relative cut of a
        lower-is-better metric (error), the gain of a higher-is-better one (AP)."""
        base_stage = f"kd_{self.kd_baseline}" if self.kd_baseline else None
        if base_stage not in by or key not in by[base_stage]:
            return {}
        alone = by[base_stage][key]
        variants = [r for r in by.values() if r["stage"].startswith("kd_") and r["stage"] != base_stage]
        if self.task.higher_is_better:
            return {"kd_ap_gain": {r["stage"]: round(r[key] - alone, 2) for r in variants}}
        return {"kd_relative_error_reduction": {r["stage"]: round((alone - r[key]) / alone, 3)
                                                for r in variants if alone > 0}}


def results_markdown(summary: Mapping[str, Any]) -> str:
    """The results table as markdown (what ``ddkit run`` prints at the end)."""
    rows = summary.get("rows") or []
    stopped = f"**STOPPED, not a result:** {summary['stopped']}\n\n" if summary.get("stopped") else ""
    stopped += "".join(f"**WARNING:** {w}\n\n" for w in summary.get("warnings") or [])
    if not rows:
        return stopped + "(no results)"
    cols = [c for c in rows[0] if c != "stage"]
    for r in rows[1:]:
        cols += [c for c in r if c not in cols and c != "stage"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c == "model" else "---:" for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    if "gap_closed" in summary:
        lines.append(f"\nShare of the baseline -> fully labeled gap closed by data distillation: "
                     f"{100 * summary['gap_closed']:.0f} %")
        for stage, gap in (summary.get("gap_closed_by_round") or {}).items():
            lines.append(f"  {stage}: {100 * gap:.0f} %")
    for stage, red in (summary.get("kd_relative_error_reduction") or {}).items():
        amount, words = error_change(red)
        lines.append(f"\n{stage}: {amount} {words}")
    for stage, gain in (summary.get("kd_ap_gain") or {}).items():
        lines.append(f"\n{stage}: {gain:+.2f} AP over the student alone")
    return stopped + "\n".join(lines)


def stage_failure(stage: str, err: BaseException) -> str:
    """``stage student: RuntimeError: boom (raised at plugin.py:12 in compute); DDKIT_DEBUG=1 shows the
    traceback``: the exception's first line and its innermost frame, which is the plugin's code when it raised."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    at = f" (raised at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    lines = str(err).strip().splitlines()
    return (f"stage {stage}: {type(err).__name__}: {lines[0] if lines else ''}{at}; {DEBUG_ENV}=1 shows the "
            f"traceback")


def run_recipe(cfg: DictConfig, source: str = "recipe", force: Sequence[str] = (), progress: bool | None = None,
               registry: Registry | None = None, lock: RunLock | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of a recipe; return the summary written to ``results.json``. ``lock``: the
    command's (:mod:`ddkit.engine.run_lock`), taken on ``run.out_dir`` once the recipe is validated."""
    return Runner(cfg, source=source, registry=registry, force=force, progress=progress, lock=lock).execute()
