"""Diagnostics at every checkpoint, within a bounded share of the training time.

:class:`DiagnosticsCallback` runs :func:`medvlm.diagnostics.probe.run_probe` on the model being
trained at each save and writes ``checkpoint-N/diagnostics/diagnostics.json`` (+ overlays).

Budget. The callback measures the training wall time between saves (its own probe time excluded)
and its own probe time. At a save the budget is ``budget_fraction x training time so far - probe
time so far`` (so an unused budget carries over and an overrun is paid back at the next save).
The cost of a probe is estimated per example and method: from the previous probes' measured
timings, and before any probe has run (the first save) from the shapes: one timed forward pass of
the first probe example gives seconds per floating-point operation, and each registered method
declares its operations on an example of that shape (:meth:`~medvlm.diagnostics.methods.Method.cost`:
occlusion's forwards, Grad-CAM's backward, the unembeddings of the log-probability increase and
the logit lens). When the estimate exceeds the budget the probe shrinks in this order: fewer
examples (down to ``min_examples``), fewer randomisation-test examples (down to 1), drop the
costliest methods first, no randomisation test, a single example; if even that does not fit, the
probe is skipped. Whatever is left out is listed under ``"budget"`` in the JSON, never silently,
and :func:`run_probe` still stops early once its measured time would overrun the budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.methods import Shape, registered
from medvlm.diagnostics.probe import run_probe, select_probe_records
from medvlm.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

#: Sanity cost per example / probe cost per example before it is measured: the randomisation test
#: recomputes every map on the model and on its randomised copy (2x), plus the copy.
DEFAULT_SANITY_RATIO = 2.5


def estimate_seconds(cost: dict[str, float], n: int, methods: Sequence[str], n_sanity: int) -> float:
    """Seconds for ``n`` examples with ``methods`` and ``n_sanity`` randomisation tests, from
    per-example costs ``cost`` (keys: capture, each method, sanity_ratio) and the geometry's
    fixed cost (key geometry: its extra hidden-states passes and the scores)."""
    per_example = cost.get("capture", 0.0) + sum(cost.get(m, 0.0) for m in methods)
    sanity = cost.get("sanity_ratio", DEFAULT_SANITY_RATIO) * per_example
    return n * per_example + n_sanity * sanity + cost.get("geometry", 0.0)


def plan_probe(budget_s: float, cost: dict[str, float] | None, max_examples: int, methods: Sequence[str],
               sanity_examples: int, min_examples: int = 2) -> dict[str, Any]:
    """The largest probe whose estimated cost fits ``budget_s`` (shrink order in the module doc).

    Returns ``{"run", "n_examples", "methods", "sanity_examples", "estimate_s", "skipped"}`` where
    ``skipped`` lists what was left out and why.
    """
    n, s, ms = max_examples, min(sanity_examples, max_examples), list(methods)
    if not cost:
        return {"run": True, "n_examples": n, "methods": ms, "sanity_examples": s, "estimate_s": float("nan"),
                "skipped": [], "note": "no cost estimate yet: full probe, stopped early inside if it overruns"}
    droppable = sorted((m for m in ms if cost.get(m, 0.0) > 0), key=lambda m: -cost[m])  # costliest first
    run = True
    while estimate_seconds(cost, n, ms, s) > budget_s:
        if n > min_examples:
            n -= 1
        elif s > 1:
            s -= 1
        elif droppable:
            ms.remove(droppable.pop(0))
        elif s > 0:
            s = 0
        elif n > 1:
            n -= 1
        else:
            run = False
            break
    est = estimate_seconds(cost, n, ms, s)
    why = f"estimated cost above the budget of {budget_s:.2f}s"
    skipped = []
    if not run:
        skipped.append({"what": "probe", "reason": f"even 1 example with {ms} is estimated at {est:.2f}s, "
                                                   f"above the budget of {budget_s:.2f}s"})
    if n < max_examples:
        skipped.append({"what": "examples", "n": max_examples - n, "reason": why})
    if s < min(sanity_examples, max_examples):
        skipped.append({"what": "randomisation_test_examples", "n": min(sanity_examples, max_examples) - s,
                        "reason": why})
    for m in methods:
        if m not in ms:
            skipped.append({"what": "method", "name": m, "reason": why})
    return {"run": run, "n_examples": n, "methods": ms, "sanity_examples": s, "estimate_s": est,
            "skipped": skipped}


def costs_from_timings(timings: dict[str, float], previous: dict[str, float] | None = None) -> dict[str, float]:
    """Per-example costs from a probe's ``timings`` (totals); methods not run keep their old estimate."""
    cost = dict(previous or {})
    n = int(timings.get("n_examples") or 0)
    if n == 0:
        return cost
    names = [m.name for m in registered()]
    for key in ("capture", *names):
        if key in timings:
            cost[key] = timings[key] / n
    if "geometry" in timings:
        cost["geometry"] = timings["geometry"]
    n_sanity = int(timings.get("n_sanity") or 0)
    per_example = timings.get("capture", 0.0) / n + sum(timings.get(m, 0.0) / n for m in names)
    if n_sanity and per_example > 0:
        cost["sanity_ratio"] = timings.get("sanity", 0.0) / n_sanity / per_example
    return cost


