"""The ``transferkit`` group: console set-up, logging to stderr, and library errors mapped to exit codes.

Exit codes: 0 success, 1 runtime error or a failed ``--min-accuracy`` gate, 2 usage error (bad
option, path or input), 130 interrupted. Commands register on :func:`main` in their modules.
"""

from __future__ import annotations

import codecs
import functools
import logging
import sys

import click

from transferkit import __version__, runtime
from transferkit.errors import ArgumentError, TransferkitError

log = logging.getLogger("transferkit")


class _ClickHandler(logging.Handler):
    """Library log records to stderr; warnings in yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.WARNING:
            message = click.style(message, fg="yellow")
        click.echo(message, err=True)


def _console_escape(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler for the console: what cannot be printed is shown as an escape, never an error.

    A file name's bytes that are not UTF-8 (surrogates) show as ``\\xNN`` (as files.display_name), any
    other character the terminal's encoding lacks as ``\\uNNNN``.
    """
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    shown = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}"
                    if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in exc.object[exc.start:exc.end])
    return shown, exc.end


codecs.register_error("transferkit.console", _console_escape)


def _console_never_fails() -> None:
    """Printing a file name (or anything) must not crash a command: the streams escape what they cannot encode."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="transferkit.console")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (a test's stream): leave it
            pass


def _option_name(ctx: click.Context, argument: str) -> str:
    """The command's option for a library argument (``num_seeds`` -> ``--seeds``; else ``--num-seeds``)."""
    for param in ctx.command.params:
        if param.name == argument and isinstance(param, click.Option):
            return max(param.opts, key=len)
    return "--" + argument.replace("_", "-")


def handle_errors(func):
    """Turn library errors into a one-line message and an exit code (traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except TransferkitError as exc:
            if debug:
                raise
            message = exc.for_option(_option_name(ctx, exc.argument)) if isinstance(exc, ArgumentError) else str(exc)
            click.echo(click.style("Error: ", fg="red", bold=True) + message, err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # disk full, permissions, a folder removed mid-run
            if debug:
                raise
            where = f" '{exc.filename}'" if exc.filename else ""
            click.echo(click.style("Error: ", fg="red", bold=True) + f"cannot access{where}: "
                       f"{exc.strerror or exc}. Check the path, free space and permissions.", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            message = "Interrupted. Finished features are kept in the cache; run again to resume."
            run_dir = ctx.params.get("output_dir") or ctx.params.get("resume_dir")
            if ctx.info_name == "train" and run_dir:
                message += f" Continue the training with: transferkit train --resume {run_dir}"
            click.echo(message, err=True)
            ctx.exit(130)

    return wrapper


# auto_envvar_prefix: every option also reads TRANSFERKIT_<COMMAND>_<OPTION> (TRANSFERKIT_TRAIN_EPOCHS=5,
# TRANSFERKIT_FEATURES_EXPORT_SEED=1): a recipe (--config) < the environment < the flags, in merge_config.
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                               "auto_envvar_prefix": "TRANSFERKIT"})
@click.version_option(__version__, "--version", prog_name="transferkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def main(debug: bool) -> None:
    """Transfer learning for Keras 3: train, evaluate and use image classifiers built on
    ImageNet-pretrained backbones, from a folder with one sub-folder per class.

    \b
    Start here:   transferkit demo
    Your data:    transferkit train PHOTOS_DIR -o runs/first
    """
    _console_never_fails()
    logging.basicConfig(level=logging.WARNING)
    log.handlers[:] = [_ClickHandler()]
    log.setLevel(logging.INFO)
    log.propagate = False
    runtime.show_startup_logs = debug
