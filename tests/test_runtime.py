"""The APR runtime, driven by a scripted engine (exact replay) and by a random tiny policy."""

import itertools

import jax
import numpy as np
import pytest

from envs import countdown
from jaxapr import data, runtime, traces
from jaxapr.scripted_engine import ForcedEngine, ScriptedEngine
from jaxapr.tokenizer import CountdownTokenizer

TOK = CountdownTokenizer()
BIG = 1 << 15  # replay contexts: some fixture calls are longer than 4096 of our tokens


def responses_of(trees):
    out = {}
    for tree in trees:
        for prompt, output, _ in data.tree_calls(traces.CallTree.from_dict(tree), is_root=True):
            assert out.setdefault(prompt, output) == output  # no conflicting prompts
    return out


def problems_of(rows):
    return np.array([r["nums"] for r in rows]), np.array([r["target"] for r in rows])


@pytest.mark.parametrize("num_slots", [1, 2, 7, 64])
def test_replay_rebuilds_every_fixture_tree(fixture_rows, num_slots):
    responses = responses_of(r["apr"]["tree"] for r in fixture_rows)
    for n in (3, 4):
        rows = [r for r in fixture_rows if len(r["nums"]) == n]
        eng = ScriptedEngine(responses, num_slots=num_slots, max_len=BIG)
        results = runtime.rollout(None, problems_of(rows), "apr", engine=eng, decode_chunk=5)
        for row, res in zip(rows, results):
            assert res.tree == row["apr"]["tree"], row["id"]
            final = row["apr"]["tree"]["main_calls"][-1]
            assert res.text == final
            assert res.success == traces.verify(final, row["nums"], row["target"]).success
        assert set(eng.inserted) <= set(responses)  # every prompt it was asked is a reference prompt


def test_replay_of_our_depth_2_and_3_trees():
    numbers, targets = countdown.generate_problems(
        jax.random.PRNGKey(5), 40, num_numbers=5, max_number=30, min_target=10, max_target=60
    )
    trees = [
        traces.apr(x, t, beam_size=3, sub_call_beam_size=3, seed=k, max_depth=3, spawn_prob=1.0).to_dict()
        for k, (x, t) in enumerate(zip(np.asarray(numbers).tolist(), np.asarray(targets).tolist()))
    ]
    deep = sum("at level 2>" in c for tree in trees for c in _all_texts(tree))
    assert deep > 0
    for slots in (3, 16):
        results = runtime.rollout(
            None, (numbers, targets), "apr", engine=ScriptedEngine(responses_of(trees), slots, BIG), max_depth=3
        )
        for tree, res in zip(trees, results):
            assert res.tree == tree
    # With max_depth=1 a child's spawn ends the child: the trees differ exactly there.
    shallow = runtime.rollout(None, (numbers, targets), "apr", engine=ScriptedEngine(responses_of(trees), 8, BIG))
    assert any(r.tree != t for r, t in zip(shallow, trees))


def _all_texts(tree):
    yield from tree["main_calls"]
    for children in tree["sub_calls"]:
        for child in children:
            yield from _all_texts(child)


def _outputs(tree):
    """Output texts of one thread's calls (prompt = two lines, or the join context)."""
    outs = []
    for k, call in enumerate(tree["main_calls"]):
        if k == 0:
            cut = len("".join(call.split("\n")[:2])) + 2
        else:
            finals = [c["main_calls"][-1] for c in tree["sub_calls"][k - 1]]
            cut = len(traces.join(tree["main_calls"][k - 1], finals))
        outs.append(call[cut:])
    return outs


def _seq(tree):
    own = sum(len(TOK.encode(o)) + 1 for o in _outputs(tree))
    return own + sum(max(_seq(c) for c in children) for children in tree["sub_calls"] if children)


