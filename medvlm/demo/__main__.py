"""``python -m medvlm.demo FAMILY [FAMILY ...]``: build (or find) the embedded demo base of each family."""

from __future__ import annotations

import argparse
import logging
import sys

from medvlm.demo.base import ensure_base_model
from medvlm.models.families import FAMILIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medvlm.demo", description=__doc__)
    parser.add_argument("families", nargs="+", choices=sorted(FAMILIES), help="families to build")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for family in args.families:
        print(ensure_base_model(family))
    return 0


if __name__ == "__main__":
    sys.exit(main())
