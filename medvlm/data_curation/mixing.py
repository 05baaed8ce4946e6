"""Training mixes: sources with weights or counts, filters, phases, and an annealing phase.

A mix YAML (see ``data_curation/mixes/``)::

    seed: 0
    stopping_strategy: undersample        # undersample | oversample | once
    sources:
      - {name: generated, source: phantom, options: {label_noise: 0.2}, filters: [format, exact_duplicates]}
      - {name: clean, source: phantom}
    phases:
      - {name: main, size: 4000, weights: {generated: 0.8, clean: 0.2}}
      - {name: anneal, count: {clean: 900, generated: 100}}   # exact rows per source; the last phase anneals

``source`` is ``phantom``, a :func:`~medvlm.data_curation.load_source` name (with ``path``), a folder
saved by ``Dataset.save_to_disk``, or a JSON-lines file / folder of ``*.jsonl`` files holding unified
records (``generated.jsonl`` of ``data_curation/generate_qa.py``). ``filters`` lists
:mod:`medvlm.data_curation.filters` steps run on the source before mixing (rejects go to
``filters/<name>/rejects.jsonl``).

Each phase with ``weights`` interleaves its sources with ``datasets.interleave_datasets``
(probabilities = the normalised weights, seeded per phase): ``undersample`` stops when the first
source runs out, ``oversample`` repeats sources until all are exhausted, ``once`` uses each example
exactly once; the phase is then cut at ``size`` rows. A phase with ``count`` takes exactly that many
shuffled rows of each source (repeating a source only under ``oversample``) and shuffles them
together. Rows carry ``phase`` (0, 1, ...) and ``phase_name``; the training sampler visits phases
in order, so the annealing phase comes last.

``streaming: true`` on a JSON-lines or hub source reads it as an ``IterableDataset``: rows are
parsed, filtered and shuffled (buffer of ``shuffle_buffer`` rows) only as the phases consume
them, so the source is never converted to Arrow whole. Streamed sources accept only row-wise
filters (steps without a global pass), and each phase that uses one needs a ``size`` or ``count``.
A streamed source's filter counts and ``rejects.jsonl`` cover the rows the phases consumed (a row
read by two phases is counted twice), not the whole source. Phase rows drawn from a stream are
written to Arrow under ``out_dir/.cache`` (removed at the end), never held as a Python list.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml

from medvlm.data_curation.filters import KEY_FIELDS, FilterConfigError, FilterPipeline, FilterStep
from medvlm.data_curation.loading import UnknownSourceError
from medvlm.records import COLUMNS, FEATURES
from medvlm.utils.io import atomic_write_text, hash_rows, sha256_file, write_manifest

logger = logging.getLogger(__name__)

STRATEGIES = {"undersample": "first_exhausted", "oversample": "all_exhausted",
              "once": "all_exhausted_without_replacement"}
_BATCH = 1000
#: Rows while a mix is built: the unified record plus the name of the mix source they came from.
_TAGGED = datasets.Features({**FEATURES, "_mix_source": datasets.Value("string")})


class MixError(ValueError):
    """A mix config that cannot be built; the message names the source or phase and the fix."""


@dataclass
class SourceSpec:
    name: str
    source: str                      # 'phantom', a load_source name, a saved dataset folder, or JSONL
    path: str | None = None          # the dataset as the user has it (for load_source names)
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)
    filters: list[Any] = field(default_factory=list)   # filter steps run before mixing
    streaming: bool = False          # read JSONL / hub sources lazily (see the module docstring)
    shuffle_buffer: int = 10_000     # rows held for shuffling a streamed source


@dataclass
class PhaseSpec:
    name: str
    weights: dict[str, float] = field(default_factory=dict)
    size: int | None = None          # rows in this phase (None: what the strategy yields)
    count: dict[str, int] | None = None   # exact rows per source, instead of weights


@dataclass
class MixConfig:
    sources: list[SourceSpec]
    phases: list[PhaseSpec]
    seed: int = 0
    stopping_strategy: str = "undersample"

    @classmethod
    def from_yaml(cls, path: str | Path) -> MixConfig:
        if not Path(path).is_file():
            raise MixError(f"mix file {str(path)!r} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {"sources", "phases", "seed", "stopping_strategy"}
        if unknown:
            raise MixError(f"{path}: unknown mix keys {sorted(unknown)}; expected sources, phases, seed, "
                           "stopping_strategy")
        try:
            cfg = cls(sources=[SourceSpec(**s) for s in data.get("sources") or []],
                      phases=[PhaseSpec(**p) for p in data.get("phases") or []],
                      seed=int(data.get("seed", 0)),
                      stopping_strategy=data.get("stopping_strategy", "undersample"))
        except TypeError as err:
            raise MixError(f"{path}: {err}; see the format in medvlm/data_curation/mixing.py") from err
        cfg.validate(str(path))
        return cfg

    def validate(self, origin: str = "mix") -> None:
        names = {s.name for s in self.sources}
        if not self.sources or not self.phases:
            raise MixError(f"{origin}: a mix needs at least one source and one phase")
        if self.stopping_strategy not in STRATEGIES:
            raise MixError(f"{origin}: stopping_strategy {self.stopping_strategy!r} unknown; expected one of "
                           f"{sorted(STRATEGIES)}")
        for spec in self.sources:
            try:
                FilterPipeline.check_config(spec.filters, streaming=spec.streaming)
            except FilterConfigError as err:
                raise MixError(f"{origin}: source {spec.name!r}: {err}") from err
        for phase in self.phases:
            _validate_phase(phase, names, origin)


def _validate_phase(phase: PhaseSpec, names: set[str], origin: str) -> None:
    if bool(phase.weights) == (phase.count is not None):
        raise MixError(f"{origin}: phase {phase.name!r} needs either `weights` or `count` (exact rows per "
                       "source), not both and not neither")
    table = phase.weights or phase.count or {}
    missing = set(table) - names
    if missing:
        raise MixError(f"{origin}: phase {phase.name!r} names source(s) {sorted(missing)} that the mix "
                       f"does not define; defined sources: {sorted(names)}")
    if any(not isinstance(v, int | float) or v < 0 for v in table.values()):
        raise MixError(f"{origin}: phase {phase.name!r} needs non-negative numbers, got {table}")
    if phase.count is not None and any(int(v) != v for v in phase.count.values()):
        raise MixError(f"{origin}: phase {phase.name!r}: counts must be whole numbers, got {phase.count}")
    if not sum(table.values()) > 0 or phase.size == 0:
        raise MixError(f"{origin}: phase {phase.name!r} is empty (all weights/counts are 0 or size is 0); "
                       "give it a positive weight/count or remove the phase")
    if phase.count is not None and phase.size is not None and phase.size != sum(phase.count.values()):
        raise MixError(f"{origin}: phase {phase.name!r}: size {phase.size} differs from the sum of its counts "
                       f"{sum(phase.count.values())}; drop `size` or make them agree")


# ---------------------------------------------------------------- load sources

def _jsonl_files(path: Path) -> list[str]:
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return [str(path)]
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return sorted(str(p) for p in path.glob("*.jsonl"))
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
    if spec.source == "phantom":
        from medvlm.data_curation.phantom import load_phantom_source

        ds = load_phantom_source(spec.path, split=spec.split, **spec.options)
        return ds.to_iterable_dataset() if spec.streaming else ds
    where = Path(spec.path if spec.source in ("json", "jsonl") else spec.source).expanduser()
    files = _jsonl_files(where)
    if files:
        ds = datasets.load_dataset("json", data_files=files, split="train", streaming=spec.streaming)
        ds = _unified(ds, f"mix source {spec.name!r} ({where})")
        if spec.split:
            ds = ds.filter(lambda s: s in (spec.split, ""), input_columns="split")
        return ds
    if where.is_dir():
        ds = datasets.load_from_disk(str(where))
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise MixError(f"mix source {spec.name!r}: {where} has splits {list(ds)}, not {spec.split!r}")
            ds = ds[spec.split]
        return ds.to_iterable_dataset() if spec.streaming else ds
    from medvlm.data_curation import load_source

    result = load_source(spec.source, spec.path, split=spec.split, **spec.options)
    if result.skipped:
        logger.warning("mix source %s: the loader skipped %d rows", spec.name, len(result.skipped))
    return result.dataset.to_iterable_dataset() if spec.streaming else result.dataset


def _load(spec: SourceSpec):
    try:
        return load_mix_source(spec)
    except UnknownSourceError as err:
        raise MixError(f"mix source {spec.name!r}: {spec.source!r} is not 'phantom', an existing dataset "
                       f"folder or JSONL file, nor a known dataset: {err}") from err
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


def _llm_specs(specs: list[Any]) -> list[Any]:
    """A ``blind_check`` given ``llm: {backend: ..., model: ...}`` gets a backend from ``medvlm.llm``
    (imported only then: the filters themselves accept any object with ``generate``)."""
    out = []
    for spec in specs:
        if isinstance(spec, dict) and "step" not in spec and len(spec) == 1:
            spec = {"step": next(iter(spec)), **(next(iter(spec.values())) or {})}
        if isinstance(spec, dict) and spec.get("step") == "blind_check" and isinstance(spec.get("llm"), dict):
            from medvlm.llm import make_llm

            spec = {**spec, "llm": make_llm(spec["llm"])}
        out.append(spec)
    return out


def _prepare_sources(cfg: MixConfig, out: Path, llm: Any) -> tuple[dict, dict]:
    loaded, filtered = {}, {}
    for spec in cfg.sources:
        ds = _load(spec)
        if spec.filters:
            pipe = FilterPipeline.from_config(_llm_specs(spec.filters), llm=llm)
            folder = out / "filters" / spec.name
            if spec.streaming:
                stats: dict = {}
                ds = _filter_stream(ds, pipe.steps, folder, stats)
                filtered[spec.name] = {"steps": pipe.describe(), "counts": stats, "streamed": True}
            else:
                result = pipe.run(ds, folder)
                ds = result.dataset
                filtered[spec.name] = {"steps": pipe.describe(), "counts": result.counts,
                                       "rejects_sha256": sha256_file(result.rejects_path)}
        ds = ds.map(_tag, batched=True, fn_kwargs={"name": spec.name}, features=_TAGGED)  # counts per mix source
        if not spec.streaming and len(ds) == 0:
            raise MixError(f"mix source {spec.name!r} ({spec.source}) has no rows"
                           f"{' left after its filters' if spec.filters else ''}; check its path/split/filters")
        loaded[spec.name] = ds
    return loaded, filtered


# ---------------------------------------------------------------- phases

def _shuffled(ds, seed: int, spec: SourceSpec):
    if isinstance(ds, datasets.IterableDataset):
        return ds.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
    return ds.shuffle(seed=seed)


def _materialise(ds: datasets.IterableDataset, cache: Path) -> datasets.Dataset:
    """An iterable (streamed) phase → Arrow, written under ``cache`` (never a Python list of rows)."""
    def gen(token):
        yield from ds

    return datasets.Dataset.from_generator(gen, features=_TAGGED, cache_dir=str(cache),
                                           gen_kwargs={"token": uuid.uuid4().hex}, fingerprint=uuid.uuid4().hex)


def _take(ds, n: int, origin: str, strategy: str, cache: Path) -> datasets.Dataset:
    if isinstance(ds, datasets.IterableDataset):
        part = _materialise(ds.take(n), cache)
        if len(part) < n:
            raise MixError(f"{origin}: asked for {n} rows, the streamed source holds {len(part)}")
        return part
    if n <= len(ds):
        return ds.select(range(n))
    if strategy != "oversample":
        raise MixError(f"{origin}: asked for {n} rows, the source has {len(ds)} (after filters); lower the "
                       "count or use stopping_strategy: oversample to repeat rows")
    reps = -(-n // len(ds))
    return datasets.concatenate_datasets([ds] * reps).select(range(n))


def _build_phase(i: int, phase: PhaseSpec, loaded: dict, specs: dict, cfg: MixConfig, cache: Path):
    seed = cfg.seed + 1000 * i
    if phase.count is not None:
        parts = [_take(_shuffled(loaded[n], seed, specs[n]), int(c), f"phase {phase.name!r}, source {n!r}",
                       cfg.stopping_strategy, cache) for n, c in phase.count.items() if c > 0]
        return datasets.concatenate_datasets(parts).shuffle(seed=seed + 1)
    names = [n for n, w in phase.weights.items() if w > 0]
    total = sum(phase.weights[n] for n in names)
    shuffled = [_shuffled(loaded[n], seed, specs[n]) for n in names]
    ds = datasets.interleave_datasets(shuffled, probabilities=[phase.weights[n] / total for n in names],
                                      seed=cfg.seed + i, stopping_strategy=STRATEGIES[cfg.stopping_strategy])
    if isinstance(ds, datasets.IterableDataset):
        if phase.size is None:
            raise MixError(f"phase {phase.name!r} uses a streamed source and needs a `size`")
        return _materialise(ds.take(phase.size), cache)
    if phase.size is not None:
        if phase.size > len(ds):
            logger.warning("phase %s: asked for %d rows, the %s strategy yields %d", phase.name,
                           phase.size, cfg.stopping_strategy, len(ds))
        ds = ds.select(range(min(phase.size, len(ds))))
    return ds


def _tag(batch: dict[str, list], name: str) -> dict[str, list]:
    return {"_mix_source": [name] * len(batch["id"])}


def _add_phase(batch: dict[str, list], index: int, name: str) -> dict[str, list]:
    n = len(batch["id"])
    return {"phase": [index] * n, "phase_name": [name] * n}


def _column_counts(ds: datasets.Dataset, column: str) -> dict[str, int]:
    counts: Counter = Counter()
    for b in ds.select_columns([column]).iter(batch_size=10 * _BATCH):
        counts.update(b[column])
    return dict(counts)


def _ids_hash(ds: datasets.Dataset) -> str:
    return hash_rows(i for b in ds.select_columns(["id"]).iter(batch_size=10 * _BATCH) for i in b["id"])


def build_mix(config: str | Path | MixConfig, out_dir: str | Path, *, llm: Any = None,
              report: bool = True) -> Path:
    """Build the mix into ``out_dir/dataset`` (Arrow); returns that folder. Reused if complete.

    ``llm``: an object with ``generate(prompt) -> str`` for ``blind_check`` filters (or give the
    step ``llm: {backend: ..., model: ...}`` in the YAML). ``report``: write the condition /
    modality / body-part report (``report.png``, ``report.md``, ``report.csv``) per phase.
    The manifest holds realised counts per phase and source, per-source filter counts, and hashes.
    """
    out = Path(out_dir)
    data_dir = out / "dataset"
    if (out / "manifest.json").exists():
        return data_dir
    cfg = config if isinstance(config, MixConfig) else MixConfig.from_yaml(config)
    cfg.validate(str(config) if not isinstance(config, MixConfig) else "mix")
    loaded, filtered = _prepare_sources(cfg, out, llm)
    specs = {s.name: s for s in cfg.sources}
    cache = out / ".cache"
    parts, counts, by_spec = [], {}, {}
    for i, phase in enumerate(cfg.phases):
        ds = _build_phase(i, phase, loaded, specs, cfg, cache)
        if len(ds) == 0:
            raise MixError(f"phase {phase.name!r} is empty after mixing; a source it draws from ran out "
                           "(see the filter counts) or the strategy yields nothing")
        by_spec[phase.name] = _column_counts(ds, "_mix_source")
        ds = ds.map(_add_phase, batched=True, fn_kwargs={"index": i, "name": phase.name},
                    remove_columns=["_mix_source"], desc=f"phase {phase.name}",
                    features=datasets.Features({**FEATURES, "phase": datasets.Value("int64"),
                                                "phase_name": datasets.Value("string")}))
        counts[phase.name] = _column_counts(ds, "source")
        parts.append(ds)
    mixed = datasets.concatenate_datasets(parts)
    mixed.save_to_disk(str(data_dir))
    atomic_write_text(out / "mix.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    files = {}
    if report:
        from medvlm.data_curation.reports import write_mix_report

        mixed = datasets.load_from_disk(str(data_dir))
        phases = {p.name: mixed.filter(lambda x, i=i: [v == i for v in x], input_columns="phase",
                                       batched=True) for i, p in enumerate(cfg.phases)}
        paths = write_mix_report(phases, out, title=f"mix {out.name}")
        files = {p.name: sha256_file(p) for p in paths.values()}
    shutil.rmtree(cache, ignore_errors=True)
    write_manifest(out, rows=len(mixed), counts_per_phase=counts, counts_per_phase_by_mix_source=by_spec,
                   ids_hash=_ids_hash(mixed),
                   config_sha256=sha256_file(out / "mix.yaml"), filters=filtered, files=files,
                   sources={s.name: {"source": s.source, "streamed": s.streaming,
                                     "rows": None if s.streaming else len(loaded[s.name])} for s in cfg.sources})
    return data_dir
