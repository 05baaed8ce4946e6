"""Mix sources: load each source of a mix into unified records and run its filters.

Used by :func:`medvlm.data_curation.mixing.build_mix`; see that module for the mix format. A source is
``phantom``, a :func:`~medvlm.data_curation.load_source` name (with ``path``), ``json`` / ``jsonl`` (with
``path``: a JSON-lines file or folder of ``*.jsonl`` unified records), or itself the path of a folder
saved by ``Dataset.save_to_disk`` or of such JSON-lines records. Every path is checked before any
source is loaded, so a placeholder path fails at once, naming itself and the YAML to edit. Nothing is
dropped silently: rows a loader refused are written to ``filters/<name>/load_skipped.jsonl`` and rows
a filter rejected to ``filters/<name>/rejects.jsonl``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from medvlm.data_curation.filters import KEY_FIELDS, FilterPipeline, FilterStep
from medvlm.data_curation.loading import UnknownSourceError, source_accepts_file
from medvlm.data_curation.sources import SOURCES
from medvlm.records import COLUMNS, FEATURES
from medvlm.utils.hub import looks_like_hub_id
from medvlm.utils.io import atomic_write_text, did_you_mean, sha256_file

logger = logging.getLogger(__name__)

_BATCH = 1000
#: Rows while a mix is built: the unified record plus the name of the mix source they came from.
TAGGED = datasets.Features({**FEATURES, "_mix_source": datasets.Value("string")})


class MixError(ValueError):
    """A mix config that cannot be built; the message names the source or phase and the fix."""


@dataclass
class SourceSpec:
    name: str
    source: str                      # 'phantom', 'json', a load_source name, a saved dataset folder, or JSONL
    path: str | None = None          # the dataset as the user has it (for load_source names)
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)
    filters: list[Any] = field(default_factory=list)   # filter steps run before mixing
    streaming: bool = False          # read JSONL / hub sources lazily (see the module docstring)
    shuffle_buffer: int = 10_000     # rows held for shuffling a streamed source
    review: str | None = None        # a filled review sheet (CSV) applied after the filters
    review_sample: int = 0           # rows written to review/<name>.csv for a reviewer (seeded sample)


#: ``source:`` values that read unified JSON-lines records from ``path``.
JSON_KINDS = ("json", "jsonl")


def source_kinds() -> list[str]:
    """Every ``source:`` name a mix accepts (besides a path): ``json``/``jsonl`` and the dataset loaders."""
    return sorted({*JSON_KINDS, *SOURCES})


def _looks_like_path(text: str) -> bool:
    return (any(sep in text for sep in ("/", "\\")) or text.startswith(("~", "."))
            or Path(text).suffix in (".jsonl", ".json", ".arrow"))


def check_source_paths(specs: list[SourceSpec], origin: str = "the mix YAML") -> None:
    """Raise :class:`MixError` for the first source whose kind is unknown or whose path is missing.

    Run before any source is loaded, so a placeholder path fails in a second, not after the sources
    before it were loaded and filtered. ``origin`` names the YAML to edit in the message.
    """
    for spec in specs:
        where = f"mix source {spec.name!r}"
        if spec.source == "phantom":
            continue  # the path is optional: the phantom dataset is generated there when missing
        if spec.source in JSON_KINDS or spec.source in SOURCES:
            what = ("a JSON-lines file or folder of *.jsonl records" if spec.source in JSON_KINDS
                    else f"the dataset folder{' or its data file' if source_accepts_file(spec.source) else ''}, "
                         "a local HF copy, or a hub id owner/name")
            if not spec.path:
                raise MixError(f"{where}: `source: {spec.source}` needs `path:` ({what}); add it in {origin}")
            text = str(spec.path)
            if spec.source in SOURCES and looks_like_hub_id(text):
                continue
            if not Path(text).expanduser().exists():
                raise MixError(f"{where}: dataset folder/file {text!r} does not exist: set `path:` in {origin} "
                               f"to your copy ({what})")
            if spec.source in SOURCES and Path(text).expanduser().is_file() and not source_accepts_file(spec.source):
                raise MixError(f"{where}: {text!r} is a file but `source: {spec.source}` reads a folder: set "
                               f"`path:` in {origin} to the folder holding it")
            if spec.source in JSON_KINDS and not _jsonl_files(Path(text).expanduser()):
                raise MixError(f"{where}: {text!r} holds no JSON-lines records (a .jsonl file, or a folder "
                               f"with generated.jsonl or other *.jsonl files); fix `path:` in {origin}")
            continue
        if Path(spec.source).expanduser().exists():
            continue
        if _looks_like_path(spec.source):
            raise MixError(f"{where}: dataset folder/file {spec.source!r} does not exist: set `source:` in "
                           f"{origin} to your copy (or `source: json` with `path:`)")
        raise MixError(f"{where} in {origin}: {did_you_mean(spec.source, source_kinds(), 'source')} (json "
                       "and dataset names take `path:`), or give the path of a saved dataset folder or "
                       "JSON-lines file")


#: JSON-lines files written next to records that are not records (journals, rejects, notes).
NOT_RECORDS = ("items.jsonl", "rejects.jsonl", "filter_notes.jsonl", "load_skipped.jsonl")


def _jsonl_files(path: Path) -> list[str]:
    """Record files of a JSONL source: the file itself; in a folder, ``generated.jsonl`` when present
    (a ``generate_qa`` output folder), else every ``*.jsonl`` except :data:`NOT_RECORDS`."""
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return [str(path)]
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        if (path / "generated.jsonl").is_file():
            return [str(path / "generated.jsonl")]
        return sorted(str(p) for p in path.glob("*.jsonl") if p.name not in NOT_RECORDS)
    return []


def _unified_stream(ds: datasets.IterableDataset, origin: str) -> datasets.IterableDataset:
    """Streamed JSON rows → the unified columns (features are unknown until the first row)."""
    def gen():
        for n, row in enumerate(ds):
            missing = [c for c in COLUMNS if c not in row]
            if missing:
                raise MixError(f"{origin}: row {n} lacks unified columns {missing}")
            yield {c: row[c] for c in COLUMNS}

    return datasets.IterableDataset.from_generator(gen, features=FEATURES)


def _unified(ds: datasets.Dataset | datasets.IterableDataset, origin: str):
    if isinstance(ds, datasets.IterableDataset):
        return _unified_stream(ds, origin)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise MixError(f"{origin}: records lack unified columns {missing}; build them with medvlm loaders")
    extra = [c for c in ds.column_names if c not in COLUMNS]
    ds = ds.remove_columns(extra) if extra else ds
    return ds.cast(FEATURES) if ds.features != FEATURES else ds


def load_mix_source(spec: SourceSpec) -> datasets.Dataset | datasets.IterableDataset:
    """The source's unified records (an ``IterableDataset`` when ``spec.streaming``)."""
    return _load_with_skips(spec)[0]


