"""Question a checkpoint and see why it answered: a local web app (Gradio).

    python diagnostics/explore.py                                  # the embedded demo model, offline
    python diagnostics/explore.py --run runs/demo-llava-<stamp>    # its stage 1 and stage 2, side by side
    python diagnostics/explore.py --model google/paligemma-3b-mix-448 --adapter A --adapter B

With no --model and no --run, the newest demo run under ./runs is served (stage 1 as A, stage 2
as B) when there is one, else the embedded demo base model (built and cached on first use). The
app listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medvlm.demo import ensure_demo_model
from medvlm.diagnostics.explorer import ExplorerError, load_explorer_model
from medvlm.diagnostics.explorer_app import Server, build_app, launch
from medvlm.diagnostics.explorer_samples import samples
from medvlm.diagnostics.model_card import adapter_base

logger = logging.getLogger("explore")


def run_sources(run: Path) -> tuple[str, list[str]]:
    """(base model, [stage1, stage2 adapter folders]) of a medvlm run folder."""
    stages = [run / s for s in ("stage1", "stage2") if (run / s / "adapter" / "adapter_config.json").is_file()]
    if not stages:
        raise ExplorerError(f"{run} holds no stage1/adapter or stage2/adapter; pass a medvlm run folder")
    return adapter_base(stages[-1], prefer_local=True), [str(s / "adapter") for s in stages]


def default_sources(runs_dir: Path = Path("runs")) -> tuple[str, list[str]]:
    """The newest finished demo run's stages, else the embedded demo base model."""
    runs = sorted((p for p in runs_dir.glob("demo-*") if (p / "stage2" / "manifest.json").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if runs:
        logger.info("serving the newest demo run %s (stage 1 as A, stage 2 as B)", runs[-1])
        return run_sources(runs[-1])
    logger.info("no demo run under %s: serving the embedded demo base model", runs_dir)
    return "demo:llava", []


def load_demo_or_model(model: str, adapters: list[str], dtype: str):
    """:func:`load_explorer_model`, building a ``demo:<family>`` base first when it is not built yet."""
    if model and model.startswith("demo:"):
        try:
            ensure_demo_model(model)
        except ValueError as err:  # an unknown family
            raise ExplorerError(str(err)) from err
    return load_explorer_model(model, adapters, dtype=dtype)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hub id, model folder or demo:<family> (demo:llava, demo:paligemma, ...)")
    p.add_argument("--adapter", action="append", default=[], help="LoRA adapter folder (give twice to compare)")
    p.add_argument("--run", type=Path, help="a medvlm run folder: its base model and stage adapters")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--budget", type=float, default=30.0, metavar="SECONDS",
                   help="seconds the saliency methods may take per answer (default 30); the costlier maps are "
                        "skipped, listed in the page, and computed on request; 0 for no limit")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU (the model is put there), float32 on a CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.run:
            model, adapters = run_sources(args.run)
            model = args.model or model
        elif args.model:
            model, adapters = args.model, args.adapter
        elif args.adapter:
            raise ExplorerError("--adapter needs --model (the base model the adapter was trained on), "
                                "or pass a run folder with --run")
        else:
            model, adapters = default_sources()
        adapters = adapters + (args.adapter if args.run else [])
        em = load_demo_or_model(model, adapters, args.dtype)
    except (ExplorerError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    server = Server(em, lambda name, ads: load_demo_or_model(name, ads, args.dtype), samples(),
                    budget_s=args.budget or None)
    local = args.host in ("127.0.0.1", "localhost", "::1")
    if not local:
        logger.warning("serving on %s: the Model panel (load any model or adapter path) is switched off", args.host)
    launch(build_app(server, allow_model_loading=local), args.host, args.port, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
