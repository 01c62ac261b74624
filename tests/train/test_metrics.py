"""jaxapr.train.metrics: JSONL rows, TensorBoard events read back, resume truncation, progress."""

import glob
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from jaxapr.train.metrics import MetricWriter, read_metrics


def tb_scalars(workdir):
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_rows_and_types(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False, progress=False) as w:
        w.write(
            1,
            {
                "loss": jnp.float32(2.5),
                "acc": np.float64(0.25),
                "tokens": np.int64(128),
                "ok": True,
                "lr": jnp.asarray(1e-3, jnp.bfloat16),
            },
        )
        w.write(2, {"loss": float("nan"), "grad_norm": float("inf"), "neg": -math.inf})
        w.write(2, {"accuracy": 0.5}, prefix="eval/")
        # Each line is on disk as soon as write returns.
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3
    raw = [json.loads(line) for line in lines]
    assert raw[0] == {
        "step": 1,
        "loss": 2.5,
        "acc": 0.25,
        "tokens": 128,
        "ok": True,
        "lr": float(jnp.asarray(1e-3, jnp.bfloat16)),
    }
    assert type(raw[0]["tokens"]) is int and type(raw[0]["loss"]) is float
    assert raw[1] == {"step": 2, "loss": "nan", "grad_norm": "inf", "neg": "-inf"}
    assert raw[2] == {"step": 2, "eval/accuracy": 0.5}
    rows = read_metrics(tmp_path)
    assert math.isnan(rows[1]["loss"]) and rows[1]["grad_norm"] == math.inf and rows[1]["neg"] == -math.inf
    assert read_metrics(tmp_path, prefix="eval/") == [{"step": 2, "eval/accuracy": 0.5}]


