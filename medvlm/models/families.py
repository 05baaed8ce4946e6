"""The one place families are registered: ``model_type`` (config.json) → family adapter.

A leaf module (it imports only the families), so the tiny demo models can name their family
without importing the loading code in :mod:`medvlm.models.registry`, which imports them back.
"""

from __future__ import annotations

import difflib

from medvlm.models.base import ModelFamily
from medvlm.models.llava import LlavaFamily
from medvlm.models.paligemma import PaliGemmaFamily

FAMILIES: dict[str, type[ModelFamily]] = {"paligemma": PaliGemmaFamily, "llava": LlavaFamily}


def get_family(name: str) -> ModelFamily:
    """The family adapter for a name or a config ``model_type``; did-you-mean on a typo."""
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, list(FAMILIES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown model family {name!r}.{hint} Available: {sorted(FAMILIES)}")
    return FAMILIES[name]()
