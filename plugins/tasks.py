"""Builtin tasks (see the training engine)."""
