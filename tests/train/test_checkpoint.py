"""jaxapr.train.checkpoint: exact round trips, retention (last k + best), restore across meshes,
config/tree checks, corrupt (unreadable, flipped, non-finite) and half-written checkpoints on
disk, and an exact resume."""

import glob
import json
import logging
import os
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import zstandard
from flax import nnx

from jaxapr import model, sharding
from jaxapr.train import state as st
from jaxapr.train.checkpoint import Checkpointer, ConfigMismatchError, CorruptCheckpointError, sharded_target

TINY = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64)
CONFIG = {"model": TINY, "train": {"lr": 1e-3, "batch_size": 2}}


@pytest.fixture(scope="module")
def setup():
    policy = model.Transformer(model.get_config("tiny", **TINY), rngs=nnx.Rngs(0))
    tx, _ = st.make_optimizer(1e-3, total_steps=100)
    graphdef, state = st.init_train_state(policy, tx)
    # Distinct, non-initial values everywhere (step, params, both Adam moments, counters).
    state = jax.tree.map(
        lambda x: (
            x + jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape), x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x + 7
        ),
        state,
    )
    abstract = st.abstract_train_state(tx, state.params)
    return graphdef, tx, state, abstract


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
    la, lb = host(a), host(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def bumped(state, k):
    return jax.tree.map(lambda x: x + k, state)


def test_round_trip_is_exact_with_extra(tmp_path, setup):
    _, _, state, abstract = setup
    key = jax.random.split(jax.random.key(5), 3)
    extra = {
        "data": {"parent": {"next_index": 7}, "next_row": 0, "counter": 6},
        "pair": (1, "a"),
        "loss": float("nan"),
        "n": np.int64(4),
    }
    tree = {"state": state, "rng": key, "raw_key": jax.random.PRNGKey(2)}  # PRNG keys travel with the arrays
    with Checkpointer(tmp_path / "ck", config=CONFIG) as ck:
        assert ck.latest_step() is None and ck.all_steps() == [] and ck.best_step() is None
        assert ck.save(10, tree, extra=extra) is True
        ck.wait()
        assert ck.latest_step() == 10
        target = {
            "state": abstract,
            "rng": jax.eval_shape(lambda: key),
            "raw_key": jax.ShapeDtypeStruct((2,), jnp.uint32),
        }
        restored, got = ck.restore(target)
    assert type(restored["state"]) is st.TrainState
    assert_same(restored["state"], state)
    assert got["data"] == extra["data"] and got["pair"] == [1, "a"] and got["n"] == 4  # JSON: tuples are lists
    assert np.isnan(got["loss"])
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(key))
    assert restored["rng"].dtype == key.dtype
    np.testing.assert_array_equal(restored["raw_key"], np.asarray(jax.random.PRNGKey(2)))
    # The meta record is plain JSON on disk (orbax's JSON item), with a checksum per array.
    meta = Checkpointer(tmp_path / "ck", config=CONFIG).metadata()
    assert meta["step"] == 10 and meta["config"]["model"]["d_model"] == 32 and meta["extra"]["data"] == extra["data"]
    assert len(meta["checksums"]) == len(jax.tree.leaves(tree)) and "rng" in meta["checksums"]
    (path,) = [p for p in glob.glob(str(tmp_path / "ck" / "10" / "meta" / "*")) if "commit" not in p]
    assert json.loads(open(path).read().replace("NaN", "null"))["extra"]["data"] == extra["data"]


def test_extra_is_json_data_and_objects_are_one_line_errors(tmp_path, setup):
    _, _, state, abstract = setup
    value = {
        "a": [1, 2.5, None, True],
        "b": {"c": "xy"},
        "t": (1, (2, 3)),
        "n": np.int64(4),
        "f": np.float32(0.5),
        "inf": -float("inf"),
        "weird": {"__bytes__": "not bytes"},
    }
    with Checkpointer(tmp_path / "ck", config=CONFIG) as ck:
        ck.save(1, state, extra=value)
        _, back = ck.restore(abstract)
        assert back["a"] == [1, 2.5, None, True] and back["b"] == {"c": "xy"} and back["t"] == [1, [2, 3]]
        assert back["n"] == 4 and back["f"] == 0.5 and back["inf"] == -float("inf")
        assert back["weird"] == {"__bytes__": "not bytes"}  # no tags: plain JSON means what it says
        for bad, message in (
            ({"obj": object()}, r"^extra\['obj'\] is a object: expected JSON data"),
            ({"blob": b"xy"}, r"extra\['blob'\] is a bytes: expected JSON data"),
            (
                {"arr": np.arange(3)},
                r"extra\['arr'\] is a ndarray: .* arrays and PRNG keys belong "
                r"in the saved state",
            ),
            ({3: "int key"}, r"extra has the key 3: expected string keys"),
        ):
            with pytest.raises(ValueError, match=message) as e:
                ck.save(2, state, extra=bad)
            assert "\n" not in str(e.value)
        assert ck.all_steps() == [1]