def test_metrics_by_hand():
    # Root: one spawn of two children, then the root's continuation call.
    nums, target = [4, 23, 59, 44], 47
    tree = traces.apr(nums, target, beam_size=2, sub_call_beam_size=2, seed=3, spawn_prob=1.0).to_dict()
    assert len(tree["main_calls"]) == 2 and len(tree["sub_calls"][0]) == 2
    eng = ScriptedEngine(responses_of([tree]), num_slots=4, max_len=BIG)
    (res,) = runtime.rollout(None, (np.array([nums]), np.array([target])), "apr", engine=eng, decode_chunk=1)
    root_len = [len(TOK.encode(o)) + 1 for o in _outputs(tree)]  # + EOS
    child_len = [
        len(TOK.encode(c["main_calls"][0][len(p) :])) + 1
        for c, p in zip(tree["sub_calls"][0], traces.child_prompts(tree["main_calls"][0]))
    ]
    assert res.total_tokens == sum(root_len) + sum(child_len)
    assert res.sequential_tokens == sum(root_len) + max(child_len) == _seq(tree)
    assert res.num_children == 2 and res.num_spawns == 1 and res.num_calls == 4
    # Each call's first token comes with its prefill; decode_chunk=1 schedules step by step.
    assert res.latency_steps == (root_len[0] - 1) + (max(child_len) - 1) + (root_len[1] - 1)
    prompts = [c.prompt for c in res.calls]
    assert prompts[0] == traces.root_prompt(nums, target) and prompts[1:3] == traces.child_prompts(
        tree["main_calls"][0]
    )
    assert res.prompt_tokens == sum(len(TOK.encode(p)) + 1 for p in prompts)
    assert all(len(c.logprobs) == len(c.output_tokens) for c in res.calls)
    assert res.success == traces.verify(tree["main_calls"][-1], nums, target).success


def test_latency_is_the_critical_path_whatever_the_slot_count():
    """Latency counts the critical path's decode steps with children in parallel: the same
    with 2 slots (children queue) as with 64 (all run at once); the pool's steps differ."""
    numbers, targets = countdown.generate_problems(
        jax.random.PRNGKey(5), 6, num_numbers=4, max_number=10, min_target=5, max_target=25
    )
    trees = [
        traces.apr(x, t, beam_size=4, sub_call_beam_size=2, seed=k, spawn_prob=1.0).to_dict()
        for k, (x, t) in enumerate(zip(np.asarray(numbers).tolist(), np.asarray(targets).tolist()))
    ]
    assert sum(len(t["sub_calls"][0]) for t in trees if t["sub_calls"]) >= 12
    runs = {
        slots: runtime.rollout(
            None,
            (numbers, targets),
            "apr",
            decode_chunk=4,
            engine=ScriptedEngine(responses_of(trees), num_slots=slots, max_len=BIG),
        )
        for slots in (2, 64)
    }
    for few, many, tree in zip(runs[2], runs[64], trees):
        assert few.latency_steps == many.latency_steps and few.sequential_tokens == many.sequential_tokens
        # One thread's calls in a row, the longest child per spawn: tokens minus one per call on that path.
        calls_on_path = len(tree["main_calls"]) + sum(1 for block in tree["sub_calls"] if block)
        assert many.latency_steps == many.sequential_tokens - calls_on_path
    assert runs[2][0].schedule["steps"] > runs[64][0].schedule["steps"]


def test_sosp_mode_replays_fixture_traces(fixture_rows):
    rows = [r for r in fixture_rows if len(r["nums"]) == 4][:40]
    responses = {}
    for r in rows:
        trace = r["sosp"]["trace"]
        head = trace.index("\n") + 1
        responses[trace[:head]] = trace[head:]
    results = runtime.rollout(None, problems_of(rows), "sosp", engine=ScriptedEngine(responses, 5, BIG))
    for r, res in zip(rows, results):
        assert res.text == r["sosp"]["trace"] and res.num_children == 0 and res.num_calls == 1
        assert res.success == traces.verify(r["sosp"]["trace"], r["nums"], r["target"]).success


