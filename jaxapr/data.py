"""Datasets of tokenized search traces: build (in parallel), store as shards, load as batches.

One module (over 500 lines) because building, storing and loading share one shard layout,
defined here once.

An **example** is one call: ``[bos] prompt output [eos]``, tokenized with
``CountdownTokenizer``, with ``prompt_len`` = the number of leading tokens that are context
and never trained (bos + prompt). For SoS+ a problem gives one example whose prompt is the
first line (``Current State: T:[...], Operations: []``). For APR every call of the problem's
tree is an example: a thread's first call has its two-line prompt as context, and a
continuation call has the whole join context (``traces.join`` of the previous call and the
children's final calls, i.e. everything through ``<End Sub Searches>``) as context.

On disk (``build_dataset``): ``<dir>/<split>/shard-00000.tokens.npy`` (all tokens of the
shard, flat, in the vocabulary's storage dtype, uint16) and ``shard-00000.index.npy``
(int64[E, 5]: offset, length, prompt_len, problem, call kind), plus ``<dir>/manifest.json``
(config, seed, counts, token statistics, sha256 of every file). Building is deterministic:
problem ``i`` draws its beam sizes and solver seed from ``(seed, i)`` alone, so the files do
not depend on the number of worker processes, nor of hosts (``process_index``/``num_processes``).

Loading (``make_loader``) uses grain: a random-access source over the memory-mapped shards,
per-host sharding, a per-epoch shuffle from a seed, then packing into fixed-length rows
(first-fit, with segment ids and positions so that packed examples never attend to each
other) or padding, and fixed-shape batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import time
from collections.abc import Iterator, Sequence

import numpy as np

from envs.countdown.problems import sha256_file
from jaxapr.tokenizer import VOCAB_VERSION, CountdownTokenizer

FORMAT = "jaxapr.traces.dataset/1"
CALL_KINDS = {"sosp": 0, "root_first": 1, "continuation": 2, "child_first": 3}
KINDS = ("sosp", "apr")


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """How traces are written. Beam sizes are drawn per problem, as the original scripts do:
    SoS+ ``beam_size`` uniform in [min_beam_size, max_beam_size]; APR ``beam_size`` likewise and
    ``sub_call_beam_size`` uniform in [beam_size, max_sub_call_beam_size]."""

    kind: str = "sosp"
    min_beam_size: int = 1
    max_beam_size: int = 5
    max_sub_call_beam_size: int = 10
    spawn_prob: float = 0.9
    max_depth: int = 1
    token_budget: bool = False  # SoS+: prefix "Token Budget: N " (N = tokens rounded up to 512)
    # APR: the share of problems whose root calls start with "Sub Call Budget: N " (N = the
    # tree's children), drawn per problem: 0 none, 1 all (True = 1); a share in between trains
    # one policy that runs with or without a budget.
    sub_call_budget: float = 0.0
    only_solved: bool = False  # keep only problems whose trace reaches the goal
    shuffle: bool = True  # expansions write their kept children in a random order (the original); False: best first

    def check(self) -> TraceConfig:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        if not 1 <= self.min_beam_size <= self.max_beam_size:
            raise ValueError(f"beam sizes {self.min_beam_size}..{self.max_beam_size}: expected 1 <= min <= max")
        if self.kind == "apr" and self.max_sub_call_beam_size < 1:
            raise ValueError(f"max_sub_call_beam_size={self.max_sub_call_beam_size}: expected >= 1")
        if not 0.0 <= float(self.sub_call_budget) <= 1.0:
            raise ValueError(f"sub_call_budget={self.sub_call_budget!r}: expected a share of problems in [0, 1]")
        return self


def _problem_rng(seed: int, index: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def problem_texts(nums: Sequence[int], target: int, config: TraceConfig, seed: int, index: int):
    """The (prompt, output, call kind) texts of one problem, and whether its trace solved it."""
    from jaxapr import traces

    rng = _problem_rng(seed, index)
    beam = rng.randint(config.min_beam_size, config.max_beam_size)
    nums, target = [int(x) for x in nums], int(target)
    if config.kind == "sosp":
        solver_seed = rng.getrandbits(32)
        text = traces.sosp(nums, target, beam_size=beam, seed=solver_seed, shuffle=config.shuffle)
        if config.token_budget:
            tokens = len(_TOKENIZER.encode(text)) + 2
            budget = 512 * max(1, math.ceil(tokens / 512))
            text = traces.sosp(
                nums, target, beam_size=beam, seed=solver_seed, token_budget=budget, shuffle=config.shuffle
            )
        head = text.index("\n") + 1
        solved = traces.verify(text, nums, target).success
        return [(text[:head], text[head:], CALL_KINDS["sosp"])], solved
    sub_beam = rng.randint(min(beam, config.max_sub_call_beam_size), config.max_sub_call_beam_size)
    solver_seed = rng.getrandbits(32)
    share = float(config.sub_call_budget)
    budget = share >= 1.0 or (share > 0.0 and rng.random() < share)  # no draw at 0 or 1: same bytes as before
    tree = traces.apr(
        nums,
        target,
        beam_size=beam,
        sub_call_beam_size=sub_beam,
        seed=solver_seed,
        max_depth=config.max_depth,
        spawn_prob=config.spawn_prob,
        sub_call_budget=budget,
        shuffle=config.shuffle,
    )
    solved = traces.verify(tree.final_text, nums, target).success
    return list(tree_calls(tree, is_root=True)), solved


def tree_calls(tree, is_root: bool):
    """(prompt, output, kind) of every call of a CallTree, parents before their children."""
    from jaxapr import traces

    for k, call in enumerate(tree.main_calls):
        if k == 0:
            cut = _after_line(call, 2)
            kind = CALL_KINDS["root_first" if is_root else "child_first"]
        else:
            context = traces.join(tree.main_calls[k - 1], [c.final_text for c in tree.sub_calls[k - 1]])
            if not call.startswith(context):
                raise ValueError(f"call {k} does not start with its join context")
            cut, kind = len(context), CALL_KINDS["continuation"]
        yield call[:cut], call[cut:], kind
        if k < len(tree.sub_calls):
            for child in tree.sub_calls[k]:
                yield from tree_calls(child, is_root=False)


def _after_line(text: str, lines: int) -> int:
    cut = 0
    for _ in range(lines):
        cut = text.index("\n", cut) + 1
    return cut


_TOKENIZER = CountdownTokenizer()


def _build_chunk(args):
    """Worker: tokenized examples of problems [start, stop). Returns (tokens, index, solved):
    ``solved`` bool[stop - start], whether each problem's trace reaches the goal."""
    numbers, targets, start, config, seed = args
    tok = _TOKENIZER
    pieces, rows, solved = [], [], np.zeros(len(targets), bool)
    offset = 0
    bos, eos = np.array([tok.bos_id], np.int32), np.array([tok.eos_id], np.int32)
    for k, (nums, target) in enumerate(zip(numbers, targets)):
        calls, ok = problem_texts(nums, target, config, seed, start + k)
        solved[k] = ok
        if config.only_solved and not ok:
            continue
        for prompt, output, kind in calls:
            p, o = tok.encode(prompt), tok.encode(output)
            ids = np.concatenate([bos, p, o, eos])
            pieces.append(ids)
            rows.append((offset, len(ids), 1 + len(p), start + k, kind))
            offset += len(ids)
    tokens = np.concatenate(pieces).astype(tok.storage_dtype) if pieces else np.zeros(0, tok.storage_dtype)
    index = np.array(rows, np.int64).reshape(-1, 5)
    return tokens, index, solved


