"""Compare runs and checkpoints offline: a Markdown table, a self-contained HTML page and PNG plots.

Inputs are run folders (``metrics.json`` of the final evaluation, ``checkpoint-N/metrics.json``
written by :class:`~medvlm.training.callbacks.CheckpointEvalCallback`, ``trainer_state.json``) or
single ``checkpoint-N`` folders. :func:`write_comparison` writes into ``output``::

    comparison.md / comparison.html / comparison.json   one row per run or checkpoint
    accuracy_rouge.png         closed accuracy (95% CI bars) and ROUGE-L against the training step
    slices_qtype.png, slices_modality.png   closed accuracy per slice value

Every name and value in the HTML is ``html.escape``'d; the plots are embedded as data URIs, so
the page is one file that opens anywhere. The same numbers reach W&B through the callback.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.utils.io import atomic_write_json, atomic_write_text

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

COLUMNS = ("label", "step", "loss", "closed_n", "accuracy", "accuracy_ci", "open_n", "rougeL", "token_f1",
           "consistent_accuracy", "flip_rate")


def entry_row(e: Entry) -> dict[str, Any]:
    """The headline numbers of one entry (``None`` where the metric was not computed)."""
    return {
        "label": e.label, "run": e.run, "step": e.step, "loss": e.loss,
        "closed_n": e.number("closed", "n"), "accuracy": e.number("closed", "accuracy"),
        "accuracy_ci": e.number("closed", "accuracy_ci"),
        "open_n": e.number("open", "n"), "rougeL": e.number("open", "rougeL"),
        "token_f1": e.number("open", "token_f1"),
        "consistent_accuracy": e.number("consistency", "consistent_accuracy"),
        "flip_rate": e.number("robustness", "flip_rate"),
        "slices": {f: {v: (d.get("closed") or {}).get("accuracy")
                       for v, d in (e.metrics.get("slices") or {}).get(f, {}).items()} for f in SLICE_FIELDS},
        "open_slices": {f: {v: (d.get("open") or {}).get("rougeL")
                            for v, d in (e.metrics.get("slices") or {}).get(f, {}).items()} for f in SLICE_FIELDS},
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def slice_tables(rows: Sequence[dict]) -> list[tuple[str, str, str, list[str]]]:
    """``(row key, title, field, values)`` of each slice table worth showing: closed accuracy, then open
    ROUGE-L, per slicing field, keeping only values that have a score in some row."""
    out = []
    for key, title in (("slices", "Closed accuracy"), ("open_slices", "Open ROUGE-L")):
        for f in SLICE_FIELDS:
            values = sorted({v for r in rows for v, x in r[key][f].items() if x is not None})
            if values:
                out.append((key, title, f, values))
    return out


def to_markdown(rows: Sequence[dict], skipped: Sequence[dict], plots: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")  # no raw HTML in cells

    lines = ["# Comparison", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    for key, title, f, values in slice_tables(rows):
        lines += ["", f"## {title} by {f}", "", "| label | " + " | ".join(cell(v) for v in values) + " |",
                  "|" + "---|" * (len(values) + 1)]
        lines += ["| " + cell(r["label"]) + " | " + " | ".join(cell(r[key][f].get(v)) for v in values) + " |"
                  for r in rows]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {cell(s['path'])}: {cell(s['reason'])}" for s in skipped]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def to_html(rows: Sequence[dict], skipped: Sequence[dict], plots: dict[str, bytes]) -> str:
    """One self-contained page: every text ``html.escape``'d, plots as base64 data URIs."""
    esc = html.escape

    def table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
        head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Comparison</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "img{max-width:100%}</style></head><body><h1>Comparison</h1>",
             table(COLUMNS, [[r[c] for c in COLUMNS] for r in rows])]
    for key, title, f, values in slice_tables(rows):
        parts.append(f"<h2>{esc(title)} by {esc(f)}</h2>")
        parts.append(table(["label", *values], [[r["label"], *(r[key][f].get(v) for v in values)] for r in rows]))
    if skipped:
        parts.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{esc(s['path'])}: {esc(s['reason'])}</li>"
                                                      for s in skipped) + "</ul>")
    for name, data in plots.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f"<h2>{esc(name)}</h2><img alt='{esc(name, quote=True)}' src='{uri}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
            acc = [nan(r["accuracy"]) for _, r in sel]
            err = [[a - r["accuracy_ci"][0] if r["accuracy_ci"] and r["accuracy"] is not None else 0
                    for a, (_, r) in zip(acc, sel)],
                   [r["accuracy_ci"][1] - a if r["accuracy_ci"] and r["accuracy"] is not None else 0
                    for a, (_, r) in zip(acc, sel)]]
            n = sorted({r["closed_n"] for _, r in sel if r["closed_n"] is not None})
            label = f"{run} {'final' if final else 'checkpoints'} (n={'/'.join(map(str, n)) or '?'})"
            ms = 12 if final else 6
            ax_acc.errorbar(x, acc, yerr=err, marker=marker, markersize=ms, linestyle=style, capsize=3, color=color,
                            label=label)
            ax_rouge.plot(x, [nan(r["rougeL"]) for _, r in sel], marker=marker, markersize=ms, linestyle=style,
                          color=color, label=label)
    ax_acc.set(title="Closed accuracy (95% CI)", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax_rouge.set(title="Open ROUGE-L", xlabel="step", ylabel="ROUGE-L F", ylim=(0, 1.02))
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
