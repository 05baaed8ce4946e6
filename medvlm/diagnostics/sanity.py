"""Is a saliency method explaining *this* model? The model-parameter randomisation test.

Randomisation test (Adebayo et al. 2018, "Sanity checks for saliency maps"): re-initialise the top
``top_k`` decoder layers (and/or the vision tower's top layers) of a seeded deep copy of the model,
recompute each method's map and compare it with the original map by Spearman rank correlation
(``scipy.stats.spearmanr``) and Pearson correlation of the cell values. A map that barely changes
when the weights it claims to explain are destroyed reflects the input or the architecture, not
the learned model. Methods whose Spearman correlation is above ``threshold`` (default 0.8, a
conventional "strong correlation" cut-off we chose; the paper compares visually and by rank
correlation without fixing one) are flagged untrustworthy. A constant map has no rank
correlation: it is reported as NaN with the reason and not flagged either way.

Re-initialisation calls each submodule's ``reset_parameters()`` (PyTorch's default init for
Linear / LayerNorm / Embedding); norm layers without it (RMSNorm) keep their weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from medvlm.diagnostics.capture import Example
from medvlm.diagnostics.methods import registered
from medvlm.models.base import ModelFamily

logger = logging.getLogger(__name__)

MapFn = Callable[[torch.nn.Module, ModelFamily, Example], np.ndarray]
TOWERS = ("language", "vision", "both")


def sanity_methods(names: Sequence[str] | None = None) -> dict[str, MapFn]:
    """``name -> fn(model, family, example) -> map`` of the registered methods the randomisation test
    applies to (``names``: only those), each running a capture of its own."""
    return {m.name: m.map for m in registered(names) if m.sanity}


def randomize_top_layers(model: torch.nn.Module, family: ModelFamily, top_k: int = 1, tower: str = "language",
                         seed: int = 0) -> torch.nn.Module:
    """A deep copy of ``model`` whose top ``top_k`` layers of ``tower`` are re-initialised (seeded).

    The global RNG state is left untouched.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower={tower!r}; expected one of {TOWERS}")
    clone = copy.deepcopy(model)
    stacks = []
    if tower in ("language", "both"):
        stacks.append(family.decoder_layers(clone))
    if tower in ("vision", "both"):
        stacks.append(family.vision_layers(clone))
    for stack in stacks:
        if not 1 <= top_k <= len(stack):
            raise ValueError(f"top_k={top_k}; the {tower} tower has {len(stack)} layers")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for stack in stacks:
            for layer in list(stack)[-top_k:]:
                for module in layer.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
    return clone


def _corr(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    x, y = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": float("nan"), "pearson": float("nan"),
                "reason": "a map is constant; rank correlation is undefined"}
    rho = spearmanr(x, y)
    return {"spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "pearson": float(pearsonr(x, y).statistic), "reason": ""}


@dataclass
class SanityReport:
    """Per method: ``scores[name]`` = spearman, pearson, flagged (bool or None), reason."""

    scores: dict[str, dict[str, Any]]
    original: dict[str, np.ndarray] = field(repr=False)
    randomized: dict[str, np.ndarray] = field(repr=False)
    tower: str = "language"
    top_k: int = 1
    threshold: float = 0.8

    @property
    def untrustworthy(self) -> list[str]:
        return [name for name, s in self.scores.items() if s.get("flagged")]


def randomization_test(model: torch.nn.Module, family: ModelFamily, example: Example,
                       methods: dict[str, MapFn] | None = None, *, top_k: int = 1, tower: str = "language",
                       threshold: float = 0.8, seed: int = 0) -> SanityReport:
    """Compare each method's map on ``model`` and on its randomised copy (see module docstring).

    A method that raises (ValueError / RuntimeError / KeyError) is recorded with the error as its
    reason, not dropped.
    """
    methods = methods or sanity_methods()
    randomized = randomize_top_layers(model, family, top_k, tower, seed)
    scores: dict[str, dict[str, Any]] = {}
    maps_a: dict[str, np.ndarray] = {}
    maps_b: dict[str, np.ndarray] = {}
    for name, fn in methods.items():
        try:
            maps_a[name] = np.asarray(fn(model, family, example), float)
            maps_b[name] = np.asarray(fn(randomized, family, example), float)
        except (ValueError, RuntimeError, KeyError) as err:
            logger.warning("randomisation test: method %s failed: %s", name, err)
            scores[name] = {"spearman": float("nan"), "pearson": float("nan"), "flagged": None,
                            "reason": f"method failed: {err}"}
            continue
        s = _corr(maps_a[name], maps_b[name])
        s["flagged"] = None if np.isnan(s["spearman"]) else bool(s["spearman"] > threshold)
        scores[name] = s
    return SanityReport(scores, maps_a, maps_b, tower, top_k, threshold)