def test_sampling_modes_vote_and_choose():
    nums, target = [3, 5], 8
    good = "Exploring Operation: 3+5=8, Resulting Numbers: [8]\n8,8 equal: Goal Reached\n"
    claim_good = good + "Moving to Node #0\n" + good
    claim_bad = good.replace("3+5=8", "5-3=2").replace("[8]", "[2]").replace("8,8 equal", "2,2 equal")
    claim_bad = claim_bad + "Moving to Node #0\n" + good.replace("3+5=8", "3*5=8")  # wrong arithmetic
    answers = itertools.cycle([claim_bad, claim_good, claim_bad, "No solution found.\n"])
    eng = ScriptedEngine(lambda prompt: next(answers), num_slots=2, max_len=BIG)
    key = jax.random.key(0)
    probs = (np.array([nums]), np.array([target]))
    (passed,) = runtime.rollout(None, probs, "pass@4", engine=eng, temperature=1.0, key=key)
    assert passed.success and len(passed.samples) == 4
    assert passed.total_tokens == sum(s.total_tokens for s in passed.samples)
    (voted,) = runtime.rollout(None, probs, "cons@4", engine=eng, temperature=1.0, key=key)
    assert not voted.success  # the wrong claim has two votes
    assert runtime.claimed_answer(claim_good) == ("3+5=8",)
    assert runtime.claimed_answer("No solution found.\n") is None
    with pytest.raises(ValueError, match="expected temperature > 0"):
        runtime.rollout(None, probs, "cons@4", engine=eng)
    # the first k samples of one pass@4 rollout answer pass@k / cons@k for every k <= 4
    (drawn,) = runtime.rollout(None, probs, "pass@4", engine=eng, temperature=1.0, key=key)
    outputs = [s.text.split("\n", 1)[1] for s in drawn.samples]  # after the prompt's state line
    assert outputs == [claim_bad, claim_good, claim_bad, "No solution found.\n"]  # the cycle, in order
    wins = [runtime.first_samples(drawn, f"pass@{k}").success for k in range(1, 5)]
    assert wins == [False, True, True, True]
    votes = [runtime.first_samples(drawn, f"cons@{k}").success for k in range(1, 5)]
    assert votes == [False, False, False, False]  # a tie at k=2 goes to the first claim: the bad one
    assert runtime.first_samples(drawn, "pass@2").total_tokens == sum(s.total_tokens for s in drawn.samples[:2])
    assert not runtime.first_samples(drawn, "pass@1").samples[0].success
    with pytest.raises(ValueError, match="needs 5 samples; the result has 4"):
        runtime.first_samples(drawn, "pass@5")
    with pytest.raises(ValueError, match="expected 'pass@k', 'cons@k' or 'best-of-k'"):
        runtime.first_samples(drawn, "sosp")
    from jaxapr import evaluation

    for modes in ([], ["pass@2", "apr"]):  # refused before anything is rolled out
        with pytest.raises(ValueError, match="expected sampled modes 'pass@k', 'cons@k' or 'best-of-k'"):
            evaluation.sampled_metrics(
                None, probs, modes=modes, max_context=BIG, num_slots=2, temperature=1.0, key=key, engine=eng
            )
    shared = evaluation.sampled_metrics(
        None,
        probs,
        modes=["pass@1", "pass@2", "cons@2"],
        max_context=BIG,
        num_slots=2,
        temperature=1.0,
        key=key,
        engine=eng,
    )
    assert shared["pass@1"]["seconds"] == shared["cons@2"]["seconds"]  # one rollout answered every mode
    with pytest.raises(ValueError, match="mode='apr@3'"):
        runtime.rollout(None, probs, "apr@3", engine=eng)


def _spawning_root(nums, target, children):
    """A root call that expands the root and spawns ``children`` of its generated nodes."""
    lines = []
    for k, m in enumerate(countdown.moves(list(nums))):
        if k == children:
            break
        lines.append(f"Exploring Operation: {m.text}, Resulting Numbers: {m.numbers}")
        lines.append(f"Generated Node #0,{k}: {target}:{m.numbers} Operation: {m.text}")
    block = ["<Calling Sub Searches>"] + [
        f"<Start Sub Search {k} at level 1> Moving to Node #0,{k}" for k in range(children)
    ]
    return "\n".join(lines + block + ["<End Calling Sub Searches>"]) + "\n"


