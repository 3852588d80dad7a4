"""The result of ``ddkit bench``: the grid's rows (one per aggregator x selector cell), their order, and the files
written from them (``bench.csv``, ``bench.md``, ``bench.json``, two PNG plots)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ddkit.engine.prediction_kinds import INSTANCES, KINDS
from ddkit.errors import ConfigError

LOWER_IS_BETTER = ("agg_ms_per_image",)


@dataclass
class BenchResult:
    """Rows of the grid (one dict per aggregator x selector cell) and what the bench ran on."""

    prediction_type: str
    rows: list[dict[str, Any]]
    sort_by: str
    num_images: int
    num_views: int
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> Any:
        """The :class:`~ddkit.engine.prediction_kinds.PredictionKind` benched."""
        return KINDS[self.prediction_type]

    def sorted_rows(self) -> list[dict[str, Any]]:
        return sort_rows(self.rows, self.sort_by)


def sort_rows(rows: Sequence[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    if rows and key not in rows[0]:
        raise ConfigError(f"bench.sort_by: {key!r} is not a metric of this bench; choose one of "
                          f"{', '.join(k for k, v in rows[0].items() if isinstance(v, (int, float)))}")
    sign = 1.0 if key in LOWER_IS_BETTER else -1.0

    def k(row: Mapping[str, Any]) -> tuple:
        v = row.get(key)
        bad = v is None or (isinstance(v, float) and math.isnan(v))
        return (bad, sign * float(v) if not bad else 0.0)

    return [dict(r) for r in sorted(rows, key=k)]


def _fmt_cell(key: str, v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if key in ("AP", "AP50", "AR", "precision", "recall", "accuracy", "selected_accuracy", "coverage",
                   "agg_recall"):
            return f"{100 * v:.1f}"
        if key == "agg_ms_per_image":
            return f"{v:.3f}"
        return f"{v:.2f}"
    return str(v)


def markdown_table(result: BenchResult) -> str:
    """The grid as a markdown table, sorted by ``result.sort_by`` (percentages for rates, ms for time); an ``error``
    column when some cell failed."""
    metrics = result.kind.bench_metrics
    failed = ("error",) if any(r.get("error") for r in result.rows) else ()
    cols = ("aggregator", "selector") + metrics + failed
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("aggregator", "selector") else "---:"
                                                             for c in cols) + "|"]
    for row in result.sorted_rows():
        lines.append("| " + " | ".join(_fmt_cell(c, row.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def csv_text(result: BenchResult) -> str:
    rows = result.sorted_rows()
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _save_fig(fig, path: Path) -> Path:
    from ddkit.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_results(result: BenchResult, out_dir: Path) -> list[Path]:
    """Two PNGs: quality vs aggregation time (one point per aggregator variant) and the selection's
    precision/recall (boxes) or selected accuracy/coverage (classes), one point per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    boxes = result.kind is INSTANCES
    quality = result.kind.quality_metric
    aggs = list(dict.fromkeys(r["aggregator"] for r in rows))
    sels = list(dict.fromkeys(r["selector"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(aggs) <= 10 else "tab20")
    markers = "osD^v<>pPX*hH8"
    paths = []

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, a in enumerate(aggs):
        r = next(r for r in rows if r["aggregator"] == a)
        ax.scatter(r["agg_ms_per_image"], 100 * r[quality], color=cmap(i % 20), label=a, s=40,
                   marker=markers[i % len(markers)])
    ax.set_xlabel("aggregation time per image (ms)")
    ax.set_ylabel(f"{quality} (%)")
    ax.set_title(f"{quality} of aggregated predictions vs aggregation time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(_save_fig(fig, out_dir / f"bench_{quality.lower()}_vs_time.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    xk, yk = ("recall", "precision") if boxes else ("coverage", "selected_accuracy")
    for r in rows:
        i, j = aggs.index(r["aggregator"]), sels.index(r["selector"])
        x, y = r[xk], r[yk]
        if x is None or y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        ax.scatter(100 * x, 100 * y, color=cmap(i % 20), marker=markers[j % len(markers)], s=40)
    for i, a in enumerate(aggs):
        ax.scatter([], [], color=cmap(i % 20), marker="o", label=a)
    for j, s in enumerate(sels):
        ax.scatter([], [], color="gray", marker=markers[j % len(markers)], label=s)
    ax.set_xlabel(f"{xk} of selected pseudo-labels (%)")
    ax.set_ylabel(f"{yk} of selected pseudo-labels (%)")
    ax.set_title("selection: " + ("precision vs recall" if boxes else "accuracy vs coverage"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(_save_fig(fig, out_dir / ("bench_selection_pr.png" if boxes else "bench_selection_accuracy.png")))
    plt.close(fig)
    return paths


def write_outputs(result: BenchResult, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """``bench.csv``, ``bench.md``, ``bench.json`` and the PNG plots into ``out_dir`` (atomic writes)."""
    from ddkit.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(result)
    head = f"# {title}\n\n" if title else ""
    info = (f"{result.num_images} images, {result.num_views} views, {len({r['aggregator'] for r in result.rows})} "
            f"aggregator variants x {len({r['selector'] for r in result.rows})} selector variants, "
            f"sorted by {result.sort_by}\n\n")
    paths = {
        "csv": atomic_write_text(out_dir / "bench.csv", csv_text(result)),
        "markdown": atomic_write_text(out_dir / "bench.md", head + info + md + "\n"),
        "json": atomic_write_json(out_dir / "bench.json", {
            "prediction_type": result.prediction_type, "sort_by": result.sort_by, "num_images": result.num_images,
            "num_views": result.num_views, "notes": result.notes,
            "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                     for r in result.sorted_rows()]}),
    }
    for p in plot_results(result, out_dir):
        paths[p.stem] = p
    return paths
