"""Generate image and literature QA records from captions with a text LLM (resumable).

    python data_curation/generate_qa.py qa.yaml [key=value ...]

with a config such as::

    input: runs/data/rocov2/records.jsonl     # unified records: caption in `answer`
    output_dir: runs/qa/rocov2-gen
    sources: [rocov2, medpix]
    n_questions: {image: 4, literature: 2}
    concurrency: 4
    llm: {backend: ollama, model: llama3.1:8b, timeout: 120}   # cache_dir: default <output_dir>/llm_cache

or, for an OpenAI-compatible server (vLLM, SGLang, llama.cpp, LM Studio, TGI, ollama's /v1; the
key from $OPENAI_API_KEY or the variable ``api_key_env`` names, never written anywhere)::

    llm: {backend: openai, model: Qwen/Qwen2.5-7B-Instruct, host: http://127.0.0.1:8000/v1, concurrency: 8}

Overrides such as ``llm.model=qwen2.5:7b limit=100`` change one key. Re-running resumes:
finished items are skipped and cached LLM responses are reused. See
``medvlm.data_curation.qa_generation`` for the config keys and the output files.

Exit status: 0 when every item finished (``manifest.json`` written), 3 when some items failed on
backend errors (listed in ``incomplete.json``; run the same command again to retry them), 2 on a
bad config or input, or when the server is down, lacks the model or refuses the API key (finished items
are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from medvlm.data_curation.qa_generation import generate_qa, load_qagen_config
from medvlm.llm import LLMError
from medvlm.records import RecordError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (QAGenConfig fields)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (llm.model=...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    try:
        summary = generate_qa(load_qagen_config(args.config, args.overrides))
    except (LLMError, RecordError, ValueError, FileNotFoundError) as err:
        print(f"generate_qa: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    keep = ("n_input_items", "n_finished", "n_failed", "n_records", "n_rejects", "by_kind", "complete")
    print(json.dumps({k: summary[k] for k in keep}, indent=2))
    if not summary["complete"]:
        print(f"generate_qa: {summary['n_failed']} items failed on backend errors (see incomplete.json); "
              "run the same command again to retry them", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
