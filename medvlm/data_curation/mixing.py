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

``source`` is ``phantom``, a :func:`~medvlm.data_curation.load_source` name (with ``path``), ``json``
(or ``jsonl``, with ``path``: a JSON-lines file or folder of ``*.jsonl`` files holding unified records,
e.g. the ``generated.jsonl`` folder of ``data_curation/generate_qa.py``), or the path of a folder saved
by ``Dataset.save_to_disk`` or of such JSON-lines records. Paths are checked before anything is loaded. ``filters`` lists
:mod:`medvlm.data_curation.filters` steps run on the source before mixing (rejects go to
``filters/<name>/rejects.jsonl``; rows a dataset loader refused go to ``filters/<name>/load_skipped.jsonl``).
Human review per source: ``review_sample: 200`` writes ``review/<name>.csv`` (a seeded sample of the
filtered rows, columns ``decision`` = accept | reject | edit, ``corrected_answer``, ``note`` to fill);
``review: <filled sheet>`` applies it on the next build (rejects with the reviewer's note, edited
answers; counts as a ``human_review`` step in the manifest).

Each phase with ``weights`` interleaves its sources with ``datasets.interleave_datasets``
(probabilities = the normalised weights, seeded per phase): ``undersample`` stops when the first
source runs out, ``oversample`` repeats sources until all are exhausted, ``once`` uses each example
exactly once; the phase is then cut at ``size`` rows (under ``oversample``, a phase whose sources
yield fewer rows than ``size`` repeats them until it has ``size`` rows). A phase with ``count``
takes exactly that many shuffled rows of each source (repeating a source only under ``oversample``) and shuffles them
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

import logging
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml

from medvlm.data_curation.filters import FilterConfigError, FilterPipeline
from medvlm.data_curation.mix_sources import (  # noqa: F401 - load_mix_source re-exported
    TAGGED,
    MixError,
    SourceSpec,
    check_source_paths,
    load_mix_source,
    prepare_sources,
)
from medvlm.records import FEATURES
from medvlm.utils.io import atomic_write_text, hash_rows, sha256_file, write_manifest

logger = logging.getLogger(__name__)

STRATEGIES = {"undersample": "first_exhausted", "oversample": "all_exhausted",
              "once": "all_exhausted_without_replacement"}
_BATCH = 1000


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
            if spec.streaming and (spec.review or spec.review_sample):
                raise MixError(f"{origin}: source {spec.name!r}: human review needs the whole source; drop "
                               "`streaming` or the review keys")
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


# ---------------------------------------------------------------- phases

def _shuffled(ds, seed: int, spec: SourceSpec):
    if isinstance(ds, datasets.IterableDataset):
        return ds.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
    return ds.shuffle(seed=seed)


def _materialise(ds: datasets.IterableDataset, cache: Path) -> datasets.Dataset:
    """An iterable (streamed) phase → Arrow, written under ``cache`` (never a Python list of rows)."""
    def gen(token):
        yield from ds

    return datasets.Dataset.from_generator(gen, features=TAGGED, cache_dir=str(cache),
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
    if phase.size is not None and phase.size > len(ds) and cfg.stopping_strategy == "oversample" and len(ds):
        # interleave's all_exhausted stops once every source was seen; oversampling means repeating
        # the interleaved rows (index mapping, no copy) until the phase has its size
        ds = ds.select([k % len(ds) for k in range(phase.size)])
    if phase.size is not None:
        if phase.size > len(ds):
            logger.warning("phase %s: asked for %d rows, the %s strategy yields %d (each example at most "
                           "once); use stopping_strategy: oversample to repeat rows", phase.name,
                           phase.size, cfg.stopping_strategy, len(ds))
        ds = ds.select(range(min(phase.size, len(ds))))
    return ds


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


def _dataset_hash(data_dir: Path) -> str:
    """sha256 over the saved Arrow files (name and content hash, in name order): the bytes trained on."""
    return hash_rows(f"{p.name}:{sha256_file(p)}" for p in sorted(data_dir.glob("*.arrow")))


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
    origin = str(config) if not isinstance(config, MixConfig) else "mix"
    cfg.validate(origin)
    check_source_paths(cfg.sources, origin if origin != "mix" else "the mix config")
    loaded, filtered, loads = prepare_sources(cfg.sources, out, llm, seed=cfg.seed)
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
    shutil.rmtree(data_dir, ignore_errors=True)  # left by a run that died before its manifest
    mixed.save_to_disk(str(data_dir))
    atomic_write_text(out / "mix.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    files = {}
    if report:
        from medvlm.data_curation.reports import write_mix_report

        # the phase parts themselves: filtering the saved dataset would write cache files into dataset/
        paths = write_mix_report({p.name: part for p, part in zip(cfg.phases, parts, strict=True)}, out,
                                 title=f"mix {out.name}")
        files = {p.name: sha256_file(p) for p in paths.values()}
    shutil.rmtree(cache, ignore_errors=True)
    write_manifest(out, rows=len(mixed), counts_per_phase=counts, counts_per_phase_by_mix_source=by_spec,
                   ids_hash=_ids_hash(mixed), dataset_sha256=_dataset_hash(data_dir),
                   config_sha256=sha256_file(out / "mix.yaml"), filters=filtered, files=files,
                   sources={s.name: {"source": s.source, "streamed": s.streaming,
                                     "rows": None if s.streaming else len(loaded[s.name]),
                                     "loader": loads.get(s.name, {"skipped": 0})} for s in cfg.sources})
    return data_dir
