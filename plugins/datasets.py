"""Builtin datasets (see the training engine)."""
