"""ddkit's builtin strategies, installed as the top-level package ``ddkit_plugins``.

Each module is one plugin registered through the ``ddkit`` entry-point group in pyproject.toml, exactly as a
third-party package registers its own. They import only ddkit's public API (``ddkit``, ``ddkit.ops``,
``ddkit.types`` and the engine's documented helpers).
"""
