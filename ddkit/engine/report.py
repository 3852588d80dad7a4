"""A static HTML report of a ``ddkit run`` folder (no server, no external JS/CSS): ``report.html`` + ``plots/*.png``.

::

    write_report(run_dir, results, info=splits.info, task_name="detection", unlabeled=splits.unlabeled)

Sections (each one is left out with a one-line note when its inputs are missing, so a partial run folder still gets
a report):

1. **Results**: the table of ``results["rows"]`` (every key a column), the gap closed, test-time augmentation
   (``results["tta"]``) and a bar chart of ``results["metric"]`` per model;
2. **Training curves**: every stage folder with a ``metrics.jsonl`` (written by
   :func:`ddkit.engine.train.train_model`): loss and each loss term vs iteration, and the eval metric vs iteration,
   one colour per stage;
3. **Pseudo-labels**: for every ``label*`` folder's ``summary.json`` (:mod:`ddkit.engine.label`): instances per
   image labeled vs pseudo per category and the per-category score thresholds;
4. **Pseudo-label quality**: ``label*/quality.json`` (hidden ground truth): single view vs the multi-transform
   ensemble, a table and a bar chart;
5. **Pseudo-labelled images**: a grid of unlabeled images with their pseudo-labels (boxes, keypoints, or the class
   and score for classification), read from ``label*/pseudo_labels.json``; the images come from ``unlabeled``
   (matched on ``image_id``) or from the files the JSON names.

Plots are drawn with matplotlib's Agg canvas (no pyplot state) and every file is written atomically.
"""
from __future__ import annotations

import html
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ddkit.engine.draw import category_colors, draw_instances, to_uint8_rgb
from ddkit.engine.pseudo import IMAGE_LABELS
from ddkit.io import atomic_write_bytes, atomic_write_text
from ddkit.types import DatasetInfo

log = logging.getLogger("ddkit.report")

REPORT_NAME = "report.html"
PLOTS_DIR = "plots"
# quality.json / eval keys that are counts, not rates (left out of the bar charts)
_COUNT_KEYS = {"images", "selected", "ground_truth", "num_samples", "num_images"}
_STAGE_ORDER = ("teacher", "baseline", "student", "full", "fully_labeled")

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
     padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{margin-top:2em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}