@pytest.mark.parametrize(
    "output",
    [
        "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n",  # unclosed
        "<Calling Sub Searches>\n<End Calling Sub Searches>\n",  # no children
        "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,9\n<End Calling Sub Searches>\n",  # unknown node
        "\x00\x01 garbage \ud800 Goal Reached Goal Reached",
        "",
    ],
)
def test_malformed_outputs_end_cleanly_not_solved(output):
    eng = ScriptedEngine(lambda prompt: output, num_slots=3, max_len=BIG)
    (res,) = runtime.rollout(None, (np.array([[2, 3, 4]]), np.array([9])), "apr", engine=eng)
    assert not res.success and res.reason and res.num_children == 0


def test_caps_on_children_tokens_and_context():
    nums, target = [4, 23, 59, 44], 47
    root = _spawning_root(nums, target, 5)
    child = "No solution found.\n"
    answers = lambda p: "" if "<Sub Searches>" in p else (root if p.startswith("Moving to Node #0\n") else child)
    (res,) = runtime.rollout(
        None, (np.array([nums]), np.array([target])), "apr", engine=ScriptedEngine(answers, 2, BIG), max_children=3
    )
    assert res.num_children == 3 and res.num_spawns == 1
    assert res.tree["main_calls"][1].count("<No Solution in Sub Search") == 5  # capped ones join as no solution
    # A total-token cap stops the problem: no children run.
    root_tokens = len(TOK.encode(root)) + 1
    (capped,) = runtime.rollout(
        None,
        (np.array([nums]), np.array([target])),
        "apr",
        engine=ScriptedEngine(answers, 2, BIG),
        max_total_tokens=root_tokens,
    )
    assert capped.total_tokens == root_tokens and capped.num_calls >= 1 and not capped.success
    # A per-call context window truncates a call at the window.
    (short,) = runtime.rollout(
        None, (np.array([nums]), np.array([target])), "apr", engine=ScriptedEngine(answers, 2, BIG), max_context=40
    )
    assert (
        short.calls[0].stopped == "length"
        and len(short.calls[0].prompt_tokens) + len(short.calls[0].output_tokens) == 40
    )
    assert short.num_children == 0 and not short.success


def test_bad_arguments():
    probs = (np.array([[1, 2]]), np.array([3]))
    eng = ScriptedEngine({}, 1)
    with pytest.raises(ValueError, match="mode='fast'"):
        runtime.rollout(None, probs, "fast", engine=eng)
    with pytest.raises(ValueError, match="problems shapes"):
        runtime.rollout(None, (np.array([1, 2]), np.array([3])), engine=eng)
    with pytest.raises(ValueError, match="needs key"):
        runtime.rollout(None, probs, engine=eng, temperature=1.0)
    with pytest.raises(ValueError, match="needs a policy or an engine"):
        runtime.rollout(None, probs)
    with pytest.raises(ValueError, match="join='keep'"):
        runtime.rollout(None, probs, engine=eng, join="keep")

    class NoExtend:  # the engine interface without extend
        num_slots, max_len = 1, 64

    with pytest.raises(ValueError, match="join='keep_slot' needs an engine with an extend"):
        runtime.rollout(None, probs, engine=NoExtend(), join="keep_slot")


