"""Stages of the pipeline: train, label, evaluate, run. They talk to the registry, never to ddkit_plugins."""
