"""The shipped policies: each is an output of the documented command, listed in the manifest
with its hash, budget and seeds; the compared methods had equal budgets; the splits they were
trained and tested on ship beside them."""

import json
import os

import numpy as np
import pytest

from envs import countdown
from envs.countdown.problems import sha256_file

CKPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "checkpoints")
MANIFEST = os.path.join(CKPTS, "manifest.json")
KEYS = {
    "method",
    "stage",
    "sft_steps",
    "sft_tokens",
    "rl_steps",
    "seed",
    "command",
    "config",
    "wall_s",
    "machine",
    "sha256",
}


@pytest.fixture(scope="module")
def manifest():
    with open(MANIFEST) as f:
        return json.load(f)


def test_every_shipped_file_is_in_the_manifest_with_its_hash(manifest):
    shipped = sorted(f for f in os.listdir(CKPTS) if f.endswith(".npz"))
    assert sorted(manifest["files"]) == shipped
    for name, entry in manifest["files"].items():
        assert sha256_file(os.path.join(CKPTS, name)) == entry["sha256"], name
        if name.endswith("_splits.npz"):
            continue
        assert KEYS <= set(entry), (name, KEYS - set(entry))
        assert entry["method"] in ("sosp", "apr") and entry["stage"] in ("sft", "grpo")
        assert name == f"{entry['config']['data']['preset']}_{entry['method']}_{entry['stage']}.npz"
        if entry["config"]["data"]["preset"] == manifest["preset"]:  # the reproduce run's own outputs
            assert entry["command"] == manifest["command"]
            assert entry["command"].startswith(f"python -m experiments.reproduce --preset={manifest['preset']}")
            assert entry["wall_s"] > 0 and entry["machine"]["cores"] >= 1
        else:  # the tiny pair the mini SFT stages start from: their command is in their metadata
            from jaxapr import policy_io

            assert entry["command"] == policy_io.exported_meta(os.path.join(CKPTS, name))["extra"]["made_by"]


def test_compared_methods_had_equal_budgets(manifest):
    policies = [e for e in manifest["files"].values() if "method" in e]
    assert {e["method"] for e in policies if e["config"]["data"]["preset"] == manifest["preset"]} == {"sosp", "apr"}
    for preset in {manifest["preset"]}:  # the pairs the reproduce run trained side by side
        rows = [e for e in policies if e["config"]["data"]["preset"] == preset]
        for stage in ("sft", "grpo"):
            pair = {e["method"]: e for e in rows if e["stage"] == stage}
            if len(pair) < 2:
                continue
            sosp, apr = pair["sosp"], pair["apr"]
            # the SFT budget: steps x batch x seq_len token slots (the compute), equal within 5%
            assert sosp["sft_steps"] == apr["sft_steps"]
            assert abs(sosp["sft_tokens"] - apr["sft_tokens"]) <= 0.05 * max(sosp["sft_tokens"], apr["sft_tokens"])
            for e in (sosp, apr):
                assert e["sft_trained_tokens"] < e["sft_nonpad_tokens"] <= e["sft_tokens"]
            assert sosp["rl_steps"] == apr["rl_steps"] and sosp["rl_rollouts"] == apr["rl_rollouts"]
            for key in ("learning_rate", "warmup_steps", "schedule"):
                assert sosp["config"]["sft"]["optim"][key] == apr["config"]["sft"]["optim"][key]
            assert sosp["config"]["sft"]["seq_len"] == apr["config"]["sft"]["seq_len"]
            assert sosp["config"]["sft"]["batch_size"] == apr["config"]["sft"]["batch_size"]


def test_shipped_policies_load_and_say_what_they_are(manifest):
    from jaxapr import policy_io

    for name, entry in manifest["files"].items():
        if "method" not in entry:
            continue
        meta = policy_io.exported_meta(os.path.join(CKPTS, name))
        assert meta["extra"]["kind"] == entry["method"] and meta["extra"].get("stage", "sft") == entry["stage"]
        policy = policy_io.load_policy(os.path.join(CKPTS, name))
        assert policy.cfg.max_len >= meta["extra"]["max_context"]


def test_the_choice_is_validations_and_names_shipped_files(manifest):
    """Each method's shipped best is the stage its GRPO run's validation accuracy picked."""
    for kind, c in manifest["choice"].items():
        assert c["best"] == ("grpo" if c["grpo_val_accuracy"] > c["sft_val_accuracy"] else "sft"), c
        assert f"{manifest['preset']}_{kind}_{c['best']}.npz" in manifest["files"]


def test_shipped_splits_are_the_configs_and_test_is_disjoint():
    """mini_splits.npz holds the splits the mini policies were trained / selected / tested
    on: the data config's, with test disjoint from train and val by (sorted numbers, target)."""
    from experiments.configs import data as data_configs

    path = os.path.join(CKPTS, "mini_splits.npz")
    with np.load(path) as z:
        got = {s: (z[f"{s}_numbers"], z[f"{s}_targets"]) for s in ("train", "val", "test")}
    c = data_configs.get_config("mini")
    p = c.problems
    assert got["test"][0].shape == (p.test, 4) and got["test"][1].shape == (p.test,) and p.test >= 1000
    keys = {s: set(countdown.problem_keys(*got[s])) for s in got}
    assert not keys["test"] & (keys["train"] | keys["val"]) and not keys["train"] & keys["val"]
    again = countdown.make_splits(
        c.seed,
        {"train": p.train, "val": p.val, "test": p.test},
        num_numbers=p.num_numbers,
        min_target=p.min_target,
        max_target=p.max_target,
        max_number=p.max_number,
    )
    for s in got:
        np.testing.assert_array_equal(got[s][0], again[s][0])
        np.testing.assert_array_equal(got[s][1], again[s][1])
