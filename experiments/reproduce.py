r"""The whole pipeline at one preset: data -> SFT (SoS+ and APR) -> GRPO (APR) -> evaluation.

    python -m experiments.reproduce --preset=mini --workdir=/tmp/jaxapr_reproduce
    python -m experiments.reproduce --preset=tiny --workdir=/tmp/r --sft_config.num_steps=500

Stages write into ``--workdir``: ``data/`` (``gen_data``), ``sft_sosp/`` and ``sft_apr/``
(``train_sft``), ``rl_apr/`` (``train_rl`` from ``sft_apr``'s best checkpoint), ``eval/``
(``evaluate``: JSON, tables, PNG plots) and ``reproduce.json`` (the final table). A finished
stage (its ``summary.json`` / manifest exists) is skipped and an interrupted one resumes, so the
same command continues a stopped pipeline. Configs: ``experiments/configs/{data,sft,rl}.py`` at
``--preset``, each overridable (``--sft_config.num_steps=...``, ``--data_config.problems.train=...``,
``--rl_config.grpo.num_problems=...``) or replaced (``--sft_config=path.py:preset``).
``--preset=paper`` is the APR paper's scale, for GPU/TPU.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import cli, pipeline
from jaxapr import distributed


def _preset_in_argv(default: str = "mini") -> str:
    """--preset picks the default config files, so it is read before absl parses the flags
    (the config flags' overrides need their file at definition time)."""
    for i, a in enumerate(sys.argv[1:], 1):
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
        if a == "--preset" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return default


_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_PRESET = _preset_in_argv() if _preset_in_argv() in ("tiny", "mini", "paper") else "mini"  # else: --preset's error
FLAGS = flags.FLAGS
distributed.define_flags()  # many hosts: see jaxapr.distributed / experiments.launch
flags.DEFINE_enum("preset", "mini", ["tiny", "mini", "paper"], "Scale of every stage.")
flags.DEFINE_string("workdir", None, "Work directory (created; an existing one is continued).")
cli.define_config_file("data_config", f"{_CONFIGS}/data.py:{_PRESET}", "Dataset config (file:preset).")
cli.define_config_file("sft_config", f"{_CONFIGS}/sft.py:{_PRESET}", "SFT config (file:preset).")
cli.define_config_file("rl_config", f"{_CONFIGS}/rl.py:{_PRESET}", "GRPO config (file:preset).")
flags.DEFINE_bool("rl", True, "Run the GRPO stage.")
flags.DEFINE_integer("eval_problems", 200, "Held-out (test) problems of the final evaluation (0: none).", lower_bound=0)
flags.DEFINE_list("eval_contexts", [], "Per-call context windows evaluated (default: the model's).")
flags.DEFINE_integer("eval_n_max", 4, "SoS+ pass@n / cons@n up to n.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_or_exit()  # before any JAX computation
    cli.quiet_logs()
    data_config, sft_config, rl_config = FLAGS.data_config, FLAGS.sft_config, FLAGS.rl_config
    for name, c in (("data", data_config), ("sft", sft_config), ("rl", rl_config)):
        print(f"resolved {name} config:\n{c}")
    try:
        pipeline.run(FLAGS.workdir, data_config, sft_config, rl_config, rl=FLAGS.rl,
                     eval_problems=FLAGS.eval_problems, eval_contexts=FLAGS.eval_contexts, eval_n_max=FLAGS.eval_n_max)
    except Exception as e:  # noqa: BLE001 - cli.fail: user errors one line, bugs raised again
        cli.fail(e)


if __name__ == "__main__":
    cli.run(main)