def _load_with_skips(spec: SourceSpec) -> tuple[datasets.Dataset | datasets.IterableDataset, list[dict], list[str]]:
    """(records, rows the loader skipped, loader warnings); only dataset loaders skip rows."""
    if spec.source == "phantom":
        from medvlm.data_curation.phantom import load_phantom_source

        ds = load_phantom_source(spec.path, split=spec.split, **spec.options)
        return (ds.to_iterable_dataset() if spec.streaming else ds), [], []
    where = Path(spec.path if spec.source in ("json", "jsonl") else spec.source).expanduser()
    files = _jsonl_files(where)
    if files:
        try:
            ds = datasets.load_dataset("json", data_files=files, split="train", streaming=spec.streaming)
        except datasets.exceptions.DatasetGenerationError as err:
            raise MixError(f"mix source {spec.name!r}: cannot read {files} as unified records "
                           f"({err.__cause__ or err}); every line must be one record with the same "
                           "columns (see medvlm.records)") from err
        ds = _unified(ds, f"mix source {spec.name!r} ({where})")
        if spec.split:
            ds = ds.filter(lambda s: s in (spec.split, ""), input_columns="split")
        return ds, [], []
    if where.is_dir():
        ds = datasets.load_from_disk(str(where))
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise MixError(f"mix source {spec.name!r}: {where} has splits {list(ds)}, not {spec.split!r}")
            ds = ds[spec.split]
        return (ds.to_iterable_dataset() if spec.streaming else ds), [], []
    from medvlm.data_curation import load_source

    result = load_source(spec.source, spec.path, split=spec.split, **spec.options)
    if result.skipped:
        logger.warning("mix source %s: the loader skipped %d rows (listed in filters/%s/load_skipped.jsonl)",
                       spec.name, len(result.skipped), spec.name)
    ds = result.dataset.to_iterable_dataset() if spec.streaming else result.dataset
    return ds, result.skipped, result.warnings


