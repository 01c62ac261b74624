r"""Build the SoS+ and APR datasets: problems -> split -> traces -> tokenized shards.

    python -m experiments.gen_data --config=experiments/configs/data.py:tiny --out=/tmp/jaxapr_data
    python -m experiments.gen_data --config=experiments/configs/data.py:paper --out=data/paper \
        --config.num_workers=16

Writes <out>/problems (the splits, with a manifest), <out>/<kind> for each kind in
config.kinds (shards + manifest), <out>/identity.json (the config that made the data, less
``num_workers``), <out>/config.json (the resolved config) and, last, <out>/gen_data.json
(counts, token statistics, timings), and prints a table. Its "within"
columns are the demonstrators' ceilings: the share of problems whose trace solves with every
call fitting a 512 / 1,024 / 4,096-token window (the manifest's ``solved_within``).

Many hosts (see jaxapr.distributed; e.g. ``python -m experiments.launch --num_processes=2 --
experiments.gen_data ...``): every process draws the same problems (cheap, deterministic),
the trace chunks are split over the processes, and process 0 writes every file: the output
is byte for byte the single-process one (<out> must be on a file system all processes see).

<out> must be new or empty. ``--overwrite`` replaces a previous gen_data output there as a
whole (every file but the lock), so no kind of an earlier config is left beside the new
problems; it refuses a directory that gen_data did not write. One writer at a time: <out> is
locked while gen_data writes (``jaxapr.train.lock``). :func:`prepare` (the quickstart's and
the pipeline's data step) reuses <out> when it holds a complete dataset of the same identity
and fails in one line, listing the differing fields, when it holds another config's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from absl import app, flags

from experiments import cli
from jaxapr import distributed

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program: ``prepare`` and ``run`` are
    imported by other absl programs (the pipeline, the quickstart, the benchmarks), whose own
    flags (e.g. ``--out``) would clash."""
    distributed.define_flags()
    cli.define_config_file("config", cli.config_path("data.py:tiny"), "Dataset config (file:preset).")
    flags.DEFINE_string("out", None, "Output directory (created; must be empty or not exist).")
    flags.DEFINE_bool("overwrite", False, "Replace the gen_data output in --out (all of it).")


IDENTITY = "identity.json"
IDENTITY_FORMAT = "jaxapr.gen_data/1"
NOT_IDENTITY = ("num_workers",)  # config fields that do not change the data


def identity(config) -> dict:
    """What makes a dataset: the resolved config less :data:`NOT_IDENTITY`."""
    from jaxapr.train import run_config

    ident = run_config.to_dict(config)
    for key in NOT_IDENTITY:
        ident.pop(key, None)
    return ident


def recorded_identity(out: str) -> dict | None:
    """The identity recorded in ``out`` by gen_data, or None when there is none."""
    path = os.path.join(out, IDENTITY)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path!r} is not readable ({type(e).__name__}: {e}): expected gen_data's identity record"
        ) from None
    if not isinstance(record, dict) or record.get("format") != IDENTITY_FORMAT:
        raise ValueError(f"{path!r} is not a {IDENTITY_FORMAT!r} record: expected gen_data's identity record")
    return record["config"]


def _contents(out: str) -> list[str]:
    from jaxapr.train.lock import LOCK_NAME

    return sorted(e for e in os.listdir(out) if e != LOCK_NAME)


def _claim(config, out: str, overwrite: bool, log) -> None:
    """Make ``out`` this run's: empty it (``overwrite`` and a previous gen_data output) or
    check it is empty, then record the identity and the config (process 0)."""
    entries = _contents(out)
    if entries:
        if not overwrite:
            raise ValueError(
                f"--out={out!r} is not empty: expected a new directory (or --overwrite to replace the "
                "gen_data output there)"
            )
        if IDENTITY not in entries:
            raise ValueError(
                f"--out={out!r} holds files that gen_data did not write (no {IDENTITY}): expected a new "
                "or empty directory (--overwrite replaces only a gen_data output)"
            )
        for name in entries:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        log(f"--overwrite: deleted the previous dataset in {out} ({', '.join(entries)})")
    with open(os.path.join(out, IDENTITY), "w") as f:
        json.dump({"format": IDENTITY_FORMAT, "config": identity(config)}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))


def is_complete(config, out: str) -> bool:
    """``out`` holds every part of ``config``'s dataset (gen_data.json is written last)."""
    return os.path.isfile(os.path.join(out, "gen_data.json")) and all(
        os.path.isfile(os.path.join(out, part, "manifest.json")) for part in ("problems", *config.kinds)
    )


def prepare(config, out: str, log=print, progress: bool = True) -> str:
    """``config``'s dataset in ``out``: reused when ``out`` holds a complete one of the same
    identity or of it with more demonstration kinds (``config.kinds``); built when ``out`` is new
    or empty, holds an interrupted build of it, or lacks some of its kinds (built again with the
    kinds of both); another config's data (or files gen_data did not write) are a one-line
    ``ValueError``.
    ``progress``: a bar per demonstration kind on stderr while building."""
    from jaxapr.train import run_config

    saved = recorded_identity(out) if os.path.isdir(out) else None
    if saved is None:
        if os.path.isdir(out) and _contents(out):
            raise ValueError(
                f"{out!r} holds files but no gen_data identity ({IDENTITY}): expected a new directory or "
                "one written by experiments.gen_data (delete it to rebuild the data)"
            )
        run(config, out, log=log, progress=progress)
        return out
    wanted = identity(config)
    have, need = set(saved.get("kinds", ())), set(wanted.get("kinds", ()))
    diffs = run_config.differences(dict(saved, kinds=None), dict(wanted, kinds=None))
    if diffs:
        raise ValueError(
            f"{out!r} holds the dataset of another config: {run_config.describe(diffs)}: expected the "
            "same config to reuse it (use another directory, or gen_data --overwrite to replace it)"
        )
    if need <= have and is_complete(config, out):
        log(f"  reusing the dataset in {out} (same config)")
        return out
    from jaxapr import data

    if need <= have:
        log(f"  {out} holds an interrupted build of this dataset: building it again")
    else:  # the same problems, with this run's demonstration kinds added
        log(f"  {out} holds this dataset without {sorted(need - have)}: building it again with them")
    config = config.copy_and_resolve_references()
    config.kinds = tuple(k for k in data.KINDS if k in have | need)
    run(config, out, overwrite=True, log=log, progress=progress)
    return out


