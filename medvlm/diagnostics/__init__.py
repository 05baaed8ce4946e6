from medvlm.diagnostics.attention_quality import map_summary, paraphrase_divergence  # noqa: F401
from medvlm.diagnostics.geometry import layerwise_geometry, linearity_score  # noqa: F401

# Saliency API, imported on first use: it needs torch and transformers, which the numpy-only
# scores above do not. Functions named like their module (capture, gradcam, logit_lens, overlay)
# are reached through the module (``from medvlm.diagnostics.capture import capture``): a package
# attribute cannot be both the submodule and the function.
_LAZY = {
    "Cache": "capture", "prepare_example": "capture", "write_lens_html": "logit_lens",
    "logprob_increase": "logprob", "save_overlay": "overlay", "attention_rollout": "saliency",
    "image_to_response": "saliency", "raw_attention": "saliency", "randomization_test": "sanity",
}

def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"medvlm.diagnostics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medvlm.diagnostics' has no attribute {name!r}")


# Per-checkpoint probe, its callback, the run report and the adapter's model card (lazy: torch, hub).
_LAZY.update({"run_probe": "probe", "DiagnosticsCallback": "callback", "write_report": "report",
              "build_model_card": "model_card", "run_report": "model_card"})
