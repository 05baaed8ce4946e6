"""Build a backend from a config: ``make_llm({"backend": "ollama", "model": "llama3.1:8b"})``.

YAML form (used by ``data_curation/generate_qa.py`` and the judge)::

    llm:
      backend: ollama          # or: transformers
      model: llama3.1:8b       # transformers: a local folder, a .gguf path, or "smollm2"
      host: http://127.0.0.1:11434
      cache_dir: runs/llm-cache
      concurrency: 4
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from medvlm.llm.base import TextLLM
from medvlm.llm.cache import CachedLLM
from medvlm.llm.ollama_backend import OllamaLLM
from medvlm.llm.transformers_backend import TransformersLLM, smollm2_gguf_path


@dataclass
class LLMConfig:
    """Which text LLM to use.

    Server fields: ``host``, ``timeout``, ``keep_alive``, ``concurrency``, ``check_model``.
    Local fields: ``gguf_file``, ``device``, ``max_new_tokens``. Both: ``options`` (sampling, in
    Ollama's vocabulary) and ``cache_dir`` (responses cached on disk when set).
    """

    backend: str = field(default="ollama", metadata={"help": "ollama | transformers"})
    model: str = field(default="", metadata={"help": "model name / local path / 'smollm2'"})
    host: str | None = field(default=None, metadata={"help": "Ollama server; default $OLLAMA_HOST"})
    cache_dir: str | None = field(default=None, metadata={"help": "folder of the response cache"})
    concurrency: int = field(default=1, metadata={"help": "parallel requests to a server"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per server request"})
    keep_alive: str | float | None = field(default=None, metadata={"help": "Ollama keep_alive"})
    check_model: bool = field(default=False, metadata={"help": "check the model is pulled at start"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside the model folder"})
    device: str = field(default="cpu", metadata={"help": "torch device for local models"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget for local models"})
    options: dict = field(default_factory=dict, metadata={"help": "sampling options (temperature, seed, ...)"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            close = difflib.get_close_matches(str(self.backend), BACKENDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown LLM backend {self.backend!r}.{hint} Available: {', '.join(BACKENDS)}")
        if not self.model:
            raise ValueError(
                f"llm.model is empty; give a model name for backend {self.backend!r} "
                "(e.g. model: llama3.1:8b for ollama, model: smollm2 for transformers)"
            )
        if int(self.concurrency) < 1:
            raise ValueError(f"llm.concurrency must be >= 1, got {self.concurrency}")


BACKENDS = ("ollama", "transformers")


def _as_config(config: LLMConfig | dict | Any) -> LLMConfig:
    if isinstance(config, LLMConfig):
        return config
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(f"make_llm expects a dict or a dataclass, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(LLMConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, n=1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"unknown LLM config keys {', '.join(hints)}; known keys: {', '.join(sorted(known))}")
    return LLMConfig(**config)


def make_llm(config: LLMConfig | dict | Any) -> TextLLM:
    """Build the backend a config names, wrapped in a :class:`CachedLLM` when ``cache_dir`` is set."""
    cfg = _as_config(config)
    llm: TextLLM
    if cfg.backend == "ollama":
        llm = OllamaLLM(
            cfg.model,
            cfg.host,
            timeout=cfg.timeout,
            keep_alive=cfg.keep_alive,
            concurrency=cfg.concurrency,
            options=cfg.options,
            check_model=cfg.check_model,
        )
    else:
        model, gguf = cfg.model, cfg.gguf_file
        if model.lower() in ("smollm2", "smollm2-135m-instruct"):
            path = smollm2_gguf_path()
            model, gguf = str(path.parent), path.name
        llm = TransformersLLM(
            model, gguf, device=cfg.device, max_new_tokens=cfg.max_new_tokens, options=cfg.options
        )
    if cfg.cache_dir:
        llm = CachedLLM(llm, cfg.cache_dir)
    return llm
