"""experiments.reproduce end to end at a very small size: every stage, the table, resuming."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--sft_config.model.num_layers=1", "--sft_config.model.d_model=32", "--sft_config.model.num_heads=2",
         "--sft_config.model.num_kv_heads=2", "--sft_config.model.mlp_dim=64", "--sft_config.model.max_len=256",
         "--sft_config.seq_len=256", "--sft_config.batch_size=4", "--sft_config.num_steps=3",
         "--sft_config.optim.warmup_steps=1", "--sft_config.eval_every=0", "--sft_config.checkpoint_every=3",
         "--sft_config.eval_problems=2", "--sft_config.eval_max_context=128", "--sft_config.eval_num_slots=8",
         "--sft_config.eval_batches=1", "--sft_config.progress=False",
         "--data_config.problems.train=40", "--data_config.problems.val=4", "--data_config.problems.test=4",
         "--data_config.num_workers=0",
         "--rl_config.num_steps=1", "--rl_config.grpo.num_problems=2", "--rl_config.grpo.group_size=2",
         "--rl_config.max_context=128", "--rl_config.num_slots=8", "--rl_config.eval_problems=2",
         "--rl_config.eval_at_start=False", "--rl_config.progress=False",
         "--eval_problems=2", "--eval_n_max=1"]


@pytest.mark.slow
def test_reproduce_tiny_end_to_end_and_resume(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.reproduce", "--preset=tiny", f"--workdir={tmp_path}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "reproduce.json"))
    assert [r["run"] for r in report["headline"]] == ["sosp", "apr", "apr_rl"]
    for stage in ("sft_sosp", "sft_apr", "rl_apr"):
        assert os.path.isfile(tmp_path / stage / "summary.json")
    assert os.path.isfile(tmp_path / "eval" / "evaluate.json")
    assert "APR + GRPO" in proc.stdout
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "== SFT sosp: done" in again.stdout


@pytest.mark.parametrize("preset", ["tiny", "mini", "paper"])
def test_presets_are_consistent(preset):
    """Every preset's configs load; an SFT ``init_from`` names shipped files of the run's model."""
    from experiments.configs import data as data_configs
    from experiments.configs import rl as rl_configs
    from experiments.configs import sft as sft_configs
    from jaxapr import policy_io
    from jaxapr.train import run_config

    d, s, r = data_configs.get_config(preset), sft_configs.get_config(preset), rl_configs.get_config(preset)
    assert s.seq_len <= s.model.max_len and r.max_context <= s.model.max_len and s.eval_max_context <= s.model.max_len
    assert s.optim.warmup_steps < s.num_steps
    assert d.apr.min_beam_size <= d.apr.max_beam_size and d.sosp.min_beam_size <= d.sosp.max_beam_size
    if s.init_from:
        for kind in ("sosp", "apr"):
            path = s.init_from.replace("{kind}", kind)
            cfg, _, _ = policy_io.load_params(path)
            assert cfg == run_config.model_config(s), path