def test_async_save_is_safe_when_buffers_are_deleted_after_save(tmp_path, setup):
    _, _, state, abstract = setup
    live = bumped(state, 1)  # fresh device buffers that we may destroy
    expected = host(live)
    with Checkpointer(tmp_path / "ck", config=CONFIG, async_save=True) as ck:
        assert ck.save(1, live)
        for x in jax.tree.leaves(live):  # what donation to the next train step does
            x.delete()
        ck.wait()
        restored, _ = ck.restore(abstract)
    for x, y in zip(host(restored), expected):
        np.testing.assert_array_equal(x, y)


def test_keeps_last_k_and_the_best(tmp_path, setup):
    _, _, state, abstract = setup
    accs = {1: 0.1, 2: 0.9, 3: 0.3, 4: float("nan"), 5: 0.4, 6: 0.5, 7: 0.2}
    with Checkpointer(tmp_path / "ck", config=CONFIG, keep=2, best_metric="val_acc") as ck:
        for step, acc in accs.items():
            assert ck.save(step, bumped(state, step), metrics={"val_acc": acc, "loss": 1.0})
        ck.wait()
        assert ck.all_steps() == [2, 6, 7]
        assert ck.best_step() == 2
    assert sorted(int(d) for d in os.listdir(tmp_path / "ck") if d.isdigit()) == [2, 6, 7]
    # A fresh manager (a resumed run) sees the same, and the old best restores exactly.
    with Checkpointer(tmp_path / "ck", config=CONFIG, keep=2, best_metric="val_acc") as ck:
        assert ck.all_steps() == [2, 6, 7] and ck.best_step() == 2 and ck.latest_step() == 7
        restored, _ = ck.restore(abstract, step=ck.best_step())
        assert_same(restored, bumped(state, 2))
        ck.save(8, state, metrics={"val_acc": 0.95})  # a new best replaces the old one
        ck.wait()
        assert ck.all_steps() == [7, 8] and ck.best_step() == 8
    # min mode keeps the lowest; without best_metric only the last k survive.
    with Checkpointer(
        tmp_path / "min", config=CONFIG, keep=1, best_metric="loss", best_mode="min", async_save=False
    ) as ck:
        for step, loss in enumerate([3.0, 1.0, 2.0, 4.0], start=1):
            ck.save(step, state, metrics={"loss": loss})
        assert ck.all_steps() == [2, 4] and ck.best_step() == 2
    with Checkpointer(tmp_path / "plain", config=CONFIG, keep=2) as ck:
        for step in range(1, 5):
            ck.save(step, state, metrics={"loss": 1.0 / step})
        ck.wait()
        assert ck.all_steps() == [3, 4] and ck.best_step() is None


def test_restore_onto_a_mesh_and_back(tmp_path, setup):
    _, _, state, abstract = setup
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    target = sharded_target(abstract, mesh, sharding.rules_for("fsdp_tp"))
    with Checkpointer(tmp_path / "one", config=CONFIG) as ck:  # written from one device
        ck.save(3, state)
        restored, _ = ck.restore(target)
    assert_same(restored, state)
    wk = restored.params["blocks"][0]["attn"]["wk"][...]
    assert len(jax.tree.leaves(state)[0].sharding.device_set) == 1
    assert wk.sharding.mesh.devices.size == 8 and wk.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert not wk.sharding.is_fully_replicated
    mu_wk = restored.opt_state[1][0].mu["blocks"][0]["attn"]["wk"][...]
    assert mu_wk.sharding.spec == wk.sharding.spec
    # ... and a checkpoint written from the 8-device mesh restores onto one device.
    with Checkpointer(tmp_path / "eight", config=CONFIG) as ck:
        ck.save(4, bumped(restored, 1))
        back, _ = ck.restore(abstract)
    assert_same(back, bumped(state, 1))
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(back))
    # A concrete-array target gives its own shardings.
    with Checkpointer(tmp_path / "eight", config=CONFIG) as ck:
        again, _ = ck.restore(bumped(restored, 0))
    assert again.params["embed"][...].sharding == restored.params["embed"][...].sharding


