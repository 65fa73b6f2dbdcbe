"""Evaluation of checkpoints: zero-shot classification (zeroshot.py) on sets read by datasets.py."""
from clipscale.evaluate.zeroshot import zeroshot_eval

__all__ = ["zeroshot_eval"]
