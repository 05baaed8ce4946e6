"""Text-LLM backends shared by QA generation and the judge (Ollama server, local transformers)."""

from medvlm.llm.base import (
    LLMConnectionError,
    LLMError,
    LLMModelNotFoundError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    TextLLM,
)
from medvlm.llm.cache import CachedLLM, ResponseCache, cache_key
from medvlm.llm.factory import LLMConfig, make_llm
from medvlm.llm.jsonout import InvalidJSONAnswer, JSONResult, generate_json, parse_and_validate
from medvlm.llm.ollama_backend import OllamaLLM
from medvlm.llm.transformers_backend import TransformersLLM, smollm2_gguf_path

__all__ = [
    "CachedLLM",
    "InvalidJSONAnswer",
    "JSONResult",
    "LLMConfig",
    "LLMConnectionError",
    "LLMError",
    "LLMModelNotFoundError",
    "LLMResponseError",
    "LLMServerError",
    "LLMTimeoutError",
    "OllamaLLM",
    "ResponseCache",
    "TextLLM",
    "TransformersLLM",
    "cache_key",
    "generate_json",
    "make_llm",
    "parse_and_validate",
    "smollm2_gguf_path",
]