def test_config_mismatch_is_one_line_naming_the_key(tmp_path, setup):
    _, _, state, abstract = setup
    with Checkpointer(tmp_path / "ck", config=CONFIG) as ck:
        ck.save(1, state)
    other = {"model": {**TINY, "d_model": 64}, "train": {"lr": 1e-3, "batch_size": 2}}
    with Checkpointer(tmp_path / "ck", config=other) as ck:
        with pytest.raises(ValueError, match=r"^checkpoint config model\.d_model=32 differs from this run's 64: ") as e:
            ck.restore(abstract)
        assert "\n" not in str(e.value) and not isinstance(e.value, CorruptCheckpointError)
    new_key = {"model": {**TINY, "rope_scaling": 2.0}, "train": CONFIG["train"]}
    with Checkpointer(tmp_path / "ck", config=new_key) as ck:
        with pytest.raises(ValueError, match=r"model\.rope_scaling=<absent> differs from this run's 2\.0"):
            ck.restore(abstract)
    lr = {"model": TINY, "train": {"lr": 3e-4, "batch_size": 2}}
    with Checkpointer(tmp_path / "ck", config=lr) as ck:  # train.* is not compared by default
        restored, _ = ck.restore(abstract)
        assert_same(restored, state)
    # A run's identity: every key but the ignored ones, all differences in one line.
    run = {"model": {**TINY, "d_model": 64}, "train": {"lr": 3e-4, "batch_size": 4}}
    with Checkpointer(tmp_path / "ck", config=run, compare_keys=None, ignore_keys=("train.batch_size",)) as ck:
        with pytest.raises(
            ConfigMismatchError,
            match=r"^checkpoint config model\.d_model=32 differs from this run's "
            r"64, train\.lr=0\.001 differs from this run's 0\.0003: ",
        ) as e:
            ck.restore(abstract)
        assert [k for k, _, _ in e.value.differences] == ["model.d_model", "train.lr"]
    same = {"model": TINY, "train": {"lr": 1e-3, "batch_size": 4}}
    with Checkpointer(tmp_path / "ck", config=same, compare_keys=None, ignore_keys=("train.batch_size",)) as ck:
        assert_same(ck.restore(abstract)[0], state)
    with Checkpointer(tmp_path / "ck", config=lr, compare_keys=("model", "train.lr")) as ck:
        with pytest.raises(ValueError, match=r"checkpoint config train\.lr=0\.001 differs from this run's 0\.0003"):
            ck.restore(abstract)
    with Checkpointer(tmp_path / "ck", config=other, compare_keys=()) as ck:  # no check: the tree still matches
        ck.restore(abstract)


def test_missing_checkpoints_and_bad_arguments(tmp_path, setup):
    _, _, state, abstract = setup
    with Checkpointer(tmp_path / "empty", config=CONFIG) as ck:
        with pytest.raises(FileNotFoundError, match=r"^no checkpoint in '.*empty': expected "):
            ck.restore(abstract)
        ck.save(5, state)
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 4 in .*: expected one of \[5\]"):
            ck.restore(abstract, step=4)
        assert ck.save(5, state) is False  # already there: never overwritten
        with pytest.raises(ValueError, match="checkpoint step 5 already exists"):
            ck.save(5, state, force=True)
        assert ck.save(3, state) is False  # older than the latest
        with pytest.raises(ValueError, match=r"extra\['it'\] is a object"):
            ck.save(6, state, extra={"it": object()})
        with pytest.raises(ValueError, match=r"step=-1: expected an int >= 0"):
            ck.save(-1, state)
        assert ck.all_steps() == [5]
    with pytest.raises(ValueError, match=r"Checkpointer for .* is closed"):
        ck.save(7, state)
    with Checkpointer(tmp_path / "best", config=CONFIG, best_metric="acc") as ck:
        with pytest.raises(ValueError, match=r"metrics has no 'acc' \(the best_metric\)"):
            ck.save(1, state, metrics={"loss": 1.0})
        with pytest.raises(ValueError, match=r"metrics\['acc'\]='high': expected a number"):
            ck.save(1, state, metrics={"acc": "high"})
    for bad in (dict(keep=0), dict(best_mode="median")):
        with pytest.raises(ValueError, match="expected"):
            Checkpointer(tmp_path / "x", config=CONFIG, **bad)
    with pytest.raises(ValueError, match="is a file: expected a directory"):
        (tmp_path / "file").write_text("x")
        Checkpointer(tmp_path / "file", config=CONFIG)


