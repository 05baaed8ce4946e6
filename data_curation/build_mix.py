"""Build a training mix (sources, filters, phases, annealing) into a folder.

    python data_curation/build_mix.py data_curation/mixes/phantom_stage2.yaml --output runs/mix/phantom_stage2

The folder receives ``dataset/`` (Arrow, with ``phase``/``phase_name`` columns), ``mix.yaml``,
``filters/<source>/rejects.jsonl``, ``report.png``/``report.md``/``report.csv`` and
``manifest.json`` (written last). A finished folder is reused as it is. See
``medvlm.data_curation.mixing`` for the mix format.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medvlm.data_curation.mixing import build_mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mix", help="mix YAML (see data_curation/mixes/)")
    parser.add_argument("--output", required=True, help="output folder (reused when it holds a manifest)")
    parser.add_argument("--no-report", action="store_true", help="skip the condition/modality/body-part report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    data_dir = build_mix(args.mix, args.output, report=not args.no_report)
    manifest = json.loads((Path(args.output) / "manifest.json").read_text())
    print(f"mix written to {data_dir}")
    print(json.dumps({k: manifest.get(k) for k in ("rows", "counts_per_phase", "filters")}, indent=2))


if __name__ == "__main__":
    main()
