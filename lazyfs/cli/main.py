"""The ``lazyfs`` command line. Flags follow skopeo and podman.

Every failure lazyfs expects becomes one line on stderr and a non-zero exit status: 2 for bad
usage, 1 for everything else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lazyfs import __version__
from lazyfs.errors import LazyfsError, UsageError

# Command -> the module that adds its parser (``add_parsers``). Only the module of the command
# being run is imported: ``lazyfs mount`` is a client whose start-up is its mount time.
COMMAND_MODULES = {
    "convert": "lazyfs.cli.convert",
    "mount": "lazyfs.cli.mount",
    "umount": "lazyfs.cli.mount",
    "stats": "lazyfs.cli.mount",
    "serve": "lazyfs.cli.serve",
    "cache": "lazyfs.cli.cache",
    "demo": "lazyfs.cli.demo",
    "bench": "lazyfs.cli.bench",
    "podman-config": "lazyfs.cli.podman",
    "profile": "lazyfs.cli.profile",
    "bundle": "lazyfs.cli.bundle",
    "pin": "lazyfs.cli.pin",
    "unpin": "lazyfs.cli.pin",
}
_GLOBAL_OPTIONS_WITH_VALUES = frozenset({"--log-level"})
# Clients of the service, whose start is their run time: at the default level they leave
# logging unconfigured (and unimported, ~9 ms); a rare warning then reaches stderr through
# logging's last-resort handler, message only.
CLIENT_COMMANDS = frozenset({"mount", "umount", "stats"})


# While the parser is built, argparse makes a help formatter at every add_argument (to check
# the metavar) and add_subparsers (to name the commands' prog), and each asks the terminal's
# width, importing shutil: ~3 ms of `lazyfs mount`'s start. No help is formatted then, so those
# formatters get a fixed width instead.
_building = False
_BUILD_WIDTH = 78


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lazyfs: error: {message}\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        if _building and self.formatter_class is argparse.HelpFormatter:
            return argparse.HelpFormatter(prog=self.prog, width=_BUILD_WIDTH)
        return super()._get_formatter()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of ``command`` (and the others it shares a
    module with)."""
    global _building
    _building = True
    try:
        return _build_parser(command)
    finally:
        _building = False


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="lazyfs", description="Mount OCI images lazily.")
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(wanted):
        importlib.import_module(name).add_parsers(commands)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``: the first word that is not a global option."""
    words = iter(argv)
    for word in words:
        if word in _GLOBAL_OPTIONS_WITH_VALUES:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


# Boolean flags written as podman and skopeo take them: bare means true, a value only with "="
# (``--tls-verify=false``), so a bare flag never swallows the argument that follows it.
BOOLEAN_FLAGS = frozenset({"--tls-verify", "--src-tls-verify", "--dest-tls-verify"})


def _with_boolean_values(argv: Sequence[str]) -> list[str]:
    words: list[str] = []
    for word in argv:
        if word == "--":
            words.extend(argv[len(words) :])
            break
        words.append(f"{word}=true" if word in BOOLEAN_FLAGS else word)
    return words


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=level.upper(), format="lazyfs: %(asctime)s %(levelname)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = _with_boolean_values(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_of(raw_argv)).parse_args(raw_argv)
    args.raw_argv = raw_argv
    if args.command not in CLIENT_COMMANDS or args.log_level != "warning":
        _configure_logging(args.log_level)
    code = _run(args)
    if argv is None and args.command in CLIENT_COMMANDS:
        _exit_at_once(code)
    return code


def _exit_at_once(code: int) -> NoReturn:
    """End a client command's process without the interpreter's teardown (about 8 ms of the
    ~60 a `lazyfs mount` takes): it holds no file, thread or handler that needs it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: the output is lost either way
        code = code or 1
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return 2
    except LazyfsError as exc:
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the system refused something lazyfs did not expect it to
        print(
            f"lazyfs: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("lazyfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