def test_target_that_does_not_match(tmp_path, setup):
    _, tx, state, abstract = setup
    with Checkpointer(tmp_path / "ck", config=CONFIG, compare_keys=()) as ck:
        ck.save(1, state)
        wide = model.Transformer(model.get_config("tiny", **{**TINY, "mlp_dim": 96}), rngs=nnx.Rngs(0))
        _g2, s2 = st.init_train_state(wide, tx)
        with pytest.raises(
            ValueError,
            match=r"does not match the restore target: .*mlp\.w_down\.value has shape "
            r"\(64, 32\) in the checkpoint, \(96, 32\) in the target",
        ):
            ck.restore(st.abstract_train_state(tx, s2.params))
        deeper = model.Transformer(model.get_config("tiny", **{**TINY, "num_layers": 2}), rngs=nnx.Rngs(0))
        _g3, s3 = st.init_train_state(deeper, tx)
        with pytest.raises(ValueError, match=r"blocks\.1\..* is not in the checkpoint"):
            ck.restore(st.abstract_train_state(tx, s3.params))
        with pytest.raises(ValueError, match=r"the checkpoint has opt_state\..*, which the target lacks"):
            ck.restore(st.TrainState(step=abstract.step, params=abstract.params, opt_state=()))
        with pytest.raises(ValueError, match=r"restore target leaf step is a str"):
            ck.restore(st.TrainState(step="zero", params=abstract.params, opt_state=abstract.opt_state))
        assert ck.all_steps() == [1]


def _truncate_arrays(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)


