"""The embedded default: tiny models of each family pre-trained on phantom data (``demo:<family>``).

``python -m medvlm.demo llava`` (or any registered family) builds the family's demo base under
``$MEDVLM_HOME/base/`` and records it as the one ``demo:<family>`` names; the scripts build it on
first use (:func:`ensure_demo_model`). See :mod:`medvlm.demo.base`.
"""

from medvlm.demo.base import TinyConfig, base_model_dir, ensure_base_model, ensure_demo_model, phantom_corpus

__all__ = ["TinyConfig", "base_model_dir", "ensure_base_model", "ensure_demo_model", "phantom_corpus"]
