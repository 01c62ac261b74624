"""experiments/colab_quickstart.ipynb: its install cell keeps the runtime's JAX and names the
repository once, and the whole notebook runs top to bottom (nbclient) at its test size."""

import json
import os
import re

import pytest

from tests.test_quickstart import _check_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_quickstart.ipynb")


def _code_cells():
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_install_cell_keeps_jax_and_names_the_repository_once():
    cells = _code_cells()
    install = cells[0]
    first_code_line = next(line for line in install.splitlines() if line.strip() and not line.startswith("#"))
    assert re.fullmatch(r'REPO_URL = "https://[^"]+"  # <- set to your fork', first_code_line)
    assert sum(len(re.findall(r"\bREPO_URL\s*=", c)) for c in cells) == 1
    assert sum("github.com" in c for c in cells) == 1
    assert '"--no-deps", "./jaxapr"' in install and '"-e"' not in install
    assert "JAXAPR_NOTEBOOK_SKIP_INSTALL" in install


def test_install_cell_requirements_leave_out_jax(tmp_path, monkeypatch):
    # Run the install cell against a fake checkout and a pip that records its calls: jaxapr is
    # installed without its dependencies, then every requirement but jax, with jax pinned.
    import importlib.util
    import subprocess
    import sys

    install = _code_cells()[0]
    repo = tmp_path / "jaxapr"
    repo.mkdir()
    (repo / "pyproject.toml").write_bytes(open(os.path.join(ROOT, "pyproject.toml"), "rb").read())
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JAXAPR_NOTEBOOK_SKIP_INSTALL", raising=False)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(list(cmd)))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jaxapr" else real_find_spec(name, *a)
    )
    exec(compile(install, "install-cell", "exec"), {"__name__": "__main__"})
    assert calls[0] == [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "./jaxapr"]
    assert calls[1][:6] == [sys.executable, "-m", "pip", "install", "-q", "-c"]
    requirements = calls[1][7:]
    names = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requirements}
    assert "jax" not in names and "jaxlib" not in names and {"flax", "optax", "ml_dtypes"} <= names
    import jax

    assert f"jax=={jax.__version__}" in open(tmp_path / calls[1][6]).read().split()


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = str(tmp_path / "nb")
    keys = (
        "JAXAPR_NOTEBOOK_SIZE",
        "JAXAPR_NOTEBOOK_WORKDIR",
        "JAXAPR_NOTEBOOK_SKIP_INSTALL",
        "XLA_FLAGS",
        "PYTHONPATH",
        "JAX_PLATFORMS",
    )
    old = {k: os.environ.get(k) for k in keys}
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # this checkout, installed or not
    os.environ.update(
        JAXAPR_NOTEBOOK_SIZE="test",
        JAXAPR_NOTEBOOK_WORKDIR=workdir,
        JAXAPR_NOTEBOOK_SKIP_INSTALL="1",
        XLA_FLAGS="",
        PYTHONPATH=path,
        JAX_PLATFORMS="cpu",
    )
    try:  # the kernel inherits this environment
        nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = json.load(open(os.path.join(workdir, "quickstart.json")))
    _check_output(out, workdir, [128], rl_eval=False)
    images = [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2  # the plots are shown inline
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "nothing to install" in text and "size 'test'" in text and "Target (APR >= 10 points" in text
