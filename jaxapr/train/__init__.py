"""Training: supervised fine-tuning and GRPO, orbax checkpoints, metric writers.

- ``state``: ``TrainState`` (step, params, opt_state), ``make_optimizer`` (AdamW, warmup +
  cosine, clipping).
- ``sft``: the masked next-token loss, ``make_sft_step`` (one jitted update with gradient
  accumulation), ``train(config, workdir)`` (a resumable run).
- ``grpo``: group-normalised advantages, APR's 1/calls weights, the PPO-clipped loss with a k3
  KL to a frozen reference, ``make_grpo_step``; ``rl.train(config, workdir)`` runs it.
- ``checkpoint``: ``Checkpointer`` (orbax; last k and the best; restore onto any mesh).
- ``metrics``: ``MetricWriter`` (JSONL, TensorBoard, a progress bar).
- ``common``: what the runs share (mesh, policy from a config, held-out rollouts).
"""
