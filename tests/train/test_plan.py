"""The training forward's options (remat, fused attention) and the memory planner.

Remat and the fused attention change memory and speed, never values: the loss and gradients
equal the plain forward's. The planner's compiled figures are the compiled train step's own
(on 4 fake CPU devices, nothing allocated), its analytic estimate bounds them within 2x on a
small config, and remat cuts the step's peak per device by at least 2x where activations
dominate."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import rl as rl_configs
from experiments.configs import sft as sft_configs
from jaxapr import model, sharding
from jaxapr.train import mesh as mesh_lib
from jaxapr.train import plan, run_config, sft

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=128)


def small_batch(b=4, t=48, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[0, 20:40], seg[0, 40:] = 2, 0  # two packed examples and padding in row 0
    pos = np.where(seg[0] == 2, np.arange(t) - 20, np.arange(t))
    positions = np.stack([pos * (seg[0] > 0)] + [np.arange(t)] * (b - 1)).astype(np.int32)
    return {
        "tokens": rng.integers(3, 30, (b, t)).astype(np.int32),
        "loss_mask": (rng.random((b, t)) < 0.7).astype(np.int32),
        "segment_ids": seg,
        "positions": positions,
    }


def test_remat_and_fused_attention_give_the_same_loss_and_gradients():
    cfg = model.get_config("tiny", **SMALL)
    graphdef, params = nnx.split(model.Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = small_batch()
    grads = jax.jit(sft.sft_grads, static_argnums=(0, 3, 4))

    def run(remat, attention):  # forward options as a tuple of pairs: a hashable static argument
        return grads(graphdef, params, batch, 2, (("remat", remat), ("attention", attention)))

    ref_loss, ref_grads, _ = run("none", "blocked")
    assert float(ref_loss) > 0 and all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(ref_grads))
    for remat, attention in [("block", "blocked"), ("dots", "blocked"), ("none", "fused")]:
        loss, g, _ = run(remat, attention)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=f"{remat}/{attention}")
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{remat}/{attention}")


def test_unknown_training_forward_options_are_one_line_errors():
    cfg = model.get_config("tiny", **SMALL)
    policy = model.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"remat='full': expected one of \('none', 'block', 'dots'\)"):
        policy(tokens, remat="full")
    with pytest.raises(ValueError, match=r"attention='flash': expected one of \('blocked', 'fused'\)"):
        policy(tokens, attention="flash")
    with pytest.raises(ValueError, match="remat='yes'"):
        sft.make_sft_step(nnx.split(policy)[0], optax.sgd(0.1), remat="yes")
    with pytest.raises(ValueError, match="device_bytes='80 parsecs'"):
        plan.parse_bytes("80 parsecs")
    assert plan.parse_bytes("80GiB") == 80 * 2**30 and plan.parse_bytes("16GB") == 16 * 10**9


def small_sft_config(remat="none", **model_kw):
    c = sft_configs.get_config("tiny")
    c.model.update(dataclasses.asdict(model.get_config("tiny", **{**SMALL, **model_kw})))
    c.update(batch_size=8, seq_len=64, accum_steps=1, num_steps=10, remat=remat)
    c.optim.warmup_steps = 1
    return c


def mesh4():
    return sharding.make_mesh(data=4, devices=jax.devices()[:4])


@pytest.mark.slow
def test_compiled_plan_is_the_compiled_steps_memory_and_remat_halves_it():
    mesh = mesh4()
    config = small_sft_config(num_layers=6, mlp_dim=128, max_len=256)
    config.update(batch_size=16, seq_len=256)  # activations dominate: 4 rows x 256 tokens per device
    p = plan.sft_plan(config, mesh, limit="1GiB")
    # The same step compiled the way the run compiles it, from real (allocated) arrays.
    cfg = model.ModelConfig(**config.model.to_dict())
    tx, schedule = run_config.make_optimizer(config)
    policy = model.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state, shardings = mesh_lib.init_state_on_mesh(policy, tx, mesh, sharding.rules_for(cfg))
    data = sharding.data_sharding(mesh)
    batch = {k: jax.device_put(v, data) for k, v in small_batch(16, 256).items()}
    step = sft.make_sft_step(graphdef, tx, 1, schedule, state_shardings=shardings, batch_sharding=data)
    ma = step.lower(state, batch).compile().memory_analysis()
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    assert p.method == "compiled" and p.peak_bytes_per_device == peak and p.fits
    rows = dict(p.rows)
    assert rows["step temporaries (activations, gradients, updates)"] == ma.temp_size_in_bytes
    assert rows["batch"] == 4 * (16 // 4) * 256 * 4  # four int32 arrays, 4 rows per device
    assert json.loads(plan.to_json(p))["peak_bytes_per_device"] == peak
    analytic = plan.sft_plan(config, mesh, compiled=False, limit="1GiB")
    assert peak <= analytic.peak_bytes_per_device <= 2 * peak, (analytic.rows, p.rows)
    # Remat "block" keeps each block's input only: the compiled peak falls by more than half.
    config.remat = "block"
    block = plan.sft_plan(config, mesh, limit="1GiB").peak_bytes_per_device
    assert peak >= 2 * block, (peak, block)
    assert block <= plan.sft_plan(config, mesh, compiled=False, limit="1GiB").peak_bytes_per_device <= 2 * block


def test_a_run_that_does_not_fit_fails_with_one_line_naming_the_field(monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("the analytic plan decides here: no compile")

    monkeypatch.setattr(plan, "_compile_memory", no_compile)
    config = sft_configs.get_config("paper")
    config.remat = "none"
    with pytest.raises(
        ValueError, match=r"^SFT needs .* GiB per device .* but a device has 80.0 GiB: .*config.remat='block'"
    ):
        plan.check_run(config, "sft", limit="80GiB")
    config.remat = "block"
    with pytest.raises(ValueError, match=r"config.accum_steps \(now 1\)"):
        plan.check_run(config, "sft", limit="8GiB")
    assert plan.check_run(small_sft_config(), "sft", mesh=mesh4(), limit="80GiB").method == "analytic"


def test_rl_plan_splits_the_kv_cache_over_the_data_devices(monkeypatch):
    config = rl_configs.get_config("paper")
    config.model = dataclasses.asdict(model.get_config("paper"))
    mesh = sharding.make_mesh(data=8)
    per_slot = model.cache_bytes_per_slot(model.get_config("paper"), max_len=4096)
    assert plan.kv_cache_bytes(config, model.get_config("paper"), mesh)[0] == 256 // 8 * per_slot
    p = plan.rl_plan(config, mesh, compiled=False, limit="80GiB")
    rows = dict(p.rows)
    assert rows["engine KV cache (256 slots x 4096)"] == 32 * per_slot
    assert rows["reference params"] > 0 and p.fits, p.table()
    config.shard_slots = False  # the whole cache on one device
    p = plan.rl_plan(config, mesh, compiled=False, limit="40GiB")
    assert dict(p.rows)["engine KV cache (256 slots x 4096)"] == 256 * per_slot
    assert not p.fits and p.field == "shard_slots" and "config.shard_slots=True" in p.error()


def test_plan_command_prints_a_table_and_json_on_fake_devices():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.plan", "--config=experiments/configs/rl.py:paper", "--devices=8"]
        + ["--device_bytes=80GiB", "--analytic"],
        cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fits"] and out["device_bytes"] == 80 * 2**30 and out["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert "engine KV cache" in proc.stdout


def _temporaries(p) -> int:
    return dict(p.rows)["step temporaries (activations, gradients, updates)"]


def test_micro_batches_stay_split_over_the_data_devices():
    """At a fixed batch per device, a step's temporaries per device do not grow with the
    device count: GRPO's micro-batches gathered from the shuffled rows and SFT's accumulation
    micro-batches are each split over the data devices, not replicated on every one."""
    small = dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=256)
    temps = {}
    for n in (1, 8):
        mesh = sharding.make_mesh(data=n, devices=jax.devices()[:n])
        rl = rl_configs.get_config("paper")
        rl.model = dataclasses.asdict(model.get_config("tiny", **small))
        rl.update(max_context=256, num_slots=8)
        # 4 rows of 256 tokens per device (rl_batch_rows plans two calls per rollout), one
        # minibatch of two micro-batches of 2 rows per device
        rl.grpo.update(num_problems=2 * n, group_size=1, num_minibatches=1, micro_batch_tokens=256 * 2 * n)
        assert plan.rl_batch_rows(rl, mesh) == 4 * n
        sft_config = small_sft_config(**small)
        sft_config.update(batch_size=8 * n, seq_len=256, accum_steps=4)  # micro-batches of 2 rows per device
        temps[n] = (_temporaries(plan.rl_plan(rl, mesh, limit="1GiB")), _temporaries(plan.sft_plan(sft_config, mesh)))
    for what, one, eight in zip(("GRPO", "SFT"), temps[1], temps[8]):
        assert eight <= 1.25 * one, (what, one, eight)
