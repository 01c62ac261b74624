"""SFT configs: ``python -m experiments.train_sft --config=experiments/configs/sft.py:<preset>``.

Presets: ``tiny`` (minutes on 2 CPU cores; tests and the quickstart), ``mini`` (the SFT stages of
``reproduce --preset=mini``; validation loss picks the checkpoint), ``paper`` (the APR paper's model on GPU/TPU). Every field can be overridden from
the command line, e.g. ``--config.kind=apr --config.num_steps=500 --config.model.d_model=192``.
The model fields are ``jaxapr.model.PRESETS[preset]``'s (one source of truth).
"""

import dataclasses
import os

from ml_collections import ConfigDict

PRESETS = ("tiny", "mini", "paper")
_CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def get_config(preset: str = "tiny") -> ConfigDict:
    from jaxapr import model

    if preset not in PRESETS:
        raise ValueError(f"unknown SFT preset {preset!r}: expected one of {PRESETS}")
    c = ConfigDict()
    c.preset = preset
    # mini trains the tiny model's dimensions: the 4.8M-parameter mini model trains too few
    # tokens in reproduce's 2.5 hours on 2 CPU cores (BUILD_NOTES); paper and tiny are their own.
    c.model = ConfigDict(dataclasses.asdict(model.PRESETS["tiny" if preset == "mini" else preset]))
    c.kind = "sosp"  # "sosp" | "apr": which dataset of data_dir trains, and how validation rolls out
    c.data_dir = ""  # an experiments.gen_data output directory (required)
    c.seed = 0
    # Start from another run's parameters (a workdir or an exported .npz; "{kind}" is replaced by
    # config.kind); the optimizer starts fresh. The mini preset starts from the shipped tiny
    # policies (3 numbers): a curriculum that 2 CPU hours allow, where 4 numbers from scratch do not.
    c.init_from = os.path.join(_CHECKPOINTS, "tiny_{kind}_sft.npz") if preset == "mini" else ""
    c.init_which = "best"
    c.train_on_prompt = False  # the paper trained on all tokens; we mask prompts/join contexts by default
    # Examples per epoch of each call kind (jaxapr.data.CALL_KINDS), e.g.
    # --config.kind_repeats.continuation=4 oversamples APR parents' calls after a join.
    c.kind_repeats = ConfigDict(dict(sosp=1, root_first=1, continuation=1, child_first=1))
    run = {
        #        seq_len batch accum steps  lr    warmup eval_every ckpt_every eval_problems max_context slots
        "tiny": (512, 16, 1, 2_000, 2e-3, 100, 250, 250, 100, 512, 64),
        # mini: both methods train the same steps x 16 x 1,024 tokens from the tiny policies (each
        # 2,000 tiny steps); sized so that reproduce --preset=mini fits 2.5 hours on 2 CPU cores.
        "mini": (1024, 16, 1, 450, 1e-3, 50, 150, 150, 0, 1024, 64),
        # paper: the APR paper's SFT, 19,531 steps at lr 5e-5 (10 passes over its 500k
        # demonstrations at batch 256), rows of its 4,096-token context; warmup and the
        # evaluation cadence are ours (the paper does not give them in the material we have).
        # accum 1 fits 80 GB devices; on a TPU v5e-8 (8 x 16 GiB) or v4-8 (4 x 32 GiB) run it
        # with --config.accum_steps=8, with which experiments.plan finds it fits there (and why
        # not 4: BUILD_NOTES.md): the same batch of 256 x 4,096 and the same update, its
        # gradient summed over 8 micro-batches.
        "paper": (4096, 256, 1, 19_531, 5e-5, 1_000, 2_000, 2_000, 1_000, 4096, 256),
    }[preset]
    (
        c.seq_len,
        c.batch_size,
        c.accum_steps,
        c.num_steps,
        lr,
        warmup,
        c.eval_every,
        c.checkpoint_every,
        c.eval_problems,
        c.eval_max_context,
        c.eval_num_slots,
    ) = run
    c.optim = ConfigDict(
        dict(
            learning_rate=lr,
            warmup_steps=warmup,
            schedule="cosine",
            end_fraction=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.95,
            clip_norm=1.0,
        )
    )
    # > 0: stop (evaluate, checkpoint) after this much training time. The presets are sized in
    # steps (0): a time cap would make the result depend on the machine.
    c.max_train_seconds = 0
    # The training forward (jaxapr.model.REMATS / ATTENTIONS; same values, different memory and
    # speed). paper: "block" remat, ours (the paper trained on a TPU pod): without it the step's
    # activations need several times an 80 GB GPU at batch 256 x 4,096 over 8 devices
    # (python -m experiments.plan; BUILD_NOTES.md). "fused" attention is cuDNN's kernel on a GPU.
    c.remat = "block" if preset == "paper" else "none"
    c.attention = "blocked"
    c.log_every = 10
    c.eval_batches = 4  # validation-loss batches
    c.eval_split = "val"
    c.eval_at_start = False
    c.keep = 3
    c.async_checkpoint = True
    c.progress = True
    c.wandb = False  # True: also log the metrics to Weights & Biases (pip install 'jaxapr[wandb]')
    c.overwrite = False  # True: delete the workdir's previous run (checkpoints, metrics) and start afresh
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining devices
    c.rules = "auto"  # or a jaxapr.sharding.RULES name
    return c