def test_random_tiny_policy_rollouts_finish_and_report():
    from flax import nnx

    from jaxapr import engine, model

    cfg = model.ModelConfig(
        d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64, max_len=128, tie_embeddings=False
    )
    policy = model.Transformer(cfg, rngs=nnx.Rngs(0))
    numbers, targets = countdown.generate_problems(jax.random.PRNGKey(0), 6, num_numbers=3)
    eng = engine.Engine(policy, num_slots=4, max_len=128)
    for mode in ("apr", "sosp", "pass@2"):
        results = runtime.rollout(
            None, (numbers, targets), mode, engine=eng, temperature=1.0, key=jax.random.key(1), decode_chunk=16
        )
        assert len(results) == 6 and not any(r.success for r in results)
        for r in results:
            assert r.reason and r.total_tokens > 0 and r.calls[0].stopped in ("eos", "length")
            for c in r.calls:
                assert len(c.logprobs) == len(c.output_tokens) and (c.logprobs <= 0).all()
                assert len(c.prompt_tokens) + len(c.output_tokens) <= 128
    # Same key, same samples, whatever the slot count.
    again = runtime.rollout(
        policy, (numbers, targets), "apr", temperature=1.0, key=jax.random.key(1), num_slots=2, max_context=128
    )
    first = runtime.rollout(None, (numbers, targets), "apr", engine=eng, temperature=1.0, key=jax.random.key(1))
    assert [r.text for r in again] == [r.text for r in first]
    # Split over "processes" (every 2nd problem) with global problem_ids: the same samples.
    for mode in ("apr", "pass@2"):
        whole = runtime.rollout(None, (numbers, targets), mode, engine=eng, temperature=1.0, key=jax.random.key(1))
        parts = [
            runtime.rollout(
                None,
                (numbers[p::2], targets[p::2]),
                mode,
                engine=eng,
                temperature=1.0,
                key=jax.random.key(1),
                problem_ids=np.arange(6)[p::2],
            )
            for p in range(2)
        ]
        assert [r.text for r in parts[0]] == [r.text for r in whole[0::2]]
        assert [[s.text for s in r.samples] for r in parts[1]] == [[s.text for s in r.samples] for r in whole[1::2]]
        unshifted = runtime.rollout(
            None, (numbers[1::2], targets[1::2]), mode, engine=eng, temperature=1.0, key=jax.random.key(1)
        )
        assert [r.text for r in unshifted] != [r.text for r in parts[1]]  # the ids do move the keys
    with pytest.raises(ValueError, match="problem_ids of shape \\(2,\\): expected 6 non-negative ints"):
        runtime.rollout(
            None, (numbers, targets), "apr", engine=eng, temperature=1.0, key=jax.random.key(1), problem_ids=[0, 1]
        )


def test_forced_engine_rebuilds_scripted_trees():
    from flax import nnx

    from jaxapr import engine, model

    cfg = model.ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64, max_len=512)
    numbers, targets = countdown.generate_problems(
        jax.random.PRNGKey(2), 4, num_numbers=3, max_number=25, min_target=10, max_target=50
    )
    trees = [
        traces.apr(x, t, beam_size=2, sub_call_beam_size=2, seed=k, spawn_prob=1.0).to_dict()
        for k, (x, t) in enumerate(zip(np.asarray(numbers).tolist(), np.asarray(targets).tolist()))
    ]
    assert any(tree["sub_calls"] for tree in trees)
    responses = responses_of(trees)
    scripted = runtime.rollout(
        None, (numbers, targets), "apr", engine=ScriptedEngine(responses, 3, 512), decode_chunk=8
    )
    forced_eng = ForcedEngine(
        engine.Engine(model.Transformer(cfg, rngs=nnx.Rngs(0)), num_slots=3, max_len=512), responses
    )
    forced = runtime.rollout(None, (numbers, targets), "apr", engine=forced_eng, decode_chunk=8)
    for tree, s, f in zip(trees, scripted, forced):
        assert f.tree == s.tree == tree
        assert (f.total_tokens, f.prompt_tokens, f.num_calls, f.success, f.latency_steps) == (
            s.total_tokens,
            s.prompt_tokens,
            s.num_calls,
            s.success,
            s.latency_steps,
        )
        for call in f.calls:  # real log-probs of the forced tokens
            assert len(call.logprobs) == len(call.output_tokens) and (call.logprobs < 0).all()
    sched = forced[0].schedule
    assert sched["steps"] == scripted[0].schedule["steps"] > 0 and 0 < sched["device_s"] < sched["wall_s"]
    assert sched["useful_slot_steps"] == sum(len(c.output_tokens) - 1 for r in forced for c in r.calls)
    assert sched["useful_slot_steps"] <= 3 * sched["steps"]
    # the engine's read accounting, per batch: decode read whole windows, at least the prefixes
    # the calls hold (every generated token attended to its call's prefix); a scripted engine
    # reads nothing and reports nothing
    window, prefix = sched["attention_window_entries"], sched["attention_prefix_entries"]
    ran = sum((len(c.output_tokens) - 1) * (len(c.prompt_tokens) + 1) for r in forced for c in r.calls)
    assert 0 < ran <= prefix <= window
    assert window <= sched["decode_calls"] * 8 * 3 * 512
    again = runtime.rollout(None, (numbers, targets), "apr", engine=forced_eng, decode_chunk=8)[0].schedule
    assert (again["attention_window_entries"], again["attention_prefix_entries"]) == (window, prefix)
    assert "attention_window_entries" not in scripted[0].schedule


