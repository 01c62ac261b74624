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
        (["--sampler_hf_batches=64,x"], "--sampler_hf_batches: 'x' is not a positive int"),
        (["--baseline_commit=no_such_rev"], "--baseline_commit='no_such_rev': not a commit of this repository"),
        (
            ["--suite=quickstart", f"--quickstart_workdir={tmp_path / 'a_file' / 'runs'}"],
            "/runs': cannot be created (Not a directory): expected a writable directory",
        ),
    ):
        (tmp_path / "a_file").write_text("")
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.bench", "--suite=train", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-500:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "matmul peak" not in proc.stdout  # nothing ran


def test_quickstart_suite_imports_the_quickstart_without_flag_clashes():
    # --suite=quickstart runs quickstart.run in the bench's process, which imports gen_data and
    # the pipeline: none of them may define a flag the bench defines too (e.g. --out).
    code = "import experiments.bench, experiments.quickstart, experiments.gen_data, experiments.pipeline"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]


def test_quickstart_suite_times_a_first_run_in_a_new_directory(tmp_path, monkeypatch):
    # The quickstart resumes a finished GRPO run in its workdir (nothing left to do), so two
    # benchmark runs (or a --baseline_commit run and this one) must not share a workdir.
    from experiments import bench, quickstart

    seen = []

    def fake_run(workdir, **kw):
        seen.append(workdir)
        return {"rows": [], "times": {"data": 1.0, "total": 1.0}}

    monkeypatch.setattr(quickstart, "run", fake_run)
    bench.FLAGS(["bench", f"--quickstart_workdir={tmp_path / 'qs'}"])
    try:
        for _ in range(2):
            bench.suite_quickstart(quick=False, repeats=1)
    finally:
        bench.FLAGS.unparse_flags()
    assert len(set(seen)) == 2 and all(os.path.dirname(w) == str(tmp_path / "qs") for w in seen)
    assert all(os.path.isdir(w) and not os.listdir(w) for w in seen)


def test_quickstart_suite_reports_stages_beside_a_baseline(tmp_path):
    import json

    from experiments.bench_util import quickstart_stages

    run = {
        "rows": [
            {"run": "sosp", "total_tokens": 800.0, "problems": 200},
            {"run": "apr", "total_tokens": 2000.0, "problems": 200},
            {"run": "scratch", "total_tokens": 1000.0, "problems": 200},
        ],
        "times": {"data": 20.0, "evaluate": 400.0, "total": 900.0},
    }
    stages = quickstart_stages(run)
    assert stages["evaluate"] == {"seconds": 400.0, "tokens_per_s": (800 + 2000) * 200 / 400}
    assert stages["data"] == {"seconds": 20.0} and set(stages) == {"data", "evaluate", "total"}
    base = {"rows": run["rows"][:1], "times": {"data": 25.0, "evaluate": 600.0, "total": 1800.0}}
    paths = []
    for name, out in (("new", run), ("old", base)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(out, f)
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench",
            "--suite=quickstart",
            f"--quickstart_json={paths[0]}",
            f"--baseline_json={paths[1]}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-1000:]
    total = next(line for line in proc.stdout.splitlines() if line.startswith("total"))
    assert "2.00x" in total and "1.50x" in next(l for l in proc.stdout.splitlines() if l.startswith("evaluate"))


def test_gpu_bench_commands_parse_on_a_cpu(tmp_path):
    """gpu_bench.sh's steps (printed by DRY_RUN=1) name real modules and flags, and
    bench_scale's arguments parse into the planned run (--dry_run computes nothing)."""
    import json
    import re

    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", DRY_RUN="1", OUT=str(tmp_path), PY=sys.executable)
    out = subprocess.run(
        ["bash", "experiments/gpu_bench.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    steps = dict(re.findall(r"^== (\w+): (.*)$", out.stdout, flags=re.M))
    assert {"scale_sft", "scale_grpo", "sampler_b64", "plan_sft"} <= set(steps), out.stdout
    for name, command in steps.items():
        module = re.search(r"-m (experiments\.\w+)", command).group(1)
        source = open(os.path.join(ROOT, *module.split(".")) + ".py", encoding="utf-8").read()
        for flag in re.findall(r"--(\w+)", command):
            assert flag == "config" or re.search(rf"DEFINE_\w+\(\s*\"{flag}\"", source), (name, flag)
    sft = steps["scale_sft"].split(" -m ", 1)[1].split()[1:]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_scale", *sft, "--dry_run"],
        cwd=ROOT,
        env=dict(env, DRY_RUN=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["preset"] == "paper" and plan["sft"]["seq_len"] == 4096
    assert plan["sft"]["variants"] == ["none/blocked", "block/blocked", "none/fused", "block/fused"]
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.bench_scale", "--dry_run", "--variants=block/flash"],
        cwd=ROOT,
        env=dict(env, DRY_RUN=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--variants entry 'block/flash'" in bad.stderr.strip().splitlines()[-1]


def test_decode_by_window_reads_the_window_it_reports():
    # each row's decode call attends exactly its window (asserted inside), and the figures are sane
    from experiments import bench

    rows = bench._decode_by_window(["tiny"], 4, [64, 128], 1)
    assert [r["window"] for r in rows] == [64, 128]
    assert all(r["ms/step"] > 0 and r["KV GB/s"] > 0 for r in rows)
    assert all(r["read floor ms"] > 0 and r["x floor"] == r["ms/step"] / r["read floor ms"] for r in rows)


def test_read_floor_grows_with_the_bytes():
    from experiments import bench

    small, large = bench._read_ms(1 << 20, 5), bench._read_ms(256 << 20, 5)
    assert 0 < small < large
