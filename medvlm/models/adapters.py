"""LoRA adapters: what medvlm writes beside them, the checks before loading, and the one loader.

Every adapter folder medvlm writes holds peft's ``adapter_config.json`` and
``adapter_model.safetensors`` plus ``medvlm_adapter.json``::

    {"model_name_or_path": "google/paligemma-3b-mix-448",   # the base, as the user named it
     "resolved_path": "...",                                 # the folder it resolved to (demo bases)
     "family": "paligemma",
     "merged_into_base": [],                                 # adapters merged into the base first
     "image_settings": {}}                                   # processor overrides it was trained with
                                                             # (min_pixels / max_pixels; loaders reuse them)

An adapter is always relative to the *original* base, so plain transformers + PEFT
(``PeftModel.from_pretrained(base, folder)``) reproduces the run, as the model card says. A stage
that merged its previous adapter into the base (``adapter_mode: merge``) trains a new adapter on
the merged weights; its final adapter is saved as the concatenation of the two (rank r1 + r2:
ΔW = s1·B1·A1 + s2·B2·A2 exactly, PEFT's ``add_weighted_adapter(..., combination_type="cat")``
rule, computed here on the two state dicts so the base is not loaded a second time).
Checkpoints written during such a stage still hold the new adapter alone; their
``medvlm_adapter.json`` lists the merged adapter, and :func:`apply_adapter` merges it first.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medvlm.models.registry import LoadedModel, detect_family, load_model_and_processor, resolve_model_path
from medvlm.models.tiny import DEMO_SCHEME, current_record, demo_model_dir
from medvlm.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

RECORD = "medvlm_adapter.json"
WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter that cannot be used; the message names the folder and the fix."""


def adapter_folder(folder: str | Path) -> Path:
    """``folder`` itself, or its ``adapter/`` when it is a stage folder of a medvlm run."""
    path = Path(folder)
    if not (path / "adapter_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    return path


def adapter_record(folder: str | Path, what: str = "adapter") -> dict[str, Any]:
    """``medvlm_adapter.json`` (empty when the adapter was not written by medvlm) with peft's
    ``base_model_name_or_path`` as a fallback for the base. ``what`` names the setting in errors."""
    path = adapter_folder(folder)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{what} {folder}: no adapter_config.json there; point at the 'adapter' folder of a "
                           "finished stage (e.g. runs/demo/stage1/adapter) or a stage folder holding adapter/")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    record = json.loads((path / RECORD).read_text(encoding="utf-8")) if (path / RECORD).is_file() else {}
    record.setdefault("model_name_or_path", cfg.get("base_model_name_or_path"))
    record["peft_base"] = cfg.get("base_model_name_or_path")  # the folder or id peft saw at training
    record.setdefault("merged_into_base", [])
    return record


def check_adapter(folder: str | Path, base_model: str, family: str | None = None,
                  what: str = "adapter") -> dict[str, Any]:
    """The adapter exists and was trained on this base model (and family), before any weights load.
    Returns its record. ``what`` names the setting in errors (``init_adapter``, ``--adapter``)."""
    record = adapter_record(folder, what)
    trained_on, resolved = record.get("model_name_or_path"), record.get("resolved_path")
    if record.get("family") and family and record["family"] != family:
        raise AdapterError(f"{what} {folder} was trained on a {record['family']} model ({trained_on}), but "
                           f"{base_model} is a {family} model; an adapter only fits the family and base it was "
                           f"trained on. Set model_name_or_path: {trained_on}")
    if trained_on and base_model not in (trained_on, resolved, record.get("peft_base")):
        raise AdapterError(f"{what} {folder} was trained on base model {trained_on!r}, but this run loads "
                           f"{base_model!r}. Set model_name_or_path: {trained_on} (or train a new stage-1 "
                           "adapter on this base).")
    if resolved and base_model.startswith(DEMO_SCHEME):
        try:
            now = str(demo_model_dir(base_model))
        except FileNotFoundError:  # not built here: it can only match if the recorded one is here
            home = current_record(base_model[len(DEMO_SCHEME):]).parent
            now = resolved if Path(resolved).is_dir() and Path(resolved).parent == home else "(not built)"
        if now != resolved:
            raise AdapterError(f"{what} {folder} was trained on the tiny base in {resolved}, but {base_model} "
                               f"now resolves to {now} (the demo base was rebuilt since, or MEDVLM_HOME points "
                               "elsewhere). Set MEDVLM_HOME to the run's, train stage 1 again, or set "
                               "model_name_or_path to the old folder.")
    return record


def write_record(folder: str | Path, base_model: str, family: str, merged_into_base: Sequence[str] = (),
                 image_settings: dict[str, int] | None = None) -> Path:
    """``medvlm_adapter.json`` of an adapter folder (see the module docstring)."""
    return atomic_write_json(Path(folder) / RECORD, {
        "model_name_or_path": base_model, "resolved_path": resolve_model_path(base_model), "family": family,
        "merged_into_base": [str(Path(p).resolve()) for p in merged_into_base],
        "image_settings": dict(image_settings or {})})


def _scaling(cfg: dict[str, Any]) -> float:
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / (r ** 0.5 if cfg.get("use_rslora") else r)


