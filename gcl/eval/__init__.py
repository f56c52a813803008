"""Evaluation: retrieval metrics, exact top-k retrieval, tasks and the evaluation runner."""