def _delete_arrays(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        os.remove(path)


def _garbage_meta(step_dir):
    (path,) = [p for p in glob.glob(os.path.join(step_dir, "meta", "*")) if "commit" not in p]
    with open(path, "w") as f:
        f.write('{"format": "jaxapr.checkpoint/1", "step":')


def _delete_tree_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _rot_bit(blob):
    """Offset of one bit flip in `blob` that leaves it decodable with different content.

    Orbax writes each array chunk as a zstd frame, packed one after another in a data file; a
    flip in a frame header or between frames makes the file unreadable (caught, but not by the
    checksums), and where the middle of the file falls depends on the order of concurrent
    writes. So the flip goes into the largest frame, at the first offset past its middle that
    zstd still decodes to as many bytes as before, checked with an independent
    decoder. A file that is not zstd (uncompressed arrays) is flipped in its middle."""
    if not blob.startswith(ZSTD_MAGIC):
        return len(blob) // 2
    frames, start = [], 0
    while start >= 0:
        d = zstandard.ZstdDecompressor().decompressobj()
        payload = d.decompress(blob[start:])
        end = len(blob) - len(d.unused_data)
        frames.append((start, end, payload))
        start = blob.find(ZSTD_MAGIC, end)
    start, end, payload = max(frames, key=lambda f: f[1] - f[0])
    for offset in range((start + end) // 2, end):
        frame = bytearray(blob[start:end])
        frame[offset - start] ^= 0x10
        try:
            out = zstandard.ZstdDecompressor().decompress(bytes(frame), max_output_size=2 * len(payload))
        except zstandard.ZstdError:
            continue
        if len(out) == len(payload) and out != payload:
            return offset
    raise AssertionError("no bit of the largest zstd frame flips to a decodable, different frame")


def _flip_bytes(step_dir):
    """Bit rot inside every array data file that leaves it readable: orbax reads such files
    without complaint (the values are wrong), so only the checksums can tell."""
    files = [
        p
        for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
        if os.path.getsize(p) > 4096
    ]
    assert files
    for path in files:
        with open(path, "rb") as f:
            blob = bytearray(f.read())
        blob[_rot_bit(bytes(blob))] ^= 0x10
        with open(path, "wb") as f:
            f.write(blob)


@pytest.mark.parametrize(
    "corrupt", [_truncate_arrays, _delete_arrays, _garbage_meta, _delete_tree_metadata, _flip_bytes]
)
def test_corrupt_latest_falls_back_and_is_kept(tmp_path, setup, corrupt, caplog):
    _, _, state, abstract = setup
    d = tmp_path / "ck"
    with Checkpointer(d, config=CONFIG, async_save=False) as ck:
        for step in (1, 2, 3):
            ck.save(step, bumped(state, step), extra={"at": step})
    corrupt(str(d / "3"))
    with Checkpointer(d, config=CONFIG) as ck:
        assert ck.latest_step() == 3
        with pytest.raises(CorruptCheckpointError, match=r"^checkpoint step 3 in '.*ck' is corrupt: ") as e:
            ck.restore(abstract, step=3)
        assert "\n" not in str(e.value)
        with caplog.at_level(logging.WARNING, logger="jaxapr.train.checkpoint"):
            restored, extra = ck.restore(abstract)
        assert extra == {"at": 2}
        assert_same(restored, bumped(state, 2))
        assert "checkpoint step 3" in caplog.text and "corrupt" in caplog.text
        assert os.path.isdir(d / "3")  # nothing deleted by restore
        # The resumed run reaches step 3 again: the corrupt one is moved aside, not deleted.
        assert ck.save(3, bumped(state, 30))
        ck.wait()
        assert ck.all_steps() == [1, 2, 3]
        assert os.path.isdir(d / "corrupt" / "3")
    with Checkpointer(d, config=CONFIG) as ck:
        assert ck.all_steps() == [1, 2, 3]
        restored, extra = ck.restore(abstract)
        assert_same(restored, bumped(state, 30))


def test_all_corrupt_is_a_clear_error(tmp_path, setup):
    _, _, state, abstract = setup
    d = tmp_path / "ck"
    with Checkpointer(d, config=CONFIG, async_save=False) as ck:
        ck.save(1, state)
        ck.save(2, state)
    _delete_tree_metadata(str(d / "1"))
    _garbage_meta(str(d / "2"))
    with Checkpointer(d, config=CONFIG) as ck:
        with pytest.raises(
            CorruptCheckpointError,
            match=r"no checkpoint in '.*ck' restores: all of steps \[1, 2\] "
            r"are corrupt \(newest: checkpoint step 2",
        ):
            ck.restore(abstract)
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_flipped_bytes_are_caught_by_the_checksums(tmp_path, setup):
    _, _, state, abstract = setup
    d = tmp_path / "ck"
    with Checkpointer(d, config=CONFIG, async_save=False) as ck:
        ck.save(1, state)
        ck.save(2, bumped(state, 2))
    _flip_bytes(str(d / "2"))
    with Checkpointer(d, config=CONFIG) as ck:
        with pytest.raises(
            CorruptCheckpointError,
            match=r"^checkpoint step 2 in .* is corrupt: array \S+ does not "
            r"match its saved checksum \(\d+ of \d+ arrays differ\)$",
        ):
            ck.restore(abstract, step=2)
        restored, _ = ck.restore(abstract)
    assert_same(restored, state)


def test_non_finite_state_counts_as_corrupt(tmp_path, setup):
    _, _, state, abstract = setup
    nan_moment = jax.tree.map(lambda x: x, state)
    nan_moment.opt_state[1][0].mu["embed"][...] = nan_moment.opt_state[1][0].mu["embed"][...].at[0, 0].set(jnp.inf)
    d = tmp_path / "ck"
    with Checkpointer(d, config=CONFIG, async_save=False) as ck:
        ck.save(1, state)
        ck.save(2, nan_moment)  # saved as it is: its checksums match, its values are not usable
        with pytest.raises(
            CorruptCheckpointError,
            match=r"checkpoint step 2 in .* is corrupt: array "
            r"opt_state\.1\.0\.mu\.embed\.value holds NaN or infinite",
        ):
            ck.restore(abstract, step=2)
        restored, _ = ck.restore(abstract)
        assert_same(restored, state)
        ck.save(2, bumped(state, 1))  # the resumed run writes step 2 again; the bad one is kept aside
        assert os.path.isdir(d / "corrupt" / "2")


def test_half_written_checkpoint_is_never_latest(tmp_path, setup):
    _, _, state, abstract = setup
    d = tmp_path / "ck"
    with Checkpointer(d, config=CONFIG) as ck:
        ck.save(5, state)
    # What a process killed mid-save leaves behind: the tmp directory orbax renames on success.
    tmp = d / "6.orbax-checkpoint-tmp"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"\x00" * 10)
    with Checkpointer(d, config=CONFIG) as ck:
        assert ck.all_steps() == [5] and ck.latest_step() == 5
        restored, _ = ck.restore(abstract)
        assert_same(restored, state)
        assert ck.save(6, bumped(state, 6))  # the same step is written cleanly afterwards
        ck.wait()
        assert ck.all_steps() == [5, 6]
        assert_same(ck.restore(abstract)[0], bumped(state, 6))


def test_process_killed_during_async_save(tmp_path):
    """A real crash: the process exits right after an asynchronous save() returns."""
    d = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import os
        import jax.numpy as jnp
        from jaxapr.train.checkpoint import Checkpointer
        ck = Checkpointer({str(d)!r}, config={{}})
        ck.save(1, {{"w": jnp.arange(4.0)}})
        ck.wait()
        ck.save(2, {{"w": jnp.ones((4096, 4096))}})  # 64 MiB, still being written
        os._exit(0)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    with Checkpointer(d, config={}) as ck:
        latest = ck.latest_step()
        target = {"w": jax.ShapeDtypeStruct((4,) if latest == 1 else (4096, 4096), jnp.float32)}
        restored, _ = ck.restore(target)
    if latest == 1:  # the usual outcome: step 2 never became visible
        assert not os.path.isdir(d / "2")
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0, dtype=np.float32))
    else:  # the write won the race; then it is complete
        assert latest == 2
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones((4096, 4096), np.float32))


