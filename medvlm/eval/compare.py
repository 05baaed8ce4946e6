"""Compare runs and checkpoints offline: a Markdown table, a self-contained HTML page and PNG plots.

Inputs are run folders (``metrics.json`` of the final evaluation, ``checkpoint-N/metrics.json``
written by :class:`~medvlm.training.callbacks.CheckpointEvalCallback`, ``trainer_state.json``) or
single ``checkpoint-N`` folders. :func:`write_comparison` writes into ``output``::

    comparison.md / comparison.html / comparison.json   one row per run or checkpoint
    accuracy_rouge.png         closed accuracy (95% CI bars) and ROUGE-L against the training step
    slices_qtype.png, slices_modality.png   closed accuracy per slice value

The columns are the metric registry's table metrics (:func:`~medvlm.eval.metrics.shown_metrics`).
Every name and value in the HTML is escaped; the plots are embedded as data URIs, so the page is
one file that opens anywhere. The same numbers reach W&B through the callback.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.eval.metrics import get_metric, headline, shown_metrics
from medvlm.utils.io import atomic_write_json, atomic_write_text
from medvlm.utils.render import render_html, render_markdown

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
SLICE_FIELDS = ("qtype", "modality")
#: More entries than this and the slice bars show each run's last entry only (readability).
MAX_SLICE_BARS = 8


class CompareError(ValueError):
    """An input folder holding nothing to compare; the message names it and what was expected."""


@dataclass
class Entry:
    """One evaluated point: a run's final evaluation or one of its checkpoints."""

    run: str
    label: str
    step: int | None
    loss: float | None
    metrics: dict = field(repr=False)
    path: str = ""

    def number(self, section: str, key: str) -> Any:
        return (self.metrics.get(section) or {}).get(key)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); re-run the evaluation") from e


def _loss_at(state_file: Path, step: int | None) -> tuple[float | None, int | None]:
    """Last training loss logged at or before ``step`` (all steps when None), and the state's step."""
    if not state_file.is_file():
        return None, None
    state = _read_json(state_file)
    losses = [(h["step"], h["loss"]) for h in state.get("log_history", [])
              if "loss" in h and (step is None or h.get("step", 0) <= step)]
    return (losses[-1][1] if losses else None), state.get("global_step")


def _checkpoint_entry(folder: Path, run: str) -> Entry | None:
    step = int(CHECKPOINT_RE.fullmatch(folder.name).group(1))
    if not (folder / "metrics.json").is_file():
        return None
    loss, _ = _loss_at(folder / "trainer_state.json", step)
    return Entry(run, f"{run}/{folder.name}", step, loss, _read_json(folder / "metrics.json"), str(folder))


