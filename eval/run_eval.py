"""Evaluate: score a predictions file, or run a model on a dataset, into ``metrics.json`` (+ manifest).

    python eval/run_eval.py --predictions runs/stage2/predictions.jsonl --output runs/stage2/eval
    python eval/run_eval.py --predictions runs/eval/predictions.jsonl \
        --paraphrase-predictions runs/eval/predictions_paraphrase.jsonl --output runs/eval/rescored
    python eval/run_eval.py --predictions answers.jsonl --questions test.json \\
        --suite eval/suites/llava_med_vqa.yaml --output runs/eval-llava-med
    python eval/run_eval.py --model demo:llava --adapter runs/demo/stage2/adapter --dataset phantom \\
        --max-samples 200 --consistency --robustness --output runs/demo/eval
    python eval/run_eval.py --predictions runs/stage2/predictions.jsonl --judge-backend transformers \\
        --judge-model smollm2 --output runs/stage2/judged
    python eval/run_eval.py --model google/paligemma-3b-mix-448 --dataset data/slake --split test \\
        --judge-backend ollama --judge-model llama3.1:8b --output runs/eval-slake
    accelerate launch --config_file recipes/accelerate/multi_gpu_ddp.yaml eval/run_eval.py \\
        --model demo:llava --consistency --output runs/eval-8gpu

Model mode runs under ``accelerate launch`` with N processes: each answers a contiguous shard of
the questions and the main process gathers them in order, scores and writes; greedy and sampled
answers (seeded per question) are those of one process.

Model mode writes ``predictions.jsonl`` (raw answers) before scoring and judging; see
``medvlm.eval.evaluate`` for every file it writes. With --robustness it also writes the answers to
reworded questions, ``predictions_paraphrase.jsonl``: predictions mode scores that file too (the
``robustness`` section: flip rate, per-variant accuracy), read from --paraphrase-predictions or, by
default, from beside the --predictions file.

With a judge on a server (``ollama``, or ``openai``: any OpenAI-compatible server such as vLLM,
SGLang, llama.cpp, LM Studio, TGI; the key from $OPENAI_API_KEY or --judge-api-key-env), the
server is asked first whether it is up and has the model: if not, the run stops with exit status 2
and one line (start the server / ``ollama pull`` / a model name the server lists), in model mode
before the model loads, in predictions mode after the scores are written (kept in
``metrics.json``). Items the server fails on (HTTP errors, malformed replies, timeouts) are
counted invalid; a server that goes away midway also ends in exit status 2, with the items judged
so far kept (and cached: run the same command again to judge the rest).

The predictions formats (ours, LLaVA-Med's answer files) and every metric are described in
``medvlm.eval.predictions`` and ``medvlm.eval.metrics``. This script only parses arguments and
calls ``medvlm.eval``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medvlm.demo import ensure_demo_model
from medvlm.eval.distributed import world
from medvlm.eval.judge import check_judge_server, judge_llm_config
from medvlm.eval.metrics import UnknownMetricError
from medvlm.eval.predictions import (
    PARAPHRASE_FILE,
    PredictionsError,
    load_paraphrase_predictions,
)
from medvlm.eval.scoring import format_summary, score_predictions_file, scoring_kwargs
from medvlm.llm import LLMError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    what = parser.add_argument_group("what to evaluate (one mode)")
    mode = what.add_mutually_exclusive_group(required=True)
    mode.add_argument("--predictions", metavar="FILE",
                      help="predictions JSONL to score (ours: id/answer/prediction/..., or a LLaVA-Med answer file)")
    mode.add_argument("--model", metavar="ID|DIR",
                      help="model to run: hub id, local folder, or demo:paligemma / demo:llava")
    add_model_arguments(parser)
    add_judge_arguments(parser)

    preds = parser.add_argument_group("predictions mode")
    preds.add_argument("--questions", metavar="FILE",
                       help="LLaVA-Med question file (JSON list or JSONL) holding the reference answers")
    preds.add_argument("--paraphrase-predictions", metavar="FILE|none",
                       help="answers to reworded questions (model mode's --robustness output) to score for "
                            f"robustness; default: {PARAPHRASE_FILE} beside --predictions when it exists; "
                            "'none' to skip it")

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--suite", metavar="YAML",
                         help="suite file choosing metrics, slices and bootstrap (eval/suites/*.yaml)")
    scoring.add_argument("--bootstrap", type=int, default=None, metavar="N",
                         help="bootstrap resamples for 95%% intervals (default 1000; 0 disables intervals)")
    scoring.add_argument("--seed", type=int, default=None, help="seed of the bootstrap draws (default 0)")
    scoring.add_argument("--slice-by", nargs="+", default=None, metavar="FIELD",
                         help="record fields to slice by (default: modality answer_type body_part source)")

    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR",
                     help="folder for metrics.json and manifest.json (created if missing)")
    out.add_argument("--quiet", action="store_true", help="do not print the summary table")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model mode's options, grouped by purpose."""
    model = parser.add_argument_group("model mode: model and data")
    model.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder (a run's adapter/) applied to --model")
    model.add_argument("--dataset", default="phantom",
                       help="phantom (embedded), a saved dataset folder, or a mix YAML (default phantom)")
    model.add_argument("--split", default="test", help="split to evaluate (default test)")
    model.add_argument("--max-samples", type=int, metavar="N", help="evaluate only the first N questions")
    model.add_argument("--question-types", nargs="+", metavar="TYPE", help="phantom question types (default all)")
    model.add_argument("--phantom-patients", type=int, default=4000, help="phantom size (default 4000)")
    model.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on a CPU) | float32 | bfloat16 | float16")

    gen = parser.add_argument_group("model mode: generation")
    gen.add_argument("--batch-size", default="auto", metavar="N|auto",
                     help="questions per generate call, or auto: as many as fit the memory budget (default auto); "
                          "either way halved when generate runs out of memory; metrics.json says which was used")
    gen.add_argument("--memory-budget", type=float, metavar="GiB",
                     help="auto batch: memory one process may use for generation (default: half of its free GPU "
                          "memory, or of the machine's available memory divided among this node's processes)")
    gen.add_argument("--max-new-tokens", type=int, default=16, help="answer length budget (default 16)")

    checks = parser.add_argument_group("model mode: consistency and robustness")
    checks.add_argument("--consistency", action="store_true",
                        help="also sample --samples answers per question (one generate per batch) and score "
                             "their consistency")
    checks.add_argument("--samples", type=int, default=5, help="sampled answers per question (default 5)")
    checks.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    checks.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    checks.add_argument("--sample-seed", type=int, default=0, help="seed of the sampled answers (default 0)")
    checks.add_argument("--robustness", action="store_true",
                        help="answer reworded versions of each question (paraphrase groups): flip rate, latency")



