"""medvlm: fine-tune, evaluate and diagnose medical vision-language models.

The flow (see the README): data_curation → training (stage 1 → stage 2) → eval → diagnostics.
"""

__version__ = "0.1.0"
