"""CLI subcommands, one module each (see :mod:`ddkit.cli`)."""