def concat_adapters(first: str | Path, second: str | Path, out: str | Path) -> Path:
    """One adapter equal to ``first`` merged into the base followed by ``second`` (see the module
    docstring): for every module, A = [A1; A2] and B = [s1·B1, s2·B2] at rank r1 + r2 with
    scaling 1; a module only one adapter targets gets zeros in the other's rows (exact).
    ``modules_to_save`` weights (fully trained parts) come from ``second`` where it has them."""
    first, second, out = adapter_folder(first), adapter_folder(second), Path(out)
    cfgs = [json.loads((p / "adapter_config.json").read_text(encoding="utf-8")) for p in (first, second)]
    for p, cfg in zip((first, second), cfgs, strict=True):
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") \
                or cfg.get("alpha_pattern"):
            raise AdapterError(f"adapter {p}: only plain LoRA adapters (no DoRA, no per-module ranks) can be "
                               "concatenated; save the stage with adapter_mode: continue instead")
    weights = [load_file(str(p / WEIGHTS)) for p in (first, second)]
    ranks, scales = [int(c["r"]) for c in cfgs], [_scaling(c) for c in cfgs]
    rank = sum(ranks)
    lora = {}
    other = {}
    for k, sd in enumerate(weights):
        for name, t in sd.items():
            if ".lora_A." in name:
                lora.setdefault(name.split(".lora_A.")[0], [None, None])[k] = (t, sd[name.replace(".lora_A.", ".lora_B.")])
            elif ".lora_B." not in name:
                other[name] = t  # modules_to_save: the second adapter's copy wins
    combined: dict[str, torch.Tensor] = {}
    for module, pair in lora.items():
        ref_a, ref_b = next(p for p in pair if p is not None)
        a_parts, b_parts = [], []
        for k, p in enumerate(pair):
            if p is None:
                a_parts.append(ref_a.new_zeros(ranks[k], ref_a.shape[1]))
                b_parts.append(ref_b.new_zeros(ref_b.shape[0], ranks[k]))
            else:
                a_parts.append(p[0])
                b_parts.append(p[1] * scales[k])
        combined[f"{module}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
        combined[f"{module}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
    combined.update(other)
    cfg = dict(cfgs[1])
    targets = [c["target_modules"] for c in cfgs]
    if all(isinstance(t, str) for t in targets) and targets[0] != targets[1]:
        cfg["target_modules"] = f"(?:{targets[0]})|(?:{targets[1]})"
    elif not all(isinstance(t, str) for t in targets):
        cfg["target_modules"] = sorted({*(targets[0] or []), *(targets[1] or [])})
    cfg["modules_to_save"] = sorted({*(cfgs[0].get("modules_to_save") or []), *(cfgs[1].get("modules_to_save") or [])}) or None
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(combined, str(tmp / WEIGHTS))
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def apply_adapter(model: torch.nn.Module, folder: str | Path, *, merge: bool = False, name: str = "default",
                  trainable: bool = False):
    """``model`` with the adapter of ``folder`` (adapters its record says were merged into the base
    are merged first). ``merge``: fold it into the weights (faster inference, one model); else a
    peft model (``name``: its adapter name)."""
    from peft import PeftModel

    path = adapter_folder(folder)
    for earlier in adapter_record(path)["merged_into_base"]:
        model = PeftModel.from_pretrained(model, earlier).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    return model.merge_and_unload() if merge else model


def family_of(model_name_or_path: str) -> str | None:
    """The family name of a model id without loading weights (None when its config cannot be read:
    the loader then says why)."""
    name = str(model_name_or_path)
    if name.startswith(DEMO_SCHEME):
        return name[len(DEMO_SCHEME):]
    try:
        return detect_family(name).name
    except (OSError, ValueError):
        return None


def load_with_adapter(model_name_or_path: str | None, adapter: str | Path | None = None, *, merge: bool = False,
                      **load_kwargs) -> LoadedModel:
    """The one loader of a base model with an adapter, used by evaluation, diagnostics, the
    explorer and the model card: the base (``model_name_or_path``, or the one the adapter's record
    names) loaded with ``load_kwargs``, checked against the adapter before any weights load. The
    processor gets the image settings the adapter was trained with (its record's ``image_settings``)
    unless ``load_kwargs`` names them."""
    if model_name_or_path is None:
        if adapter is None:
            raise AdapterError("give a model or an adapter whose medvlm_adapter.json names its base")
        model_name_or_path = adapter_record(adapter).get("model_name_or_path")
        if not model_name_or_path:
            raise AdapterError(f"adapter {adapter} does not name its base model; pass the model")
    if adapter is not None:
        record = check_adapter(adapter, model_name_or_path, family_of(model_name_or_path))
        load_kwargs.setdefault("image_settings", record.get("image_settings") or None)
    loaded = load_model_and_processor(model_name_or_path, **load_kwargs)
    if adapter is not None:
        loaded.model = apply_adapter(loaded.model, adapter, merge=merge)
        logger.info("applied adapter %s%s", adapter, " (merged into the weights)" if merge else "")
    loaded.model.eval()
    return loaded
