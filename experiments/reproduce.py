r"""The whole pipeline at one preset, one command: data -> SFT (SoS+ and APR) -> GRPO (each) ->
export -> evaluation on the test split -> report.

    python -m experiments.reproduce --preset=mini --workdir=/tmp/jaxapr_reproduce
    python -m experiments.reproduce --preset=tiny --workdir=/tmp/r --sft_config.num_steps=500

Stages write into ``--workdir`` (``experiments/pipeline.py`` lists what each leaves); a
finished stage is skipped and an interrupted one resumes, so the same command continues a
stopped pipeline. Both methods train with the same SFT config (steps, batch, sequence length,
learning rate) and the same GRPO config; the recipe options chosen on validation live in the
configs. Configs: ``experiments/configs/{data,sft,rl,evaluate}.py`` at ``--preset``, each
overridable (``--sft_config.num_steps=...``, ``--data_config.problems.train=...``,
``--rl_config.grpo.num_problems=...``, ``--eval_config.problems=...``) or replaced
(``--sft_config=path.py:preset``). ``--preset=paper`` is the APR paper's scale, for GPU/TPU.
"""

from __future__ import annotations

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


_PRESET = _preset_in_argv() if _preset_in_argv() in ("tiny", "mini", "paper") else "mini"  # else: --preset's error
FLAGS = flags.FLAGS
distributed.define_flags()  # many hosts: see jaxapr.distributed / experiments.launch
flags.DEFINE_enum("preset", "mini", ["tiny", "mini", "paper"], "Scale of every stage.")
flags.DEFINE_string("workdir", None, "Work directory (created; an existing one is continued).")
cli.define_config_file("data_config", cli.config_path(f"data.py:{_PRESET}"), "Dataset config (file:preset).")
cli.define_config_file("sft_config", cli.config_path(f"sft.py:{_PRESET}"), "SFT config (file:preset).")
cli.define_config_file("rl_config", cli.config_path(f"rl.py:{_PRESET}"), "GRPO config (file:preset).")
cli.define_config_file(
    "eval_config",
    cli.config_path(f"evaluate.py:{_PRESET}"),
    "Evaluation config (file:preset); problems=0 skips the evaluation.",
)
flags.DEFINE_bool("rl", True, "Run the GRPO stages.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_or_exit()  # before any JAX computation
    cli.quiet_logs()
    configs = {"data": FLAGS.data_config, "sft": FLAGS.sft_config, "rl": FLAGS.rl_config, "eval": FLAGS.eval_config}
    for name, c in configs.items():
        print(f"resolved {name} config:\n{c}")
    command = pipeline.recorded_command(sys.argv[1:])
    try:
        pipeline.run(
            FLAGS.workdir, configs["data"], configs["sft"], configs["rl"], configs["eval"], rl=FLAGS.rl, command=command
        )
    except Exception as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.run(main)