def _load(spec: SourceSpec):
    check_source_paths([spec])
    try:
        return _load_with_skips(spec)
    except UnknownSourceError as err:
        raise MixError(f"mix source {spec.name!r}: {did_you_mean(spec.source, source_kinds(), 'source')}, "
                       "or give the path of a saved dataset folder or JSON-lines file") from err
    except FileNotFoundError as err:
        raise MixError(f"mix source {spec.name!r} ({spec.source}): {err}") from err


def _filter_stream(ds: datasets.IterableDataset, steps: list[FilterStep], out: Path, stats: dict):
    """Row-wise filters applied lazily; rejects appended as rows are consumed; ``stats`` updated."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rejects.jsonl").unlink(missing_ok=True)  # appended while phases consume rows

    def gen():
        with open(out / "rejects.jsonl", "a", encoding="utf-8") as fh:
            for batch in ds.iter(batch_size=_BATCH):
                batch = {c: batch[c] for c in COLUMNS}
                for step in steps:
                    n = len(batch["id"])
                    reasons, _ = step.judge(batch, list(range(n)))
                    keep = [i for i, r in enumerate(reasons) if not r]
                    for i, r in enumerate(reasons):
                        if r:
                            fh.write(json.dumps({"id": batch["id"][i], "step": step.name, "reason": r,
                                                 **{k: batch[k][i] for k in KEY_FIELDS}}) + "\n")
                    s = stats.setdefault(step.name, {"step": step.name, "in": 0, "out": 0, "rejected": 0})
                    s["in"], s["out"], s["rejected"] = s["in"] + n, s["out"] + len(keep), s["rejected"] + n - len(keep)
                    batch = {k: [v[i] for i in keep] for k, v in batch.items()}
                for i in range(len(batch["id"])):
                    yield {k: v[i] for k, v in batch.items()}

    return datasets.IterableDataset.from_generator(gen, features=FEATURES)


def _llm_specs(specs: list[Any], cache_dir: Path) -> list[Any]:
    """A ``blind_check`` given ``llm: {backend: ..., model: ...}`` gets a backend from ``medvlm.llm``
    (imported only then: the filters themselves accept any object with ``generate``). Its responses
    are cached in ``cache_dir`` unless the step names its own ``cache_dir``, so re-running a build that
    died midway asks the server nothing twice."""
    out = []
    for spec in specs:
        if isinstance(spec, dict) and "step" not in spec and len(spec) == 1:
            spec = {"step": next(iter(spec)), **(next(iter(spec.values())) or {})}
        if isinstance(spec, dict) and spec.get("step") == "blind_check" and isinstance(spec.get("llm"), dict):
            from medvlm.llm import make_llm

            spec = {**spec, "llm": make_llm({"cache_dir": str(cache_dir), **spec["llm"]})}
        out.append(spec)
    return out


def prepare_sources(specs: list[SourceSpec], out: Path, llm: Any = None, seed: int = 0) -> tuple[dict, dict, dict]:
    """Load, filter and review each source; returns (name -> tagged records, filter info, loader info).

    Rows a loader skipped go to ``out/filters/<name>/load_skipped.jsonl`` (one ``{source, file, row,
    reason}`` per line); the loader info holds their count, the file's hash and the loader's warnings.
    """
    loaded, filtered, loads = {}, {}, {}
    for spec in specs:
        ds, skipped, warnings = _load(spec)
        folder = out / "filters" / spec.name
        if skipped or warnings:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "load_skipped.jsonl"
            atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
            loads[spec.name] = {"skipped": len(skipped), "skipped_sha256": sha256_file(path),
                                "skip_reasons": dict(Counter(_reason_kind(s["reason"]) for s in skipped)),
                                "warnings": warnings}
        if spec.filters:
            pipe = FilterPipeline.from_config(_llm_specs(spec.filters, out / "llm_cache"), llm=llm)
            if spec.streaming:
                stats: dict = {}
                ds = _filter_stream(ds, pipe.steps, folder, stats)
                filtered[spec.name] = {"steps": pipe.describe(), "counts": stats, "streamed": True}
            else:
                result = pipe.run(ds, folder)
                ds = result.dataset
                filtered[spec.name] = {"steps": pipe.describe(), "counts": result.counts,
                                       "rejects_sha256": sha256_file(result.rejects_path)}
        if spec.review or spec.review_sample:
            ds = _review(spec, ds, out, filtered.setdefault(spec.name, {"steps": [], "counts": []}), seed)
        ds = ds.map(_tag, batched=True, fn_kwargs={"name": spec.name}, features=TAGGED)  # counts per mix source
        if not spec.streaming and len(ds) == 0:
            raise MixError(f"mix source {spec.name!r} ({spec.source}) has no rows"
                           f"{' left after its filters' if spec.filters else ''}; check its path/split/filters"
                           f"{f' (the loader skipped {len(skipped)} rows: see load_skipped.jsonl)' if skipped else ''}")
        loaded[spec.name] = ds
    return loaded, filtered, loads


def _review(spec: SourceSpec, ds: datasets.Dataset, out: Path, info: dict, seed: int) -> datasets.Dataset:
    """Human review of a filtered source: write a sheet to fill (``review_sample`` rows, seeded) and/or
    apply a filled sheet (``review``): rejected rows join ``filters/<name>/rejects.jsonl`` with the
    reviewer's note, edits replace the answer (the original stays in ``meta["review"]``)."""
    from medvlm.data_curation.review import ReviewError, apply_review, export_review_sheet

    if spec.review_sample:
        n = min(int(spec.review_sample), len(ds))
        sheet = export_review_sheet(ds.shuffle(seed=seed).select(range(n)), out / "review" / f"{spec.name}.csv")
        logger.info("mix source %s: review sheet of %d rows written to %s", spec.name, n, sheet)
        info["review_sheet"] = str(sheet)
    if spec.review:
        try:
            result = apply_review(ds, spec.review, rejects_path=out / "filters" / spec.name / "rejects.jsonl")
        except (ReviewError, FileNotFoundError) as err:
            raise MixError(f"mix source {spec.name!r}: review sheet: {err}") from err
        n_in = len(ds)
        ds = result.dataset
        info["counts"].append({"step": "human_review", "in": n_in, "out": len(ds), "rejected": n_in - len(ds),
                               "noted": 0, **{f"n_{k}": v for k, v in result.counts.items()}})
        info["review_sha256"] = sha256_file(spec.review)
        if "rejects_sha256" in info or result.counts["reject"]:
            info["rejects_sha256"] = sha256_file(out / "filters" / spec.name / "rejects.jsonl")
    return ds


def _reason_kind(reason: str) -> str:
    """The reason without the row-specific part (``image file not found: tried [...]`` -> the prefix)."""
    return reason.split(":")[0].split(" (")[0][:80]


def _tag(batch: dict[str, list], name: str) -> dict[str, list]:
    return {"_mix_source": [name] * len(batch["id"])}
