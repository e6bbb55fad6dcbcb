"""RULER-style long-context evaluation: task generators, runner, plots."""
from .tasks import TASKS, Sample, TokenCounter, make_sample, score

__all__ = ["TASKS", "Sample", "TokenCounter", "make_sample", "score"]
