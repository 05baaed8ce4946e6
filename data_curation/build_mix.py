"""Build a training mix (sources, filters, phases, annealing) into a folder.

    python data_curation/build_mix.py data_curation/mixes/phantom_stage2.yaml --output runs/mix/phantom_stage2

The folder receives ``dataset/`` (Arrow, with ``phase``/``phase_name`` columns), ``mix.yaml``,
``filters/<source>/rejects.jsonl`` (rows a filter rejected, with the step and reason),
``filters/<source>/load_skipped.jsonl`` (rows a dataset loader refused), ``report.png`` /
``report.md`` / ``report.csv`` (conditions, modalities and body parts per phase) and
``manifest.json`` (written last: rows per phase and source, per-step in/out/rejected counts,
hashes). A folder holding a manifest is reused as it is. ``--compare`` writes one report across
finished mix folders instead. See ``medvlm.data_curation.mixing`` for the mix format; a source's
``source:`` is ``json`` (unified JSON-lines records at ``path:``), ``phantom``, a dataset loader name
(``medpix``, ``slake``, ``rocov2``... with ``path:``) or the path of a saved dataset / JSON-lines file.
Every path is checked before anything is loaded.

Exit status: 0 on success, 2 on a mix that cannot be built (the message names the source or
phase and the fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medvlm.data_curation.filters import FilterConfigError
from medvlm.data_curation.mixing import MixError, build_mix
from medvlm.data_curation.reports import compare_mix_folders
from medvlm.records import RecordError

SUMMARY_KEYS = ("rows", "counts_per_phase_by_mix_source", "counts_per_phase", "dataset_sha256")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mix", nargs="?", help="mix YAML (see data_curation/mixes/)")
    parser.add_argument("--output", required=True, help="output folder (reused when it holds a manifest)")
    parser.add_argument("--no-report", action="store_true", help="skip the condition/modality/body-part report")
    parser.add_argument("--compare", nargs="+", metavar="MIX_FOLDER",
                        help="instead of building: write comparison.png/.md/.csv across finished mix folders "
                             "(labelled by the shortest path suffix that tells them apart)")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="with --compare: labels for the mix folders, in order (default: path suffixes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        if args.names and not args.compare:
            parser.error("--names labels the folders of --compare; give --compare MIX_FOLDER ...")
        if args.compare:
            try:
                paths = compare_mix_folders(args.compare, args.output, names=args.names)
            except ValueError as err:  # --names that do not fit the folders
                raise MixError(str(err)) from err
            print("\n".join(str(p) for p in paths.values()))
            return 0
        if not args.mix:
            parser.error("give a mix YAML (or --compare with finished mix folders)")
        data_dir = build_mix(args.mix, args.output, report=not args.no_report)
    except (MixError, FilterConfigError, RecordError, FileNotFoundError) as err:
        print(f"build_mix: {err}", file=sys.stderr)
        return 2
    manifest = json.loads((Path(args.output) / "manifest.json").read_text())
    print(f"mix written to {data_dir}")
    summary = {k: manifest.get(k) for k in SUMMARY_KEYS}
    summary["filters"] = {name: [f"{c['step']}: {c['in']} in, {c['out']} out, {c['rejected']} rejected"
                                 for c in (f["counts"].values() if isinstance(f["counts"], dict) else f["counts"])]
                          for name, f in manifest.get("filters", {}).items()}
    summary["loader_skipped"] = {n: s["loader"]["skipped"] for n, s in manifest.get("sources", {}).items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
