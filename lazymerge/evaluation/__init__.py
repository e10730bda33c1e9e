"""Reward-model evaluation: pairwise accuracy, best-of-N, lambda sweeps.

`scoring` (pure: file formats, accuracy, sections, GSM8K grading) knows nothing of models;
`rewards` loads a reward model with transformers (optionally 4-bit/8-bit with bitsandbytes) and
scores texts; `sweep` merges and evaluates per lambda. transformers is imported only here.
"""
