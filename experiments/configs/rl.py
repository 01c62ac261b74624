"""GRPO configs: ``python -m experiments.train_rl --config=experiments/configs/rl.py:<preset>``.

``init_from`` is an SFT workdir (its best checkpoint; the model config comes from it). The
``grpo`` fields are ``jaxapr.train.grpo.GRPOConfig``'s; the paper preset uses the APR paper's
values (150 steps of 64 problems x 5 rollouts, lr 1e-5, clip 0.2, beta 0.001, 2 inner
epochs); the CPU presets sample fewer problems per step (tiny 16 x 8; mini 4 x 8 for 6
steps: a 4-number APR step of 32 rollouts is ~150-300 calls of up to 1,024 tokens; step times
are in BUILD_NOTES.md) and use lr 3e-5, the rate that raised held-out success steadily on the
tiny SoS+ policy where 1e-4 oscillated (BUILD_NOTES.md). ``grpo.micro_batch_tokens`` bounds the rows differentiated at once
(a larger minibatch is split and its gradients summed), so memory does not grow with the calls;
``grpo.pack_calls`` packs several calls per row (the same loss; APR children are short).
The CPU presets set ``grpo.skip_zero_advantage``: groups whose rollouts all succeed or all
fail (a quarter to a half of the mini preset's) get no rows in the update, which leaves the
batch's policy gradient unchanged (only their ~1e-4 KL term goes); the paper preset trains every
rollout, as the paper did. ``grpo.call_weighting`` shares each rollout's weight among its calls
("rollout", the paper's) or weights every call ("call") or token ("token") alike.
"""

from ml_collections import ConfigDict

PRESETS = ("tiny", "mini", "paper")


def get_config(preset: str = "tiny") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown RL preset {preset!r}: expected one of {PRESETS}")
    c = ConfigDict()
    c.preset = preset
    c.init_from = ""  # an SFT (or GRPO) workdir (required)
    c.init_which = "best"  # "best" or "latest" checkpoint of init_from
    c.data_dir = ""  # an experiments.gen_data output directory: its problems/ splits (required)
    c.kind = "apr"  # "apr" | "sosp": how rollouts run
    c.model = ConfigDict()  # filled from init_from's config
    c.seed = 0
    #        problems group  lr    beta  minibatches steps  max_context slots eval_every eval_problems
    p, g, lr, beta, mbs, steps, ctx, slots, ev, evp = {
        "tiny": (16, 8, 3e-5, 0.001, 2, 100, 512, 64, 10, 100),
        "mini": (4, 8, 3e-5, 0.001, 2, 6, 1024, 64, 6, 200),
        # paper: the APR paper's GRPO, 150 steps of 64 problems x 5 rollouts, lr 1e-5, KL
        # weight (beta) 0.001; num_minibatches, slots and the evaluation cadence are ours.
        "paper": (64, 5, 1e-5, 0.001, 4, 150, 4096, 256, 25, 1_000),
    }[preset]
    c.grpo = ConfigDict(
        dict(
            num_problems=p,
            group_size=g,
            learning_rate=lr,
            clip_eps=0.2,
            beta=beta,
            inner_epochs=2,
            num_minibatches=mbs,
            temperature=1.0,
            adv_eps=1e-6,
            length_penalty=0.0,
            length_measure="total",
            thread_penalty=0.0,
            recompute_old_logprobs=False,
            micro_batch_tokens=65_536,
            pack_calls=True,
            skip_zero_advantage=preset != "paper",
            call_weighting="rollout",
        )
    )
    c.optim = ConfigDict(
        dict(
            learning_rate=lr,
            warmup_steps=0,
            schedule="constant",
            end_fraction=1.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.99,
            clip_norm=1.0,
        )
    )
    c.num_steps = steps
    c.max_context = ctx  # per-call context window of the rollouts
    c.max_depth = 1
    # paper: 256 slots fit 80 GB devices; on a TPU v5e-8 (8 x 16 GiB) run it with
    # --config.num_slots=128, with which experiments.plan finds it fits there (BUILD_NOTES.md):
    # the KV cache of 256 slots leaves too little of a chip for the update. The slots bound how
    # many calls decode at once, not the rollouts of a step, so the samples and the update are
    # the paper's; rollouts take more decode steps.
    c.num_slots = slots
    # paper: the engine's slots (and KV cache: 256 x 4,096 tokens of the paper model is ~77 GB)
    # split over the data devices; the CPU presets keep them on one device.
    c.shard_slots = preset == "paper"
    # The training forward (jaxapr.model.REMATS / ATTENTIONS), as in configs/sft.py; paper:
    # "block" remat (ours), so the update's activations leave room for the KV cache.
    c.remat = "block" if preset == "paper" else "none"
    c.attention = "blocked"
    c.decode_chunk = 16
    c.eval_every = ev
    c.eval_problems = evp
    c.eval_split = "val"
    c.eval_at_start = True
    c.checkpoint_every = ev
    c.keep = 3
    c.async_checkpoint = True
    c.max_train_seconds = 0
    c.progress = True
    c.wandb = False  # True: also log the metrics to Weights & Biases (pip install 'jaxapr[wandb]')
    c.overwrite = False  # True: delete the workdir's previous run (checkpoints, metrics) and start afresh
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = "auto"
    return c