def costs_from_shapes(model, processor, family, record: dict, methods: Sequence[str], geometry_examples: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Per-example seconds of the capture and of each method, estimated before any probe ran: one
    timed forward pass of ``record`` calibrates seconds per operation, and each method's declared
    operations on that shape (:meth:`~medvlm.diagnostics.methods.Method.cost`) scale it."""
    import torch

    ex = prepare_example(model, processor, family, record["image"], record["question"])
    shape = Shape.of(model, family, ex)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # logits at the last position, as the probe's passes compute them
            t = clock()
            model(**ex.inputs, use_cache=False, logits_to_keep=1)
            forward = max(clock() - t, 1e-6)
    finally:
        model.train(was_training)
    per_flop = forward / shape.forward_flops()
    cost = {"capture": forward, "geometry": geometry_examples * forward, "sanity_ratio": DEFAULT_SANITY_RATIO,
            "forward_s": forward}
    cost.update({m.name: m.cost(shape) * per_flop for m in registered(methods)})
    return cost


def probe_scalars(result: dict) -> dict[str, float]:
    """Flat scalars for W&B: ROI mass / ratio / focus / pointing per method, linearity means."""
    out = {}
    for name, m in result.get("summary", {}).items():
        for key in ("roi_mass_mean", "roi_ratio_mean", "focus_mean", "pointing_game_rate"):
            if np.isfinite(m.get(key, float("nan"))):
                out[f"diag/{key.removesuffix('_mean')}/{name}"] = float(m[key])
    geo = result.get("geometry") or {}
    for group in ("image", "text"):
        v = geo.get(f"linearity_{group}_mean", float("nan"))
        if np.isfinite(v):
            out[f"diag/linearity_{group}_mean"] = float(v)
    return out


def log_to_wandb(result: dict, folder: Path, step: int) -> bool:
    """Log the probe's scalars and its first overlay when a W&B run is active; True if logged."""
    try:
        import wandb
    except ImportError:
        return False
    if getattr(wandb, "run", None) is None:
        return False
    payload: dict[str, Any] = {**probe_scalars(result), "train/global_step": step}
    for row in result.get("examples", []):
        for name, rel in (row.get("overlays") or {}).items():
            payload["diag/overlay"] = wandb.Image(str(folder / rel), caption=f"{name}: {row.get('question')}")
            break
        if "diag/overlay" in payload:
            break
    wandb.log(payload)
    return True


class DiagnosticsCallback(TrainerCallback):
    """At each save, probe the model into ``checkpoint-N/diagnostics/`` (main process only).

    ``records``: unified records with lesion masks (``roi``), e.g. the phantom validation split; the
    probe set is chosen from them once (deterministic). ``clock``: a monotonic clock in seconds
    (injectable for tests).
    """

    def __init__(self, family, processor, records, *, max_examples: int = 8, budget_fraction: float = 0.1,
                 methods: Sequence[str] | None = None, sanity_examples: int = 2, min_examples: int = 2,
                 geometry: bool = True, geometry_examples: int = 24, clock: Callable[[], float] = time.monotonic):
        if not 0 < budget_fraction <= 1:
            raise ValueError(f"budget_fraction={budget_fraction}; expected a share of training time in (0, 1]")
        methods = [m.name for m in registered(methods)]  # an unknown name: did-you-mean
        chosen, skipped = select_probe_records(records, max_examples)
        if not chosen:
            raise ValueError(f"none of the {len(records)} diagnostics records has a lesion mask ('roi'); pass "
                             f"records with masks (the phantom validation split) or turn diagnostics off "
                             f"({len(skipped)} had a missing mask file)")
        # keep all records: run_probe picks the same probe set from them, and more images for geometry
        self.family, self.processor, self.records = family, processor, records
        self.max_examples, self.budget_fraction = max_examples, budget_fraction
        self.methods, self.sanity_examples, self.min_examples = list(methods), sanity_examples, min_examples
        self.geometry, self.geometry_examples, self.clock = geometry, geometry_examples, clock
        self.first = chosen[0]
        self.cost: dict[str, float] = {}
        self.train_seconds = 0.0
        self.probe_seconds = 0.0
        self._mark: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = self.clock()

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        start = self.clock()
        interval = start - self._mark if self._mark is not None else 0.0
        self.train_seconds += interval
        budget = self.budget_fraction * self.train_seconds - self.probe_seconds
        missing = [m for m in self.methods if m not in self.cost]
        if missing or "capture" not in self.cost:  # first save: estimate from the shapes
            shapes = costs_from_shapes(model, self.processor, self.family, self.first, self.methods,
                                       self.geometry_examples if self.geometry else 0, clock=self.clock)
            self.cost = {**shapes, **self.cost}
        plan = plan_probe(budget, self.cost, self.max_examples, self.methods, self.sanity_examples,
                          self.min_examples)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "diagnostics"
        info = {"global_step": state.global_step, "epoch": state.epoch,
                "budget": {**plan, "budget_s": budget, "budget_fraction": self.budget_fraction,
                           "train_seconds_since_last_save": interval, "train_seconds_total": self.train_seconds,
                           "probe_seconds_before": self.probe_seconds}}
        if plan["run"]:
            result = run_probe(model, self.processor, self.family, self.records, folder,
                               methods=plan["methods"], max_examples=plan["n_examples"],
                               sanity_examples=plan["sanity_examples"], geometry=self.geometry,
                               geometry_examples=self.geometry_examples, time_budget=max(budget, 0.0),
                               clock=self.clock, extra=info)
            self.cost = costs_from_timings(result["timings"], self.cost)
            log_to_wandb(result, folder, state.global_step)
            logger.info("checkpoint %d diagnostics: %s", state.global_step,
                        {k: round(v, 3) for k, v in probe_scalars(result).items()})
        else:
            atomic_write_json(folder / "diagnostics.json", {**info, "status": "skipped", "examples": [],
                                                           "skipped": plan["skipped"]})
            logger.warning("checkpoint %d: diagnostics skipped: %s", state.global_step, plan["skipped"][0]["reason"])
        self.probe_seconds += self.clock() - start
        self._mark = self.clock()
