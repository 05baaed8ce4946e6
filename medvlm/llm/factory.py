"""Build a backend from a config: ``make_llm({"backend": "ollama", "model": "llama3.1:8b"})``.

YAML form (used by ``data_curation/generate_qa.py`` and the judge)::

    llm:
      backend: ollama          # or: openai (vLLM, SGLang, llama.cpp, LM Studio, TGI), transformers
      model: llama3.1:8b       # transformers: a local folder, a .gguf path, or "smollm2"
      host: http://127.0.0.1:11434   # openai: the API base, e.g. http://127.0.0.1:8000/v1
      cache_dir: runs/llm-cache
      concurrency: 4
      # openai only: api_key_env: VLLM_KEY (default OPENAI_API_KEY), max_retries: 4, backoff: 1.0
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from medvlm.llm.base import TextLLM
from medvlm.llm.cache import CachedLLM
from medvlm.llm.ollama_backend import OllamaLLM
from medvlm.llm.openai_backend import OpenAICompatLLM
from medvlm.llm.transformers_backend import TransformersLLM, smollm2_gguf_path


@dataclass
class LLMConfig:
    """Which text LLM to use.

    Server fields: ``host``, ``timeout``, ``concurrency``, ``check_model``; Ollama only:
    ``keep_alive``; OpenAI-compatible only: ``api_key_env``, ``max_retries``, ``backoff``. Local
    fields: ``gguf_file``, ``device``, ``max_new_tokens``. All: ``options`` (sampling, in Ollama's
    vocabulary) and ``cache_dir`` (responses cached on disk when set). A backend-only field set
    for another backend is an error, not silently ignored. There is no field for the API key
    itself, so a config (saved next to every output) never holds it.
    """

    backend: str = field(default="ollama", metadata={"help": "ollama | openai | transformers"})
    model: str = field(default="", metadata={"help": "model name / local path / 'smollm2'"})
    host: str | None = field(default=None, metadata={
        "help": "server: Ollama (default $OLLAMA_HOST) or an OpenAI-compatible API base (default $OPENAI_BASE_URL)"})
    cache_dir: str | None = field(default=None, metadata={"help": "folder of the response cache"})
    concurrency: int = field(default=1, metadata={"help": "parallel requests to a server"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per server request"})
    keep_alive: str | float | None = field(default=None, metadata={"help": "Ollama keep_alive"})
    check_model: bool = field(default=False, metadata={"help": "check the model is pulled at start"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside the model folder"})
    device: str = field(default="cpu", metadata={"help": "torch device for local models"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget for local models"})
    options: dict = field(default_factory=dict, metadata={"help": "sampling options (temperature, seed, ...)"})
    api_key_env: str | None = field(default=None, metadata={
        "help": "openai: environment variable holding the API key (default OPENAI_API_KEY)"})
    max_retries: int = field(default=4, metadata={"help": "openai: resends of a 408/429/5xx or dropped request"})
    backoff: float = field(default=1.0, metadata={"help": "openai: seconds before the first resend (doubles)"})

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
        for name, only in BACKEND_ONLY.items():
            if self.backend != only and getattr(self, name) != LLMConfig.__dataclass_fields__[name].default:
                raise ValueError(f"llm.{name} is read by backend {only!r} only; remove it for backend "
                                 f"{self.backend!r} (got {getattr(self, name)!r})")


BACKENDS = ("ollama", "openai", "transformers")
# fields that only one backend reads
BACKEND_ONLY = {"keep_alive": "ollama", "api_key_env": "openai", "max_retries": "openai", "backoff": "openai"}


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
    elif cfg.backend == "openai":
        llm = OpenAICompatLLM(
            cfg.model,
            cfg.host,
            api_key_env=cfg.api_key_env,
            timeout=cfg.timeout,
            concurrency=cfg.concurrency,
            options=cfg.options,
            check_model=cfg.check_model,
            max_retries=cfg.max_retries,
            backoff=cfg.backoff,
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