# --------------------------------------------------------------------------------------
# A resumed run continues exactly: state + data iterator + PRNG key through a checkpoint.
# --------------------------------------------------------------------------------------
def _loader():
    ds = (
        grain.MapDataset.range(64)
        .shuffle(seed=1)
        .map(lambda i: np.random.default_rng(int(i)).integers(1, 300, size=8).astype(np.int32))
    )
    return ds.batch(2).to_iter_dataset()


def test_resumed_run_continues_exactly(tmp_path, setup):
    graphdef, tx, _, abstract = setup
    policy = model.Transformer(model.get_config("tiny", **TINY), rngs=nnx.Rngs(1))
    _, state0 = st.init_train_state(policy, tx)

    @jax.jit
    def train_step(state, tokens, key):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            weights = jax.random.uniform(key, ce.shape)  # the key matters
            return (ce * weights).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return st.TrainState(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        ), loss

    def run(state, it, key, steps):
        losses = []
        for _ in range(steps):
            key, sub = jax.random.split(key)
            state, loss = train_step(state, jnp.asarray(next(it)), sub)
            losses.append(float(loss))
        return state, key, losses

    full, _, full_losses = run(state0, iter(_loader()), jax.random.key(0), 6)

    it = iter(_loader())
    part, key, losses = run(state0, it, jax.random.key(0), 3)
    with Checkpointer(tmp_path / "ck", config=CONFIG) as ck:
        ck.save(3, {"state": part, "key": key}, extra={"data": it.get_state()})
    del part, it, key  # "crash"
    with Checkpointer(tmp_path / "ck", config=CONFIG) as ck:
        saved, extra = ck.restore({"state": abstract, "key": jax.eval_shape(lambda: jax.random.key(0))})
    it = iter(_loader())
    it.set_state(extra["data"])
    part, _, more = run(saved["state"], it, saved["key"], 3)
    assert losses + more == full_losses
    assert int(part.step) == 6
    assert_same(part, full)
