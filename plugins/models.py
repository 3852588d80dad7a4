"""Builtin models (see the training engine)."""
