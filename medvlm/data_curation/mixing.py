"""Training mixes: sources with weights, phases, and an annealing phase toward high-quality data.

A mix YAML (see ``data_curation/mixes/``)::

    seed: 0
    stopping_strategy: undersample        # undersample | oversample | once
    sources:
      - {name: generated, source: phantom, options: {label_noise: 0.2}}
      - {name: clean, source: phantom}
    phases:
      - {name: main, size: 4000, weights: {generated: 0.8, clean: 0.2}}
      - {name: anneal, size: 1000, weights: {clean: 0.9, generated: 0.1}}   # the last phase anneals

Each phase interleaves its sources with ``datasets.interleave_datasets`` (probabilities = the
normalised weights, seeded per phase): ``undersample`` stops when the first source runs out,
``oversample`` repeats sources until all are exhausted, ``once`` uses each example exactly
once; the phase is then cut at ``size`` rows. Rows carry ``phase`` (0, 1, ...) and
``phase_name``; the training sampler visits phases in order, so the annealing phase comes last.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml

from medvlm.utils.io import atomic_write_text, hash_rows, sha256_file, write_manifest

logger = logging.getLogger(__name__)

STRATEGIES = {"undersample": "first_exhausted", "oversample": "all_exhausted",
              "once": "all_exhausted_without_replacement"}


class MixError(ValueError):
    """A mix config that cannot be built; the message names the source or phase and the fix."""


@dataclass
class SourceSpec:
    name: str
    source: str                      # 'phantom', a load_source name, or a saved dataset folder
    path: str | None = None          # the dataset as the user has it (for load_source names)
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhaseSpec:
    name: str
    weights: dict[str, float]
    size: int | None = None          # rows in this phase (None: what the strategy yields)


@dataclass
class MixConfig:
    sources: list[SourceSpec]
    phases: list[PhaseSpec]
    seed: int = 0
    stopping_strategy: str = "undersample"

    @classmethod
    def from_yaml(cls, path: str | Path) -> MixConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {"sources", "phases", "seed", "stopping_strategy"}
        if unknown:
            raise MixError(f"{path}: unknown mix keys {sorted(unknown)}; expected sources, phases, seed, "
                           "stopping_strategy")
        try:
            cfg = cls(sources=[SourceSpec(**s) for s in data.get("sources", [])],
                      phases=[PhaseSpec(**p) for p in data.get("phases", [])],
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
        for phase in self.phases:
            missing = set(phase.weights) - names
            if missing:
                raise MixError(f"{origin}: phase {phase.name!r} names source(s) {sorted(missing)} that the mix "
                               f"does not define; defined sources: {sorted(names)}")
            if any(w < 0 for w in phase.weights.values()) or not sum(phase.weights.values()) > 0:
                raise MixError(f"{origin}: phase {phase.name!r} needs non-negative weights with a positive sum")


def load_mix_source(spec: SourceSpec) -> datasets.Dataset:
    if spec.source == "phantom":
        from medvlm.data_curation.phantom import load_phantom_source

        return load_phantom_source(spec.path, split=spec.split, **spec.options)
    folder = Path(spec.source)
    if folder.exists():
        ds = datasets.load_from_disk(str(folder))
        return ds[spec.split] if isinstance(ds, datasets.DatasetDict) else ds
    from medvlm.data_curation import load_source

    result = load_source(spec.source, spec.path, split=spec.split, **spec.options)
    return result.dataset


def build_mix(config: str | Path | MixConfig, out_dir: str | Path) -> Path:
    """Build the mix into ``out_dir/dataset`` (Arrow); returns that folder. Reused if complete."""
    out = Path(out_dir)
    data_dir = out / "dataset"
    if (out / "manifest.json").exists():
        return data_dir
    cfg = config if isinstance(config, MixConfig) else MixConfig.from_yaml(config)
    loaded = {}
    for spec in cfg.sources:
        try:
            loaded[spec.name] = load_mix_source(spec)
        except FileNotFoundError as err:
            raise MixError(f"mix source {spec.name!r} ({spec.source}): {err}") from err
    parts, counts = [], {}
    for i, phase in enumerate(cfg.phases):
        names = [n for n, w in phase.weights.items() if w > 0]
        total = sum(phase.weights[n] for n in names)
        probs = [phase.weights[n] / total for n in names]
        shuffled = [loaded[n].shuffle(seed=cfg.seed + 1000 * i) for n in names]
        ds = datasets.interleave_datasets(shuffled, probabilities=probs, seed=cfg.seed + i,
                                          stopping_strategy=STRATEGIES[cfg.stopping_strategy])
        if phase.size is not None:
            if phase.size > len(ds):
                logger.warning("phase %s: asked for %d rows, the %s strategy yields %d", phase.name,
                               phase.size, cfg.stopping_strategy, len(ds))
            ds = ds.select(range(min(phase.size, len(ds))))
        ds = ds.add_column("phase", [i] * len(ds)).add_column("phase_name", [phase.name] * len(ds))
        counts[phase.name] = dict(Counter(ds["source"]))
        parts.append(ds)
    mixed = datasets.concatenate_datasets(parts)
    mixed.save_to_disk(str(data_dir))
    cfg_text = yaml.safe_dump(asdict(cfg), sort_keys=False)
    atomic_write_text(out / "mix.yaml", cfg_text)
    write_manifest(out, rows=len(mixed), counts_per_phase=counts, ids_hash=hash_rows(mixed["id"]),
                   config_sha256=sha256_file(out / "mix.yaml"),
                   sources={s.name: {"source": s.source, "rows": len(loaded[s.name])} for s in cfg.sources})
    return data_dir
