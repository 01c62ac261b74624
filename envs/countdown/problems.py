"""Countdown problem generation (the APR paper's distribution) and train/val/test splits.

Distribution: the target is uniform in [min_target, max_target], each of the N numbers is
uniform in [1, max_number], and a draw is redrawn until it is solvable (paper: N = 4,
targets 10..100, numbers 1..99). Candidates are drawn in fixed-size chunks, chunk ``r``
from ``jax.random.fold_in(key, r)``, checked for solvability in one batched call, and the
accepted ones kept in order. The chunk size depends only on N, so the problems are a
function of the key alone: the first P problems of a larger request are the P problems of
a smaller one, on any machine and any number of devices (random bits are partitionable).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from envs.countdown import rules

# Candidates drawn per chunk, per N. Fixed (never derived from P or the device count) so that
# the problems depend on the key alone.
_CHUNK = {2: 65536, 3: 65536, 4: 65536, 5: 4096, 6: 256}
# Give up when this many chunks in a row accept nothing at all (impossible ranges).
_MAX_EMPTY_CHUNKS = 16
SPLITS_FORMAT = "jaxapr.countdown.splits/1"


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise ValueError(f"{name}={value!r} is out of range: expected an int from {lo} to {hi}")
    return int(value)


def check_ranges(num_numbers, min_target, max_target, max_number) -> tuple[int, int, int, int]:
    """Validates the distribution's parameters; one-line ValueError naming the bad value."""
    n = rules.check_num_numbers(num_numbers)
    top = rules.MAX_VALUE - 1
    min_target = _check_int("min_target", min_target, 0, top)
    max_target = _check_int("max_target", max_target, 0, top)
    if min_target > max_target:
        raise ValueError(f"min_target={min_target} is above max_target={max_target}: expected min_target <= max_target")
    max_number = _check_int("max_number", max_number, 1, top)
    return n, min_target, max_target, max_number


@functools.cache
def _draw_fn(num_numbers: int, chunk: int, devices: tuple):
    """A jitted function key, ranges -> (numbers, targets, solvable) for one chunk."""

    def draw(key, min_target, max_target, max_number):
        k_num, k_tgt = jax.random.split(key)
        numbers = jax.random.randint(k_num, (chunk, num_numbers), 1, max_number + 1, dtype=jnp.int32)
        targets = jax.random.randint(k_tgt, (chunk,), min_target, max_target + 1, dtype=jnp.int32)
        return numbers, targets, rules.is_solvable(numbers, targets)

    if len(devices) > 1 and chunk % len(devices) == 0:
        mesh = Mesh(np.array(devices), ("batch",))
        rows = NamedSharding(mesh, PartitionSpec("batch"))
        return jax.jit(draw, out_shardings=(rows, rows, rows))
    jitted = jax.jit(draw)

    def on_device(*args):
        with jax.default_device(devices[0]):
            return jitted(*args)

    return on_device


