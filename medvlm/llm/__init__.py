"""Text-LLM backends shared by QA generation, the judge and the blind filter (Ollama server,
OpenAI-compatible servers, local transformers)."""

from medvlm.llm.base import (
    LLMAuthError,
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
from medvlm.llm.openai_backend import OpenAICompatLLM
from medvlm.llm.transformers_backend import TransformersLLM, smollm2_gguf_path

__all__ = [
    "CachedLLM",
    "InvalidJSONAnswer",
    "JSONResult",
    "LLMAuthError",
    "LLMConfig",
    "LLMConnectionError",
    "LLMError",
    "LLMModelNotFoundError",
    "LLMResponseError",
    "LLMServerError",
    "LLMTimeoutError",
    "OllamaLLM",
    "OpenAICompatLLM",
    "ResponseCache",
    "TextLLM",
    "TransformersLLM",
    "cache_key",
    "generate_json",
    "make_llm",
    "parse_and_validate",
    "smollm2_gguf_path",
]