def collect_entries(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> tuple[list[Entry], list[dict]]:
    """Entries of every run/checkpoint folder in ``paths`` (``names`` relabel the inputs, in order).

    Returns ``(entries, skipped)``; checkpoints without ``metrics.json`` are skipped with their reason.
    A folder with nothing to compare raises :class:`CompareError`.
    """
    if names is not None and len(names) != len(paths):
        raise CompareError(f"{len(names)} names for {len(paths)} inputs; give one name per input or none")
    entries: list[Entry] = []
    skipped: list[dict] = []
    for i, raw in enumerate(paths):
        path = Path(raw)
        if not path.is_dir():
            raise CompareError(f"{path} is not a folder; pass run folders or checkpoint-N folders")
        if CHECKPOINT_RE.fullmatch(path.name):
            run = names[i] if names else path.parent.name
            entry = _checkpoint_entry(path, run)
            if entry is None:
                raise CompareError(f"{path} holds no metrics.json; was checkpoint_eval_samples > 0 in that run?")
            entries.append(entry)
            continue
        run = names[i] if names else path.name
        found = []
        ckpts = sorted((p for p in path.iterdir() if p.is_dir() and CHECKPOINT_RE.fullmatch(p.name)),
                       key=lambda p: int(p.name.split("-")[1]))
        for ckpt in ckpts:
            entry = _checkpoint_entry(ckpt, run)
            if entry is None:
                skipped.append({"path": str(ckpt), "reason": "no metrics.json in this checkpoint"})
            else:
                found.append(entry)
        if (path / "metrics.json").is_file():
            metrics = _read_json(path / "metrics.json")
            loss, state_step = _loss_at(path / "trainer_state.json", None)
            step = state_step or (metrics.get("train") or {}).get("steps")
            found.append(Entry(run, f"{run} (final)", step, loss, metrics, str(path)))
        if not found:
            raise CompareError(f"{path} holds no metrics.json and no checkpoint-N/metrics.json; pass a run folder "
                               "written by a stage recipe or eval/run_eval.py")
        entries.extend(found)
    return entries, skipped


# Table -----------------------------------------------------------------------------------------

def columns() -> list[str]:
    """The table's columns: the metric registry's table metrics of each answer type (with the
    closed headline's 95% interval and its blank-image control), consistency and flip rate."""
    closed, open_ = (shown_metrics(t, "table") for t in ("closed", "open"))
    head = headline("closed")
    return ["label", "step", "loss", "closed_n", *(m.name for m in closed), f"{head}_ci", f"blank_{head}",
            "open_n", *(m.name for m in open_), "consistent_accuracy", "flip_rate"]


def entry_row(e: Entry) -> dict[str, Any]:
    """The table numbers of one entry (``None`` where the metric was not computed)."""
    head, open_head = headline("closed"), headline("open")
    row: dict[str, Any] = {"label": e.label, "run": e.run, "step": e.step, "loss": e.loss,
                           "closed_n": e.number("closed", "n"), "open_n": e.number("open", "n"),
                           f"{head}_ci": e.number("closed", f"{head}_ci"),
                           f"blank_{head}": ((e.metrics.get("blank_image") or {}).get("closed") or {}).get(head),
                           "consistent_accuracy": e.number("consistency", "consistent_accuracy"),
                           "flip_rate": e.number("robustness", "flip_rate")}
    for t in ("closed", "open"):
        row.update({m.name: e.number(t, m.name) for m in shown_metrics(t, "table")})
    slices = e.metrics.get("slices") or {}
    row["slices"] = {f: {v: (d.get("closed") or {}).get(head) for v, d in slices.get(f, {}).items()}
                     for f in SLICE_FIELDS}
    row["open_slices"] = {f: {v: (d.get("open") or {}).get(open_head) for v, d in slices.get(f, {}).items()}
                          for f in SLICE_FIELDS}
    return row


def slice_tables(rows: Sequence[dict]) -> list[tuple[str, str, str, list[str]]]:
    """``(row key, title, field, values)`` of each slice table worth showing: the closed headline, then
    the open one, per slicing field, keeping only values that have a score in some row."""
    out = []
    for key, t in (("slices", "closed"), ("open_slices", "open")):
        title = get_metric(headline(t), t).title
        for f in SLICE_FIELDS:
            values = sorted({v for r in rows for v, x in r[key][f].items() if x is not None})
            if values:
                out.append((key, title, f, values))
    return out


def comparison_blocks(rows: Sequence[dict], skipped: Sequence[dict]) -> list[tuple]:
    """The comparison as render blocks (:mod:`medvlm.utils.render`): the main table, the slice
    tables, what was skipped."""
    cols = columns()
    blocks: list[tuple] = [("h1", "Comparison"), ("table", cols, [[r[c] for c in cols] for r in rows])]
    for key, title, f, values in slice_tables(rows):
        blocks += [("h2", f"{title} by {f}"),
                   ("table", ["label", *values], [[r["label"], *(r[key][f].get(v) for v in values)] for r in rows])]
    if skipped:
        blocks += [("h2", "Skipped"), ("table", ["path", "reason"], [[s["path"], s["reason"]] for s in skipped])]
    return blocks


def to_markdown(rows: Sequence[dict], skipped: Sequence[dict], plots: Sequence[str]) -> str:
    text = render_markdown(comparison_blocks(rows, skipped))
    return text + "\n## Plots\n\n" + "".join(f"![{p}]({p})\n" for p in plots)


def to_html(rows: Sequence[dict], skipped: Sequence[dict], plots: dict[str, bytes]) -> str:
    """One self-contained page: every text escaped, plots as data URIs."""
    return render_html([*comparison_blocks(rows, skipped), ("figures", dict(plots))], "Comparison")


# Plots -----------------------------------------------------------------------------------------

def _figure_bytes(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_curves(rows: Sequence[dict]) -> bytes:
    """Closed accuracy (CI error bars) and ROUGE-L per run against the step (entry order without steps).

    Checkpoints (evaluated on the small fixed subset) are joined by a line; a run's final evaluation
    (usually the whole test split) is a separate star, so two sample sizes are never drawn as one curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def nan(v: Any) -> float:
        return float("nan") if v is None else v

    head, open_head = headline("closed"), headline("open")
    ci = f"{head}_ci"
    fig, (ax_acc, ax_rouge) = plt.subplots(1, 2, figsize=(12, 4))
    for i, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
        color = f"C{i % 10}"
        pts = [r for r in rows if r["run"] == run]
        xs = [r["step"] if r["step"] is not None else j for j, r in enumerate(pts)]
        for final, marker, style in ((False, "o", "-"), (True, "*", "none")):
            sel = [(x, r) for x, r in zip(xs, pts) if r["label"].endswith("(final)") == final]
            if not sel:
                continue
            x = [x for x, _ in sel]
            acc = [nan(r[head]) for _, r in sel]
            err = [[a - r[ci][0] if r[ci] and r[head] is not None else 0
                    for a, (_, r) in zip(acc, sel)],
                   [r[ci][1] - a if r[ci] and r[head] is not None else 0
                    for a, (_, r) in zip(acc, sel)]]
            n = sorted({r["closed_n"] for _, r in sel if r["closed_n"] is not None})
            label = f"{run} {'final' if final else 'checkpoints'} (n={'/'.join(map(str, n)) or '?'})"
            ms = 12 if final else 6
            ax_acc.errorbar(x, acc, yerr=err, marker=marker, markersize=ms, linestyle=style, capsize=3, color=color,
                            label=label)
            ax_rouge.plot(x, [nan(r[open_head]) for _, r in sel], marker=marker, markersize=ms, linestyle=style,
                          color=color, label=label)
    ax_acc.set(title=f"{get_metric(head, 'closed').title} (95% CI)", xlabel="step", ylabel=head, ylim=(0, 1.02))
    ax_rouge.set(title=get_metric(open_head, "open").title, xlabel="step", ylabel=open_head, ylim=(0, 1.02))
    ax_rouge.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _figure_bytes(fig)


def plot_slices(rows: Sequence[dict], field_name: str) -> bytes | None:
    """Grouped bars: closed accuracy per slice value, one bar per entry (each run's last when many)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if len(rows) > MAX_SLICE_BARS:
        rows = [[r for r in rows if r["run"] == run][-1] for run in dict.fromkeys(r["run"] for r in rows)]
    # slice values with no closed question (open-only question types) would be empty bar groups
    values = sorted({v for r in rows for v, acc in r["slices"][field_name].items() if acc is not None})
    if not values:
        return None
    x = np.arange(len(values))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(values) + 2), 4))
    for i, r in enumerate(rows):
        ys = [r["slices"][field_name].get(v) for v in values]
        ax.bar(x + i * width - 0.4 + width / 2, [np.nan if y is None else y for y in ys], width, label=r["label"])
    ax.set_xticks(x, values, rotation=30, ha="right")
    ax.set(title=f"Closed accuracy by {field_name}", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _figure_bytes(fig)


def write_comparison(paths: Sequence[str | Path], output: str | Path, names: Sequence[str] | None = None) -> dict:
    """Collect, tabulate, plot and write everything (see the module docstring); returns the rows."""
    entries, skipped = collect_entries(paths, names)
    rows = [entry_row(e) for e in entries]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, bytes] = {"accuracy_rouge.png": plot_curves(rows)}
    for f in SLICE_FIELDS:
        png = plot_slices(rows, f)
        if png is not None:
            plots[f"slices_{f}.png"] = png
    for name, data in plots.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
    atomic_write_text(out / "comparison.md", to_markdown(rows, skipped, list(plots)))
    atomic_write_text(out / "comparison.html", to_html(rows, skipped, plots))
    result = {"rows": rows, "skipped": skipped, "inputs": [str(p) for p in paths], "plots": list(plots)}
    atomic_write_json(out / "comparison.json", result)
    logger.info("compared %d entries from %d inputs into %s", len(rows), len(paths), out)
    return result
