"""Training: supervised fine-tuning and GRPO on one run skeleton.

- ``loop``: the skeleton both runs share (``run(task, workdir)``: work-directory lock, run
  identity, resume, checkpoints, periodic evaluation, metrics, summary) and ``Task``, what a
  kind of run plugs into it; ``TrainingError``.
- ``sft``: the masked next-token loss, ``make_sft_step`` (one jitted update with gradient
  accumulation), ``SFTTask`` and ``train(config, workdir)``.
- ``grpo``: group-normalised advantages, APR's 1/calls weights, the PPO-clipped loss with a k3
  KL to a frozen reference, ``make_grpo_step``; ``rl``: ``GRPOTask`` and ``train``.
- ``state``: ``TrainState`` (step, params, opt_state), ``make_optimizer`` (AdamW, warmup +
  cosine, clipping).
- ``run_config``: a run config's model, optimizer and identity (``RESUMABLE`` fields).
- ``mesh``: the mesh and rules of a run config, state and batches placed on it.
- ``plan``: a run's memory per device before it starts (the compiled step's ``memory_analysis``
  or an analytic estimate; the engine's KV cache and the reference for GRPO) and
  ``check_run``, the check before the first step.
- ``machine``: the memory a device may use, the matmul peak of this machine.
- ``checkpoint``: ``Checkpointer`` (orbax; last k and the best; checksums; restore onto any mesh).
- ``lock``: one writer per work directory.
- ``metrics``: ``MetricWriter`` (JSONL, TensorBoard via tensorboardX, a progress bar).

Policies in and out of runs (``load_policy``, ``export_policy``) live in ``jaxapr.policy_io``.
"""
