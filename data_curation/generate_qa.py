"""Generate image and literature QA records from captions with a text LLM (resumable).

    python data_curation/generate_qa.py qa.yaml [key=value ...]

with a config such as::

    input: runs/data/rocov2/records.jsonl     # unified records: caption in `answer`
    output_dir: runs/qa/rocov2-gen
    sources: [rocov2, medpix]
    n_questions: {image: 4, literature: 2}
    concurrency: 4
    llm: {backend: ollama, model: llama3.1:8b, cache_dir: runs/llm-cache, timeout: 120}

Overrides such as ``llm.model=qwen2.5:7b limit=100`` change one key. Re-running resumes:
finished items are skipped and cached LLM responses are reused. See
``medvlm.data_curation.qa_generation`` for the config keys and the output files.
"""

from __future__ import annotations

import argparse
import json
import logging

from medvlm.data_curation.qa_generation import generate_qa, load_qagen_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (QAGenConfig fields)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (llm.model=...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    summary = generate_qa(load_qagen_config(args.config, args.overrides))
    keep = ("n_input_items", "n_finished", "n_failed", "n_records", "n_rejects", "by_kind", "complete")
    print(json.dumps({k: summary[k] for k in keep}, indent=2))


if __name__ == "__main__":
    main()
