"""jaxapr.hf and experiments.export_hf: a policy as a Hugging Face Llama directory and back.

The round trips need only numpy and safetensors; the checks against ``transformers`` (same
logits, same token ids) run where torch and transformers are installed (the ``hf`` extra)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxapr import hf, policy_io, traces
from jaxapr import model as M
from jaxapr.tokenizer import CountdownTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "checkpoints", "tiny_apr_sft.npz")
# Grouped-query attention, untied output layer, head_dim not d_model / num_heads.
SMALL = M.ModelConfig(
    d_model=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=96,
    max_len=256,
    rope_theta=500.0,
    norm_eps=1e-5,
    tie_embeddings=False,
)


def _params(policy) -> dict[str, np.ndarray]:
    return {name: np.asarray(var[...]) for name, var in policy_io._named_variables(nnx.split(policy)[1])}


def _small_policy():
    policy = policy_io.make_policy(SMALL, seed=3)
    for block in policy.blocks:  # norm scales away from 1, so a swapped norm would show
        for norm in (block.attn_norm, block.mlp_norm):
            norm.scale.set_value(norm.scale[...] + 0.1 * jnp.arange(SMALL.d_model) / SMALL.d_model)
    return policy


def _trace_text() -> str:
    """A root call of a real APR demonstration (prompt and output)."""
    tree = traces.apr([4, 23, 59, 44], 47, beam_size=2, sub_call_beam_size=2, seed=3, spawn_prob=1.0)
    return tree.main_calls[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_hf"))
    return hf.export_hf(policy_io.load_policy(TINY), out)


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_round_trip_gives_identical_parameters(which, tiny_dir, tmp_path):
    if which == "tiny":
        policy, out = policy_io.load_policy(TINY), tiny_dir
    else:
        policy = _small_policy()
        out = hf.export_hf(policy, str(tmp_path / "small"))
    back = policy_io.load_policy(out)
    assert back.cfg == policy.cfg.replace(head_dim=policy.cfg.head_dim)
    a, b = _params(policy), _params(back)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32 and np.array_equal(a[name], b[name]), name
    cfg, params, run = policy_io.load_params(out)
    assert cfg == policy.cfg and run.model.d_model == cfg.d_model
    assert all(np.array_equal(np.asarray(v[...]), a[n]) for n, v in policy_io._named_variables(params))
    config = json.loads(Path(out, "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["jaxapr"]["tie_embeddings"] == policy.cfg.tie_embeddings


def test_a_changed_output_layer_loads_untied(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "edited"
    shutil.copytree(tiny_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * np.float32(2)
    save_file(tensors, str(out / "model.safetensors"))
    policy = policy_io.load_policy(str(out))
    assert not policy.cfg.tie_embeddings
    assert np.array_equal(np.asarray(policy.unembed[...]), tensors["lm_head.weight"].T)


def test_bad_directories_are_one_line_errors(tiny_dir, tmp_path):
    config = json.loads(Path(tiny_dir, "config.json").read_text())
    weights = Path(tiny_dir, "model.safetensors").read_bytes()
    for change, message in (
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "expected a Llama model"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"hidden_size": None}, "unusable config.json"),
    ):
        bad = tmp_path / change.get("model_type", next(iter(change)))
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        (bad / "model.safetensors").write_bytes(weights)
        with pytest.raises(ValueError, match=message) as e:
            policy_io.load_policy(str(bad))
        assert "\n" not in str(e.value)
    (tmp_path / "hidden_size" / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "hidden_size" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unreadable model.safetensors"):
        policy_io.load_policy(str(tmp_path / "hidden_size"))


def _transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_transformers_gives_the_same_logits(which, tiny_dir, tmp_path):
    torch, transformers = _transformers()
    tok = CountdownTokenizer()
    ids = tok.encode(_trace_text(), add_bos=True)[None]
    policy = policy_io.load_policy(TINY) if which == "tiny" else _small_policy()
    out = tiny_dir if which == "tiny" else hf.export_hf(policy, str(tmp_path / "small"))
    expected = np.asarray(policy(jnp.asarray(ids)))
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert logits.shape == expected.shape == (1, ids.shape[1], tok.vocab_size)
    # float32 in both, summed in different orders (XLA's and torch's blocking and threads): 3e-4
    # on logits of size ~10; an export error (a transposed or misnamed weight) moves them by > 1e-2.
    np.testing.assert_allclose(logits, expected, atol=3e-4, rtol=0)


def test_transformers_tokenizer_gives_the_same_ids(tiny_dir):
    _, transformers = _transformers()
    tok = CountdownTokenizer()
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf_tok) == tok.vocab_size
    text = _trace_text()
    assert hf_tok(text)["input_ids"] == tok.encode(text, add_bos=True).tolist()  # a prompt starts with <bos>
    # outside the trace language: the byte fallback, phrases next to each other, special names as text
    for s in (text, "Moving to Node #0,1\n", "héllo <bos> ☃ Current State: Current State:: , ['1-1=0'] []"):
        ids = tok.encode(s).tolist()
        assert hf_tok(s, add_special_tokens=False)["input_ids"] == ids, s
        assert hf_tok.decode(ids) == s


def test_command_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "experiments.export_hf", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    proc = run(f"--policy={TINY}", f"--out={tmp_path / 'hf'}")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert sorted(os.listdir(tmp_path / "hf")) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    (tmp_path / "file").write_text("")
    for args, message in (
        ([f"--policy={tmp_path / 'missing.npz'}", f"--out={tmp_path / 'x'}"], "no such file"),
        ([f"--policy={TINY}", f"--out={tmp_path / 'file'}"], "is not a directory"),
        ([f"--policy={TINY}"], "--out is required"),
    ):
        proc = run(*args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1500:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
