"""The ``ddkit`` command. Each subcommand is one module in :mod:`ddkit.commands` that defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and optionally ``ON_INTERRUPT`` (what to
do after Ctrl-C or SIGTERM, when re-running does more than start again: a line, or a function of the parsed
arguments that gives it, as the advice depends on the options given); modules are discovered, not listed. A
command module imports the engine inside ``run``, not at its top: ``ddkit --help`` builds every command's parser
and stays instant only while that imports no torch (tests/test_config_cli.py checks).
``args.command_line`` is the command as typed (``ddkit train R ...``), for the run folder's lock to name."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import pkgutil
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import ddkit.commands
from ddkit.errors import ConfigError, DDKitError, Interrupted, PluginError, StageError


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="ddkit", description="Data and knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"ddkit {ddkit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {}
    for info in sorted(pkgutil.iter_modules(ddkit.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"ddkit.commands.{info.name}")
        name = info.name.replace("_", "-")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, command=name, _on_interrupt=getattr(module, "ON_INTERRUPT", None))
        commands[name] = cmd
    return parser, commands


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options may stand anywhere among a command's positionals (``ddkit train R a=1 --no-progress b=2``,
    ``ddkit config show R --defaults a=1``): argparse's intermixed parsing of the command, or of its sub-action."""
    parser, commands = _build()
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = commands.get(argv[0]) if argv else None
    if cmd is None:
        return parser.parse_args(argv)
    namespace, rest = argparse.Namespace(**cmd._defaults, command_line=shlex.join(["ddkit", *argv])), argv[1:]
    while cmd._subparsers is not None:  # walk down to the sub-action (config -> show)
        actions = next(a for a in cmd._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
        if not rest or rest[0] not in actions.choices:
            return parser.parse_args(argv)  # argparse's own message (a missing or unknown action)
        setattr(namespace, actions.dest, rest[0])
        cmd, rest = actions.choices[rest[0]], rest[1:]
    return cmd.parse_intermixed_args(rest, namespace=namespace)


def disk_full_message(err: OSError) -> str:
    """One line for a full disk: the file being written, its folder and what is free there. Atomic writes leave
    nothing half-written behind, so re-running after freeing space resumes."""
    path = Path(err.filename or ".")
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    free = shutil.disk_usage(folder).free
    return (f"no space left on the device writing {path} ({free / 2**20:.0f} MiB free in {folder}); free some "
            f"space and re-run the same command to resume")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (Slurm, Kubernetes, ``docker stop``) stops a command as Ctrl-C does rather than killing it on the
    spot: :class:`~ddkit.errors.Interrupted` is raised (atomic writes drop their temporary file, the training loop
    defers it to the end of the step and checkpoints) and the CLI says how to resume. The old handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_torchrun_worker(code)
    return code


def _exit_torchrun_worker(code: int) -> None:
    """A torchrun worker whose work is done and whose process group is gone leaves without the interpreter's
    teardown: gloo's threads can abort it there ("terminate called without an active exception", exit -6) after
    a complete run, and torchrun then reports the whole job failed (seen twice in the test suite's DDP runs)."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    if not hasattr(args, "_run"):
        build_parser().print_help()
        return 0
    from ddkit.engine.data import NO_PROGRESS_ENV

    if getattr(args, "no_progress", False):  # for the bars built deep below the command (checking images)
        os.environ[NO_PROGRESS_ENV] = "1"
    try:
        with sigterm_as_interrupt():
            return int(args._run(args) or 0)
    except DDKitError as err:
        _say_error(args.command, err)
        return 1 if isinstance(err, StageError) else 2
    except BrokenPipeError:  # `ddkit plugins | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"ddkit {args.command}: error: {disk_full_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Interrupted): exit 128 + the signal, as a shell says
        signum = getattr(err, "signum", signal.SIGINT)
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        hint = getattr(args, "_on_interrupt", None)
        hint = hint(args) if callable(hint) else hint
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops alike: rank 0 says it once
            print(f"ddkit {args.command}: interrupted{by}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 128 + signum
    finally:
        os.environ.pop(NO_PROGRESS_ENV, None)


def _say_error(command: str, err: DDKitError) -> None:
    """The one-line error. Under torchrun a recipe's or a plugin's error is every rank's alike: rank 0 says it once;
    another rank says its own failure (a stage's) with its rank."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"ddkit {command}: error: {err}", file=sys.stderr)
    elif not isinstance(err, (ConfigError, PluginError)):
        print(f"ddkit {command} [rank {rank}]: error: {err}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
