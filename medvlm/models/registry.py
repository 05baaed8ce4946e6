"""Families by name, and loading a model with its processor from a hub id or a local folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, ProcessorMixin

from medvlm.models.base import ModelFamily
from medvlm.models.families import FAMILIES, get_family  # noqa: F401 - the registry's public names
from medvlm.models.tiny import DEMO_SCHEME, demo_model_dir
from medvlm.utils.hub import looks_like_hub_id, looks_like_missing_folder

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def detect_family(model_name_or_path: str) -> ModelFamily:
    """The family of a checkpoint from the ``model_type`` of its ``config.json``, read as a plain dict:
    a type transformers does not know either gets medvlm's message (the registered families and the
    file to add), not transformers' advice to upgrade."""
    config, _ = PretrainedConfig.get_config_dict(model_name_or_path)
    model_type = config.get("model_type")
    if not model_type:
        raise ValueError(f"{model_name_or_path}: its config.json has no model_type, so no family can be chosen; "
                         "point at a transformers checkpoint folder (config.json with model_type)")
    return get_family(model_type)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: ProcessorMixin
    family: ModelFamily


def resolve_model_path(model_name_or_path: str) -> str:
    """``demo:<family>`` names the embedded demo base of a family (the folder it was last built in,
    see :mod:`medvlm.models.tiny`); anything else is returned as given."""
    if model_name_or_path.startswith(DEMO_SCHEME):
        return str(demo_model_dir(model_name_or_path))
    return model_name_or_path


def quantization_config(bits: int | None, dtype: torch.dtype):
    """A bitsandbytes config for QLoRA (4-bit NF4 with double quantisation, or 8-bit)."""
    if not bits:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization bits must be 4, 8 or empty, got {bits!r}")


def device_map_for(quantized: bool) -> dict | None:
    """Never ``"auto"`` under several processes: each rank holds a whole replica (DDP). Quantised
    weights must be placed at load time, on this process's device."""
    if not quantized:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        return {"": local_rank}
    return {"": "cpu"}


def load_model_and_processor(
    model_name_or_path: str,
    *,
    dtype: str = "float32",
    quantization_bits: int | None = None,
    attn_implementation: str | None = "eager",
    for_inference: bool = False,
    image_settings: dict[str, int] | None = None,
) -> LoadedModel:
    """Load a model of a registered family and its processor.

    ``attn_implementation="eager"`` is the default because diagnostics need attention weights
    (sdpa returns none); pass ``"sdpa"`` for faster training when no diagnostics run.
    ``dtype="auto"``: bfloat16 on a GPU, float32 on a CPU. ``for_inference`` (evaluation,
    diagnostics, the explorer) puts an unquantised model on the GPU when there is one; training
    leaves placement to the Trainer / accelerate. ``image_settings`` (``min_pixels``, ``max_pixels``)
    override the processor config of a dynamic-resolution family (:meth:`ModelFamily.load_processor`).
    """
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    path = resolve_model_path(model_name_or_path)
    if looks_like_missing_folder(path):
        raise FileNotFoundError(f"model folder {path} does not exist; pass a hub id (owner/name) or an "
                                "existing folder")
    try:
        family = detect_family(path)
    except OSError as err:
        if not looks_like_hub_id(path):
            raise
        offline = " (HF_HUB_OFFLINE is set: the model must already be in the local hub cache)" \
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
        raise OSError(f"cannot load {path} from the Hugging Face hub{offline}: {err}") from err
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; expected auto or one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    qconfig = quantization_config(quantization_bits, torch_dtype)
    # the processor first: bad image settings fail before the weights load
    processor = family.load_processor(path, **(image_settings or {}))
    model = family.model_class.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn_implementation,
        quantization_config=qconfig, device_map=device_map_for(qconfig is not None),
    )
    if for_inference and qconfig is None and torch.cuda.is_available():
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return LoadedModel(model, processor, family)
