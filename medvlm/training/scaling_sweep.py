"""A scaling-law sweep: stage 2 at several data sizes × LoRA ranks, their evaluation losses, the fit.

``run_sweep(plan)`` does, in ``plan.out``::

    stage1/                 a stage-1 run to start every point from (skipped with plan.init_adapter)
    mix-<name>/             the stage-2 mix, built once (load_records builds it)
    data/train-<D>/         the first D rows of one seeded shuffle of the mix (nested subsets)
    data/validation/        the fixed validation questions the loss is measured on
    runs/d<D>-r<rank>/      one stage-2 run per point (adapter_mode merge: the stage-1 adapter is
                            merged into the base and a new adapter of that rank is trained), one
                            epoch over its D examples; plus eval_loss.json, written by the sweep
    scaling_fit.json        the points, the fits (joint, per template, data-only per size) and the
                            held-out check;  scaling.png, scaling_<template>.png  the figures

A run folder holding ``manifest.json`` is finished and reused (the stage recipes write it last)
when its ``config.yaml`` is the config the sweep asks for now, and refused when it is not; one
without ``manifest.json`` was interrupted and is deleted and run again. The evaluation loss is the mean
cross-entropy over answer tokens, teacher-forced, on the validation questions (the stage recipe
writes only generation metrics): the training collator's labels choose the tokens, so it is the
training objective measured on held-out questions, overall and per answer type (closed, open).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from medvlm.config import to_yaml
from medvlm.diagnostics.model_card import load_adapter_model
from medvlm.diagnostics.scaling import ScalingFit, fit_data_law, fit_scaling_law
from medvlm.diagnostics.scaling_plot import plot_scaling
from medvlm.models.base import IGNORE_INDEX
from medvlm.models.inputs import VLMCollator, prepare_examples
from medvlm.training.cli import parse_stage_config
from medvlm.training.stage import load_records, run_stage
from medvlm.utils.io import atomic_write_json, hash_rows

logger = logging.getLogger(__name__)

EVAL_FILE = "eval_loss.json"
SIZE_VARIABLES = ("trainable", "rank")


@dataclass
class SweepPlan:
    """What to run. ``holdout`` (data size, rank) defaults to 4 × the largest size at the largest rank."""

    out: Path
    config: str = "recipes/configs/demo_llava_stage2.yaml"
    stage1_config: str = "recipes/configs/demo_llava_stage1.yaml"
    init_adapter: str | None = None  # a finished stage-1 adapter; None: train one (stage1_steps)
    stage1_steps: int = 600
    data_sizes: tuple[int, ...] = (500, 1000, 2000, 4000)
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    holdout: tuple[int, int] | None = None
    epochs: float = 1.0
    eval_samples: int = 256
    size_variable: str = "trainable"  # X: trainable parameters (from the manifest) or the LoRA rank
    n_bootstrap: int = 200
    seed: int = 0
    stage_args: list[str] = field(default_factory=list)  # extra overrides for every stage-2 run
    fit_options: dict = field(default_factory=dict)  # passed to fit_scaling_law (grids, delta, max_iter)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.size_variable not in SIZE_VARIABLES:
            raise ValueError(f"size_variable {self.size_variable!r}: expected one of {SIZE_VARIABLES}")
        bad = [v for v in (*self.data_sizes, *self.ranks) if int(v) < 1]
        if bad:
            raise ValueError(f"data sizes and ranks must be positive integers, got {bad}")
        if self.holdout is None:
            self.holdout = (4 * max(self.data_sizes), max(self.ranks))
        if self.holdout[0] <= max(self.data_sizes):
            raise ValueError(f"the held-out run's data size {self.holdout[0]} must exceed the sweep's largest "
                             f"({max(self.data_sizes)}): it checks an extrapolation")


# -- evaluation loss ---------------------------------------------------------------------------------
@torch.no_grad()
def answer_nll(model, collator, examples, labels: list[str], batch_size: int = 8) -> dict:
    """Teacher-forced cross-entropy over answer tokens (the collator's labels): overall and per
    label (e.g. the answer type), each the token-weighted mean {"loss", "n_tokens", "n_examples"}.
    Memory: one batch's logits."""
    model.eval()
    device = next(model.parameters()).device
    nll = np.zeros(len(examples))
    tokens = np.zeros(len(examples), dtype=np.int64)
    for start in range(0, len(examples), batch_size):
        batch = collator([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
        target = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        target = target[:, 1:]  # position t predicts token t + 1
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0),
                                                 reduction="none")
        mask = target != IGNORE_INDEX
        nll[start:start + len(target)] = (loss * mask).sum(1).cpu().numpy()
        tokens[start:start + len(target)] = mask.sum(1).cpu().numpy()
    labels_arr = np.asarray(labels, dtype=object)

    def summary(sel) -> dict:
        n_tok = int(tokens[sel].sum())
        return {"loss": float(nll[sel].sum() / n_tok) if n_tok else None, "n_tokens": n_tok,
                "n_examples": int(np.count_nonzero(sel))}

    out = summary(np.ones(len(examples), dtype=bool))
    out["by_template"] = {str(t): summary(labels_arr == t) for t in dict.fromkeys(labels)}
    return out


def evaluate_run(run_dir: Path, validation, validation_hash: str) -> dict:
    """The run's evaluation loss, from ``eval_loss.json`` when it was measured on these questions,
    else measured now (base + the run's adapter) and written there."""
    path = run_dir / EVAL_FILE
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("validation_hash") == validation_hash:
            return cached
    loaded = load_adapter_model(run_dir)
    examples = prepare_examples(validation, loaded.processor, loaded.family)
    result = answer_nll(loaded.model, VLMCollator(loaded.family, loaded.processor), examples,
                        list(validation["answer_type"]))
    result["validation_hash"] = validation_hash
    atomic_write_json(path, result)
    del loaded
    gc.collect()
    return result


# -- collecting points from finished runs --------------------------------------------------------------
def read_point(run_dir: Path) -> dict:
    """One finished run as a point: D (training examples), rank, trainable parameters, its losses."""
    run_dir = Path(run_dir)
    manifest_file, eval_file = run_dir / "manifest.json", run_dir / EVAL_FILE
    for f in (manifest_file, eval_file):
        if not f.is_file():
            raise FileNotFoundError(f"{run_dir} has no {f.name}: not a finished, evaluated sweep run "
                                    "(run the sweep again to finish it)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    losses = json.loads(eval_file.read_text(encoding="utf-8"))
    trainable = sum(t.get("trainable", 0) for t in manifest.get("trainable_parameters", {}).values())
    return {"run": run_dir.name, "D": int(manifest["data"]["train"]), "rank": int(config["lora_r"]),
            "trainable": int(trainable), "loss": losses["loss"],
            "by_template": {k: v["loss"] for k, v in losses.get("by_template", {}).items()}}


# -- fitting and reporting -----------------------------------------------------------------------------
def _arrays(points: list[dict], size_variable: str, template: str | None = None):
    X = np.array([p[size_variable] for p in points], dtype=float)
    D = np.array([p["D"] for p in points], dtype=float)
    L = np.array([p["loss"] if template is None else p["by_template"].get(template, np.nan) for p in points])
    return X, D, L


def _holdout_check(fit: ScalingFit, point: dict, size_variable: str, template: str | None = None) -> dict:
    measured = point["loss"] if template is None else point["by_template"].get(template)
    out = {"run": point["run"], "D": point["D"], "X": point[size_variable], "measured": measured}
    if fit.converged and measured:
        predicted = float(fit.predict(point["D"], point[size_variable] if fit.form == "X,D" else None)[()])
        out.update(predicted=predicted, relative_error=(predicted - measured) / measured)
    return out


def _try(fn, *args, **kwargs) -> ScalingFit | str:
    """A secondary fit, or the reason it cannot be made (recorded, never dropped)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        return f"not fitted: {err}"


def fit_points(points: list[dict], holdout: dict | None, out: Path, *, size_variable: str = "trainable",
               n_bootstrap: int = 200, seed: int = 0, extra: dict | None = None, **fit_kwargs) -> dict:
    """Fit the joint law on ``points`` (and per template, and the data-only law per size), check
    the prediction on ``holdout``, draw the figures and write ``scaling_fit.json`` into ``out``.
    ``extra`` is stored in the JSON as given. The joint fit's bad-input errors propagate: without
    it there is nothing to report."""
    out = Path(out)
    kw = dict(n_bootstrap=n_bootstrap, seed=seed, **fit_kwargs)
    X, D, L = _arrays(points, size_variable)
    fit = fit_scaling_law(X, D, L, **kw)
    result = {"size_variable": size_variable, "points": points, "holdout_point": holdout, "fit": fit.to_dict(),
              **(extra or {})}
    hold = {"X": holdout[size_variable], "D": holdout["D"], "measured": holdout["loss"]} if holdout else None
    plot_scaling(fit, X, D, L, out / "scaling.png", holdout=hold, title=f"joint fit, X = {size_variable}")
    if holdout:
        result["holdout"] = _holdout_check(fit, holdout, size_variable)
    templates = sorted({t for p in points for t in p["by_template"]})
    result["by_template"], result["holdout_by_template"] = {}, {}
    for t in templates:
        Xt, Dt, Lt = _arrays(points, size_variable, t)
        keep = np.isfinite(Lt)
        tfit = _try(fit_scaling_law, Xt[keep], Dt[keep], Lt[keep], **kw)
        if not isinstance(tfit, ScalingFit):
            result["by_template"][t] = f"{t} questions {tfit}"
            continue
        result["by_template"][t] = tfit.to_dict()
        measured = holdout["by_template"].get(t) if holdout else None
        t_hold = {"X": holdout[size_variable], "D": holdout["D"], "measured": measured} if measured else None
        plot_scaling(tfit, Xt[keep], Dt[keep], Lt[keep], out / f"scaling_{t}.png", holdout=t_hold,
                     title=f"{t} questions, X = {size_variable}")
        if t_hold:
            result["holdout_by_template"][t] = _holdout_check(tfit, holdout, size_variable, t)
    result["data_only"] = {}
    for level in np.unique(X):
        sel = X == level
        dfit = _try(fit_data_law, D[sel], L[sel], **kw)
        result["data_only"][f"{level:g}"] = dfit.to_dict() if isinstance(dfit, ScalingFit) else dfit
    atomic_write_json(out / "scaling_fit.json", result)
    return result


# -- running the sweep ---------------------------------------------------------------------------------
def _stage_config(argv: list[str]):
    return parse_stage_config(argv)


def _changed_settings(out_dir: Path, configs) -> dict:
    """Keys whose value in the finished run's config.yaml differs from the config asked for now."""
    want = yaml.safe_load(to_yaml(*configs)) or {}
    saved = yaml.safe_load((out_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    return {k: (saved.get(k), want.get(k)) for k in sorted(set(want) | set(saved)) if saved.get(k) != want.get(k)}


def _run(argv: list[str], out_dir: Path) -> Path:
    """One stage run into ``out_dir``: reused when finished (manifest.json) with the same config,
    refused when finished with another one (a stale point would bias the fit silently), deleted
    and run again when interrupted."""
    configs = _stage_config([*argv, "--output_dir", str(out_dir)])
    if (out_dir / "manifest.json").is_file():
        changed = _changed_settings(out_dir, configs)
        if changed:
            shown = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in list(changed.items())[:4])
            raise ValueError(f"{out_dir} is a finished run made with other settings ({shown}); delete it, or "
                             "give the sweep another --out")
        logger.info("reusing the finished run %s", out_dir)
        return out_dir
    if out_dir.exists():
        logger.warning("%s holds an interrupted run (no manifest.json): deleting it and running again", out_dir)
        shutil.rmtree(out_dir)
    run_stage(*configs)
    gc.collect()
    return out_dir


def ensure_stage1(plan: SweepPlan) -> Path:
    """The adapter every point starts from: ``plan.init_adapter``, or a stage-1 run of ``stage1_steps``."""
    if plan.init_adapter:
        return Path(plan.init_adapter).resolve()
    argv = [plan.stage1_config, "--max_steps", str(plan.stage1_steps), "--save_strategy", "no",
            "--checkpoint_eval_samples", "0", "--diagnostics_examples", "0", "--blank_eval", "false",
            "--max_eval_samples", "64", "--report_to", "none", "--seed", str(plan.seed)]
    return _run(argv, plan.out / "stage1").resolve() / "adapter"


def prepare_data(plan: SweepPlan) -> tuple[dict[int, Path], object, str]:
    """Nested training subsets of the stage-2 data (one seeded shuffle, its first D rows; phases
    keep their order in training) and the fixed validation questions, saved under ``out/data``."""
    _, data_args, _, _ = _stage_config([plan.config])
    train = load_records(data_args.dataset, "train", data_args.question_types, data_args, plan.out)
    sizes = sorted({*plan.data_sizes, plan.holdout[0]})
    if sizes[-1] > len(train):
        raise ValueError(f"data size {sizes[-1]} exceeds the {len(train)} training rows of {data_args.dataset}; "
                         "choose smaller --data-sizes / --holdout")
    order = np.random.default_rng(plan.seed).permutation(len(train))
    folders = {}
    for size in sizes:
        folder = plan.out / "data" / f"train-{size}"
        if not (folder / "dataset_info.json").is_file():
            train.select(order[:size]).flatten_indices().save_to_disk(str(folder))
        folders[size] = folder
    val = load_records(data_args.eval_dataset, "validation", data_args.eval_question_types, data_args, plan.out)
    if plan.eval_samples > len(val):
        raise ValueError(f"eval_samples {plan.eval_samples} exceeds the {len(val)} validation questions")
    val = val.select(np.random.default_rng(plan.seed + 1).permutation(len(val))[:plan.eval_samples])
    return folders, val, hash_rows(val["id"])


def point_argv(plan: SweepPlan, data: Path, rank: int, adapter: Path) -> list[str]:
    """Stage-2 overrides of one point: its data and rank, one pass, no checkpoints or probes, a small
    final evaluation (the sweep measures its own loss); ``plan.stage_args`` last, so they win."""
    return [plan.config, "--dataset", str(data.resolve()), "--init_adapter", str(adapter),
            "--adapter_mode", "merge", "--lora_r", str(rank), "--lora_alpha", str(2 * rank),
            "--num_train_epochs", str(plan.epochs), "--max_steps", "-1", "--warmup_steps", "0.1",
            "--save_strategy", "no", "--checkpoint_eval_samples", "0", "--diagnostics_examples", "0",
            "--blank_eval", "false", "--max_eval_samples", "32", "--report_to", "none",
            "--seed", str(plan.seed), *plan.stage_args]


def run_sweep(plan: SweepPlan) -> dict:
    """Every point and the held-out run (cached), their losses, the fits, figures and JSON."""
    plan.out.mkdir(parents=True, exist_ok=True)
    adapter = ensure_stage1(plan)
    folders, validation, val_hash = prepare_data(plan)
    points = []
    for d, r in [(d, r) for d in plan.data_sizes for r in plan.ranks] + [plan.holdout]:
        run_dir = _run(point_argv(plan, folders[d], r, adapter), plan.out / "runs" / f"d{d}-r{r}")
        evaluate_run(run_dir, validation, val_hash)
        points.append(read_point(run_dir))
    return fit_points(points[:-1], points[-1], plan.out, size_variable=plan.size_variable,
                      n_bootstrap=plan.n_bootstrap, seed=plan.seed,
                      extra={"validation": {"n": len(validation), "hash": val_hash}}, **plan.fit_options)


def format_report(result: dict) -> str:
    """The points, the fitted parameters with their intervals, and the held-out check, as text."""
    xv = result["size_variable"]
    lines = [f"{'run':<14}{'D':>7}{'rank':>6}{xv:>12}{'loss':>9}  per template"]
    for p in result["points"] + ([result["holdout_point"]] if result.get("holdout_point") else []):
        per = ", ".join(f"{k} {v:.4f}" for k, v in p["by_template"].items() if v is not None)
        lines.append(f"{p['run']:<14}{p['D']:>7}{p['rank']:>6}{p[xv]:>12}{p['loss']:>9.4f}  {per}")
    lines.append("")
    lines += _describe_fit("joint fit", result["fit"])
    for t, f in result.get("by_template", {}).items():
        lines += _describe_fit(f"{t} questions", f) if isinstance(f, dict) else [f]
    for level, f in result.get("data_only", {}).items():
        lines += _describe_fit(f"data only, {xv} = {level}", f) if isinstance(f, dict) else [f"data only, "
                                                                                           f"{xv} = {level}: {f}"]
    for name, h in [("held-out", result.get("holdout")),
                    *((f"held-out, {t}", h) for t, h in result.get("holdout_by_template", {}).items())]:
        if h and "predicted" in h:
            lines.append(f"{name} run {h['run']} (D={h['D']}): predicted {h['predicted']:.4f}, measured "
                         f"{h['measured']:.4f}, relative error {100 * h['relative_error']:+.1f}%")
        elif h:
            lines.append(f"{name} run {h['run']}: measured {h['measured']}, no prediction (the fit did not converge)")
    return "\n".join(lines)


def _describe_fit(name: str, f: dict) -> list[str]:
    if not f["converged"]:
        return [f"{name}: did not converge ({f['message']})"]
    keys = [k for k in ("A", "alpha", "beta", "E") if k in f]
    iv = f.get("intervals") or {}
    parts = [f"{k} = {f[k]:.4g}" + (f" [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" if k in iv else "") for k in keys]
    err = f["error"]
    notes = f["message"].split("; ")[1:]  # the first part is the count of converged starts
    return [f"{name} ({f['n_points']} points): " + ", ".join(parts),
            f"    error on the points: rmse(log) {err['rmse_log']:.4f}, mean |rel| {100 * err['mean_abs_rel']:.2f}%, "
            f"max |rel| {100 * err['max_abs_rel']:.2f}%", *(f"    note: {n}" for n in notes)]