def build_dataset(
    out_dir: str,
    splits: dict,
    config: TraceConfig,
    *,
    seed: int = 0,
    num_workers: int | None = None,
    problems_per_task: int = 256,
    shard_examples: int = 200_000,
    progress=None,
    process_index: int = 0,
    num_processes: int = 1,
) -> dict:
    """Writes a dataset of ``config.kind`` traces for each split; returns the manifest.

    ``splits``: {name: (numbers int[P, N], targets int[P])}, e.g. ``ProblemSplits.splits``.
    ``num_workers``: solver processes (default: all cores; 0 = in this process). ``progress``:
    optional callable(done_problems, total_problems) (with several processes: this one's).

    Many hosts (``num_processes`` > 1, after ``jax.distributed`` is initialized): every process
    calls this with the same arguments and its ``process_index``, ``out_dir`` on a shared file
    system. Process i builds the chunks of ``problems_per_task`` problems whose number is i
    modulo ``num_processes`` into ``<out_dir>/.parts/``; after a barrier, process 0 writes the
    shards and the manifest from all chunks in order and removes the parts, so the files are
    byte for byte those of one process. Every process returns the manifest.
    """
    config.check()
    if not splits:
        raise ValueError("splits is empty: expected at least one {name: (numbers, targets)}")
    if not 0 <= process_index < num_processes:
        raise ValueError(
            f"process_index={process_index} of num_processes={num_processes}: expected "
            "0 <= process_index < num_processes"
        )
    if num_processes > 1:
        from jaxapr import distributed

        if distributed.process_count() != num_processes:
            raise ValueError(
                f"num_processes={num_processes} but jax.process_count()={distributed.process_count()}: "
                "expected jax.distributed to be initialized with that many processes"
            )
    os.makedirs(out_dir, exist_ok=True)
    num_workers = os.cpu_count() if num_workers is None else num_workers
    t0 = time.time()
    manifest = {
        "format": FORMAT,
        "vocab_version": VOCAB_VERSION,
        "token_dtype": np.dtype(_TOKENIZER.storage_dtype).name,
        "config": dataclasses.asdict(config),
        "seed": seed,
        "splits": {},
    }
    pool = mp.get_context("spawn").Pool(num_workers) if num_workers > 0 else None
    try:
        total = sum(len(t) for _, t in splits.values())
        done = 0
        for name, (numbers, targets) in splits.items():
            numbers, targets = np.asarray(numbers).tolist(), np.asarray(targets).tolist()
            if len(numbers) != len(targets):
                raise ValueError(f"split {name!r}: {len(numbers)} number rows but {len(targets)} targets")
            tasks = [
                (numbers[s : s + problems_per_task], targets[s : s + problems_per_task], s, config, seed)
                for s in range(0, len(targets), problems_per_task)
            ]
            if num_processes > 1:  # this process's chunks -> parts; process 0 writes them all in order
                mine = tasks[process_index::num_processes]
                _build_parts(os.path.join(out_dir, PARTS_DIR, name), mine, pool, progress)
                distributed.barrier(f"build_dataset {name}")
                if process_index != 0:
                    continue
                results = (_load_part(os.path.join(out_dir, PARTS_DIR, name), task[2]) for task in tasks)
            else:
                results = pool.imap(_build_chunk, tasks) if pool else map(_build_chunk, tasks)
            writer = _ShardWriter(os.path.join(out_dir, name), shard_examples)
            solved = np.zeros(len(targets), bool)
            longest = np.zeros(len(targets), np.int64)  # each problem's longest example (call), in tokens
            children = np.zeros(len(targets), np.int64)  # child threads per problem (their first calls)
            for (tokens, index, ok), task in zip(results, tasks):
                writer.add(tokens, index)
                solved[task[2] : task[2] + len(ok)] = ok
                np.maximum.at(longest, index[:, 3], index[:, 1])
                np.add.at(children, index[:, 3], index[:, 4] == CALL_KINDS["child_first"])
                done += len(task[1])
                if progress and num_processes == 1:
                    progress(done, total)
            files = writer.close()
            lengths = writer.lengths
            written = longest[longest > 0]
            manifest["splits"][name] = {
                "problems": len(targets),
                "solved": int(solved.sum()),
                "examples": len(lengths),
                # The ceiling of a policy that imitated these traces perfectly with a per-call
                # window of C tokens: the trace solves and every call (BOS + prompt + output +
                # EOS, as a training example) fits in C.
                "solved_within": {str(c): int((solved & (longest <= c)).sum()) for c in REPORT_CONTEXTS},
                # How many child threads the demonstrations spawn per problem: {count: problems}.
                "children": {str(k): int(v) for k, v in enumerate(np.bincount(children)) if v},
                "longest_call": dict(
                    zip(("p50", "p90"), np.percentile(written, [50, 90]).tolist() if len(written) else (0.0, 0.0))
                ),
                "tokens": int(lengths.sum()),
                "trained_tokens": int(writer.trained),
                "tokens_per_problem": float(lengths.sum() / max(1, len(targets))),
                "tokens_per_example": {
                    "mean": float(lengths.mean()) if len(lengths) else 0.0,
                    "max": int(lengths.max(initial=0)),
                    "p99": float(np.percentile(lengths, 99)) if len(lengths) else 0.0,
                },
                "files": {os.path.relpath(f, out_dir): sha256_file(f) for f in files},
            }
    finally:
        if pool:
            pool.close()
            pool.join()
    if process_index == 0:
        manifest["build_seconds"] = time.time() - t0
        manifest["bytes_on_disk"] = sum(
            os.path.getsize(os.path.join(out_dir, f)) for s in manifest["splits"].values() for f in s["files"]
        )
        with open(os.path.join(out_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if num_processes > 1:
            import shutil

            shutil.rmtree(os.path.join(out_dir, PARTS_DIR), ignore_errors=True)
    if num_processes > 1:
        distributed.barrier("build_dataset manifest")
        if process_index != 0:
            with open(os.path.join(out_dir, "manifest.json")) as f:
                manifest = json.load(f)
    return manifest


PARTS_DIR = ".parts"
REPORT_CONTEXTS = (512, 768, 1024, 2048, 4096)  # the manifest's ``solved_within`` windows


def _part_path(directory: str, start: int) -> str:
    return os.path.join(directory, f"part-{start:010d}.npz")


def _build_parts(directory: str, tasks: list, pool, progress) -> None:
    """Build ``tasks`` (this process's chunks) into ``directory``, one npz per chunk, each
    written to a temporary name and renamed when complete."""
    os.makedirs(directory, exist_ok=True)
    results = pool.imap(_build_chunk, tasks) if pool else map(_build_chunk, tasks)
    total, done = sum(len(t[1]) for t in tasks), 0
    for (tokens, index, ok), task in zip(results, tasks):
        path = _part_path(directory, task[2])
        with open(path + ".tmp", "wb") as f:
            np.savez(f, tokens=tokens, index=index, solved=ok)
        os.replace(path + ".tmp", path)
        done += len(task[1])
        if progress:
            progress(done, total)


def _load_part(directory: str, start: int):
    path = _part_path(directory, start)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"dataset part {path!r} is missing: expected every process to have built its chunks "
            "into the shared out_dir (is it on a file system all processes see?)"
        )
    with np.load(path) as part:
        return part["tokens"], part["index"], part["solved"]


class _ShardWriter:
    def __init__(self, directory: str, shard_examples: int):
        os.makedirs(directory, exist_ok=True)
        self.dir, self.limit = directory, shard_examples
        self.tokens, self.index, self.count, self.files = [], [], 0, []
        self.all_lengths, self.trained = [], 0

    def add(self, tokens: np.ndarray, index: np.ndarray):
        self.tokens.append(tokens)
        self.index.append(index)
        self.count += len(index)
        self.all_lengths.append(index[:, 1])
        self.trained += int((index[:, 1] - index[:, 2]).sum())
        if self.count >= self.limit:
            self._flush()

    def _flush(self):
        if not self.index:
            return
        k = len(self.files) // 2
        index = np.concatenate(self.index)
        starts = np.cumsum([0] + [len(t) for t in self.tokens[:-1]])
        # Rebase per-chunk offsets onto the shard's token array.
        index[:, 0] += np.repeat(starts, [len(i) for i in self.index])
        tokens = np.concatenate(self.tokens)
        for suffix, arr in (("tokens", tokens), ("index", index)):
            path = os.path.join(self.dir, f"shard-{k:05d}.{suffix}.npy")
            np.save(path, arr)
            self.files.append(path)
        self.tokens, self.index, self.count = [], [], 0

    def close(self) -> list[str]:
        self._flush()
        self.lengths = np.concatenate(self.all_lengths) if self.all_lengths else np.zeros(0, np.int64)
        return self.files


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def load_manifest(data_dir: str, verify_checksums: bool = False) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no manifest.json in {data_dir!r}: expected a directory written by build_dataset / gen_data"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"dataset format {manifest.get('format')!r} in {path!r}: expected {FORMAT!r}")
    if manifest.get("vocab_version") != VOCAB_VERSION:
        raise ValueError(
            f"dataset vocab_version {manifest.get('vocab_version')} in {path!r}: expected {VOCAB_VERSION} (rebuild it)"
        )
    if verify_checksums:
        for split in manifest["splits"].values():
            for rel, digest in split["files"].items():
                if sha256_file(os.path.join(data_dir, rel)) != digest:
                    raise ValueError(
                        f"checksum of {os.path.join(data_dir, rel)!r} does not match the manifest (file changed or corrupt)"
                    )
    return manifest


class TraceSource:
    """Random access to one split's examples (memory-mapped); a grain data source.

    ``source[i]`` = {"tokens": int32[n], "loss_mask": int32[n], "problem": int, "kind": int}.
    ``loss_mask[t] = 1`` where token t is trained (output and eos; with ``train_on_prompt``
    every token after bos).
    """

    def __init__(self, data_dir: str, split: str, train_on_prompt: bool = False):
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise KeyError(f"split {split!r} not in {data_dir!r}: expected one of {sorted(manifest['splits'])}")
        files = sorted(f for f in manifest["splits"][split]["files"] if f.endswith(".index.npy"))
        self._tokens, index = [], []
        for k, rel in enumerate(files):
            self._tokens.append(
                np.load(os.path.join(data_dir, rel.replace(".index.npy", ".tokens.npy")), mmap_mode="r")
            )
            idx = np.load(os.path.join(data_dir, rel))
            index.append(np.concatenate([idx, np.full((len(idx), 1), k, np.int64)], axis=1))
        self.index = np.concatenate(index) if index else np.zeros((0, 6), np.int64)
        if len(self.index) == 0:
            raise ValueError(f"split {split!r} in {data_dir!r} has no examples: expected a non-empty dataset")
        self.train_on_prompt = train_on_prompt
        self.lengths = self.index[:, 1]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        offset, length, prompt_len, problem, kind, shard = (int(v) for v in self.index[i])
        tokens = np.asarray(self._tokens[shard][offset : offset + length], np.int32)
        mask = np.zeros(length, np.int32)
        mask[1 if self.train_on_prompt else prompt_len :] = 1
        return {"tokens": tokens, "loss_mask": mask, "problem": problem, "kind": kind}


def make_loader(
    data_dir: str,
    split: str,
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    pack: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    train_on_prompt: bool = False,
    packing_bins: int | None = None,
    kind_repeats: dict | None = None,
):
    """A grain ``IterDataset`` of fixed-shape batches (numpy):

    ``tokens`` int32[B, L], ``loss_mask`` int32[B, L], ``segment_ids`` int32[B, L] (0 = padding,
    1, 2, ... = the examples packed into the row), ``positions`` int32[B, L].
    Examples longer than ``seq_len`` are dropped (their count is ``loader.num_dropped``).
    Shuffled per epoch from ``seed``; host ``shard_index`` of ``num_shards`` reads every
    ``num_shards``-th example. ``num_epochs=None`` repeats forever. ``kind_repeats``: how many
    times an example of each call kind (``CALL_KINDS`` names; default 1) appears per epoch,
    e.g. ``{"continuation": 4}`` oversamples APR parents' post-join calls; 0 leaves a kind out.
    """
    import grain
    import grain.experimental as gexp

    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: expected batch_size >= 1 and seq_len >= 2")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index={shard_index} of num_shards={num_shards}: expected 0 <= shard_index < num_shards"
        )
    source = TraceSource(data_dir, split, train_on_prompt)
    keep = np.nonzero(source.lengths <= seq_len)[0]
    keep = keep[shard_index::num_shards]
    if kind_repeats:
        unknown = sorted(set(kind_repeats) - set(CALL_KINDS))
        if unknown:
            raise ValueError(f"kind_repeats names {unknown}: expected call kinds from {sorted(CALL_KINDS)}")
        reps = np.ones(len(CALL_KINDS), np.int64)
        for name, r in kind_repeats.items():
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
                raise ValueError(f"kind_repeats[{name!r}]={r!r}: expected an int >= 0")
            reps[CALL_KINDS[name]] = r
        keep = np.repeat(keep, reps[source.index[keep, 4]])
    if len(keep) == 0:
        raise ValueError(
            f"no example of split {split!r} fits seq_len={seq_len} (shortest: {int(source.lengths.min())} tokens)"
        )
    fields = ("tokens", "loss_mask")
    ds = grain.MapDataset.range(len(keep)).map(lambda i: source[int(keep[i])])
    ds = ds.shuffle(seed=seed).repeat(num_epochs).map(lambda ex: {k: ex[k] for k in fields})
    it = ds.to_iter_dataset()
    if pack:
        it = gexp.FirstFitPackIterDataset(
            it,
            length_struct={k: seq_len for k in fields},
            num_packing_bins=packing_bins or batch_size,
            seed=seed,
            shuffle_bins=True,
        )
        it = it.map(_rename_packed)
    else:
        it = it.map(lambda ex: _pad(ex, seq_len))
    it = it.batch(batch_size, drop_remainder=True)
    it.num_dropped = int(np.sum(source.lengths > seq_len))
    it.num_examples = len(keep)
    return it


def _rename_packed(ex: dict) -> dict:
    return {
        "tokens": ex["tokens"].astype(np.int32),
        "loss_mask": ex["loss_mask"].astype(np.int32),
        "segment_ids": ex["tokens_segment_ids"].astype(np.int32),
        "positions": ex["tokens_positions"].astype(np.int32),
    }


def _pad(ex: dict, seq_len: int) -> dict:
    n = len(ex["tokens"])
    out = {}
    for k in ("tokens", "loss_mask"):
        row = np.zeros(seq_len, np.int32)
        row[:n] = ex[k]
        out[k] = row
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
    return out


def iterate_batches(loader, num_batches: int) -> Iterator[dict]:
    """The first ``num_batches`` batches of a loader (convenience for scripts and tests)."""
    it = iter(loader)
    for _ in range(num_batches):
        yield next(it)
