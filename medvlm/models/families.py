"""The one place families are registered: family name → adapter class.

Adding a family is one line here plus its file (see :mod:`medvlm.models.base`). A checkpoint is
matched to its family by the ``model_type`` of its ``config.json`` (each family lists its own in
``model_types``).
"""

from __future__ import annotations

import difflib

from medvlm.models.base import ModelFamily
from medvlm.models.gemma3 import MedGemmaFamily
from medvlm.models.llava import LlavaFamily
from medvlm.models.paligemma import PaliGemmaFamily
from medvlm.models.qwen2_5_vl import Qwen25VLFamily

FAMILIES: dict[str, type[ModelFamily]] = {
    "paligemma": PaliGemmaFamily,
    "llava": LlavaFamily,
    "medgemma": MedGemmaFamily,
    "qwen2_5_vl": Qwen25VLFamily,
}


def get_family(name: str) -> ModelFamily:
    """The family adapter for a family name or a config ``model_type``; did-you-mean on a typo."""
    if name in FAMILIES:
        return FAMILIES[name]()
    for family in FAMILIES.values():
        if name in family.model_types:
            return family()
    known = sorted(set(FAMILIES) | {t for f in FAMILIES.values() for t in f.model_types})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"no model family handles model_type {name!r}.{hint} Registered families: "
                     f"{', '.join(sorted(FAMILIES))}. To add one, write medvlm/models/<family>.py (a ModelFamily "
                     "subclass) and register it in medvlm/models/families.py")
