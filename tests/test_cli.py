"""Every entry point turns a user mistake into one line on stderr and exit status 2 (absl's
usage-error status): bad paths, unreadable or truncated files, config typos (ml_collections'
suggestion kept), unknown presets, out-of-range values. Each case runs the real script."""

import os
import subprocess
import sys

import pytest

from experiments import gen_data
from experiments.configs import data as data_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
TINY_NPZ = os.path.join(ROOT, "experiments", "checkpoints", "tiny_apr_sft.npz")


def run(module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_usage_error(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    with open(TINY_NPZ, "rb") as f:
        (root / "truncated.npz").write_bytes(f.read()[:4096])
    (root / "empty.npz").write_bytes(b"")
    (root / "full").mkdir()
    (root / "full" / "something").write_text("x")
    config = data_configs.get_config("tiny")
    config.problems.update(train=20, val=4, test=4)
    config.num_workers = 0
    gen_data.run(config, str(root / "data"), log=lambda *_: None)
    return root


def read_only_dir(tmp_path):
    """A directory this process cannot write (root ignores permission bits: sysfs then)."""
    if os.geteuid() == 0:
        return "/sys"
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o555)
    return str(d)


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
@pytest.mark.parametrize("module, flag", [("gen_data", "--out"), ("train_sft", "--workdir"), ("train_rl", "--workdir")])
def test_bad_output_paths(files, tmp_path, module, flag, where):
    path = {
        "file": str(files / "a_file"),
        "under_file": str(files / "a_file" / "sub"),
        "read_only": read_only_dir(tmp_path),
    }[where]
    expected = {
        "file": "is a file: expected a directory",
        "under_file": "cannot be created (Not a directory)",
        "read_only": "(Permission denied): expected a writable directory",
    }[where]
    extra = {
        "train_sft": ["--config.data_dir=" + str(files)],
        "train_rl": ["--config.data_dir=" + str(files), "--config.init_from=" + TINY_NPZ],
    }.get(module, [])
    assert_usage_error(run(module, f"{flag}={path}", *extra), expected)


def test_gen_data_refuses_a_non_empty_directory(files):
    assert_usage_error(run("gen_data", f"--out={files / 'full'}"), "is not empty: expected a new directory")
    assert_usage_error(
        run("gen_data", f"--out={files / 'full'}", "--overwrite"), "holds files that gen_data did not write"
    )
    assert os.listdir(files / "full") == ["something"]  # nothing deleted


@pytest.mark.parametrize("module", ["evaluate", "quickstart"])
@pytest.mark.parametrize("name, reason", [("truncated.npz", "BadZipFile"), ("empty.npz", "EOFError")])
def test_unreadable_policy_files(files, tmp_path, module, name, reason):
    path = str(files / name)
    args = (
        [f"--sosp={path}", f"--data_dir={files / 'data'}", f"--out={tmp_path / 'out'}"]
        if module == "evaluate"
        else [f"--apr={path}", f"--workdir={tmp_path / 'w'}"]
    )
    assert_usage_error(run(module, *args), f"{path!r} is not a readable exported policy ({reason}")


@pytest.mark.parametrize(
    "module, args, fragments",
    [
        (
            "train_sft",
            ["--config.optim.learnin_rate=0.1"],
            ["--config.optim.learnin_rate: no config field 'learnin_rate'", 'Did you mean "learning_rate"'],
        ),
        ("gen_data", ["--config.problems.trian=5"], ["no config field 'trian'", 'Did you mean "train"']),
        ("train_rl", ["--config.grpo.group_siz=4"], ["no config field 'group_siz'", 'Did you mean "group_size"']),
        ("reproduce", ["--sft_config.num_step=4"], ["no config field 'num_step'", 'Did you mean "num_steps"']),
        ("train_sft", ["--config.num_steps=abc"], ["flag --config.num_steps=abc: invalid literal for int()"]),
        ("train_sft", ["--config=experiments/configs/sft.py:huge"], ["unknown SFT preset 'huge'"]),
        ("train_sft", ["--config=experiments/configs/nowhere.py"], ["No such file or directory"]),
        ("train_sft", ["--workdri=/tmp/x"], ["Unknown command line flag 'workdri'"]),
        ("reproduce", ["--preset=huge"], ["flag --preset=huge: value should be one of <tiny|mini|paper>"]),
        ("reproduce", ["--eval_config.problems=-1"], ["eval_config.problems=-1: expected >= 0"]),
        ("quickstart", ["--preset=huge"], ["flag --preset=huge: value should be one of"]),
    ],
)
def test_config_typos_unknown_presets_and_bad_values(tmp_path, module, args, fragments):
    out = {"gen_data": [f"--out={tmp_path / 'o'}"], "evaluate": [f"--out={tmp_path / 'o'}"]}.get(module, [])
    workdir = [] if module in ("gen_data", "evaluate") else [f"--workdir={tmp_path / 'w'}"]
    assert_usage_error(run(module, *args, *out, *workdir), *fragments)
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "o")  # nothing was written


def test_out_of_range_run_configs(files, tmp_path):
    # 0 used to mean "the model's maximum" silently; it is a window of 0 tokens.
    proc = run(
        "train_rl",
        f"--workdir={tmp_path / 'rl'}",
        f"--config.init_from={TINY_NPZ}",
        f"--config.data_dir={files}",
        "--config.max_context=0",
    )
    assert_usage_error(proc, "config.max_context=0: expected a per-call context window of 2..")
    proc = run(
        "train_sft", f"--workdir={tmp_path / 'sft'}", f"--config.data_dir={files / 'data'}", "--config.batch_size=0"
    )
    assert_usage_error(proc, "config.batch_size=0: expected >= 1")
    proc = run(
        "train_sft", f"--workdir={tmp_path / 'sft'}", f"--config.data_dir={files / 'data'}", "--config.eval_every=-5"
    )
    assert_usage_error(proc, "config.eval_every=-5: expected >= 0 (0 turns it off)")
