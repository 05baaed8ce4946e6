"""One split of a dataset named the way configs name it: ``phantom``, a saved folder, or a mix YAML.

Training, evaluation and diagnostics read their records through :func:`load_split`, so a
``dataset:`` value means the same thing in every room.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from medvlm.data_curation.mixing import build_mix
from medvlm.data_curation.phantom import PhantomConfig, load_phantom


def load_split(dataset: str, split: str, *, question_types: Sequence[str] | None = None,
               phantom_patients: int = 4000, phantom_seed: int = 0,
               build_dir: str | Path = ".") -> datasets.Dataset:
    """Unified records of ``split``.

    ``dataset``: ``"phantom"`` (the embedded data; ``question_types``, ``phantom_patients`` and
    ``phantom_seed`` choose which), a folder written by ``build_mix.py`` or ``save_to_disk`` (a
    ``DatasetDict`` by split, or one dataset with a ``split`` column, or one dataset taken whole),
    or a mix YAML, built into ``build_dir/mix-<name>`` (reused when complete).
    """
    if dataset == "phantom":
        cfg = PhantomConfig(n_patients=phantom_patients, seed=phantom_seed)
        return load_phantom(cfg, kind="qa", split=split, qtypes=list(question_types or []) or None)
    path = Path(dataset)
    if path.suffix in (".yaml", ".yml"):
        path = build_mix(path, Path(build_dir) / f"mix-{path.stem}")
    if not path.exists():
        raise FileNotFoundError(f"dataset {dataset} does not exist; use 'phantom', a folder written by "
                                "data_curation/build_mix.py or Dataset.save_to_disk, or a mix YAML")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset {dataset} has splits {list(ds)}, not {split!r}")
        return ds[split]
    if "split" in ds.column_names and split in set(ds["split"]):
        return ds.filter(lambda s: s == split, input_columns="split")
    return ds
