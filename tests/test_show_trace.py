"""jaxapr.trace_view and experiments.show_trace: the tree of a real rollout in the terminal and as HTML."""

import os
import subprocess
import sys

import numpy as np

from jaxapr import runtime, trace_view, traces
from jaxapr.scripted_engine import ScriptedEngine
from tests.test_runtime import BIG, responses_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scripted_result():
    nums, target = [4, 23, 59, 44], 47
    tree = traces.apr(nums, target, beam_size=2, sub_call_beam_size=2, seed=3, spawn_prob=1.0).to_dict()
    eng = ScriptedEngine(responses_of([tree]), num_slots=4, max_len=BIG)
    (res,) = runtime.rollout(None, (np.array([nums]), np.array([target])), "apr", engine=eng)
    return tree, res


def test_text_and_html_show_every_call(tmp_path):
    tree, res = _scripted_result()
    text = trace_view.render_text(res, width=400)
    lines = text.split("\n")
    calls = len(list(trace_view._calls_in_order(res.tree)))
    assert len(lines) == 1 + calls == 1 + len(res.calls)
    assert lines[1].startswith("root call 1 [47:[4, 23, 59, 44]] spawned")
    assert sum(l.startswith("  child ") for l in lines) == len(tree["sub_calls"][0])
    assert ("SOLVED" in lines[0]) == res.success
    page = open(trace_view.write_html(res, str(tmp_path / "t" / "trace.html"))).read()
    assert page.count('class="call') == calls and page.count('class="kids"') == 1
    for call in res.calls:  # every call's own output is on the page, escaped
        assert call.output.replace("<", "&lt;").replace(">", "&gt;")[:60] in page


def test_command_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    ckpt = os.path.join(ROOT, "experiments", "checkpoints", "tiny_apr_sft.npz")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.show_trace",
            f"--policy={ckpt}",
            "--numbers=4,9,2",
            "--target=11",
            f"--out={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "root call 1 [11:[4, 9, 2]]" in proc.stdout and os.path.getsize(tmp_path / "trace.html") > 500
    for bad, message in (
        (["--numbers=4,x", "--target=11"], "expected comma-separated integers"),
        (["--numbers=4,9,2", "--target=-3"], "expected a non-negative int"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.show_trace", f"--policy={ckpt}", *bad],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
