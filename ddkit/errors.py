"""Errors a user can act on. The CLI prints them as one line, without a traceback."""
import signal


class DDKitError(Exception):
    """Base class of every error caused by user input (config, data, plugin set-up)."""


class ConfigError(DDKitError, ValueError):
    """A recipe or a strategy block is malformed: the message names the file, the field and the fix."""


class UnknownStrategyError(ConfigError, KeyError):
    """A strategy name is not registered for its kind."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(DDKitError):
    """An installed plugin is broken (fails to import, its hook raises, yields wrong specs): the message names the
    plugin, its distribution and how to disable it."""


class PluginContractError(PluginError, TypeError):
    """A strategy returned something its kind's contract refuses (a wrong shape, dtype, range or a non-finite
    value): the message names the strategy and what was wrong. A ``TypeError`` as well, as it was before."""


class PluginClashError(PluginError):
    """Two plugins register the same name for one kind."""


class DataError(DDKitError, ValueError):
    """A dataset or annotation file is malformed: the message names the file, the record and the field."""


class DegenerateResultError(DataError):
    """A stage finished with an outcome that must not be reported as a success (e.g. 0 pseudo-labels): the run
    stops, and its results say why."""


DEBUG_ENV = "DDKIT_DEBUG"  # set (to anything) to get a stage's original exception and its traceback


class StageError(DDKitError):
    """A stage's code (often a plugin's strategy) raised an exception that is not a :class:`DDKitError`: one line
    naming the stage, the exception and where it was raised; the original is its ``__cause__``, and with
    ``DDKIT_DEBUG=1`` it propagates as it is, with its traceback. The CLI exits 1 (not 2: it may be a bug)."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (``signum``: SIGINT as Ctrl-C, or SIGTERM from Slurm, Kubernetes, ``docker stop``) stopped the
    command; a KeyboardInterrupt, so that whatever handles Ctrl-C handles it. The CLI exits ``128 + signum``."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    """``Ctrl-C`` for SIGINT, else the signal's name (``SIGTERM``)."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