def test_bad_metrics_are_one_line_errors(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False, progress=False) as w:
        with pytest.raises(ValueError, match=r"^metric 'v' is a ndarray of shape \(3,\): expected a number"):
            w.write(1, {"v": np.ones(3)})
        with pytest.raises(ValueError, match=r"metric 'name' is a str: expected a number"):
            w.write(1, {"name": "x"})
        with pytest.raises(ValueError, match="metric name 'step' is reserved"):
            w.write(1, {"step": 3})
        with pytest.raises(ValueError, match=r"step=-1: expected an int >= 0"):
            w.write(-1, {"loss": 1.0})
        w.write(jnp.int32(4), {"loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 4, "loss": 1.0}]  # nothing half-written by the failures
    with pytest.raises(ValueError, match="is closed"):
        w.write(5, {"loss": 1.0})
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in '.*nowhere'"):
        read_metrics(tmp_path / "nowhere")


def test_tensorboard_events_read_back(tmp_path):
    with MetricWriter(tmp_path, progress=False) as w:
        for step in range(1, 4):
            w.write(step, {"loss": 1.0 / step, "tokens": 100 * step})
        w.write(3, {"accuracy": 0.75}, prefix="eval/")
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    scalars = tb_scalars(tmp_path)
    assert set(scalars) == {"loss", "tokens", "eval/accuracy"}
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
    assert scalars["tokens"] == [(1, 100.0), (2, 200.0), (3, 300.0)]
    assert scalars["eval/accuracy"] == [(3, 0.75)]


def test_resume_drops_later_rows_and_matches_an_uninterrupted_run(tmp_path):
    def metrics(step):
        return {"loss": 10.0 / step, "lr": 1e-3 * step}

    with MetricWriter(tmp_path / "full", progress=False) as w:
        for step in range(1, 9):
            w.write(step, metrics(step))
    # Interrupted: ran to step 6 (and half-wrote a 7th line), last checkpoint at step 4.
    with MetricWriter(tmp_path / "crash", progress=False) as w:
        for step in range(1, 7):
            w.write(step, metrics(step))
    with open(tmp_path / "crash" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.4')
    with MetricWriter(tmp_path / "crash", progress=False, resume_step=4) as w:
        assert [r["step"] for r in read_metrics(tmp_path / "crash")] == [1, 2, 3, 4]
        for step in range(5, 9):
            w.write(step, metrics(step))
    assert (tmp_path / "crash" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    assert not glob.glob(str(tmp_path / "crash" / "*.tmp"))
    # TensorBoard discards the superseded events of steps 5 and 6 (the restart marker).
    assert tb_scalars(tmp_path / "crash") == tb_scalars(tmp_path / "full")
    # Resuming with nothing to drop leaves the file alone; a fresh writer appends.
    with MetricWriter(tmp_path / "crash", progress=False, resume_step=8, tensorboard=False) as w:
        w.write(9, metrics(9))
    assert [r["step"] for r in read_metrics(tmp_path / "crash")] == list(range(1, 10))


def test_corrupt_line_in_the_middle_is_reported_not_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nGARBAGE\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2 is not a metrics line"):
        MetricWriter(tmp_path, progress=False, tensorboard=False, resume_step=2)
    assert "GARBAGE" in (tmp_path / "metrics.jsonl").read_text()


def test_disabled_writer_touches_nothing(tmp_path):
    with MetricWriter(tmp_path / "w", enabled=False, total_steps=10) as w:
        w.write(1, {"loss": 1.0})
        w.progress(1, loss=1.0, tokens=10)
    assert not (tmp_path / "w").exists()


def test_progress_bar_shows_postfix_and_tokens_per_second(tmp_path, capsys):
    with MetricWriter(tmp_path, total_steps=10, tensorboard=False, resume_step=2) as w:
        assert w._bar.n == 2
        w.progress(5, loss=jnp.float32(0.123456), tokens=4096)
        assert w._bar.n == 5
        postfix = w._bar.postfix
        assert "loss=0.1235" in postfix and "tok/s=" in postfix
        w.progress(4, loss=0.1)  # never moves back
        assert w._bar.n == 5
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=0.1235" in err
    with MetricWriter(tmp_path, total_steps=10, tensorboard=False, progress=False) as w:
        w.progress(3, loss=1.0)  # no bar: a no-op
        assert w._bar is None


class _FakeWandb:
    """Stands in for the ``wandb`` module: records init/log/finish calls."""

    def __init__(self):
        import types

        self.inits, self.logs, self.finished = [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.inits)}")
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logs.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        self._run = Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self._run()


def test_wandb_logs_every_row_and_resumes_the_same_run(tmp_path, monkeypatch):
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    with MetricWriter(
        tmp_path / "run", progress=False, tensorboard=False, wandb=True, wandb_config={"kind": "apr"}
    ) as w:
        w.write(1, {"loss": 2.0, "tokens": 10})
        w.write(2, {"loss": float("nan")}, prefix="eval/")
    assert fake.finished == 1
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["name"] == "run"
    assert fake.inits[0]["config"] == {"kind": "apr"} and fake.inits[0]["resume"] == "allow"
    assert fake.logs[0] == (1, {"loss": 2.0, "tokens": 10})
    assert fake.logs[1][0] == 2 and math.isnan(fake.logs[1][1]["eval/loss"])
    with MetricWriter(tmp_path / "run", progress=False, tensorboard=False, wandb=True, resume_step=1) as w:
        w.write(2, {"loss": 1.0})
    assert fake.inits[1]["id"] == fake.inits[0]["id"]  # the run continues
    with MetricWriter(tmp_path / "off", progress=False, tensorboard=False) as w:  # default: no W&B
        w.write(1, {"loss": 1.0})
    with MetricWriter(tmp_path / "other", progress=False, tensorboard=False, wandb=True, enabled=False) as w:
        w.write(1, {"loss": 1.0})  # a disabled writer (not process 0) never starts a run
    assert len(fake.inits) == 2 and len(fake.logs) == 3


def test_wandb_missing_is_one_line_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'jaxapr\[wandb\]'") as e:
        MetricWriter(tmp_path, progress=False, tensorboard=False, wandb=True)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_training_configs_have_wandb_off():
    from experiments.configs import rl, sft

    for module in (sft, rl):
        for preset in module.PRESETS:
            assert module.get_config(preset).wandb is False
