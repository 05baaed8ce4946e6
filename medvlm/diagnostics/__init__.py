from medvlm.diagnostics.attention_quality import map_summary, paraphrase_divergence  # noqa: F401
from medvlm.diagnostics.geometry import layerwise_geometry, linearity_score  # noqa: F401
