r"""Supervised fine-tuning of the policy on SoS+ or APR demonstrations.

    python -m experiments.gen_data --config=experiments/configs/data.py:tiny --out=/tmp/jaxapr_data
    python -m experiments.train_sft --config=experiments/configs/sft.py:tiny \
        --config.data_dir=/tmp/jaxapr_data --config.kind=apr --workdir=/tmp/sft_apr

Prints the resolved config, a progress bar, validation lines; writes into --workdir the config,
metrics.jsonl, TensorBoard events, orbax checkpoints and summary.json. Run it again with the
same --workdir to resume from the newest checkpoint.
"""

from __future__ import annotations

from absl import app, flags

from experiments import cli
from jaxapr import distributed

FLAGS = flags.FLAGS
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ... (see jaxapr.distributed)
cli.define_config_file("config", cli.config_path("sft.py:tiny"), "SFT config (file:preset).")
flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, metrics and the summary (resumed if it has a checkpoint of the same run).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    distributed.initialize_or_exit()  # before any JAX computation
    from jaxapr.train import sft

    cli.run_training(sft.train, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