# ----------------------------------------------------------------------------------------
# join="keep_slot": a waiting parent keeps its slot; its join extends the slot's cache
def _by_join(run):
    return {join: run(join) for join in ("reprefill", "keep_slot")}


@pytest.mark.parametrize("num_slots", [1, 3, 256])
def test_keep_slot_replays_fixture_trees_like_reprefill(fixture_rows, num_slots):
    responses = responses_of(r["apr"]["tree"] for r in fixture_rows)
    for n in (3, 4):
        rows = [r for r in fixture_rows if len(r["nums"]) == n]
        engines = {}

        def run(join):
            engines[join] = ScriptedEngine(responses, num_slots=num_slots, max_len=BIG)
            return runtime.rollout(None, problems_of(rows), "apr", engine=engines[join], decode_chunk=16, join=join)

        res = _by_join(run)
        for row, a, b in zip(rows, res["reprefill"], res["keep_slot"]):
            assert a.tree == b.tree == row["apr"]["tree"], row["id"]
            assert (a.text, a.success, a.reason, a.total_tokens, a.prompt_tokens, a.sequential_tokens) == (
                b.text,
                b.success,
                b.reason,
                b.total_tokens,
                b.prompt_tokens,
                b.sequential_tokens,
            )
        re, keep = res["reprefill"][0].schedule, res["keep_slot"][0].schedule
        # every prompt token is either prefilled or reused from the kept cache
        assert keep["prefill_tokens"] + keep["reused_prefix_tokens"] == re["prefill_tokens"]
        assert re["extend_calls"] == re["evictions"] == re["reused_prefix_tokens"] == 0
        assert keep["steps"] == re["steps"]  # a held slot never keeps a queued call out
        assert engines["keep_slot"].free_slots() == list(range(num_slots))  # nothing left held
        assert sorted(engines["keep_slot"].inserted) == sorted(engines["reprefill"].inserted)
        if num_slots == 1:  # the one slot's parent must give it up to its children: all evicted
            assert keep["extend_calls"] == 0 and keep["evictions"] > 0
        if num_slots == 256:
            assert keep["extend_calls"] > 0 and keep["prefill_tokens"] < 0.8 * re["prefill_tokens"]
        if n == 4 and num_slots == 256:  # 150 problems: demand exceeds 256 slots at times, both happen
            assert keep["evictions"] > 0


