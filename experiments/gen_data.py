r"""Build the SoS+ and APR datasets: problems -> split -> traces -> tokenized shards.

    python -m experiments.gen_data --config=experiments/configs/data.py:tiny --out=/tmp/jaxapr_data
    python -m experiments.gen_data --config=experiments/configs/data.py:paper --out=data/paper \
        --config.num_workers=16

Writes <out>/problems (the splits, with a manifest), <out>/<kind> for each kind in
config.kinds (shards + manifest), <out>/config.json (the resolved config) and
<out>/gen_data.json (counts, token statistics, timings), and prints a table. Its "within"
columns are the demonstrators' ceilings: the share of problems whose trace solves with every
call fitting a 512 / 1,024 / 4,096-token window (the manifest's ``solved_within``).

Many hosts (see jaxapr.distributed; e.g. ``python -m experiments.launch --num_processes=2 --
experiments.gen_data ...``): every process draws the same problems (cheap, deterministic),
the trace chunks are split over the processes, and process 0 writes every file: the output
is byte for byte the single-process one (<out> must be on a file system all processes see).
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from jaxapr import distributed

FLAGS = flags.FLAGS
distributed.define_flags()
config_flags.DEFINE_config_file("config", "experiments/configs/data.py:tiny", "Dataset config (file:preset).")
flags.DEFINE_string("out", None, "Output directory (created; must be empty or not exist).")
flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty --out.")


def run(config, out: str, overwrite: bool = False, log=print) -> dict:
    from envs import countdown
    from jaxapr import data

    process, processes = distributed.process_index(), distributed.process_count()
    main = process == 0
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out={out!r} is not empty: expected a new directory (or pass --overwrite)")
    kinds = tuple(config.kinds)
    unknown = [k for k in kinds if k not in data.KINDS]
    if unknown:
        raise ValueError(f"config.kinds has {unknown}: expected some of {data.KINDS}")
    distributed.barrier("gen_data checked --out")  # nobody writes before every process has checked it
    os.makedirs(out, exist_ok=True)
    if main:
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    log(f"resolved config:\n{config}")
    p = config.problems
    sizes = {"train": p.train, "val": p.val, "test": p.test}
    heldout = []
    if p.test_unseen:
        sizes["test_unseen"] = p.test_unseen
        heldout = ["test_unseen"]
    t0 = time.time()
    splits = countdown.make_splits(
        config.seed, sizes, num_numbers=p.num_numbers, min_target=p.min_target, max_target=p.max_target,
        max_number=p.max_number, holdout_target_fraction=p.holdout_target_fraction, heldout_splits=heldout)
    if main:
        splits.save(os.path.join(out, "problems"))
    report = {"problems_seconds": time.time() - t0, "kinds": {}}
    log(f"problems: {sizes} in {report['problems_seconds']:.1f} s")
    workers = os.cpu_count() if config.num_workers < 0 else config.num_workers
    for kind in kinds:
        trace_config = data.TraceConfig(kind=kind, **config[kind].to_dict())
        t1 = time.time()
        last = [0.0]

        def progress(done, total, kind=kind, t1=t1):
            if time.time() - last[0] > 5 or done == total:
                last[0] = time.time()
                log(f"  {kind}: {done:,}/{total:,} problems ({done / max(1e-9, time.time() - t1):,.0f}/s)")

        manifest = data.build_dataset(
            os.path.join(out, kind), splits.splits, trace_config, seed=config.seed, num_workers=workers,
            problems_per_task=config.problems_per_task, shard_examples=config.shard_examples, progress=progress,
            process_index=process, num_processes=processes)
        report["kinds"][kind] = {"seconds": time.time() - t1, "bytes_on_disk": manifest["bytes_on_disk"],
                                 "splits": {s: {k: v for k, v in m.items() if k != "files"}
                                            for s, m in manifest["splits"].items()}}
    report["total_seconds"] = time.time() - t0
    if main:
        with open(os.path.join(out, "gen_data.json"), "w") as f:
            json.dump(report, f, indent=2)
    windows = (512, 1024, 4096)
    rows = [("kind", "split", "problems", "solved", "within " + " / ".join(f"{c:,}" for c in windows),
             "longest call p50 / p90", "children mean (range)", "examples", "tokens/problem", "max tokens", "MB")]
    for kind, r in report["kinds"].items():
        for split, s in r["splits"].items():
            n = max(1, s["problems"])
            rows.append((kind, split, f"{s['problems']:,}", f"{s['solved'] / n:.1%}",
                         " / ".join(f"{s['solved_within'][str(c)] / n:.0%}" for c in windows),
                         f"{s['longest_call']['p50']:,.0f} / {s['longest_call']['p90']:,.0f}", _children(s["children"]),
                         f"{s['examples']:,}", f"{s['tokens_per_problem']:,.0f}",
                         f"{s['tokens_per_example']['max']:,}", ""))
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
    try:
        distributed.initialize_from_flags()  # before any JAX computation
        run(FLAGS.config, FLAGS.out, FLAGS.overwrite, log=distributed.log)
    except (ValueError, FileNotFoundError) as e:
        distributed.fail(f"gen_data: {e}")


if __name__ == "__main__":
    app.run(main)
