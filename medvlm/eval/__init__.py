"""Evaluation: metrics, consistency over sampled runs, paraphrase robustness, predictions files."""

from medvlm.eval.scoring import score_predictions_file, score_records

__all__ = ["score_predictions_file", "score_records"]