def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The LLM judge's options (both modes): off unless --judge-backend and --judge-model are given."""
    judge = parser.add_argument_group("LLM judge of open answers (both modes)")
    judge.add_argument("--judge-backend", choices=["ollama", "openai", "transformers"],
                       help="judge backend (off by default); openai: any OpenAI-compatible server")
    judge.add_argument("--judge-model", metavar="NAME",
                       help="judge model: an Ollama name (llama3.1:8b), a name the OpenAI-compatible server "
                            "lists at /v1/models, a local folder, or smollm2 (offline)")
    judge.add_argument("--judge-host", metavar="URL",
                       help="judge server: Ollama (default $OLLAMA_HOST or localhost:11434) or an OpenAI-compatible "
                            "API base (default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)")
    judge.add_argument("--judge-api-key-env", metavar="VAR",
                       help="openai: environment variable holding the API key (default OPENAI_API_KEY; "
                            "the key itself is never written anywhere)")
    judge.add_argument("--judge-cache", metavar="DIR", help="judge response cache (default OUTPUT/judge_cache)")
    judge.add_argument("--judge-concurrency", type=int, default=1, help="parallel judge requests (default 1)")
    judge.add_argument("--judge-timeout", type=float, metavar="S",
                       help="seconds per judge server request before the item is retried, then invalid (default 120)")
    judge.add_argument("--judge-template", default="correctness", metavar="NAME|FILE",
                       help="template in medvlm/templates/judge/ or a file path (default correctness)")


def model_config(args: argparse.Namespace):
    """The ``ModelEvalConfig`` the parsed arguments describe."""
    from medvlm.eval.evaluate import ModelEvalConfig

    return ModelEvalConfig(
        model=args.model, output=args.output, adapter=args.adapter, dtype=args.dtype, dataset=args.dataset,
        split=args.split, question_types=args.question_types, phantom_patients=args.phantom_patients,
        max_samples=args.max_samples, batch_size=args.batch_size, memory_budget=args.memory_budget,
        max_new_tokens=args.max_new_tokens,
        consistency=args.consistency, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
        seed=args.sample_seed, robustness=args.robustness, judge_backend=args.judge_backend,
        judge_model=args.judge_model, judge_host=args.judge_host, judge_cache=args.judge_cache,
        judge_concurrency=args.judge_concurrency, judge_template=args.judge_template,
        judge_timeout=args.judge_timeout, judge_api_key_env=args.judge_api_key_env,
    )


def print_judge(metrics: dict) -> None:
    """One line about the judge section, when there is one."""
    judge = metrics.get("judge")
    if judge:
        print(f"judge: mean score {judge.get('mean_score')}, yes rate {judge.get('yes_rate')}, "
              f"{judge.get('n_invalid')} of {judge.get('n')} items invalid {judge.get('invalid_reasons') or ''}"
              + (f"; error: {judge['error']}" if judge.get("error") else ""))


def judge_unavailable(err: LLMError, kept: str) -> int:
    """The judge server is down or lacks the model: one line (how to fix it, what was kept), status 2."""
    print(f"run_eval.py: error: the judge cannot run: {type(err).__name__}: {err}; {kept}", file=sys.stderr)
    return 2


