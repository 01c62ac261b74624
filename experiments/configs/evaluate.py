"""Evaluation configs: what ``experiments.reproduce`` (and ``experiments.evaluate --config``)
measures on the test split once the policies are trained.

Fields: ``problems`` (test problems of the context analysis), ``contexts`` (per-call windows;
the largest is the main one), ``n_max`` (SoS+ pass@n / cons@n, n = 1..n_max, sampled at
``temperature``), ``budgets`` (APR "Sub Call Budget: b" conditions, greedy), ``sweep_problems``
(the first problems of the split used by the pass@n / cons@n and budget sweeps; 0 = all),
``num_slots`` (engine rows), ``seed`` (sampling).
"""
from ml_collections import ConfigDict

PRESETS = ("tiny", "mini", "paper")


def get_config(preset: str = "tiny") -> ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown evaluation preset {preset!r}: expected one of {PRESETS}")
    c = ConfigDict()
    c.preset = preset
    c.split = "test"
    #        problems contexts            n_max budgets              sweep slots
    row = {
        "tiny": (200, (256, 384, 512), 4, (), 0, 64),
        # The budgets are the range the mini APR demonstrations were written with (root beams 2..6).
        "mini": (1_000, (768, 1024), 8, (2, 3, 4, 5, 6), 500, 64),
        "paper": (1_000, (4096,), 8, tuple(range(1, 11)), 0, 256),
    }[preset]
    c.problems, c.contexts, c.n_max, c.budgets, c.sweep_problems, c.num_slots = row
    c.temperature = 1.0
    c.seed = 0
    return c
