r"""Benchmarks. Each suite warms up (compiles) first, blocks on results, reports medians and
runs its baseline in the same process, so figures are ratios measured side by side.

    python -m experiments.bench --suite=env --out=/tmp/bench_env.json
    python -m experiments.bench --suite=env --quick        # small sizes, a smoke run

Suites: env (Countdown-v0 vs gymnax CartPole-v1 vs a plain-Python Countdown;
generate_problems); datagen (traces/s of each solver and tokens/s of the tokenizer, per core,
and a timed SoS+ + APR dataset build of --datagen_problems paper problems on all cores).
sampler (the slot engine's decode and prefill tokens/s for the tiny and mini presets at
batch 1..256, against a no-cache full-forward baseline, a matmul peak and, when torch and
transformers are installed, Hugging Face ``LlamaForCausalLM.generate`` of the same shape).
runtime (APR and SoS+ rollouts through one engine with forced solver traces; APR with both
join strategies, reprefill and keep_slot, side by side:
``--suite=runtime --runtime_preset=tiny --runtime_slots=16 --runtime_problems=32``).
train (``experiments/bench_train.py``: the SFT step's tokens/s and fraction of a matmul peak at
the tiny and mini presets, and a GRPO step split into rollout and update time, the update with
one call per row and with packed rows; ``--grpo_policy=<run or .npz> --grpo_data_dir=<data>``
for a trained policy's rollouts).
quickstart (the main job stage by stage: runs ``experiments.quickstart`` with its defaults, or
reads ``--quickstart_json``, and prints each stage's wall time, the evaluation's tokens/s and the
total, beside ``--baseline_json``'s (another run's quickstart.json, e.g. the previous commit's)
with their ratio).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import statistics
import sys
import time

from absl import app, flags

from experiments.bench_util import fmt, interleaved_medians, median_time, print_table, quickstart_stages

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "suite", "env", ["env", "datagen", "sampler", "runtime", "train", "quickstart"], "Which benchmark suite to run."
)
flags.DEFINE_integer("datagen_problems", 50_000, "datagen: problems in the timed dataset build (paper: 500000).")
flags.DEFINE_string("out", None, "Where to write the JSON results (default: print only).")
flags.DEFINE_bool("quick", False, "Small sizes and few repeats (a smoke run, not a measurement).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median reported).")
flags.DEFINE_list("sampler_presets", ["tiny", "mini"], "sampler: model presets (quick: tiny).")
flags.DEFINE_list("sampler_batches", ["1", "16", "64", "256"], "sampler: batch sizes (quick: 1, 16).")
flags.DEFINE_list("sampler_hf_batches", None, "sampler: the batch sizes that also time HF generate (default: all).")
flags.DEFINE_list(
    "sampler_windows",
    ["128", "256", "512", "1024"],
    "sampler: attention windows (cache entries a decode step reads) of the decode-step table, at "
    "--sampler_window_batch slots (empty: no table; quick: 128, 256).",
)
flags.DEFINE_integer("sampler_window_batch", 64, "sampler: slots of the decode-step-by-window table.")
flags.DEFINE_list("train_presets", ["tiny", "mini"], "train: SFT step presets (paper: batch 4 x 2048; for a GPU/TPU).")
flags.DEFINE_bool("train_grpo", True, "train: also time the GRPO step (rollout + update).")
flags.DEFINE_enum("runtime_preset", "mini", ["tiny", "mini"], "runtime: model preset (random weights).")
flags.DEFINE_integer("runtime_slots", None, "runtime: engine slots (default 32; quick 16).")
flags.DEFINE_integer("runtime_problems", None, "runtime: problems per rollout (default 64; quick 32).")
flags.DEFINE_string(
    "grpo_policy",
    None,
    "train: GRPO step with this trained policy (a run or .npz; default: tiny random weights); needs --grpo_data_dir.",
)
flags.DEFINE_string("grpo_data_dir", None, "train: the --grpo_policy's gen_data output (its training problems).")
flags.DEFINE_integer("grpo_problems", None, "train: GRPO problems per step (default 16; quick 4).")
flags.DEFINE_integer("grpo_group", 4, "train: GRPO rollouts per problem.")
flags.DEFINE_string("quickstart_json", None, "quickstart: an existing quickstart.json to report (default: run it).")
flags.DEFINE_string("baseline_json", None, "quickstart: another run's quickstart.json, reported side by side.")
flags.DEFINE_string(
    "quickstart_workdir",
    "/tmp/jaxapr_bench_quickstart",
    "quickstart: each run goes into a new directory under it (a benchmark times a first run: the "
    "quickstart would reuse a finished GRPO run or dataset in its workdir).",
)
flags.DEFINE_string(
    "baseline_commit",
    None,
    "Also run the same suite and flags on this git revision (a temporary worktree of this "
    "repository, e.g. HEAD~1 or main) first, then print every figure side by side with new/old.",
)
flags.DEFINE_integer("grpo_context", None, "train: GRPO per-call context (default: the policy's; random: 512).")


def machine() -> dict:
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


# ----------------------------------------------------------------------------------------
# env suite
# ----------------------------------------------------------------------------------------
def _scan_steps(env, params, policy, batch: int, steps: int):
    """A jitted function key -> (total reward) running `steps` vmapped env steps in lax.scan."""
    import jax

    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def run(key):
        k0, k1 = jax.random.split(key)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k0, batch), params)

        def body(carry, key):
            obs, state, aux = carry
            k_act, k_step = jax.random.split(key)
            action, aux = policy(k_act, obs, state, aux)
            obs, state, reward, *_rest, info = step(jax.random.split(k_step, batch), state, action, params)
            return (obs, state, info.get("action_mask", aux)), reward.sum()

        aux0 = jax.vmap(env.action_mask, in_axes=(0, None))(state, params) if hasattr(env, "action_mask") else None
        _, rewards = jax.lax.scan(body, (obs, state, aux0), jax.random.split(k1, steps))
        return rewards.sum()

    return jax.jit(run)


def _countdown_policy(batch, num_actions):
    """Uniform over legal actions: one random word per env picks r in [0, #legal), then the
    r-th legal action is found with a running count over the (static) action axis, which is
    much cheaper on CPU than cumsum or a rank matmul."""
    import jax
    import jax.numpy as jnp

    def policy(key, obs, state, mask):
        m = mask.astype(jnp.int32)
        r = jnp.floor(jax.random.uniform(key, (batch,)) * m.sum(-1)).astype(jnp.int32)
        seen = jnp.zeros((batch,), jnp.int32)
        action = jnp.zeros((batch,), jnp.int32)
        for a in range(num_actions):
            seen = seen + m[:, a]
            action = action + (seen <= r)
        return action, mask

    return policy


def _gymnax_cartpole():
    """gymnax's CartPole-v1 (gymnax >= 1.0 has the same 6-tuple step), or None."""
    try:
        import gymnax
    except ImportError:
        return None
    return gymnax.make("CartPole-v1")


def _python_countdown_steps_per_s(num_numbers: int, seconds: float) -> float:
    """The plain-Python Countdown from the test suite, random legal actions, auto-reset."""
    import numpy as np

    from envs import countdown
    from tests import oracle

    numbers, targets = countdown.generate_problems(__import__("jax").random.PRNGKey(0), 1000, num_numbers)
    bank = list(zip(np.asarray(numbers).tolist(), np.asarray(targets).tolist()))
    rng = random.Random(0)
    env = oracle.PyCountdown(num_numbers)
    env.reset(*rng.choice(bank))
    steps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(1000):
            legal = [a for a, ok in enumerate(env.mask()) if ok]
            _, _, done, _ = env.step(rng.choice(legal))
            if done:
                env.reset(*rng.choice(bank))
        steps += 1000
        if time.perf_counter() - t0 > seconds:
            return steps / (time.perf_counter() - t0)


def suite_env(quick: bool, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import envs
    from envs import countdown

    batches = [1, 16, 256, 4096, 65536] if not quick else [1, 256]
    results = {"countdown": {}, "cartpole": {}, "python_countdown": None, "generate_problems": None}
    env, params = envs.make("Countdown-v0", num_numbers=4)
    cart = _gymnax_cartpole()
    rows = []
    for batch in batches:
        steps = max(32, min(2048, 2**21 // batch)) if not quick else 32
        fns = {"countdown": _scan_steps(env, params, _countdown_policy(batch, env.num_actions), batch, steps)}
        if cart is not None:

            def cart_policy(key, obs, state, aux, batch=batch):  # one random word per env, as above
                return (jax.random.uniform(key, (batch,)) < 0.5).astype(jnp.int32), aux

            fns["cartpole"] = _scan_steps(cart[0], cart[1], cart_policy, batch, steps)
        times = interleaved_medians(
            {name: (lambda f=f: f(jax.random.PRNGKey(0)).block_until_ready()) for name, f in fns.items()}, repeats
        )
        row = {"batch": batch}
        for name, t in times.items():
            results[name][batch] = batch * steps / t
        row["Countdown-v0 steps/s"] = results["countdown"][batch]
        if cart is not None:
            row["CartPole-v1 steps/s"] = results["cartpole"][batch]
            row["ratio"] = row["Countdown-v0 steps/s"] / row["CartPole-v1 steps/s"]
        rows.append(row)
    py = _python_countdown_steps_per_s(4, 0.5 if quick else 3.0)
    results["python_countdown"] = py
    print("\nCountdown-v0 (N=4, random legal actions, lax.scan of vmapped steps) vs gymnax CartPole-v1")
    print_table(rows, ["batch", "Countdown-v0 steps/s", "CartPole-v1 steps/s", "ratio"])
    top = max(batches)
    print(
        f"\nplain-Python Countdown: {py:,.0f} steps/s; Countdown-v0 at batch {top}: "
        f"{results['countdown'][top] / py:,.0f}x"
    )
    results["ratio_vs_python"] = results["countdown"][top] / py
    if cart is not None:
        results["ratio_vs_cartpole"] = results["countdown"][top] / results["cartpole"][top]
    else:
        print("gymnax not installed: CartPole-v1 baseline skipped (pip install '.[compat]')")

    num = 500_000 if not quick else 20_000
    key = jax.random.PRNGKey(0)
    countdown.generate_problems(key, 1000)  # compile
    t = median_time(lambda: countdown.generate_problems(key, num)[0].block_until_ready(), max(1, repeats // 2))
    results["generate_problems"] = {"problems": num, "seconds": t, "problems_per_s": num / t}
    print(
        f"\ngenerate_problems: {num:,} paper-distribution problems (N=4, targets 10..100, numbers "
        f"1..99) in {t:.2f} s = {num / t:,.0f} problems/s"
    )

    from experiments import bench_parallel_search

    ps_results, ps_rows = bench_parallel_search.run(quick, repeats)
    results["parallel_search"] = ps_results
    print("\nParallelSearch-v0 (K=4 threads, N=4, random masked actions, lax.scan of vmapped steps)")
    print_table([r for r in ps_rows if r["table"] == "throughput"], ["batch", "K", "env steps/s", "agent steps/s"])
    print("\nScripted policies on the default bank: serial depth-first search vs fork-at-root")
    scripted_rows = [r for r in ps_rows if r["table"] != "throughput"]
    print_table(scripted_rows, [c for c in scripted_rows[0] if c != "table"] if scripted_rows else [])
    return results


def suite_datagen(quick: bool, repeats: int) -> dict:
    import tempfile

    import jax

    from envs import countdown
    from jaxapr import data, traces
    from jaxapr.tokenizer import CountdownTokenizer

    n = 300 if quick else 2000
    numbers, targets = jax.device_get(countdown.generate_problems(jax.random.PRNGKey(0), n))
    problems = list(zip(numbers.tolist(), targets.tolist()))
    rng = random.Random(0)
    sizes = [(rng.randint(1, 5), rng.randint(1, 6)) for _ in problems]
    sub_sizes = [rng.randint(b, 10) for _, b in sizes]
    solvers = {
        "SoS+ (sosp)": lambda: [
            traces.sosp(x, t, beam_size=b, seed=k) for k, ((x, t), (b, _)) in enumerate(zip(problems, sizes))
        ],
        "APR (apr)": lambda: [
            traces.apr(x, t, beam_size=b, sub_call_beam_size=sb, seed=k)
            for k, ((x, t), (_, b), sb) in enumerate(zip(problems, sizes, sub_sizes))
        ],
        "SoS DFS": lambda: [traces.sos(x, t, strategy="dfs", seed=k) for k, (x, t) in enumerate(problems)],
        "SoS BFS": lambda: [
            traces.sos(x, t, strategy="bfs", beam_size=b, seed=k)
            for k, ((x, t), (b, _)) in enumerate(zip(problems, sizes))
        ],
    }
    results, rows = {"solvers": {}}, []
    texts = {}
    for name, fn in solvers.items():
        texts[name] = fn()
        t = median_time(fn, max(1, repeats // 2))
        results["solvers"][name] = n / t
        rows.append({"what": name, "per core /s": n / t, "unit": "traces"})
    tok = CountdownTokenizer()
    all_text = texts["SoS+ (sosp)"] + [c for tree in texts["APR (apr)"] for c in _all_calls(tree)]
    num_tokens = sum(len(tok.encode(x)) for x in all_text)
    t = median_time(lambda: [tok.encode(x) for x in all_text], repeats)
    results["tokenizer_tokens_per_s"] = num_tokens / t
    rows.append({"what": "tokenizer encode", "per core /s": num_tokens / t, "unit": "tokens"})
    print("\nSolvers and tokenizer, one process (4-number paper problems, beams drawn as the original scripts do)")
    print_table(rows, ["what", "per core /s", "unit"])
    print("(the original Python solvers: about 300 APR and 900 SoS+ traces/s per core; target 3x)")

    total = 2000 if quick else FLAGS.datagen_problems
    splits = countdown.make_splits(0, {"train": total})
    build = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sosp", "apr"):
            t0 = time.perf_counter()
            m = data.build_dataset(os.path.join(tmp, kind), splits.splits, data.TraceConfig(kind=kind), seed=0)
            build[kind] = {
                "seconds": time.perf_counter() - t0,
                "bytes_on_disk": m["bytes_on_disk"],
                "tokens_per_problem": m["splits"]["train"]["tokens_per_problem"],
                "examples": m["splits"]["train"]["examples"],
                "solved": m["splits"]["train"]["solved"],
            }
    seconds = sum(b["seconds"] for b in build.values())
    results["build"] = {"problems": total, "workers": os.cpu_count(), "seconds": seconds, "kinds": build}
    print(
        f"\nDataset build: {total:,} paper problems, SoS+ and APR traces, tokenized (uint16), "
        f"{os.cpu_count()} worker processes: {seconds:.1f} s"
    )
    for kind, b in build.items():
        print(
            f"  {kind}: {b['seconds']:.1f} s, {b['tokens_per_problem']:,.0f} tokens/problem, "
            f"{b['examples']:,} examples, solved {b['solved'] / total:.1%}, {b['bytes_on_disk'] / 2**20:,.1f} MiB"
        )
    return results


def _all_calls(tree):
    yield from tree.main_calls
    for children in tree.sub_calls:
        for child in children:
            yield from _all_calls(child)


# ----------------------------------------------------------------------------------------
# sampler suite
# ----------------------------------------------------------------------------------------
def _matmul_peak_flops(dtype: str = "float32", quick: bool = False) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] in ``dtype`` (the reference peak of this machine;
    ``machine.matmul_peak_flops``'s size for the backend, 1,024 when quick)."""
    from jaxapr.train.machine import matmul_peak_flops

    return matmul_peak_flops(1024 if quick else None, dtype=dtype)


def _no_cache_segments(policy, batch: int, prompt_len: int, new: int, probe_steps: int):
    """The no-cache baseline: greedy decoding that re-runs the full forward over the whole
    sequence for every token. Shapes are static per length bucket (a power of two >= the
    current length), so a step costs the same within a bucket; each bucket's jitted
    ``fori_loop`` is timed for ``probe_steps`` steps and scaled to the steps that fall in it.
    Returns [(steps in bucket, blocking callable running probe_steps steps)]."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params = nnx.split(policy)

    def run(params, buf, start, steps):
        model = nnx.merge(graphdef, params)

        def body(i, buf):
            t = start + i
            logits = model(buf)
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), -1)
            return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype)[:, None], t, axis=1)

        return jax.lax.fori_loop(0, steps, body, buf)

    jitted = jax.jit(run, static_argnums=(3,))
    segments, length, end = [], prompt_len, prompt_len + new
    while length < end:
        bucket = 1 << length.bit_length()  # the smallest power of two > length: room for one more
        steps = min(end, bucket) - length
        buf = jnp.zeros((batch, bucket), jnp.int32)
        start, k = length, min(probe_steps, steps)
        segments.append((steps, k, lambda buf=buf, start=start, k=k: jitted(params, buf, start, k).block_until_ready()))
        length += steps
    return segments


def _hf_llama(cfg):
    """A random-weight Hugging Face LlamaForCausalLM of the same shape, or None; on the GPU
    when torch sees one (as JAX does), in the model's compute dtype there."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    cuda = torch.cuda.is_available()
    conf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.dims_per_head,
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    try:
        hf = transformers.LlamaForCausalLM(conf).eval()
        if cuda:  # HF keeps float32 weights on the CPU; on the GPU it runs as JAX does
            hf = hf.to("cuda", dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32)
        _hf_generate(hf, [[3, 4, 5]], 2)()  # a smoke run: an API change skips HF, not the suite
    except Exception as e:
        print(f"HF generate unavailable (transformers {transformers.__version__}): {type(e).__name__}: {e}")
        return None
    return hf


def _hf_generate(hf, prompts, new: int):
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long, device=hf.device)

    def run():
        with torch.no_grad():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        if ids.is_cuda:
            torch.cuda.synchronize()

    return run


def suite_sampler(quick: bool, repeats: int) -> dict:
    """Decode / prefill tokens/s of the slot engine vs a no-cache baseline and HF generate."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxapr import engine, model

    presets = ["tiny"] if quick else FLAGS.sampler_presets
    batches = [1, 16] if quick else [int(b) for b in FLAGS.sampler_batches]
    prompt_len, new = 16, (32 if quick else 512)
    repeats = min(repeats, 3)
    hf_batches = batches if FLAGS.sampler_hf_batches is None else [int(b) for b in FLAGS.sampler_hf_batches]
    peaks = {}  # per compute dtype of the presets
    for dtype in sorted({model.PRESETS[p].dtype for p in presets}):
        peaks[dtype] = _matmul_peak_flops(dtype, quick)
        print(f"\nmatmul peak ({dtype} jnp.dot on {jax.devices()[0].device_kind}): {peaks[dtype] / 1e9:,.1f} GFLOP/s")
    results = {"matmul_peak_flops": peaks, "prompt_len": prompt_len, "new_tokens": new, "rows": []}
    rows = []
    for preset in presets:
        cfg = model.PRESETS[preset]
        peak = peaks[cfg.dtype]
        policy = model.Transformer(cfg, rngs=nnx.Rngs(0))
        hf = _hf_llama(cfg)
        max_len = min(cfg.max_len, engine._next_pow2(prompt_len + new))
        # useful FLOPs per generated token, at the mean context of the generation
        flops = model.flops_per_token(cfg, prompt_len + new // 2)
        for batch in batches:
            rng = np.random.default_rng(batch)
            prompts = rng.integers(3, cfg.vocab_size, size=(batch, prompt_len)).astype(np.int32)
            eng = engine.Engine(policy, num_slots=batch, max_len=max_len)
            times = {"prefill": [], "decode": []}

            def run_engine():
                eng.release(range(batch))
                t0 = time.perf_counter()
                eng.insert(list(prompts), max_new_tokens=new)
                jax.block_until_ready(eng.slots)
                t1 = time.perf_counter()
                steps = 0
                while steps < new - 1:  # chunks of 32 steps, as generate() and the runtime decode
                    steps += int(eng.decode(min(32, new - 1 - steps)))
                t2 = time.perf_counter()
                assert steps == new - 1 and eng.finished() == list(range(batch))
                times["prefill"].append(t1 - t0)
                times["decode"].append(t2 - t1)

            segments = _no_cache_segments(policy, batch, prompt_len, new, probe_steps=2 if quick else 4)
            fns = {"engine": run_engine}
            fns.update({f"nocache{i}": fn for i, (_, _, fn) in enumerate(segments)})
            with_hf = hf is not None and batch in hf_batches
            if with_hf:
                fns["hf"] = _hf_generate(hf, prompts, new)
            med = interleaved_medians(fns, repeats)
            prefill_t = statistics.median(times["prefill"][1:])
            decode_t = statistics.median(times["decode"][1:])
            decode_tps = batch * (new - 1) / decode_t
            engine_tps = batch * new / (prefill_t + decode_t)
            nocache_t = sum(steps / k * med[f"nocache{i}"] for i, (steps, k, _) in enumerate(segments))
            row = {
                "preset": preset,
                "batch": batch,
                "decode tok/s": decode_tps,
                "prefill tok/s": batch * prompt_len / prefill_t,
                "gen tok/s": engine_tps,
                "no-cache tok/s": batch * new / nocache_t,
                "x no-cache": engine_tps / (batch * new / nocache_t),
                "HF tok/s": batch * new / med["hf"] if with_hf else None,
                "x HF": engine_tps / (batch * new / med["hf"]) if with_hf else None,
                "peak frac": decode_tps * flops / peak,
                "KV bytes/slot": model.cache_bytes_per_slot(cfg, max_len),
            }
            rows.append(row)
            results["rows"].append(row)
            print("  " + ", ".join(f"{k} {fmt(v)}" for k, v in row.items()), flush=True)
    results["prefill"] = {}
    plen, pbatch = (128, 8) if quick else (512, 16)
    for preset in presets:
        cfg = model.PRESETS[preset]
        peak = peaks[cfg.dtype]
        policy = model.Transformer(cfg, rngs=nnx.Rngs(0))
        eng = engine.Engine(policy, num_slots=pbatch, max_len=min(cfg.max_len, 2 * plen))
        prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(pbatch, plen)).astype(np.int32)

        def run_prefill():
            eng.release(range(pbatch))
            eng.insert(list(prompts), max_new_tokens=1)
            jax.block_until_ready(eng.slots)

        t = median_time(run_prefill, repeats)
        tps = pbatch * plen / t
        # Attention in a prefill of length T sees T/2 keys on average.
        frac = tps * model.flops_per_token(cfg, plen // 2) / peak
        results["prefill"][preset] = {"prompt_len": plen, "batch": pbatch, "tokens_per_s": tps, "peak_frac": frac}
        print(
            f"prefill {preset}: {pbatch} prompts x {plen} tokens: {tps:,.0f} tokens/s = {frac:.1%} of the "
            f"matmul peak ({peak / 1e9:,.0f} GFLOP/s)"
        )
    print(
        f"\nSlot engine, greedy, prompt {prompt_len} + {new} generated tokens (stop_ids=(): all real), "
        f"cache max_len {max_len}; gen = prefill + decode; no-cache = full forward per token "
        "(length-bucketed, probed and scaled); HF = LlamaForCausalLM.generate, same shape, random weights"
    )
    print_table(
        rows,
        [
            "preset",
            "batch",
            "decode tok/s",
            "prefill tok/s",
            "gen tok/s",
            "no-cache tok/s",
            "x no-cache",
            "HF tok/s",
            "x HF",
            "peak frac",
            "KV bytes/slot",
        ],
    )
    if all(r["HF tok/s"] is None for r in rows):
        print("torch/transformers not installed (or --sampler_hf_batches empty): HF generate not timed")
    windows = [128, 256] if quick else [int(w) for w in FLAGS.sampler_windows]
    if windows:
        results["decode_by_window"] = _decode_by_window(presets, FLAGS.sampler_window_batch, windows, repeats)
    return results


def _decode_by_window(presets, batch: int, windows, repeats: int) -> list[dict]:
    """Milliseconds per decode step of ``batch`` busy slots whose attention reads ``window``
    cache entries (every slot's position just under it), and the KV cache bytes a step reads
    over that time: where the step's cost goes as contexts grow. Beside it, the floor: one
    jitted sum over as many bytes (a read at the machine's streaming rate) and the step's
    ratio to it."""
    import numpy as np
    from flax import nnx

    from jaxapr import engine, model

    rows, steps = [], 32
    for preset in presets:
        cfg = model.PRESETS[preset]
        policy = model.Transformer(cfg, rngs=nnx.Rngs(0))
        for window in windows:
            if window > cfg.max_len or window <= steps:
                continue
            eng = engine.Engine(policy, num_slots=batch, decode_buckets=[window])
            prompts = list(np.full((batch, window - steps - 1), 5, np.int32))  # the last step at window - 1

            def run():
                eng.release(range(batch))
                eng.insert(prompts, max_new_tokens=steps + 1)
                eng.wait()
                t0 = time.perf_counter()
                ran = int(eng.decode(steps))
                assert ran == steps and eng.attend_counts.most_common(1)[0][0] == window
                return time.perf_counter() - t0

            run()  # compiles
            ms = statistics.median(run() for _ in range(max(repeats, 2))) / steps * 1e3
            read = batch * model.cache_bytes_per_slot(cfg, window)
            floor = _read_ms(read, repeats)
            rows.append(
                {
                    "preset": preset,
                    "slots": batch,
                    "window": window,
                    "ms/step": ms,
                    "KV GB/s": read / ms / 1e6,
                    "read floor ms": floor,
                    "x floor": ms / floor,
                }
            )
    print(f"\nDecode steps by attention window ({steps} steps, every slot busy, median of runs)")
    print_table(rows, ["preset", "slots", "window", "ms/step", "KV GB/s", "read floor ms", "x floor"])
    return rows


def _read_ms(num_bytes: int, repeats: int) -> float:
    """Milliseconds of one jitted sum over ``num_bytes`` of float32 (median of runs): the time
    to stream that much memory once, a floor for a step that must read it."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((max(num_bytes // 4, 1),), jnp.float32)
    total = jax.jit(jnp.sum)
    return median_time(lambda: total(x).block_until_ready(), max(repeats, 3)) * 1e3


# ----------------------------------------------------------------------------------------
# runtime suite
# ----------------------------------------------------------------------------------------
def suite_runtime(quick: bool, repeats: int) -> dict:
    """APR vs SoS+ rollouts on ONE slot engine: the model (random weights; ``--runtime_preset``)
    runs every token, its outputs are forced to our solvers' traces (``ForcedEngine``), so the
    spawn/join structure is real while the compute per token is the model's. Spawn-heavy APR
    trees (spawn_prob 1); SoS+ traces of the same problems. APR runs with both join strategies
    (``join="reprefill"``, the default, and ``join="keep_slot"``) on the same engine, problems
    and script. Reports per run problems/s, generated tokens/s (real tokens only), slot
    utilization, host overhead and the prefill share, and keep_slot / reprefill ratios."""
    import jax
    import numpy as np
    from flax import nnx

    from envs import countdown
    from jaxapr import data, engine, model, runtime, traces
    from jaxapr.scripted_engine import ForcedEngine
    from jaxapr.tokenizer import CountdownTokenizer

    tok = CountdownTokenizer()
    num_slots, num_problems, num_numbers = (16, 32, 3) if quick else (32, 64, 4)
    num_slots = FLAGS.runtime_slots or num_slots
    num_problems = FLAGS.runtime_problems or num_problems
    preset = FLAGS.runtime_preset
    max_len, chunk = 1024, 16
    repeats = max(1, min(repeats, 9))
    numbers, targets = jax.device_get(
        countdown.generate_problems(
            jax.random.PRNGKey(0), num_problems, num_numbers=num_numbers, max_number=25, min_target=10, max_target=50
        )
    )
    problems = list(zip(numbers.tolist(), targets.tolist()))
    rng = random.Random(0)
    beams = [(rng.randint(1, 2), rng.randint(2, 3)) for _ in problems]  # traces that fit the 1024 context
    trees = [
        traces.apr(x, t, beam_size=b, sub_call_beam_size=sb, seed=k, spawn_prob=1.0)
        for k, ((x, t), (b, sb)) in enumerate(zip(problems, beams))
    ]
    sosp = [traces.sosp(x, t, beam_size=b, seed=k) for k, ((x, t), (b, _)) in enumerate(zip(problems, beams))]
    responses = {"apr": {}, "sosp": {}}
    for tree in trees:
        for prompt, output, _ in data.tree_calls(tree, is_root=True):
            responses["apr"][prompt] = output
    for (x, t), trace in zip(problems, sosp):
        head = traces.root_prompt(x, t, "sosp")
        assert trace.startswith(head)
        responses["sosp"][head] = trace[len(head) :]
    longest = max(len(tok.encode(p)) + len(tok.encode(o)) + 2 for r in responses.values() for p, o in r.items())
    assert longest <= max_len, f"a call of {longest} tokens does not fit the {max_len} context"

    cfg = model.PRESETS[preset]
    policy = model.Transformer(cfg, rngs=nnx.Rngs(0))
    batch_buckets, prefill_buckets = (1, 4, num_slots), (64, 128, 256, 512, max_len)
    eng = engine.Engine(
        policy, num_slots=num_slots, max_len=max_len, batch_buckets=batch_buckets, prefill_buckets=prefill_buckets
    )
    for b in batch_buckets:  # compile every (batch, length) bucket before timing
        for t in prefill_buckets:
            eng.insert([np.full(t - 1, 3, np.int32)] * b, max_new_tokens=1)
            eng.decode(1)
            eng.release(range(num_slots))
    eng.wait()
    problems_arr = (np.asarray(numbers), np.asarray(targets))
    configs = {"apr": ("apr", "reprefill"), "apr keep_slot": ("apr", "keep_slot"), "sosp": ("sosp", "reprefill")}
    runs = {name: [] for name in configs}

    def run(name):
        mode, join = configs[name]
        forced = ForcedEngine(eng, responses[mode])
        results = runtime.rollout(None, problems_arr, mode, engine=forced, decode_chunk=chunk, join=join)
        runs[name].append(results)

    for name in runs:  # warm up (extend buckets compile here) and check the replay
        run(name)
        for k, r in enumerate(runs[name][-1]):
            assert all(c.stopped == "eos" for c in r.calls)
            assert r.tree == trees[k].to_dict() if configs[name][0] == "apr" else r.text == sosp[k]
    for a, b in zip(runs["apr"][-1], runs["apr keep_slot"][-1]):  # same calls, same log-probs (float noise)
        assert (a.text, a.total_tokens, a.prompt_tokens) == (b.text, b.total_tokens, b.prompt_tokens)
        for ca, cb in zip(a.calls, b.calls):
            np.testing.assert_allclose(ca.logprobs, cb.logprobs, atol=1e-3)
    counted = ("prefill", "decode", "release")
    traces_before = dict(engine.TRACE_COUNTS)
    times = interleaved_medians({name: (lambda name=name: run(name)) for name in runs}, repeats)
    recompiles = {k: engine.TRACE_COUNTS[k] - traces_before.get(k, 0) for k in counted}

    out, rows = (
        {
            "preset": preset,
            "num_slots": num_slots,
            "problems": num_problems,
            "num_numbers": num_numbers,
            "max_len": max_len,
            "decode_chunk": chunk,
            "repeats": repeats,
            "recompiles_while_timed": recompiles,
            "modes": {},
        },
        [],
    )
    for name, all_runs in runs.items():
        timed = all_runs[2:]  # drop the replay check and interleaved_medians' warm-up call
        per_run = []
        for results in timed:
            sch = results[0].schedule
            gen = sum(r.total_tokens for r in results)
            assert gen == sch["generated_tokens"]
            per_run.append(
                {
                    "wall_s": sch["wall_s"],
                    "util": sch["useful_slot_steps"] / (num_slots * sch["steps"]),
                    "util_saturated": sch["useful_slot_steps_saturated"] / max(1, num_slots * sch["saturated_steps"]),
                    "saturated_share": sch["saturated_steps"] / sch["steps"],
                    "host": 1 - sch["device_s"] / sch["wall_s"],
                    "prefill_s": sch["prefill_s"],
                    "decode_s": sch["decode_s"],
                    "prefill_time_share": sch["prefill_s"] / sch["device_s"],
                    "decode_calls": sch["decode_calls"],
                    "steps": sch["steps"],
                }
            )
        med = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
        results = timed[-1]
        sch = results[0].schedule
        gen = sum(r.total_tokens for r in results)
        m = {
            "join": configs[name][1],
            "seconds": times[name],
            "problems_per_s": num_problems / times[name],
            "gen_tokens": gen,
            "gen_tokens_per_s": gen / times[name],
            "calls": sum(r.num_calls for r in results),
            "prefill_tokens": sch["prefill_tokens"],
            "prefill_token_share": sch["prefill_tokens"] / (sch["prefill_tokens"] + gen),
            "extend_calls": sch["extend_calls"],
            "reused_prefix_tokens": sch["reused_prefix_tokens"],
            "evictions": sch["evictions"],
            "held_slot_steps": sch["held_slot_steps"],
            "median_latency_steps": statistics.median(r.latency_steps for r in results),
            "solved": sum(r.success for r in results),
            **med,
        }
        out["modes"][name] = m
        rows.append(
            {
                "mode": name,
                "problems/s": m["problems_per_s"],
                "gen tok/s": m["gen_tokens_per_s"],
                "tokens": gen,
                "calls": m["calls"],
                "steps": int(m["steps"]),
                "chunks": int(m["decode_calls"]),
                "util": f"{m['util']:.1%}",
                "util (saturated)": f"{m['util_saturated']:.1%}",
                "saturated": f"{m['saturated_share']:.0%}",
                "host": f"{m['host']:.1%}",
                "prefill (time)": f"{m['prefill_time_share']:.1%}",
                "prefill (tokens)": f"{m['prefill_token_share']:.1%}",
            }
        )
    out["apr_over_sosp_tokens_per_s"] = (
        out["modes"]["apr"]["gen_tokens_per_s"] / out["modes"]["sosp"]["gen_tokens_per_s"]
    )
    re, keep = out["modes"]["apr"], out["modes"]["apr keep_slot"]
    ratio_keys = {
        "wall s": "seconds",
        "decode steps": "steps",
        "prefill tokens": "prefill_tokens",
        "prefill s (blocked)": "prefill_s",
        "decode s (blocked)": "decode_s",
        "slot util": "util",
        "median latency steps": "median_latency_steps",
    }
    out["keep_slot_over_reprefill"] = {k: keep[v] / re[v] if re[v] else None for k, v in ratio_keys.items()}
    join_rows = []
    for name, m in (
        ("reprefill", re),
        ("keep_slot", keep),
        ("keep / reprefill", {v: out["keep_slot_over_reprefill"][k] for k, v in ratio_keys.items()}),
    ):
        join_rows.append(
            {
                "join": name,
                **{k: m[v] for k, v in ratio_keys.items()},
                "extends": m.get("extend_calls"),
                "evictions": m.get("evictions"),
            }
        )
    print(
        f"\nRuntime: {preset} preset (random weights), one engine of {num_slots} slots, context {max_len}, decode "
        f"chunk {chunk}; {num_problems} problems ({num_numbers} numbers in 1..25, targets 10..50); outputs forced "
        f"to solver traces (APR spawn_prob 1, SoS+ same problems); medians of {repeats} interleaved runs"
    )
    print_table(
        rows,
        [
            "mode",
            "problems/s",
            "gen tok/s",
            "tokens",
            "calls",
            "steps",
            "chunks",
            "util",
            "util (saturated)",
            "saturated",
            "host",
            "prefill (time)",
            "prefill (tokens)",
        ],
    )
    print(
        f"apr / sosp generated tokens/s: {out['apr_over_sosp_tokens_per_s']:.2f}; re-traces while timed: {recompiles}"
    )
    print(
        "util = sum over calls of (tokens - 1) / (slots x decode steps) (a call's first token comes from its "
        "prefill); saturated = steps in chunks that began with calls queued; host = 1 - time blocked on the "
        "device / wall; prefill (time) = blocked in prefill / all blocked"
    )
    print(
        f"\nAPR join strategies, same engine, problems and script ({keep['extend_calls']} of "
        f"{keep['extend_calls'] + keep['evictions']} joins extended a kept slot, {keep['evictions']} parents evicted)"
    )
    print_table(join_rows, ["join", *ratio_keys, "extends", "evictions"])
    out["join_kernels"] = _join_kernels(eng, runs["apr"][-1], repeats)
    jk = out["join_kernels"]
    print(
        f"\nPrefill of each APR join context alone (one slot, {jk['joins']} joins of this run, medians of "
        f"{jk['repeats']} interleaved repeats): whole prompt (insert, reprefill) {jk['insert_s'] * 1e3:,.1f} ms for "
        f"{jk['insert_tokens']:,} tokens vs suffix only (extend, keep_slot) {jk['extend_s'] * 1e3:,.1f} ms for "
        f"{jk['extend_tokens']:,} tokens: ratio {jk['extend_over_insert']:.2f}"
    )
    return out


def _join_kernels(eng, results, repeats: int) -> dict:
    """The prefill work of each APR join of ``results`` alone, both ways, on one slot of
    ``eng``: ``insert`` of the whole join prompt (reprefill) against ``extend`` of what follows
    the prefix the parent's slot holds (keep_slot), timed interleaved; the slot is set up
    untimed (an extend's slot holds the kept prefix)."""
    import numpy as np

    from jaxapr import runtime

    pairs = []
    for r in results:
        by_text = {c.text: c for c in r.calls}

        def walk(tree):
            calls = [by_text[t] for t in tree["main_calls"]]
            for prev, call in itertools.pairwise(calls):
                held = np.concatenate([prev.prompt_tokens, prev.output_tokens])
                pairs.append((call.prompt_tokens, runtime.reusable_prefix(held, call.prompt_tokens)))
            for children in tree["sub_calls"]:
                for child in children:
                    walk(child)

        walk(r.tree)

    def setup(prompt, start, kind):
        eng.release(range(eng.num_slots))
        if kind == "extend":
            eng.insert([prompt[: max(start, 1)]], [0], max_new_tokens=1)
        eng.wait()

    def op(prompt, start, kind):
        if kind == "insert":
            eng.insert([prompt], [0], max_new_tokens=1)
        else:
            eng.extend([0], [prompt[start:]], [start], max_new_tokens=1)
        eng.wait()

    times = {"insert": [[] for _ in pairs], "extend": [[] for _ in pairs]}
    for rep in range(repeats + 1):  # the first pass compiles any missing bucket
        for i, (prompt, start) in enumerate(pairs):
            for kind in times:
                setup(prompt, start, kind)
                t0 = time.perf_counter()
                op(prompt, start, kind)
                if rep:
                    times[kind][i].append(time.perf_counter() - t0)
    eng.release(range(eng.num_slots))
    med = {kind: sum(statistics.median(ts) for ts in per) for kind, per in times.items()}
    return {
        "joins": len(pairs),
        "repeats": repeats,
        "insert_s": med["insert"],
        "extend_s": med["extend"],
        "insert_tokens": int(sum(len(p) for p, _ in pairs)),
        "extend_tokens": int(sum(len(p) - s for p, s in pairs)),
        "extend_over_insert": med["extend"] / med["insert"] if med["insert"] else None,
    }


def suite_train(quick: bool, repeats: int) -> dict:
    from experiments.bench_train import suite_train as run

    return run(
        quick,
        repeats,
        presets=FLAGS.train_presets,
        grpo=FLAGS.train_grpo,
        policy_path=FLAGS.grpo_policy,
        data_dir=FLAGS.grpo_data_dir,
        num_problems=FLAGS.grpo_problems,
        group_size=FLAGS.grpo_group,
        context=FLAGS.grpo_context,
    )


def suite_quickstart(quick: bool, repeats: int) -> dict:
    del repeats  # one run: the quickstart is minutes long
    if FLAGS.quickstart_json:
        with open(FLAGS.quickstart_json) as f:
            out = json.load(f)
    else:
        import tempfile

        from experiments import cli, quickstart

        cli.quiet_logs()  # as the quickstart's own command line: orbax logs several lines per save
        kw = dict(problems=16, scratch_steps=2, rl_steps=1, progress=False) if quick else dict(progress=False)
        os.makedirs(FLAGS.quickstart_workdir, exist_ok=True)
        out = quickstart.run(tempfile.mkdtemp(prefix="run_", dir=FLAGS.quickstart_workdir), **kw)
    stages = quickstart_stages(out)
    base = None
    if FLAGS.baseline_json:
        with open(FLAGS.baseline_json) as f:
            base = quickstart_stages(json.load(f))
    rows = []
    for name, row in stages.items():
        b = (base or {}).get(name, {})
        rows.append(
            {
                "stage": name,
                "seconds": row["seconds"],
                "baseline s": b.get("seconds"),
                "speed-up": f"{b['seconds'] / row['seconds']:.2f}x" if b.get("seconds") else None,
                "eval tok/s": row.get("tokens_per_s"),
                "baseline tok/s": b.get("tokens_per_s"),
            }
        )
    print_table(rows, ["stage", "seconds", "baseline s", "speed-up", "eval tok/s", "baseline tok/s"])
    return {"stages": stages, "baseline": base}


SUITES = {
    "env": suite_env,
    "datagen": suite_datagen,
    "sampler": suite_sampler,
    "runtime": suite_runtime,
    "train": suite_train,
    "quickstart": suite_quickstart,
}


def _check_flags() -> None:
    """One-line errors before anything runs."""
    if FLAGS.grpo_policy:
        if not os.path.exists(FLAGS.grpo_policy):
            raise ValueError(f"--grpo_policy={FLAGS.grpo_policy!r} does not exist: expected a run or an exported .npz")
        if not FLAGS.grpo_data_dir or not os.path.isdir(os.path.join(FLAGS.grpo_data_dir, "problems")):
            raise ValueError(
                f"--grpo_data_dir={FLAGS.grpo_data_dir!r}: expected the policy's gen_data output "
                "(a directory with problems/)"
            )
    from experiments.bench_train import SFT_SHAPES
    from jaxapr.model import PRESETS

    for name, allowed in (("sampler_presets", PRESETS), ("train_presets", SFT_SHAPES)):
        bad = [p for p in getattr(FLAGS, name) if p not in allowed]
        if bad:
            raise ValueError(f"--{name}: unknown preset {bad[0]!r}: expected some of {sorted(allowed)}")
    for name in ("sampler_batches", "sampler_hf_batches", "sampler_windows"):
        for b in getattr(FLAGS, name) or []:
            if not b.isdigit() or int(b) < 1:
                raise ValueError(f"--{name}: {b!r} is not a positive int")
    for name in ("quickstart_json", "baseline_json"):
        path = getattr(FLAGS, name)
        if path and not os.path.isfile(path):
            raise ValueError(f"--{name}={path!r} does not exist: expected a quickstart.json")
    for name in ("grpo_problems", "grpo_group", "grpo_context"):
        value = getattr(FLAGS, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}={value}: expected a positive int")
    if FLAGS.suite == "quickstart" and not FLAGS.quickstart_json:
        path = FLAGS.quickstart_workdir
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"--quickstart_workdir={path!r}: cannot be created ({e.strerror}): expected a writable directory"
            ) from None
        if not os.access(path, os.W_OK):
            raise ValueError(f"--quickstart_workdir={path!r} is not writable: expected a writable directory")


def _run_at_commit(rev: str) -> dict:
    """This invocation's suite and flags at git revision ``rev`` (in a temporary worktree, in a
    subprocess) -> its results JSON."""
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sha = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=root, capture_output=True, text=True)
    if sha.returncode:
        raise ValueError(f"--baseline_commit={rev!r}: not a commit of this repository ({sha.stderr.strip()})")
    sha = sha.stdout.strip()
    tmp = tempfile.mkdtemp(prefix="jaxapr_bench_base_")
    tree, out = os.path.join(tmp, "tree"), os.path.join(tmp, "results.json")
    subprocess.run(["git", "worktree", "add", "--detach", tree, sha], cwd=root, check=True, capture_output=True)
    try:
        skip = ("--baseline_commit", "--out")
        argv = [a for a in sys.argv[1:] if not a.startswith(skip)] + [f"--out={out}"]
        print(f"baseline: {rev} = {sha[:10]}: python -m experiments.bench {' '.join(argv)}", flush=True)
        env = dict(os.environ, PYTHONPATH=tree)
        proc = subprocess.run([sys.executable, "-m", "experiments.bench", *argv], cwd=tree, env=env)
        if proc.returncode or not os.path.isfile(out):
            raise RuntimeError(f"the baseline run at {rev} failed (exit {proc.returncode})")
        with open(out) as f:
            base = json.load(f)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=root, capture_output=True)
    base["commit"] = sha
    return base


def _figures(tree, path: str = "") -> dict:
    """Every number in a results tree by a readable path; a list of row dicts is keyed by each
    row's text fields and its batch / slot / problem counts."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_figures(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            label = str(i)
            if isinstance(v, dict):
                ids = [
                    f"{k}={x}" for k, x in v.items() if isinstance(x, str) or k in ("batch", "num_slots", "problems")
                ]
                label = ",".join(ids) or label
            out.update(_figures(v, f"{path}[{label}]"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[path] = float(tree)
    return out


def compare(base: dict, new: dict) -> list[dict]:
    """Rows (figure, baseline, new, new / baseline) for the figures both results hold."""
    old, now = _figures(base), _figures(new)
    return [
        {"figure": k, "baseline": old[k], "new": now[k], "new / baseline": now[k] / old[k] if old[k] else None}
        for k in now
        if k in old
    ]


def main(argv):
    del argv
    try:
        _check_flags()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    t0 = time.time()
    base = None
    if FLAGS.baseline_commit:  # before this process touches JAX: a bad revision is one line on stderr
        try:
            base = _run_at_commit(FLAGS.baseline_commit)
        except (ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    results = {"suite": FLAGS.suite, "quick": FLAGS.quick, "machine": machine()}
    results["results"] = SUITES[FLAGS.suite](FLAGS.quick, FLAGS.repeats if not FLAGS.quick else 1)
    results["wall_s"] = time.time() - t0
    if base is not None:
        rows = compare(base["results"], results["results"])
        results["baseline"] = {"commit": base["commit"], "results": base["results"], "comparison": rows}
        print(f"\nthis tree vs {FLAGS.baseline_commit} ({base['commit'][:10]}), run one after the other:")
        print_table(rows, ["figure", "baseline", "new", "new / baseline"])
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
