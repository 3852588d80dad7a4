"""What a training loss term sees: defined in :mod:`ddkit.engine.task` (the module plugins may import) and
re-exported here."""
from ddkit.engine.task import FeatureHook, LossContext, LossTerm, SetupContext, get_submodule

__all__ = ["FeatureHook", "LossContext", "LossTerm", "SetupContext", "get_submodule"]