def test_keep_slot_greedy_equals_reprefill_on_a_real_engine():
    """Roots and children are forced to scripted text; every join context is decoded freely
    (greedy) by a random tiny model: after an extend and after a full prefill alike. Six
    problems on 16 slots: six parents held and twelve children queued, so some parents are
    evicted and the others extend their slots."""
    from flax import nnx

    from jaxapr import engine, model

    cfg = model.ModelConfig(
        d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64, max_len=256, tie_embeddings=False
    )
    policy = model.Transformer(cfg, rngs=nnx.Rngs(3))
    numbers, targets = countdown.generate_problems(
        jax.random.PRNGKey(2), 6, num_numbers=3, max_number=25, min_target=10, max_target=50
    )
    trees = [
        traces.apr(x, t, beam_size=2, sub_call_beam_size=2, seed=k, spawn_prob=1.0).to_dict()
        for k, (x, t) in enumerate(zip(np.asarray(numbers).tolist(), np.asarray(targets).tolist()))
    ]
    responses = responses_of(trees)
    script = lambda prompt: None if "<Sub Searches>" in prompt else responses.get(prompt, "")
    eng = engine.Engine(policy, num_slots=16, max_len=256, prefill_buckets=(64, 256), batch_buckets=(16,))
    res = _by_join(
        lambda join: runtime.rollout(
            None, (numbers, targets), "apr", engine=ForcedEngine(eng, script), decode_chunk=32, join=join
        )
    )
    for tree, a, b in zip(trees, res["reprefill"], res["keep_slot"]):
        assert a.tree["sub_calls"] == tree["sub_calls"] and len(a.calls) == len(b.calls) > 1
        assert (a.text, a.success, a.total_tokens) == (b.text, b.success, b.total_tokens)
        for ca, cb in zip(a.calls, b.calls):
            np.testing.assert_array_equal(ca.prompt_tokens, cb.prompt_tokens)
            np.testing.assert_array_equal(ca.output_tokens, cb.output_tokens)
            np.testing.assert_allclose(ca.logprobs, cb.logprobs, atol=1e-4)
    joins = [c for r in res["keep_slot"] for c in r.calls if "<Sub Searches>" in c.prompt]
    assert len(joins) == 6 and all(len(c.output_tokens) > 1 for c in joins)  # free decoding, not just EOS
    re, keep = res["reprefill"][0].schedule, res["keep_slot"][0].schedule
    assert keep["extend_calls"] > 0 and keep["evictions"] > 0 and keep["extend_calls"] + keep["evictions"] == 6
    assert keep["prefill_tokens"] + keep["reused_prefix_tokens"] == re["prefill_tokens"]
    assert eng.free_slots() == list(range(16))


