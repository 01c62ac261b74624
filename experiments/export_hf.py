r"""Write a policy as a Hugging Face model directory (``transformers``' ``LlamaForCausalLM``
and a ``PreTrainedTokenizerFast`` with the Countdown vocabulary).

    python -m experiments.export_hf --policy=experiments/checkpoints/tiny_apr_sft.npz --out=/tmp/tiny_hf

``--policy`` is an exported ``.npz`` or a training work directory (its best checkpoint);
``--dtype`` the tensors' dtype (float32 by default: ``jaxapr.load_policy(out)`` then gives back
the exact parameters). Writes ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json`` into ``--out``; then

    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    model = LlamaForCausalLM.from_pretrained("/tmp/tiny_hf")
    tokenizer = PreTrainedTokenizerFast.from_pretrained("/tmp/tiny_hf")

The conversion is ``jaxapr.hf`` (``export_hf``, ``load_hf``).
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("policy", None, "An exported policy .npz or a training workdir.")
flags.DEFINE_string("out", None, "Directory to write the Hugging Face files into.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dtype of the exported tensors.")


def export(policy_path: str, out: str, dtype: str = "float32") -> str:
    if not os.path.exists(policy_path):
        raise FileNotFoundError(f"--policy={policy_path!r}: no such file or directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out={out!r} exists and is not a directory")
    # imported after the checks: a mistyped path is answered before JAX starts
    from jaxapr import hf, policy_io

    return hf.export_hf(policy_io.load_policy(policy_path), out, dtype=dtype)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for name in ("policy", "out"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    cli.quiet_logs()
    out = export(FLAGS.policy, FLAGS.out, FLAGS.dtype)
    print(f"wrote {', '.join(sorted(os.listdir(out)))} into {out}")


if __name__ == "__main__":
    cli.run(main)
