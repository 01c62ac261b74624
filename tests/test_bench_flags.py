"""experiments.bench: a wrong flag is a one-line error before any suite runs."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bad_grpo_flags_fail_fast(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    for args, message in (
            (["--grpo_policy=" + str(tmp_path / "missing")], "does not exist: expected a run or an exported .npz"),
            (["--grpo_policy=" + str(tmp_path)], "--grpo_data_dir=None: expected the policy's gen_data output"),
            (["--grpo_group=0"], "--grpo_group=0: expected a positive int"),
            (["--train_presets=tiny,huge"], "--train_presets: unknown preset 'huge'"),
            (["--sampler_hf_batches=64,x"], "--sampler_hf_batches: 'x' is not a positive int")):
        proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--suite=train", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-500:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "matmul peak" not in proc.stdout  # nothing ran
