"""Diagnostics of a checkpoint: why it answers what it answers, and whether those maps can be trusted.

``capture`` (one hooked forward pass), ``methods/`` (the saliency methods, one file each, in a
registry), ``attention_quality`` (scores against a lesion mask), ``sanity`` (the randomisation
test), ``geometry`` (embedding geometry per layer), ``probe`` and ``callback`` (diagnostics at
every checkpoint, within a time budget), ``report`` and ``model_card``, ``explorer`` (the
interactive app's engine). Import what you need from its module, e.g.
``from medvlm.diagnostics.probe import run_probe``.
"""
