"""Scoring a model on lm-eval tasks over local data: task resolution and the evaluator."""