def problem_stream(
    key: jax.Array,
    num_numbers: int = 4,
    min_target: int = 10,
    max_target: int = 100,
    max_number: int = 99,
    devices: Sequence[jax.Device] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields the accepted problems of chunk 0, 1, 2, ... as numpy (numbers, targets)."""
    n, min_target, max_target, max_number = check_ranges(num_numbers, min_target, max_target, max_number)
    devices = tuple(jax.local_devices() if devices is None else devices)
    draw = _draw_fn(n, _CHUNK[n], devices)
    ranges = (np.int32(min_target), np.int32(max_target), np.int32(max_number))
    r, empty = 0, 0
    while True:
        numbers, targets, ok = jax.device_get(draw(jax.random.fold_in(key, r), *ranges))
        r += 1
        empty = 0 if ok.any() else empty + 1
        if empty >= _MAX_EMPTY_CHUNKS:
            raise ValueError(
                f"no solvable problem among {empty * _CHUNK[n]} candidates with num_numbers={n}, "
                f"targets {min_target}..{max_target}, numbers 1..{max_number}: expected ranges "
                "in which some problems are solvable"
            )
        yield numbers[ok], targets[ok]


def generate_problems(
    key: jax.Array,
    num_problems: int,
    num_numbers: int = 4,
    min_target: int = 10,
    max_target: int = 100,
    max_number: int = 99,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(numbers int32[P, N], targets int32[P]): P solvable problems from the key alone.

    ``devices``: where candidates are drawn and checked (default: all local devices, the
    chunk sharded over them); the result does not depend on it.
    """
    num_problems = _check_int("num_problems", num_problems, 0, 2**31 - 1)
    n = rules.check_num_numbers(num_numbers)
    got_n, got_t, have = [], [], 0
    if num_problems:
        for numbers, targets in problem_stream(key, n, min_target, max_target, max_number, devices):
            got_n.append(numbers)
            got_t.append(targets)
            have += len(targets)
            if have >= num_problems:
                break
    else:
        check_ranges(n, min_target, max_target, max_number)
    numbers = np.concatenate(got_n)[:num_problems] if got_n else np.zeros((0, n), np.int32)
    targets = np.concatenate(got_t)[:num_problems] if got_t else np.zeros((0,), np.int32)
    return jnp.asarray(numbers, jnp.int32), jnp.asarray(targets, jnp.int32)


def problem_keys(numbers: np.ndarray, targets: np.ndarray) -> list[tuple]:
    """Canonical identities: (sorted numbers..., target). Splits are disjoint in these."""
    numbers = np.sort(np.asarray(numbers), axis=-1)
    return [tuple(row) + (int(t),) for row, t in zip(numbers.tolist(), np.asarray(targets).tolist())]


@dataclasses.dataclass
class ProblemSplits:
    """Named, disjoint problem sets (e.g. train/val/test) with the config that made them.

    ``splits[name] = (numbers int32[P, N], targets int32[P])`` as numpy arrays.
    """

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    config: dict
    heldout_targets: list[int]

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.splits:
            raise KeyError(f"split {name!r} not found: expected one of {sorted(self.splits)}")
        return self.splits[name]

    def save(self, directory: str | os.PathLike) -> dict:
        """Writes ``<name>.npz`` per split and ``manifest.json`` (sizes, config, sha256)."""
        os.makedirs(directory, exist_ok=True)
        entries = {}
        for name, (numbers, targets) in self.splits.items():
            path = os.path.join(directory, f"{name}.npz")
            np.savez(path, numbers=np.asarray(numbers, np.int32), targets=np.asarray(targets, np.int32))
            entries[name] = {"file": f"{name}.npz", "size": len(targets), "sha256": sha256_file(path)}
        manifest = {
            "format": SPLITS_FORMAT,
            "config": self.config,
            "heldout_targets": list(self.heldout_targets),
            "splits": entries,
        }
        with open(os.path.join(directory, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        return manifest

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ProblemSplits:
        """Reads what ``save`` wrote, checking format, sizes and checksums."""
        path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no manifest.json in {os.fspath(directory)!r}: expected a directory written by ProblemSplits.save"
            )
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != SPLITS_FORMAT:
            raise ValueError(f"manifest format {manifest.get('format')!r} in {path!r}: expected {SPLITS_FORMAT!r}")
        splits = {}
        for name, entry in manifest["splits"].items():
            file = os.path.join(directory, entry["file"])
            if not os.path.isfile(file):
                raise FileNotFoundError(f"split file {file!r} listed in the manifest is missing")
            digest = sha256_file(file)
            if digest != entry["sha256"]:
                raise ValueError(
                    f"checksum of {file!r} is {digest[:12]}...: expected {entry['sha256'][:12]}... (file changed or corrupt)"
                )
            with np.load(file) as data:
                numbers, targets = data["numbers"], data["targets"]
            if len(targets) != entry["size"]:
                raise ValueError(f"split {name!r} has {len(targets)} problems: expected {entry['size']}")
            splits[name] = (numbers, targets)
        return cls(splits, manifest["config"], manifest["heldout_targets"])


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes (manifests use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_splits(
    seed: int,
    sizes: Mapping[str, int],
    *,
    num_numbers: int = 4,
    min_target: int = 10,
    max_target: int = 100,
    max_number: int = 99,
    holdout_target_fraction: float = 0.0,
    heldout_splits: Sequence[str] = (),
) -> ProblemSplits:
    """Disjoint splits of generated problems, e.g. ``sizes={"train": 50000, "val": 500, "test": 500}``.

    Problems are unique by (sorted numbers, target) across and within splits. They come from
    ``generate_problems(PRNGKey(seed), ...)``'s stream in order and fill the splits in the
    order of ``sizes``. With ``holdout_target_fraction`` f > 0, round(f * #targets) target
    values (chosen from the seed) are held out, as in the Stream of Search work: the splits
    named in ``heldout_splits`` (e.g. ``"test_unseen"``) contain only those targets and all
    other splits none of them.
    """
    seed = _check_int("seed", seed, 0, 2**32 - 1)
    n, min_target, max_target, max_number = check_ranges(num_numbers, min_target, max_target, max_number)
    for name, size in sizes.items():
        _check_int(f"sizes[{name!r}]", size, 0, 2**31 - 1)
    unknown = [s for s in heldout_splits if s not in sizes]
    if unknown:
        raise ValueError(f"heldout_splits names {unknown} not in sizes: expected some of {list(sizes)}")
    if not 0.0 <= float(holdout_target_fraction) < 1.0:
        raise ValueError(f"holdout_target_fraction={holdout_target_fraction!r} is out of range: expected 0 <= f < 1")
    if heldout_splits and holdout_target_fraction == 0.0:
        raise ValueError(f"heldout_splits={list(heldout_splits)} needs holdout_target_fraction > 0")
    key = jax.random.PRNGKey(seed)
    all_targets = np.arange(min_target, max_target + 1)
    num_held = round(float(holdout_target_fraction) * len(all_targets))
    if holdout_target_fraction > 0 and num_held == 0:
        raise ValueError(
            f"holdout_target_fraction={holdout_target_fraction} holds out no target of {len(all_targets)}: expected a larger fraction"
        )
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0x7A46), len(all_targets)))
    held = np.sort(all_targets[perm[:num_held]])
    held_set = set(held.tolist())

    pending = {"seen": [s for s in sizes if s not in heldout_splits], "held": list(heldout_splits)}
    out = {name: ([], []) for name in sizes}
    seen_keys: set = set()
    stream = problem_stream(key, n, min_target, max_target, max_number)
    stale = 0
    while any(len(out[s][1]) < sizes[s] for s in sizes):
        numbers, targets = next(stream)
        before = len(seen_keys)
        for row, t, k in zip(numbers, targets, problem_keys(numbers, targets)):
            if k in seen_keys:
                continue
            group = pending["held" if int(t) in held_set else "seen"]
            while group and len(out[group[0]][1]) >= sizes[group[0]]:
                group.pop(0)
            if not group:
                continue
            seen_keys.add(k)
            out[group[0]][0].append(row)
            out[group[0]][1].append(int(t))
        stale = 0 if len(seen_keys) > before else stale + 1
        if stale >= _MAX_EMPTY_CHUNKS:
            got = {s: len(out[s][1]) for s in sizes}
            raise ValueError(
                f"only {got} unique problems found for sizes={dict(sizes)}: expected sizes that "
                f"the distribution (num_numbers={n}, targets {min_target}..{max_target}, numbers "
                f"1..{max_number}, held-out targets {held.tolist()[:8]}...) can fill"
            )
    splits = {
        name: (np.array(nums, np.int32).reshape(-1, n), np.array(tg, np.int32)) for name, (nums, tg) in out.items()
    }
    config = dict(
        seed=seed,
        sizes=dict(sizes),
        num_numbers=n,
        min_target=min_target,
        max_target=max_target,
        max_number=max_number,
        holdout_target_fraction=float(holdout_target_fraction),
        heldout_splits=list(heldout_splits),
    )
    return ProblemSplits(splits, config, held.tolist())
