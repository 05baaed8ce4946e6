"""The demo bases: a tiny model of each family, pre-trained on phantom data, cached by its config.

``ensure_base_model(family)`` returns a folder holding a tiny model of the family's real class
with its processor, after a short *full-parameter* pre-training on phantom captions
(:mod:`medvlm.demo.pretrain`), so that the LoRA stages adapt a model that already sees. The folder
is cached under ``$MEDVLM_HOME/base/`` keyed by the hash of :class:`TinyConfig` (and the phantom
generator version): change a field and it is rebuilt. It is then recorded as the base that
``demo:<family>`` names (:func:`medvlm.models.tiny.demo_model_dir`).

The tokenizer is a byte-level BPE trained on the phantom corpus (~1k tokens; PaliGemma's
processor adds its 1,152 location/segmentation tokens).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from medvlm.data_curation.phantom import GENERATOR_VERSION, PhantomConfig, load_phantom
from medvlm.models.base import TinySizes
from medvlm.models.families import get_family
from medvlm.models.tiny import DEMO_SCHEME, build_tiny, current_record, tiny_tokenizer
from medvlm.utils.distributed import main_process_first
from medvlm.utils.io import atomic_write_text, medvlm_home, sha256_json, write_manifest

logger = logging.getLogger(__name__)

#: Bump when the pre-training recipe changes (it enters the cache key with TinyConfig).
BASE_RECIPE_VERSION = 2


@dataclass
class TinyConfig:
    """Sizes and pre-training of a tiny family model. Every field enters the cache key."""

    family: str = "paligemma"
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    vocab_size: int = 800
    #: None: the family's ``tiny_vision_pretrain_steps``
    vision_pretrain_steps: int | None = None
    vision_pretrain_lr: float = 1e-3
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 32
    pretrain_lr: float = 1e-3
    #: share of the language pre-training with the vision tower held still; None: the family's
    #: ``tiny_vision_frozen_share``
    vision_frozen_share: float | None = None
    seed: int = 0
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    def __post_init__(self):
        if self.vision_frozen_share is None:
            self.vision_frozen_share = get_family(self.family).tiny_vision_frozen_share
        if self.vision_pretrain_steps is None:
            self.vision_pretrain_steps = get_family(self.family).tiny_vision_pretrain_steps
        if not 0.0 <= self.vision_frozen_share <= 1.0:
            raise ValueError(f"TinyConfig.vision_frozen_share must be in [0, 1], got {self.vision_frozen_share}")

    def key(self) -> str:
        return sha256_json({**asdict(self), "generator": GENERATOR_VERSION, "recipe": BASE_RECIPE_VERSION})[:16]

    def sizes(self) -> TinySizes:
        return TinySizes(**{f.name: getattr(self, f.name) for f in fields(TinySizes)})


def phantom_corpus(cfg: PhantomConfig) -> list[str]:
    """Every question and answer of the phantom data, plus the prompt words of each family."""
    texts: list[str] = []
    for kind in ("qa", "captions", "cases", "generic"):
        ds = load_phantom(cfg, kind=kind)
        texts += list(ds["question"]) + list(ds["answer"])
    texts += ["USER: ASSISTANT: answer en caption en", "0123456789 .,;:!?()-'\"/"]
    return texts


def base_model_dir(family: str = "paligemma", cfg: TinyConfig | None = None) -> Path:
    """Where the demo base of ``family`` lives under ``$MEDVLM_HOME`` (built or not): the folder name
    holds a hash of the config, so a changed config gets a new folder."""
    cfg = cfg or TinyConfig(family=family)
    return medvlm_home() / "base" / f"{cfg.family}-{cfg.key()}"


def ensure_base_model(family: str = "paligemma", cfg: TinyConfig | None = None,
                      root: str | Path | None = None) -> Path:
    """The cached tiny base model folder for ``family``; built (a few minutes on a CPU) if missing,
    and recorded as what ``demo:<family>`` names (unless ``root`` puts it elsewhere)."""
    from medvlm.demo.pretrain import pretrain, pretrain_vision

    cfg = cfg or TinyConfig(family=family)
    folder = Path(root) if root else base_model_dir(family, cfg)
    if not (folder / "manifest.json").exists():
        logger.info("building the tiny %s base model in %s (cached for later runs)", cfg.family, folder)
        tokenizer = tiny_tokenizer(cfg.family, phantom_corpus(cfg.phantom), cfg.vocab_size)
        model, processor = build_tiny(cfg.family, cfg.sizes(), tokenizer)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        stats = pretrain_vision(model, processor, cfg)
        stats.update(pretrain(model, processor, cfg, tmp / "pretrain"))
        shutil.rmtree(tmp / "pretrain", ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        (tmp / "tiny_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
        write_manifest(tmp, kind="tiny-base", family=cfg.family, key=cfg.key(), pretrain=stats,
                       parameters=sum(p.numel() for p in model.parameters()))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    if root is None:
        atomic_write_text(current_record(cfg.family), folder.name + "\n")
    return folder


def ensure_demo_model(model_name_or_path: str | None) -> None:
    """Build the demo base a ``demo:<family>`` id names, if needed (scripts call this before loading);
    under several processes the main process builds it while the others wait."""
    if model_name_or_path and str(model_name_or_path).startswith(DEMO_SCHEME):
        with main_process_first():
            ensure_base_model(str(model_name_or_path)[len(DEMO_SCHEME):])