def judge_lost_server(metrics: dict, output: str) -> int:
    """0, or 2 with one line when the judge's server went away midway (items left unjudged)."""
    judge = metrics.get("judge") or {}
    lost = (judge.get("invalid_reasons") or {}).get("LLMConnectionError", 0)
    if not lost:
        return 0
    start = "start it with `ollama serve`" if judge.get("backend") == "ollama" else "start it again"
    print(f"run_eval.py: error: the judge lost its server ({judge.get('host') or judge.get('backend')}) midway: "
          f"{lost} of {judge.get('n')} items not judged; {start} and run the same command "
          f"again (finished judgements are cached; the scores are in {output}/metrics.json)", file=sys.stderr)
    return 2


def run_model_mode(args: argparse.Namespace, scoring: dict) -> int:
    """Model mode: one clear error line and exit status 2 on a bad model, adapter or dataset, or a
    judge server that is down (checked before the model loads)."""
    from medvlm.eval.evaluate import ModelEvalError, evaluate_model

    try:
        config = model_config(args)
        if config.judge_backend:
            try:
                check_judge_server(config.judge_llm_config())
            except LLMError as e:
                return judge_unavailable(e, "nothing was evaluated or written")
        if world()[1] == 1:  # demo:<family>: built on first use (under several processes: build it first)
            ensure_demo_model(config.model)
        metrics = evaluate_model(config, scoring=scoring)
    except (ModelEvalError, FileNotFoundError, ValueError) as e:
        print(f"run_eval.py: error: {e}", file=sys.stderr)
        return 2
    except LLMError as e:  # the server went away after the first check, while the model answered
        return judge_unavailable(e, f"the predictions and the scores without the judge are in {args.output}/ "
                                    "(predictions.jsonl, metrics.json)")
    if not metrics:  # another process than the main one of `accelerate launch`: it only generated its shard
        return 0
    if not args.quiet:
        print(format_summary(metrics))
        print_judge(metrics)
        print(f"wrote {args.output}/predictions.jsonl and metrics.json")
    return judge_lost_server(metrics, args.output)


def paraphrase_file(args: argparse.Namespace) -> str | None:
    """The paraphrase predictions to score: --paraphrase-predictions, else the file model mode
    writes beside --predictions when it exists (logged), else none."""
    given = args.paraphrase_predictions
    if given is not None and given.lower() == "none":
        return None
    if given is not None:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--paraphrase-predictions {given} does not exist; pass the "
                                    f"{PARAPHRASE_FILE} model mode wrote with --robustness, or 'none'")
        return given
    beside = Path(args.predictions).with_name(PARAPHRASE_FILE)
    if beside.is_file() and beside.resolve() != Path(args.predictions).resolve():
        logging.getLogger("run_eval").info("scoring robustness from %s (found beside --predictions; "
                                           "--paraphrase-predictions none skips it)", beside)
        return str(beside)
    return None


def run_predictions_mode(args: argparse.Namespace, scoring: dict, judge: dict | None) -> dict:
    """Predictions mode: the scores, the robustness of the paraphrase predictions (if any) and the
    judge's section, each in metrics.json as soon as it exists (see ``score_predictions_file``)."""
    para = paraphrase_file(args)
    para_rows = load_paraphrase_predictions(para) if para else None  # a bad file fails before any work
    inputs = {"predictions": args.predictions, "questions": args.questions, "suite": args.suite}
    if para:
        inputs["paraphrase_predictions"] = para
    return score_predictions_file(args.predictions, args.output, questions=args.questions, inputs=inputs,
                                  paraphrase_rows=para_rows, judge=judge, judge_template=args.judge_template,
                                  judge_concurrency=args.judge_concurrency, **scoring)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # Score (and judge)
    try:
        kwargs = scoring_kwargs(args.suite, bootstrap=args.bootstrap, seed=args.seed, slice_by=args.slice_by)
        if args.model is not None:
            if args.paraphrase_predictions is not None:
                raise ValueError("--paraphrase-predictions belongs to predictions mode; in model mode "
                                 "--robustness answers the reworded questions itself")
            return run_model_mode(args, kwargs)
        judge = None
        if args.judge_backend or args.judge_model:
            if not (args.judge_backend and args.judge_model):
                raise ValueError("the judge needs both --judge-backend and --judge-model "
                                 "(e.g. --judge-backend ollama --judge-model llama3.1:8b)")
            judge = judge_llm_config(args.judge_backend, args.judge_model, args.output, host=args.judge_host,
                                     cache=args.judge_cache, concurrency=args.judge_concurrency,
                                     timeout=args.judge_timeout, api_key_env=args.judge_api_key_env)
        metrics = run_predictions_mode(args, kwargs, judge)
    except LLMError as e:  # raised only once the scores are on disk
        return judge_unavailable(e, f"the scores without the judge are in {args.output}/metrics.json")
    except (PredictionsError, UnknownMetricError, FileNotFoundError, ValueError) as e:
        parser.error(str(e))

    # Report
    if not args.quiet:
        print(format_summary(metrics))
        print_judge(metrics)
        print(f"wrote {args.output}/metrics.json" + (" and judge.jsonl" if "judge" in metrics else ""))
    return judge_lost_server(metrics, args.output)


if __name__ == "__main__":
    sys.exit(main())