def test_join_diagnostics_by_hand():
    """Duplicate children, solved children, a join cut by the context, a lost join: by hand."""
    from jaxapr import evaluation
    from jaxapr.tokenizer import CountdownTokenizer

    tok = CountdownTokenizer()
    nums, target = [1, 4, 5], 20
    root = (
        "Exploring Operation: 5*4=20, Resulting Numbers: [1, 20]\nGenerated Node #0,0: 20:[1, 20] Operation: 5*4=20\n"
        "Exploring Operation: 5*4=20, Resulting Numbers: [1, 20]\nGenerated Node #0,1: 20:[1, 20] Operation: 5*4=20\n"
        "Exploring Operation: 4+1=5, Resulting Numbers: [5, 5]\nGenerated Node #0,2: 20:[5, 5] Operation: 4+1=5\n"
        "<Calling Sub Searches>\n"
        + "".join(f"<Start Sub Search {k} at level 1> Moving to Node #0,{k}\n" for k in range(3))
        + "<End Calling Sub Searches>\n"
    )
    path = "Exploring Operation: 20*1=20, Resulting Numbers: [20]\n20,20 equal: Goal Reached\n"

    def solved_child(k):
        return path + f"Moving to Node #0,{k}\nCurrent State: 20:[1, 20], Operations: ['5*4=20']\n" + path

    final = (
        "20,20 equal: Goal Reached\nMoving to Node #0\nCurrent State: 20:[1, 4, 5], Operations: []\n"
        "Exploring Operation: 5*4=20, Resulting Numbers: [1, 20]\nGenerated Node #0,0: 20:[1, 20] Operation: 5*4=20\n"
        + solved_child(0)[len(path) :]
    )

    def answers(join_output):
        def respond(p):
            if "<Sub Searches>" in p:
                return join_output
            if p.startswith("Moving to Node #0\n"):
                return root
            return solved_child(int(p[18])) if p[18] in "01" else "No solution found.\n"

        return respond

    probs = (np.array([nums]), np.array([target]))
    (won,) = runtime.rollout(None, probs, "apr", engine=ScriptedEngine(answers(final), 2, BIG))
    assert won.success and won.num_children == 3
    assert runtime.join_diagnostics(won) == {
        "distinct_children": 2,
        "solved_children": 2,
        "child_solved": 1,
        "join_overflow": 0,
        "lost_at_join": 0,
        "join_prompt_tokens": len(won.calls[4].prompt_tokens),
        "join_output_tokens": len(tok.encode(final)) + 1,  # the restated path and EOS
        "root_spawns": 1,
    }
    join_prompt = won.calls[4].prompt_tokens
    assert won.calls[4].prompt.endswith("<End Sub Searches>\n") and len(join_prompt) > len(tok.encode(root))
    (lost,) = runtime.rollout(None, probs, "apr", engine=ScriptedEngine(answers("No solution found.\n"), 2, BIG))
    assert not lost.success
    assert runtime.join_diagnostics(lost) == {
        "distinct_children": 2,
        "solved_children": 2,
        "child_solved": 1,
        "join_overflow": 0,
        "lost_at_join": 1,
        "join_prompt_tokens": len(won.calls[4].prompt_tokens),  # the same join context
        "join_output_tokens": len(tok.encode("No solution found.\n")) + 1,
        "root_spawns": 1,
    }
    # The join context leaves 3 tokens of the window: the root's last call is cut (the children fit).
    window = len(won.calls[4].prompt_tokens) + 3
    assert won.calls[4].prompt == won.tree["main_calls"][1][: len(won.calls[4].prompt)]  # the root's join call
    (cut,) = runtime.rollout(None, probs, "apr", engine=ScriptedEngine(answers(final), 2, BIG), max_context=window)
    assert not cut.success and cut.calls[4].stopped == "length" and cut.calls[1].stopped == "eos"
    assert runtime.join_diagnostics(cut) == {
        "distinct_children": 2,
        "solved_children": 2,
        "child_solved": 1,
        "join_overflow": 1,
        "lost_at_join": 1,
        "join_prompt_tokens": window - 3,
        "join_output_tokens": 3,  # the window's rest
        "root_spawns": 1,
    }
    # A root that spawns a second round after its first join (one child, on node #0,2 again,
    # which fails) and then restates the solved path: two spawns, 4 children of 2 distinct
    # states, the last join's tokens.
    again = "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,2\n<End Calling Sub Searches>\n"

    def twice(p):
        if p.count("<End Sub Searches>") == 1:
            return again
        return answers(final)(p)

    (two_rounds,) = runtime.rollout(None, probs, "apr", engine=ScriptedEngine(twice, 2, BIG))
    assert two_rounds.success and two_rounds.num_children == 4
    last_join = [c for c in two_rounds.calls if c.prompt.count("<End Sub Searches>") == 2]
    assert len(last_join) == 1
    assert runtime.join_diagnostics(two_rounds) == {
        "distinct_children": 2,
        "solved_children": 2,
        "child_solved": 1,
        "join_overflow": 0,
        "lost_at_join": 0,
        "join_prompt_tokens": len(last_join[0].prompt_tokens),
        "join_output_tokens": len(tok.encode(final)) + 1,
        "root_spawns": 2,
    }
    # Serial traces and roots that never spawn: all zero.
    (serial,) = runtime.rollout(None, probs, "sosp", engine=ScriptedEngine(lambda p: path + path, 1, BIG))
    assert set(runtime.join_diagnostics(serial).values()) == {0}
    # rollout_metrics reports their means for APR only.
    eng = ScriptedEngine(answers("No solution found.\n"), 2, BIG)
    two = (np.array([nums, nums]), np.array([target, target]))
    m = evaluation.rollout_metrics(None, two, mode="apr", max_context=BIG, num_slots=2, engine=eng)
    assert m["lost_at_join"] == 1.0 and m["distinct_children"] == 2.0 and m["join_overflow"] == 0.0
    assert "lost_at_join" not in evaluation.rollout_metrics(
        None, two, mode="sosp", max_context=BIG, num_slots=2, engine=eng
    )
