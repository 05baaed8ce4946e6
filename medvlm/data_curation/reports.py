"""What a mix holds: value counts of conditions, modalities and body parts, per candidate mix.

>>> # paths = write_mix_report({"main": ds_main, "anneal": ds_anneal}, "runs/mix")
>>> # paths["png"], paths["md"], paths["csv"]     # report.png / report.md / report.csv

The figure is one panel per category with grouped bars (one colour per mix), as shares of each
mix's rows so that mixes of different sizes compare (the seed paper's figure 3 compares its
candidate mixes this way); the table holds counts and shares. Conditions are read from each row's
meta: ``finding``/``findings``, ``diagnosis`` and concept names (``concepts``), lower-cased;
``none`` (a normal study) is reported as ``(no finding)``. Counts are per row (question), not per
image. Columns are read in batches, so any size of dataset works.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path

import datasets

from medvlm.records import parse_meta
from medvlm.utils.io import atomic_write_text
from medvlm.utils.render import render_markdown

CATEGORIES = ("condition", "modality", "body_part")
CONDITION_KEYS = ("finding", "findings", "diagnosis")
NO_FINDING = "(no finding)"
_BATCH = 10_000


def conditions_of(meta: str) -> list[str]:
    """Condition names of one record's meta JSON (distinct, lower-case, in the order found)."""
    obj = parse_meta(meta)
    found: list[str] = []
    for key in CONDITION_KEYS:
        value = obj.get(key)
        values = value if isinstance(value, list) else [value]
        found += [v for v in values if isinstance(v, str)]
    for concept in obj.get("concepts") or []:
        name = concept.get("name", "") if isinstance(concept, dict) else concept
        if isinstance(name, str):
            found.append(name)
    names = [NO_FINDING if v.strip().lower() in ("none", "normal") else v.strip().lower() for v in found]
    return list(dict.fromkeys(n for n in names if n and len(n) <= 80))  # long texts are not condition names


def value_counts(ds: datasets.Dataset) -> dict[str, Counter]:
    """``{category: Counter(value -> rows)}`` for conditions, modalities and body parts."""
    counts = {c: Counter() for c in CATEGORIES}
    for b in ds.select_columns(["meta", "modality", "body_part"]).iter(batch_size=_BATCH):
        counts["modality"].update(v or "(unknown)" for v in b["modality"])
        counts["body_part"].update(v or "(unknown)" for v in b["body_part"])
        for meta in b["meta"]:
            counts["condition"].update(conditions_of(meta))
    return counts


