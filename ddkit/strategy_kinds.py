"""The kinds of strategy a plugin can register, in the order ``ddkit plugins`` lists them. Torch-free, so that the
CLI's parser can name them without importing torch (``ddkit --help`` stays instant)."""
KINDS: tuple[str, ...] = ("transforms", "aggregators", "selectors", "losses", "tasks", "datasets", "models")
