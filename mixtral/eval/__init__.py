"""Evaluation with EleutherAI's lm-evaluation-harness: `lm.py` (our lm-eval model class; imports lm-eval, an optional
extra) and `cli.py` (`mixtral eval`, light at import time)."""
