r"""GRPO on top of an SFT checkpoint: rollouts in-process, jitted updates, resumable.

    python -m experiments.train_rl --config=experiments/configs/rl.py:tiny \
        --config.init_from=/tmp/sft_apr --config.data_dir=/tmp/jaxapr_data --workdir=/tmp/rl_apr

Prints the resolved config, a progress bar, validation lines; writes into --workdir the config,
metrics.jsonl, TensorBoard events, orbax checkpoints and summary.json. Run it again with the
same --workdir to resume.
"""

from __future__ import annotations

from absl import app, flags

from experiments import cli
from jaxapr import distributed

FLAGS = flags.FLAGS
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ... (see jaxapr.distributed)
cli.define_config_file("config", cli.config_path("rl.py:tiny"), "GRPO config (file:preset).")
flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, metrics and the summary (resumed if it has a checkpoint of the same run).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_or_exit()  # before any JAX computation
    from jaxapr.train import rl

    cli.run_training(rl.train, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
