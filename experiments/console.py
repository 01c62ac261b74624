"""The console scripts that ``pip install jaxapr`` puts on the PATH (``[project.scripts]``).

Each runs one ``experiments`` module's ``main`` through :func:`experiments.cli.run`, exactly
as ``python -m experiments.<module>`` does (same flags, one-line errors, exit status 2 on bad
input); the module is imported only when its script starts, because absl flags (and the
config flags' overrides) are defined at import time from ``sys.argv``.

    jaxapr-quickstart   -> experiments.quickstart
    jaxapr-gen-data     -> experiments.gen_data
    jaxapr-train-sft    -> experiments.train_sft
    jaxapr-train-rl     -> experiments.train_rl
    jaxapr-evaluate     -> experiments.evaluate
    jaxapr-reproduce    -> experiments.reproduce
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

from experiments import cli

# console script name -> experiments module (pyproject.toml's [project.scripts] names the functions below)
SCRIPTS = {
    "jaxapr-quickstart": "quickstart",
    "jaxapr-gen-data": "gen_data",
    "jaxapr-train-sft": "train_sft",
    "jaxapr-train-rl": "train_rl",
    "jaxapr-evaluate": "evaluate",
    "jaxapr-reproduce": "reproduce",
}


def _run(module: str) -> None:
    mod = importlib.import_module(f"experiments.{module}")
    # absl's --help shows the docstring of __main__ (here the installer's stub) and the flags
    # defined by the module named sys.argv[0]: make both the script module's, as under -m.
    sys.modules["__main__"].__doc__ = mod.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(mod.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    cli.run(mod.main)


def quickstart() -> None:
    _run("quickstart")


def gen_data() -> None:
    _run("gen_data")


def train_sft() -> None:
    _run("train_sft")


def train_rl() -> None:
    _run("train_rl")


def evaluate() -> None:
    _run("evaluate")


def reproduce() -> None:
    _run("reproduce")
