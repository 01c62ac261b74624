"""What every entry point shares: a user mistake is one line on stderr and exit status 2.

    if __name__ == "__main__":
        cli.run(main)

:func:`run` is ``absl.app.run`` where

- a flag that does not parse (an unknown flag, a bad value, a value outside an enum such as an
  unknown ``--preset``, a config file that does not load, a mistyped config override, for
  which ml_collections' "Did you mean" suggestion is kept) prints ``<script>: error: ...``
  on one line and exits with status 2 (absl's usage-error status), without the usage text;
- ``main`` raising a user error (:data:`USER_ERRORS`: a bad path, an unreadable or truncated
  file, an out-of-range value, a locked or foreign work directory, ``app.UsageError``) does
  the same;
- a run that stops on purpose (``TrainingError``: a non-finite loss) prints one line and
  exits with status 1;
- anything else is a bug and keeps its traceback.

``JAXAPR_TRACEBACK=1`` in the environment shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

# Exceptions that mean "the input was wrong", raised by jaxapr's checks (one-line messages).
USER_ERRORS = (ValueError, KeyError, OSError, app.UsageError)


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line: an embedded traceback reduced to its last line (the error)."""
    if "Traceback (most recent call last)" in text:
        head, tail = text.split("Traceback (most recent call last)", 1)
        lines = [line for line in tail.splitlines() if line.strip()]
        text = head + " " + (lines[-1] if lines else "")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _config_field_error(exc: BaseException, argv: list[str]) -> str:
    """An ml_collections lookup error raised while applying ``--config.a.b=...``: the flag,
    the missing field and the library's suggestion."""
    text = str(exc.args[0]) if exc.args else str(exc)
    text = text.replace("\\n", " ").replace("\\'", "'").replace('\\"', '"').strip("'\" ")
    key = re.match(r"'?([^'\s]+)'?", text)
    name = key.group(1) if key else ""
    flag = next(
        (
            a.split("=", 1)[0]
            for a in argv[1:]
            if a.startswith("--") and "." in a.split("=", 1)[0] and a.split("=", 1)[0].rsplit(".", 1)[-1] == name
        ),
        None,
    )
    where = f"{flag}: " if flag else ""
    return one_line(f"{where}no config field {name!r}. {text[len(key.group(0)) :].strip() if key else text}")


def _flag_error(exc: BaseException, argv: list[str]) -> None:
    if isinstance(exc, flags.Error):
        _exit(one_line(str(exc)), 2)
    if isinstance(exc, (AttributeError, KeyError)):  # ml_collections: an override names a field the config lacks
        _exit(_config_field_error(exc, argv), 2)
    _exit(one_line(str(exc) or type(exc).__name__), 2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        try:
            rest = flags.FLAGS(argv)
        except SystemExit as e:  # absl's --help/--helpfull print the help and exit 1; asked-for help is no error
            if e.code == 1 and any(
                a.split("=", 1)[0] in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]
            ):
                sys.exit(0)
            raise
        for name in flags.FLAGS:  # a config file that did not load is an object that raises when touched
            value = flags.FLAGS[name].value
            if type(value).__name__ == "_ErrorConfig":
                value.to_dict()
        return rest
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        _flag_error(e, argv)


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_path(spec: str) -> str:
    """``"sft.py:tiny"`` -> the absolute ``<package>/configs/sft.py:tiny``: a default config
    that resolves next to the installed ``experiments`` package, whatever the working directory."""
    return os.path.join(CONFIGS_DIR, spec)


def define_config_file(name: str, default: str, help_string: str, **kwargs) -> None:
    """``ml_collections.config_flags.DEFINE_config_file``, whose config file and overrides
    (``--name.a.b=...``) are read from ``sys.argv`` when the flag is defined: a file that
    does not load or an override that does not apply is one line and exit status 2 here."""
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        _flag_error(e, sys.argv)
    # A key flag of the script that asked for it (so --help lists it), not of this module.
    caller = sys._getframe(1).f_globals.get("__name__")
    flags.FLAGS.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller, flags.FLAGS[name])


def _exit(message: str, code: int) -> None:
    """Print ``<script>: error: message`` on stderr and exit (every process, at once)."""
    prog = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "jaxapr"
    line = f"{prog}: error: {message}"
    if "jax" in sys.modules:
        from jaxapr import distributed

        distributed.fail(line, code)
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):  # str(KeyError) is the repr of its key; jaxapr's own carry a sentence
        key = exc.args[0] if exc.args else ""
        return one_line(key if isinstance(key, str) and " " in key else f"unknown key {key!r}")
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return one_line(f"{exc.strerror}: {exc.filename!r}")
    return one_line(str(exc) or type(exc).__name__)


def fail(exc: BaseException) -> None:
    """Exit on ``exc`` as the module docstring says: a user error -> one line, status 2; a
    ``TrainingError`` -> one line, status 1; anything else is raised again (a bug)."""
    from jaxapr.train.loop import TrainingError

    if os.environ.get("JAXAPR_TRACEBACK") or not isinstance(exc, (TrainingError, *USER_ERRORS)):
        raise exc
    _exit(_describe(exc), 1 if isinstance(exc, TrainingError) else 2)


def guarded(main):
    """``main`` with its errors handled by :func:`fail`."""

    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:
            fail(e)

    return wrapped


def run(main) -> None:
    """``absl.app.run(main)`` with one-line user errors (see the module docstring)."""
    app.run(guarded(main), flags_parser=_parse_flags)


def quiet_logs() -> None:
    """absl INFO logs (orbax writes several lines per save) off; warnings stay."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def run_training(train, config, workdir: str) -> dict:
    """What ``train_sft`` / ``train_rl`` do around ``train(config, workdir, log=...)``: quiet
    logs, the resolved config and the summary printed by process 0."""
    from jaxapr import distributed

    quiet_logs()
    distributed.quiet_other_processes()
    distributed.log(f"resolved config:\n{config}")
    summary = train(config, workdir, log=distributed.log)
    distributed.log(
        "summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    )
    return summary