def run(config, out: str, overwrite: bool = False, log=print, progress: bool = True) -> dict:
    """Builds ``config``'s dataset in ``out`` (see the module docstring); returns the report."""
    from jaxapr import data
    from jaxapr.train import lock, loop

    kinds = tuple(config.kinds)
    unknown = [k for k in kinds if k not in data.KINDS]
    if unknown:
        raise ValueError(f"config.kinds has {unknown}: expected some of {data.KINDS}")
    out = loop.prepare_workdir(out, what="out")
    with lock.hold(out, log=log):
        distributed.run_on_main(_claim, config, out, overwrite, log)  # nobody writes before process 0 claimed it
        return _build(config, out, kinds, log, progress)


def _build(config, out: str, kinds: tuple, log, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from envs import countdown
    from jaxapr import data

    process, processes = distributed.process_index(), distributed.process_count()
    main = process == 0
    log(f"resolved config:\n{config}")
    p = config.problems
    sizes = {"train": p.train, "val": p.val, "test": p.test}
    heldout = []
    if p.test_unseen:
        sizes["test_unseen"] = p.test_unseen
        heldout = ["test_unseen"]
    t0 = time.time()
    splits = countdown.make_splits(
        config.seed,
        sizes,
        num_numbers=p.num_numbers,
        min_target=p.min_target,
        max_target=p.max_target,
        max_number=p.max_number,
        holdout_target_fraction=p.holdout_target_fraction,
        heldout_splits=heldout,
    )
    if main:
        splits.save(os.path.join(out, "problems"))
    report = {"problems_seconds": time.time() - t0, "kinds": {}}
    log(f"problems: {sizes} in {report['problems_seconds']:.1f} s")
    workers = os.cpu_count() if config.num_workers < 0 else config.num_workers
    for kind in kinds:
        trace_config = data.TraceConfig(kind=kind, **config[kind].to_dict())
        t1 = time.time()
        # Problems traced per second on a bar per kind (stderr); with many processes, this one's share.
        bar = tqdm(
            total=sum(len(t) for _, t in splits.splits.values()),
            desc=f"{kind} traces",
            unit="problem",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
            disable=not (main and progress),
        )

        def advance(done, total, bar=bar):
            bar.total = total
            bar.update(done - bar.n)

        try:
            manifest = data.build_dataset(
                os.path.join(out, kind),
                splits.splits,
                trace_config,
                seed=config.seed,
                num_workers=workers,
                problems_per_task=config.problems_per_task,
                shard_examples=config.shard_examples,
                progress=advance,
                process_index=process,
                num_processes=processes,
            )
        finally:
            bar.close()
        report["kinds"][kind] = {
            "seconds": time.time() - t1,
            "bytes_on_disk": manifest["bytes_on_disk"],
            "splits": {s: {k: v for k, v in m.items() if k != "files"} for s, m in manifest["splits"].items()},
        }
    report["total_seconds"] = time.time() - t0
    if main:
        with open(os.path.join(out, "gen_data.json"), "w") as f:
            json.dump(report, f, indent=2)
    windows = (512, 1024, 4096)
    rows = [
        (
            "kind",
            "split",
            "problems",
            "solved",
            "within " + " / ".join(f"{c:,}" for c in windows),
            "longest call p50 / p90",
            "children mean (range)",
            "examples",
            "tokens/problem",
            "max tokens",
            "MB",
        )
    ]
    for kind, r in report["kinds"].items():
        for split, s in r["splits"].items():
            n = max(1, s["problems"])
            rows.append(
                (
                    kind,
                    split,
                    f"{s['problems']:,}",
                    f"{s['solved'] / n:.1%}",
                    " / ".join(f"{s['solved_within'][str(c)] / n:.0%}" for c in windows),
                    f"{s['longest_call']['p50']:,.0f} / {s['longest_call']['p90']:,.0f}",
                    _children(s["children"]),
                    f"{s['examples']:,}",
                    f"{s['tokens_per_problem']:,.0f}",
                    f"{s['tokens_per_example']['max']:,}",
                    "",
                )
            )
        rows.append((kind, "(all)", "", "", "", "", "", "", "", "", f"{r['bytes_on_disk'] / 2**20:,.1f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        log("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    log(f"wrote {out} in {report['total_seconds']:.1f} s")
    return report


def _children(hist: dict) -> str:
    """'4.9 (2..36)' from a manifest's {children: problems} histogram."""
    counts = {int(k): v for k, v in hist.items()}
    n = sum(counts.values())
    mean = sum(k * v for k, v in counts.items()) / max(n, 1)
    return f"{mean:.1f} ({min(counts)}..{max(counts)})" if counts else ""


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.out:
        raise app.UsageError("--out is required: the directory to write the dataset into")
    distributed.initialize_or_exit()  # before any JAX computation
    run(FLAGS.config, FLAGS.out, FLAGS.overwrite, log=distributed.log)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
