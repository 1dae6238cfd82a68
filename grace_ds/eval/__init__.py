"""Scoring of checkpoints on shard sets (`python -m grace_ds.eval`).

scoring.py   option / answer-letter parsing, exact match, aggregation (pure, unit-tested)
samples.py   shard samples -> evaluation items (messages, options, reference, question type)
predict.py   greedy generation + option log-likelihood with the model's chat template
checkpoint.py  16-bit HF, fake-quant (codes*scales) and packed INT4 loading
evaluate.py  evaluate_model / evaluate_checkpoint
"""

from grace_ds.eval.evaluate import evaluate_checkpoint, evaluate_model  # noqa: F401
from grace_ds.eval.scoring import (  # noqa: F401
    aggregate,
    exact_match,
    normalize_answer,
    parse_answer_letter,
    parse_options,
)