td.text,th.text{text-align:left}
tr:nth-child(even) td{background:#fafafa}
p.note{color:#777;font-style:italic}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
code{background:#f5f5f5;padding:0 .2em}
.meta{color:#555}
p.stopped{color:#a00;border:2px solid #a00;padding:.5em}
"""


# ============================================================================================ small helpers
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt_value(v: Any) -> str:
    """A value as table text: floats with sensible precision, ``None`` as ``-``, containers compacted."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.2f}"
        if a >= 1:
            return f"{v:.3f}"
        if a >= 1e-3:
            return f"{v:.4f}"
        return f"{v:.3g}"
    if isinstance(v, Mapping):
        text = ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items())
        return text if len(text) <= 300 else text[:297] + "..."
    if isinstance(v, (list, tuple)):
        text = ", ".join(fmt_value(x) for x in v)
        return text if len(text) <= 300 else text[:297] + "..."
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


def _column_format(values: Sequence[Any]) -> Callable[[Any], str]:
    """One number of decimals for the floats of a column (from its largest magnitude), so they line up."""
    mags = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v) and v != 0]
    if not mags or max(mags) < 1e-3:
        return fmt_value
    top = max(mags)
    decimals = 0 if top >= 1000 else 2 if top >= 10 else 3 if top >= 1 else 4

    def fmt(v: Any) -> str:
        if isinstance(v, float) and math.isfinite(v):
            return f"{v:,.{decimals}f}" if decimals == 0 else f"{v:.{decimals}f}"
        return fmt_value(v)

    return fmt


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
           text_columns: Iterable[str] = ()) -> str:
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    text_cols = set(text_columns)
    for c in columns:  # a column without any number is text (left-aligned)
        if not any(_is_num(r.get(c)) for r in rows):
            text_cols.add(c)

    def cell(tag: str, c: str, v: str) -> str:
        cls = ' class="text"' if c in text_cols else ""
        return f"<{tag}{cls}>{v}</{tag}>"

    fmts = {c: _column_format([r.get(c) for r in rows]) for c in columns}
    out = ["<table>", "<tr>" + "".join(cell("th", c, _esc(c)) for c in columns) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell("td", c, _esc(fmts[c](r.get(c)))) for c in columns) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _kv_table(d: Mapping[str, Any]) -> str:
    return _table([{"key": k, "value": fmt_value(v)} for k, v in d.items()], ["key", "value"],
                  text_columns=("key", "value"))


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _img(rel: str, alt: str) -> str:
    return f'<p><img src="{_esc(rel)}" alt="{_esc(alt)}"></p>'


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_json(path: Path) -> Any:
    """The JSON object in ``path``, or ``None`` when it is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        log.warning("report: cannot read %s: %s", path, err)
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ============================================================================================ figures
def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    fig.clear()
    return atomic_write_bytes(path, buf.getvalue())


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ============================================================================================ 1. results
def _results_section(results: Mapping[str, Any], plots: Path, rel: str) -> str:
    parts = ["<h2>Results</h2>"]
    if results.get("stopped"):
        parts.append(f'<p class="stopped"><b>The run stopped; this is not a result:</b> '
                     f'{_esc(results["stopped"])}</p>')
    for warning in results.get("warnings") or []:
        parts.append(f'<p class="stopped"><b>Warning:</b> {_esc(warning)}</p>')
    rows = [r for r in (results.get("rows") or []) if isinstance(r, Mapping)]
    metric = results.get("metric")
    meta = []
    if results.get("task") is not None:
        meta.append(f"task <b>{_esc(results['task'])}</b>")
    if metric is not None:
        meta.append(f"metric <b>{_esc(metric)}</b>")
    if meta:
        parts.append(f'<p class="meta">{", ".join(meta)}</p>')
    if rows:
        parts.append(_table(rows, text_columns=("model", "stage")))
    else:
        parts.append(_note("No result rows (the run has not evaluated any model yet)."))
    if results.get("gap_closed") is not None:
        g = results["gap_closed"]
        extra = f" ({100 * g:.1f} % of the gap between the labeled-only baseline and the fully labeled model)" \
            if _finite(g) else ""
        shown = f"{g:.3f}" if _finite(g) else fmt_value(g)
        parts.append(f"<p>Gap closed: <b>{_esc(shown)}</b>{_esc(extra)}</p>")
    # the KD lines as results.md words them: a relative cut in %, an AP gain in AP points (the table's unit)
    for stage, red in (results.get("kd_relative_error_reduction") or {}).items():
        amount, words = error_change(red)
        parts.append(f"<p>{_esc(stage)}: <b>{amount}</b> {words}</p>")
    for stage, gain in (results.get("kd_ap_gain") or {}).items():
        parts.append(f"<p>{_esc(stage)}: <b>{gain:+.2f} AP</b> over the student alone</p>")
    tta = results.get("tta")
    if isinstance(tta, Mapping) and tta:
        parts.append("<h3>Test-time augmentation: single view vs ensemble</h3>")
        if all(isinstance(v, Mapping) for v in tta.values()):
            parts.append(_table([{"model": k, **v} for k, v in tta.items()], text_columns=("model",)))
        else:
            parts.append(_kv_table(tta))
    known = {"task", "metric", "rows", "gap_closed", "tta", "stopped", "warnings", "kd_relative_error_reduction",
             "kd_ap_gain"}
    other = {k: v for k, v in results.items() if k not in known}
    if other:
        parts.append("<h3>Other results</h3>")
        parts.append(_kv_table(other))
    # bar chart of the main metric per model
    if metric and rows and any(_finite(r.get(metric)) for r in rows):
        pts = [(str(r.get("model", r.get("stage", i))), float(r[metric])) for i, r in enumerate(rows)
               if _finite(r.get(metric))]
        fig, axes = _figure(max(5.0, 1.4 * len(pts) + 2), 3.6)
        ax = axes[0][0]
        bars = ax.bar(range(len(pts)), [v for _, v in pts], color=_colors(len(pts)))
        ax.bar_label(bars, labels=[fmt_value(v) for _, v in pts], fontsize=8, padding=2)
        ax.set_xticks(range(len(pts)), [n for n, _ in pts], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(str(metric))
        ax.set_title(f"{metric} per model")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        _save(fig, plots / "results.png")
        parts.append(_img(f"{rel}/results.png", f"{metric} per model"))
    return "\n".join(parts)


# ============================================================================================ 2. training curves
def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train_logs, evals)`` of a ``metrics.jsonl``, sorted by iteration, the last record per iteration kept
    (torn lines and the ``final`` record, a copy of the last evaluation, are skipped)."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        log.warning("report: cannot read %s: %s", path, err)
        return [], []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not _is_num(rec.get("iteration")):
            continue
        it = int(rec["iteration"])
        if isinstance(rec.get("eval"), Mapping):
            if not rec.get("final") or it not in evals:
                evals[it] = rec
        elif _is_num(rec.get("loss")):
            train[it] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def _stage_dirs(run_dir: Path) -> list[tuple[str, Path]]:
    found = []
    for pattern in ("*/metrics.jsonl", "*/*/metrics.jsonl"):
        for p in run_dir.glob(pattern):
            if p.is_file() and PLOTS_DIR not in p.relative_to(run_dir).parts:
                found.append((p.parent.relative_to(run_dir).as_posix(), p))
    if (run_dir / "metrics.jsonl").is_file():
        found.append((run_dir.name, run_dir / "metrics.jsonl"))

    def key(item: tuple[str, Path]) -> tuple[int, list[Any]]:
        name = item[0].split("/")[0]
        rank = next((i for i, s in enumerate(_STAGE_ORDER) if name.startswith(s)), len(_STAGE_ORDER))
        return rank, _natural_key(item[0])

    return sorted(found, key=key)


def _pick_metric(evals: Iterable[Mapping[str, Any]], preferred: Any) -> str | None:
    keys: dict[str, None] = {}
    for rec in evals:
        for k, v in rec["eval"].items():
            if _finite(v) and k not in _COUNT_KEYS:
                keys[k] = None
    if not keys:
        return None
    for k in (preferred, "AP", "accuracy", "error"):
        if k in keys:
            return str(k)
    return next(iter(keys))


# metrics logged as fractions that the results tables show in percent
_PERCENT_METRICS = {"error", "accuracy"}


def _curves_section(run_dir: Path, results: Mapping[str, Any], plots: Path, rel: str) -> str:
    parts = ["<h2>Training curves</h2>"]
    stages = []
    for name, path in _stage_dirs(run_dir):
        train, evals = read_metrics(path)
        if train or evals:
            stages.append((name, train, evals))
    if not stages:
        parts.append(_note("No training curves: no stage folder with a readable metrics.jsonl."))
        return "\n".join(parts)
    metric = _pick_metric((e for _, _, ev in stages for e in ev), results.get("metric"))
    if all(len(train) <= 1 and len(evals) <= 1 for _, train, evals in stages):
        parts.append(_note("Each stage logged at most one point, so there is no curve to draw: the table below "
                           "holds the values (log more often with train.log_every / train.eval_every)."))
    else:
        colors = _colors(len(stages))
        fig, axes = _figure(6.0 * (2 if metric else 1) + 1.5, 4.4, 1, 2 if metric else 1)
        _loss_panel(axes[0][0], stages, colors)
        if metric:
            _metric_panel(axes[0][1], stages, colors, metric)
        fig.tight_layout()
        _save(fig, plots / "training_curves.png")
        parts.append(_img(f"{rel}/training_curves.png", "training curves"))
    parts.append(_table(_last_values(stages, metric), text_columns=("stage",)))
    return "\n".join(parts)


def _loss_panel(ax: Any, stages: Sequence[tuple[str, list, list]], colors: Sequence[Any]) -> None:
    """Total loss and every logged loss term per stage (markers where a line has few points)."""
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3))]
    positive, drew = True, False
    for (name, train, _), color in zip(stages, colors):
        if not train:
            continue
        its = [r["iteration"] for r in train]
        loss = [float(r["loss"]) for r in train]
        marker = "o" if len(its) < 4 else None
        ax.plot(its, loss, color=color, lw=1.8, marker=marker, ms=4, label=f"{name}: loss")
        drew = True
        positive &= all(v > 0 for v in loss if math.isfinite(v))
        terms = list(dict.fromkeys(k for r in train for k in (r.get("losses") or {})))
        for j, term in enumerate(terms):
            vals = [(r["iteration"], (r.get("losses") or {}).get(term)) for r in train]
            vals = [(i, float(v)) for i, v in vals if _finite(v)]
            if not vals:
                continue
            if len(terms) == 1 and all(math.isclose(v, loss[its.index(i)], rel_tol=1e-6) for i, v in vals):
                continue  # the only term, equal to the total loss
            positive &= all(v > 0 for _, v in vals)
            ax.plot([i for i, _ in vals], [v for _, v in vals], color=color, lw=1.0, alpha=0.8,
                    ls=styles[j % len(styles)], marker="x" if len(vals) < 4 else None, label=f"{name}: {term}")
    if drew:
        flat = [float(v) for ln in ax.get_lines() for v in ln.get_ydata() if math.isfinite(float(v))]
        if positive and flat and max(flat) / max(min(flat), 1e-12) > 20:
            ax.set_yscale("log")
            # plain tick labels: mathtext is off in the report (names may hold "$"), so 10^k would print raw
            from matplotlib.ticker import FuncFormatter

            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no training logs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("training loss (total and per term)")
    ax.grid(alpha=0.3)


def _metric_panel(ax: Any, stages: Sequence[tuple[str, list, list]], colors: Sequence[Any], metric: str) -> None:
    """The evaluation metric per stage, in % where the tables show it in % (error, accuracy), never below 0."""
    scale = 100.0 if metric in _PERCENT_METRICS else 1.0
    label = f"{metric} %" if scale == 100.0 else metric
    values = []
    for (name, _, evals), color in zip(stages, colors):
        pts = [(r["iteration"], scale * float(r["eval"][metric])) for r in evals if _finite(r["eval"].get(metric))]
        if pts:
            ax.plot([i for i, _ in pts], [v for _, v in pts], color=color, marker="o", ms=4, lw=1.5, label=name)
            values += [v for _, v in pts]
    if values and min(values) >= 0:
        ax.set_ylim(bottom=0, top=max(max(values) * 1.05, 1e-6))
    ax.set_xlabel("iteration")
    ax.set_ylabel(label)
    ax.set_title(f"evaluation: {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _last_values(stages: Sequence[tuple[str, list, list]], metric: str | None) -> list[dict[str, Any]]:
    """The last logged values per stage (the table under the curves)."""
    rows = []
    for name, train, evals in stages:
        row: dict[str, Any] = {"stage": name}
        if train:
            row["iterations"] = train[-1]["iteration"]
            row["final loss"] = train[-1]["loss"]
            if _is_num(train[-1].get("samples_per_s")):
                row["samples/s"] = train[-1]["samples_per_s"]
        if evals and metric:
            row[f"last eval {metric}"] = evals[-1]["eval"].get(metric)
        rows.append(row)
    return rows


# ============================================================================================ 3. label summary
def _label_dirs(run_dir: Path) -> list[Path]:
    return sorted((p for p in run_dir.glob("label*") if p.is_dir()), key=lambda p: _natural_key(p.name))


def _category_names(info: DatasetInfo | None, data: Mapping[str, Any] | None = None) -> dict[int, str]:
    names: dict[int, str] = {}
    cats = (data or {}).get("categories") or (info.categories if info is not None else [])
    for c in cats:
        try:
            names[int(c["id"])] = str(c.get("name", c["id"]))
        except (KeyError, TypeError, ValueError):
            continue
    return names


def _summary_plot(summary: Mapping[str, Any], title: str, path: Path) -> bool:
    cats = [c for c in summary.get("per_category") or [] if isinstance(c, Mapping)]
    if not cats:
        return False
    max_cats = 60
    shown = cats
    if len(cats) > max_cats:  # the categories with the most instances
        shown = sorted(cats, key=lambda c: -(float(c.get("labeled_per_image") or 0)
                                             + float(c.get("pseudo_per_image") or 0)))[:max_cats]
        shown.sort(key=lambda c: cats.index(c))
    names = [str(c.get("name", c.get("id"))) for c in shown]
    x = list(range(len(shown)))
    width = min(24.0, max(6.0, 0.45 * len(shown) + 2))
    fig, axes = _figure(width, 6.4, 2, 1)
    ax = axes[0][0]
    lab = [float(c.get("labeled_per_image") or 0) for c in shown]
    pse = [float(c.get("pseudo_per_image") or 0) for c in shown]
    ax.bar([i - 0.2 for i in x], lab, 0.4, label="labeled (ground truth)", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], pse, 0.4, label="pseudo-labels (selected)", color="#dd8452")
    if any(_finite(c.get("predicted_per_image")) for c in shown):
        pred = [float(c.get("predicted_per_image") or 0) for c in shown]
        ax.scatter(x, pred, marker="_", s=160, color="#333", zorder=3, label="aggregated predictions")
    ax.set_xticks(x, names, rotation=45 if len(shown) > 12 else 0, ha="right" if len(shown) > 12 else "center",
                  fontsize=8)
    ax.set_ylabel("instances per image")
    ax.set_title(f"{title}: instances per image, labeled vs pseudo")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax = axes[1][0]
    thr = [c.get("threshold") for c in shown]
    vals = [float(t) if _finite(t) else 0.0 for t in thr]
    ax.bar(x, vals, 0.6, color="#55a868")
    for i, t in enumerate(thr):
        if not _finite(t):
            ax.text(i, 0.01, "none", ha="center", va="bottom", fontsize=7, rotation=90, color="#777")
    ax.set_xticks(x, names, rotation=45 if len(shown) > 12 else 0, ha="right" if len(shown) > 12 else "center",
                  fontsize=8)
    ax.set_ylabel("score threshold")
    ax.set_title("per-category score thresholds" + ("" if any(_finite(t) for t in thr) else " (none)"))
    ax.grid(axis="y", alpha=0.3)
    if any(_finite(t) for t in thr):
        ax.set_ylim(0, max(1.0, max(vals) * 1.05))
    fig.tight_layout()
    _save(fig, path)
    return True


def _label_section(label_dirs: Sequence[Path], run_dir: Path, plots: Path, rel: str) -> str:
    parts = ["<h2>Pseudo-labels: thresholds and instance counts</h2>"]
    if not label_dirs:
        parts.append(_note("No label stage in this run folder (no label* folder)."))
        return "\n".join(parts)
    for d in label_dirs:
        summary = _read_json(d / "summary.json")
        parts.append(f"<h3>{_esc(d.name)}</h3>")
        if not isinstance(summary, Mapping):
            parts.append(_note(f"No summary: {d.name}/summary.json is missing or unreadable."))
            continue
        overview: dict[str, Any] = {}
        for k in ("images", "instances_per_image", "keypoints_per_instance"):
            if isinstance(summary.get(k), Mapping):
                for kk, vv in summary[k].items():
                    overview[f"{k.replace('_', ' ')}: {kk}"] = vv
        if summary.get("pseudo_labels") is not None:
            overview["pseudo-labels kept"] = summary["pseudo_labels"]
        thresholds = summary.get("thresholds")
        if isinstance(thresholds, Mapping):
            for k, v in thresholds.items():
                if not isinstance(v, Mapping):  # per-category ones are in the table below
                    overview[f"thresholds: {k}"] = v
        if overview:
            parts.append(_kv_table(overview))
        name = "label_summary.png" if d.name == "label" else f"label_summary_{_slug(d.name)}.png"
        if _summary_plot(summary, d.name, plots / name):
            parts.append(_img(f"{rel}/{name}", f"{d.name}: labeled vs pseudo per category and thresholds"))
            cats = [c for c in summary.get("per_category") or [] if isinstance(c, Mapping)]
            cols = [c for c in ("id", "name", "threshold", "labeled_per_image", "pseudo_per_image",
                                "predicted_per_image", "pseudo") if any(c in r for r in cats)]
            cols += [c for c in dict.fromkeys(k for r in cats for k in r) if c not in cols]
            parts.append(_table(cats, cols, text_columns=("name",)))
        else:
            parts.append(_note("No per-category statistics in the summary."))
    return "\n".join(parts)


# ============================================================================================ 4. quality
def _quality_section(label_dirs: Sequence[Path], plots: Path, rel: str) -> str:
    parts = ["<h2>Pseudo-label quality (hidden labels)</h2>"]
    found = False
    for d in label_dirs:
        q = _read_json(d / "quality.json")
        if not isinstance(q, Mapping):
            continue
        views = [(k, q[k]) for k in ("single", "ensemble") if isinstance(q.get(k), Mapping)]
        views += [(k, v) for k, v in q.items() if k not in ("single", "ensemble", "single_thresholds")
                  and isinstance(v, Mapping) and all(_is_num(x) or x is None for x in v.values())]
        if not views:
            continue
        found = True
        parts.append(f"<h3>{_esc(d.name)}</h3>")
        labels = {"single": "single view", "ensemble": "multi-transform ensemble"}
        rows = [{"pseudo-labels": labels.get(k, k), **v} for k, v in views]
        parts.append(_table(rows, text_columns=("pseudo-labels",)))
        if isinstance(q.get("views"), list):
            parts.append(f'<p class="meta">ensemble views: {_esc(", ".join(map(str, q["views"])))}</p>')
        keys = [k for k in dict.fromkeys(k for _, v in views for k in v)
                if k not in _COUNT_KEYS and any(_finite(v.get(k)) for _, v in views)]
        if not keys:
            continue
        fig, axes = _figure(max(5.0, 0.9 * len(keys) * len(views) + 2), 3.6)
        ax = axes[0][0]
        w = 0.8 / len(views)
        for j, ((k, v), color) in enumerate(zip(views, _colors(len(views)))):
            xs = [i - 0.4 + w * (j + 0.5) for i in range(len(keys))]
            ys = [float(v[m]) if _finite(v.get(m)) else 0.0 for m in keys]
            bars = ax.bar(xs, ys, w, label=labels.get(k, k), color=color)
            ax.bar_label(bars, labels=[fmt_value(v.get(m)) for m in keys], fontsize=7, padding=1)
        ax.set_xticks(range(len(keys)), keys, fontsize=8)
        ax.set_title(f"{d.name}: pseudo-label quality, single view vs ensemble")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.3)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.legend(fontsize=7, loc="upper center", ncol=len(views))
        name = "quality.png" if d.name == "label" else f"quality_{_slug(d.name)}.png"
        _save(fig, plots / name)
        parts.append(_img(f"{rel}/{name}", f"{d.name}: pseudo-label quality"))
    if not found:
        parts.append(_note("No pseudo-label quality: no label*/quality.json (the unlabeled images have no hidden "
                           "labels, or no label stage ran)."))
    return "\n".join(parts)


# ============================================================================================ 5. images
class _ImageFinder:
    """Images by ``image_id``: from the unlabeled dataset (its position ``ddkit_index`` first, else a scan of its
    targets), else the file the pseudo-label JSON names."""

    def __init__(self, unlabeled: Any, roots: Sequence[Path]):
        self.unlabeled = unlabeled
        self.roots = roots
        self._index: dict[int, int] | None = None

    def _target_id(self, i: int) -> int | None:
        from ddkit.engine.data import get_target

        try:
            t = get_target(self.unlabeled, i)
            return int(t["image_id"]) if isinstance(t, Mapping) and "image_id" in t else None
        except Exception:  # noqa: BLE001
            return None

    def _from_dataset(self, image_id: int, hint: Any) -> Any:
        ds = self.unlabeled
        if ds is None or not hasattr(ds, "__getitem__"):
            return None
        try:
            n = len(ds)
        except TypeError:
            return None
        i = None
        if _is_num(hint) and 0 <= int(hint) < n and self._target_id(int(hint)) == image_id:
            i = int(hint)
        else:
            if self._index is None:
                self._index = {}
                for j in range(min(n, 200_000)):
                    tid = self._target_id(j)
                    if tid is not None:
                        self._index.setdefault(tid, j)
            i = self._index.get(image_id)
        if i is None:
            return None
        item = ds[i]
        return item[0] if isinstance(item, (tuple, list)) else None

    def _from_file(self, file_name: Any) -> Any:
        if not file_name:
            return None
        from ddkit.engine.data import read_image

        p = Path(str(file_name))
        for cand in ([p] if p.is_absolute() else [r / p for r in self.roots]):
            if cand.is_file():
                try:
                    return read_image(cand)
                except Exception:  # noqa: BLE001
                    return None
        return None

    def __call__(self, im: Mapping[str, Any]) -> Any:
        import torch

        image_id = int(im["id"])
        try:
            img = self._from_dataset(image_id, im.get("ddkit_index"))
        except Exception as err:  # noqa: BLE001
            log.warning("report: cannot read image %s from the unlabeled dataset: %s", image_id, err)
            img = None
        if img is None:
            img = self._from_file(im.get("file_name"))
        if not isinstance(img, torch.Tensor) or img.dim() not in (2, 3):
            return None
        return img


def _skeleton(data: Mapping[str, Any], info: DatasetInfo | None, num_kp: int) -> list[tuple[int, int]] | None:
    sk = None
    for c in data.get("categories") or []:
        if isinstance(c, Mapping) and c.get("skeleton"):
            sk = [tuple(int(v) - 1 for v in e) for e in c["skeleton"]]  # COCO skeletons are 1-based
            break
    if sk is None and info is not None and info.extra.get("skeleton"):
        sk = [tuple(int(v) for v in e) for e in info.extra["skeleton"]]
    if not sk:
        return None
    return [(i, j) for i, j in sk if 0 <= i < num_kp and 0 <= j < num_kp]


def _spread(items: list[Any], n: int) -> list[Any]:
    """All ``items``, the ``n`` evenly spaced ones first."""
    if len(items) <= n or n <= 0:
        return list(items)
    picks = sorted({int(i * len(items) / n) for i in range(n)})
    chosen = set(picks)
    return [items[i] for i in picks] + [x for i, x in enumerate(items) if i not in chosen]


def _images_plot(data: Mapping[str, Any], label_dir: Path, run_dir: Path, info: DatasetInfo | None,
                 unlabeled: Any, max_images: int, path: Path) -> tuple[bool, str]:
    """Draw the grid; ``(drawn, note)``."""
    classification = data.get("ddkit_format") == IMAGE_LABELS  # one label per image, no boxes to draw
    images = [im for im in data.get("images") or [] if isinstance(im, Mapping) and "id" in im]
    anns: dict[int, list[Mapping[str, Any]]] = {}
    for a in data.get("annotations") or []:
        if isinstance(a, Mapping) and "image_id" in a:
            anns.setdefault(int(a["image_id"]), []).append(a)
    if not images:
        return False, "the pseudo-label file lists no images"
    # images with pseudo-labels first (spread evenly over the file: it is often in class order), then the others
    with_labels = [im for im in images if int(im["id"]) in anns]
    candidates = _spread(with_labels, max_images) + [im for im in images if int(im["id"]) not in anns]
    names = _category_names(info, data)
    cat_ids = sorted(names) or sorted({int(a.get("category_id", -1)) for v in anns.values() for a in v})
    cat_colors = category_colors(cat_ids)
    root = (data.get("info") or {}).get("image_root")
    roots = [Path(root)] if root else []
    roots += [label_dir, run_dir]
    finder = _ImageFinder(unlabeled, roots)
    num_kp = None
    if info is not None and info.num_keypoints:
        num_kp = int(info.num_keypoints)
    else:
        num_kp = ((data.get("info") or {}).get("dataset_info") or {}).get("num_keypoints")
    skeleton = _skeleton(data, info, int(num_kp)) if num_kp else None
    tiles = []
    misses = 0
    for im in candidates:
        if len(tiles) >= max_images or misses >= max(4 * max_images, 50):
            break
        img = finder(im)
        if img is None:
            misses += 1
            continue
        iid = int(im["id"])
        a = anns.get(iid, [])
        if classification:
            title = "no pseudo-label"
            if a:
                cid = int(a[0].get("category_id", -1))
                score = a[0].get("score")
                title = names.get(cid, str(cid)) + (f" ({score:.2f})" if _finite(score) else "")
            tiles.append((to_uint8_rgb(img), title))
        else:
            n = len(a)
            tiles.append((draw_instances(img, a, names, cat_colors, skeleton),
                          f"image {iid}: {n} pseudo-label{'s' if n != 1 else ''}"))
    if not tiles:
        src = "the unlabeled dataset" if unlabeled is not None else "no unlabeled dataset given"
        return False, f"none of its images could be found ({src}; files named in the JSON not found)"
    ncols = min(len(tiles), 6 if classification else 4)
    nrows = int(math.ceil(len(tiles) / ncols))
    side = 1.6 if classification else 3.2
    fig, axes = _figure(side * ncols, (side + 0.35) * nrows, nrows, ncols)
    for k in range(nrows * ncols):
        ax = axes[k // ncols][k % ncols]
        ax.axis("off")
        if k < len(tiles):
            rgb, title = tiles[k]
            ax.imshow(rgb.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=8 if classification else 9)
    fig.suptitle(f"{label_dir.name}: pseudo-labels on unlabeled images", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True, f"{len(tiles)} of {len(images)} images"


def _images_section(label_dirs: Sequence[Path], run_dir: Path, info: DatasetInfo | None,
                    unlabeled: Any, max_images: int, plots: Path, rel: str) -> str:
    parts = ["<h2>Pseudo-labelled images</h2>"]
    files = [(d, d / "pseudo_labels.json") for d in label_dirs if (d / "pseudo_labels.json").is_file()]
    if not files:
        parts.append(_note("No pseudo-labelled images: no label*/pseudo_labels.json."))
        return "\n".join(parts)
    if max_images <= 0:
        parts.append(_note("Images left out (max_images is 0)."))
        return "\n".join(parts)
    for d, f in files:
        data = _read_json(f)
        if len(files) > 1:
            parts.append(f"<h3>{_esc(d.name)}</h3>")
        if not isinstance(data, Mapping):
            parts.append(_note(f"{d.name}/pseudo_labels.json is unreadable."))
            continue
        name = "pseudo_labels.png" if d.name == "label" else f"pseudo_labels_{_slug(d.name)}.png"
        drawn, note = _images_plot(data, d, run_dir, info, unlabeled, max_images, plots / name)
        if drawn:
            parts.append(f'<p class="meta">{_esc(note)} from <code>{_esc(d.name)}/pseudo_labels.json</code></p>')
            parts.append(_img(f"{rel}/{name}", f"{d.name}: pseudo-labels"))
        else:
            parts.append(_note(f"No images drawn for {d.name}: {note}."))
    return "\n".join(parts)


# ============================================================================================ the report
def _guarded(title: str, fn: Callable[[], str]) -> str:
    """A section, or its heading and a note when drawing it fails (a report never breaks a run)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        log.warning("report: section %r failed: %s: %s", title, type(err).__name__, err, exc_info=True)
        return f"<h2>{_esc(title)}</h2>\n" + _note(f"This section could not be drawn: {type(err).__name__}: {err}")


def error_change(reduction: float) -> tuple[str, str]:
    """``(amount, words)`` for a KD student's relative error reduction over the student alone, as results.md and
    the report say it: a negative reduction is more error, not a "-62 % reduction"."""
    if reduction < 0:
        return f"{-100 * reduction:.0f} %", "more error than the student alone"
    return f"{100 * reduction:.0f} %", "relative error reduction over the student alone"


def write_report(run_dir: str | Path, results: Mapping[str, Any] | None, info: DatasetInfo | None = None,
                 task_name: str = "classification", unlabeled: Any = None, max_images: int = 12) -> Path:
    """Write ``run_dir/report.html`` and its plots (``run_dir/plots/*.png``); returns the HTML's path.

    Args:
        run_dir: the run folder of ``ddkit run`` (stage folders with ``metrics.jsonl``, ``label*/`` folders).
        results: ``{"task", "metric", "rows": [{"model", "stage", <metrics>...}], "gap_closed", "tta"}``; every
            key of the rows becomes a column.
        info: the dataset info (category names, keypoints); default: the pseudo-label file's categories.
        task_name: the task's name for the title when ``results`` has none (the pseudo-label file's own format
            says how its labels are drawn).
        unlabeled: the unlabeled dataset (items ``(image [C, H, W] in [0, 1], {"image_id", ...})``) the images of
            the pseudo-label grid come from; without it, the files named in ``pseudo_labels.json`` are read.
        max_images: at most this many images in the grid.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = run_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    results = dict(results or {})
    label_dirs = _label_dirs(run_dir)
    task = str(results.get("task") or task_name)
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):  # "$" in names is text, not mathtext
        sections = _sections(run_dir, results, info, unlabeled, max_images, label_dirs, plots)
    title = f"ddkit run report: {run_dir.name}"
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{_esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">task <b>{_esc(task)}</b> &middot; folder <code>{_esc(run_dir)}</code></p>',
        *sections,
        "</body>", "</html>", "",
    ])
    return atomic_write_text(run_dir / REPORT_NAME, page)


def _sections(run_dir: Path, results: Mapping[str, Any], info: DatasetInfo | None, unlabeled: Any,
              max_images: int, label_dirs: Sequence[Path], plots: Path) -> list[str]:
    return [
        _guarded("Results", lambda: _results_section(results, plots, PLOTS_DIR)),
        _guarded("Training curves", lambda: _curves_section(run_dir, results, plots, PLOTS_DIR)),
        _guarded("Pseudo-labels: thresholds and instance counts",
                 lambda: _label_section(label_dirs, run_dir, plots, PLOTS_DIR)),
        _guarded("Pseudo-label quality (hidden labels)", lambda: _quality_section(label_dirs, plots, PLOTS_DIR)),
        _guarded("Pseudo-labelled images", lambda: _images_section(label_dirs, run_dir, info, unlabeled,
                                                                   max_images, plots, PLOTS_DIR)),
    ]