def report_rows(mixes: dict[str, datasets.Dataset], top_k: int = 20) -> list[dict]:
    """One row per (category, value, mix): count and share of that mix's rows; top ``top_k`` values
    per category (by total count over the mixes), the rest summed into ``(other)``."""
    per_mix = {name: value_counts(ds) for name, ds in mixes.items()}
    sizes = {name: len(ds) for name, ds in mixes.items()}
    rows = []
    for cat in CATEGORIES:
        total = Counter()
        for counts in per_mix.values():
            total.update(counts[cat])
        top = [v for v, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]
        for value in top + (["(other)"] if len(total) > top_k else []):
            for name, counts in per_mix.items():
                c = counts[cat]
                n = sum(k for v, k in c.items() if v not in top) if value == "(other)" else c.get(value, 0)
                rows.append({"category": cat, "value": value, "mix": name, "count": n,
                             "share": round(n / sizes[name], 4) if sizes[name] else 0.0})
    return rows


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["category", "value", "mix", "count", "share"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _markdown(rows: list[dict], mixes: dict[str, datasets.Dataset], title: str,
              folders: dict[str, str] | None = None) -> str:
    names = list(mixes)
    blocks: list[tuple] = [("h1", title), ("p", "Rows per mix: " + ", ".join(f"{n} {len(mixes[n])}" for n in names))]
    if folders:
        blocks.append(("table", ["mix", "folder"], [[n, folders[n]] for n in names]))
    blocks.append(("p", "Counts are rows (questions); the share of each mix's rows is in brackets."))
    for cat in CATEGORIES:
        cells: dict[str, dict[str, str]] = {}
        for r in rows:
            if r["category"] == cat:
                cells.setdefault(r["value"], {})[r["mix"]] = f"{r['count']} ({100 * r['share']:.1f}%)"
        blocks += [("h2", cat.replace("_", " ")),
                   ("table", ["value", *names], [[v, *(c.get(n, "0") for n in names)] for v, c in cells.items()])]
    return render_markdown(blocks)


def _plot(rows: list[dict], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(CATEGORIES), 1, figsize=(11, 3.2 * len(CATEGORIES)), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, cat in zip(axes[:, 0], CATEGORIES, strict=True):
        values = list(dict.fromkeys(r["value"] for r in rows if r["category"] == cat))
        share = {(r["value"], r["mix"]): r["share"] for r in rows if r["category"] == cat}
        x = np.arange(len(values))
        for k, name in enumerate(names):
            ax.bar(x + (k - (len(names) - 1) / 2) * width, [100 * share.get((v, name), 0) for v in values],
                   width, label=name)
        ax.set_xticks(x, values, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("% of rows")
        ax.set_title(cat.replace("_", " "))
        if not values:
            ax.text(0.5, 0.5, "no values", ha="center", transform=ax.transAxes)
    axes[0, 0].legend(title="mix", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_mix_report(mixes: dict[str, datasets.Dataset], out_dir: str | os.PathLike, title: str = "mix report",
                     top_k: int = 20, stem: str = "report", folders: dict[str, str] | None = None) -> dict[str, Path]:
    """Write ``<stem>.png``, ``<stem>.md`` and ``<stem>.csv`` comparing ``mixes`` (name → records).
    ``folders`` (name → folder) is listed in the Markdown so each label traces back to its mix.

    Returns ``{"png": ..., "md": ..., "csv": ...}``. Raises ValueError when ``mixes`` is empty.
    """
    if not mixes:
        raise ValueError("write_mix_report needs at least one mix (name -> dataset)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(mixes, top_k)
    paths = {"png": out / f"{stem}.png", "md": out / f"{stem}.md", "csv": out / f"{stem}.csv"}
    atomic_write_text(paths["csv"], _csv_text(rows))
    atomic_write_text(paths["md"], _markdown(rows, mixes, title, folders) + "\n")
    _plot(rows, list(mixes), paths["png"], title)
    return paths


def mix_labels(folders: list[str | os.PathLike], names: list[str] | None = None) -> list[str]:
    """One distinct label per mix folder: ``names`` when given (one per folder, all different), else
    the shortest path suffix that tells the folder apart from the others (``demo-a/stage2/mix-x`` and
    ``demo-b/stage2/mix-x`` for two runs' ``mix-x`` folders; just ``mix-x`` when no other folder shares
    that name). The same folder given twice gets ``#2``. Raises ValueError on bad ``names``."""
    if names is not None:
        if len(names) != len(folders):
            raise ValueError(f"{len(names)} names for {len(folders)} mix folders; give one name per folder or none")
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise ValueError(f"--names repeats {repeated}; every mix needs its own name")
        return list(names)
    parts = [Path(os.path.abspath(f)).parts for f in folders]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i and p != mine]
        k = next((k for k in range(1, len(mine)) if all(p[-k:] != mine[-k:] for p in others)), len(mine))
        labels.append(str(Path(*mine[-k:])))
    seen: Counter = Counter()
    for i, label in enumerate(labels):
        seen[label] += 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return labels


def compare_mix_folders(folders: list[str | os.PathLike], out_dir: str | os.PathLike, top_k: int = 20,
                        names: list[str] | None = None) -> dict:
    """Report across finished mix folders (each written by ``build_mix``), one bar group per folder,
    labelled by :func:`mix_labels` (``names``, or the shortest distinguishing path suffix)."""
    labels = mix_labels(folders, names)
    mixes = {}
    for folder, label in zip(folders, labels, strict=True):
        data = Path(folder) / "dataset"
        if not data.is_dir():
            raise FileNotFoundError(f"{folder} holds no dataset/ folder; pass folders written by build_mix")
        mixes[label] = datasets.load_from_disk(str(data))
    sources = {label: os.path.abspath(folder) for label, folder in zip(labels, folders, strict=True)}
    return write_mix_report(mixes, out_dir, title="candidate mixes", top_k=top_k, stem="comparison",
                            folders=sources)
