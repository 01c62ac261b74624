r"""Memory per device of a training run, before it starts (``jaxapr.train.plan``).

    python -m experiments.plan --config=experiments/configs/sft.py:paper --devices=8 --device_bytes=80GiB
    python -m experiments.plan --config=experiments/configs/rl.py:paper --devices=8 --device_bytes=80GiB

Compiles the run's train step for its mesh against abstract arguments (no parameter is
allocated) and prints the table of what one device holds, then one line of JSON:
``{"peak_bytes_per_device": ..., "fits": ..., "device_bytes": ..., ...}``. Exit status 0 when
it fits, 1 when it does not.

``--devices=N`` plans on N fake CPU devices (``--xla_force_host_platform_device_count``, set
before JAX starts): a GPU or TPU mesh planned from a CPU host. Without it the mesh is the real
devices'. ``--device_bytes`` is one device's memory (default: the real device's allocator
limit; on a CPU the host's available memory over the local devices). ``--analytic`` skips the
compile (the training scripts' cheap estimate). An RL config without ``model`` fields takes the
model of the SFT preset of its name (mini: the tiny model, as the mini SFT preset trains).
"""

from __future__ import annotations

import os
import sys


def _fake_devices(argv: list[str]) -> None:
    """``--devices=N``: N fake CPU devices, set before JAX is imported."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--devices=") else None
        if arg == "--devices" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None and value.isdigit() and int(value) > 0:
            flags_env = os.environ.get("XLA_FLAGS", "")
            flags_env = " ".join(f for f in flags_env.split() if "xla_force_host_platform_device_count" not in f)
            os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={value}".strip()
            os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _fake_devices(sys.argv)

from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_file("config", cli.config_path("sft.py:tiny"), "SFT or RL config (file:preset).")
flags.DEFINE_integer("devices", 0, "Plan on this many fake CPU devices (0: the real devices).", lower_bound=0)
flags.DEFINE_string("device_bytes", "", "One device's memory, e.g. 80GiB or 16GB (default: see the docstring).")
flags.DEFINE_bool("analytic", False, "The analytic estimate instead of the compiled step's figures.")
flags.DEFINE_enum(
    "kernels", "auto", ["auto", "cpu", "xla"], "jaxapr.kernels implementation compiled (auto: the backend's)."
)


def fill_model(config) -> None:
    """An RL config's empty ``model``: the model of the SFT preset of the same name."""
    import dataclasses

    from jaxapr import model

    if "grpo" in config and not config.model:
        preset = config.get("preset", "tiny")
        with config.unlocked():
            config.model = dataclasses.asdict(model.PRESETS["tiny" if preset == "mini" else preset])


def plan(config, *, analytic: bool = False, kernels: str = "auto", device_bytes: str = ""):
    from jaxapr.train import plan as plan_lib

    fill_model(config)
    make = plan_lib.rl_plan if "grpo" in config else plan_lib.sft_plan
    return make(config, compiled=not analytic, kernels=kernels, limit=device_bytes or None)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax

    from jaxapr.train import plan as plan_lib

    if FLAGS.devices and jax.device_count() != FLAGS.devices:
        raise app.UsageError(
            f"--devices={FLAGS.devices}: JAX started with {jax.device_count()} devices (run it as python -m experiments.plan)"
        )
    p = plan(FLAGS.config, analytic=FLAGS.analytic, kernels=FLAGS.kernels, device_bytes=FLAGS.device_bytes)
    print(p.table())
    if not p.fits:
        print(p.error())
    print(plan_lib.to_json(p), flush=True)
    sys.exit(0 if p.fits else 1)


if __name__ == "__main__":
    cli.run(main)
