"""README's code runs as written: every ```python block executes (in order, each in a fresh
namespace, from the repository root) and every ``python -m experiments.<x>`` it shows names a
module that exists, with flags that module defines."""

import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S)).replace("\\\n", " ")


def test_readme_opens_with_the_main_job_and_the_tests():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert "python -m experiments.quickstart" in first[0] and "python -m pytest" in first[1]
    assert README.index("```bash") < 40


@pytest.mark.parametrize("i", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(i, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(PYTHON_BLOCKS[i], f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip(), "a README example should print what it shows"


def test_python_blocks_show_what_they_claim(monkeypatch):
    """The examples' comments state results; these are the ones a reader checks first."""
    monkeypatch.chdir(ROOT)
    env_block = next(b for b in PYTHON_BLOCKS if "Countdown-v0" in b)
    trace_block = next(b for b in PYTHON_BLOCKS if "traces.apr" in b)
    for block, expected in ((env_block, "True 1.0 True"), (trace_block, "True")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(block, {"__name__": "__readme__"})
        assert out.getvalue().splitlines()[0] == expected


def test_commands_name_real_modules_and_flags():
    commands = re.findall(r"python -m (experiments\.\w+)([^\n#|&]*)", BASH)
    assert len(commands) >= 8
    for module, args in commands:
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        assert os.path.isfile(path), module
        source = open(path, encoding="utf-8").read()
        for flag in re.findall(r"--(\w+)", args.split(" -- ")[0]):  # after " -- ": the launched module's
            if flag in ("config", "sft_config", "rl_config", "data_config", "eval_config") or flag.startswith("config"):
                continue
            defined = re.search(rf"DEFINE_\w+\(\s*\"{flag}\"", source) or f'"{flag}"' in source
            assert defined or flag in ("coordinator_address", "num_processes", "process_id"), (module, flag)


def test_links_and_cited_docs_resolve():
    """Every relative link in README.md, BUILD_NOTES.md and docs/*.md, and every ``docs/...``
    path a source file cites, names a file of the repository."""
    docs = ["README.md", "BUILD_NOTES.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]
    missing, links = [], 0
    for md in (d for d in docs if d.endswith(".md")):
        text = open(os.path.join(ROOT, md), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            links += 1
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(md), target.split("#")[0])):
                missing.append(f"{md} -> {target}")
    cited = 0
    for top in ("jaxapr", "envs", "experiments", "tests"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in (f for f in files if f.endswith((".py", ".md"))):
                path = os.path.join(d, f)
                for target in re.findall(r"\bdocs/[\w./-]*\w", open(path, encoding="utf-8").read()):
                    cited += 1
                    if not os.path.exists(os.path.join(ROOT, target)):
                        missing.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert links >= 4 and cited >= 5 and not missing, missing
