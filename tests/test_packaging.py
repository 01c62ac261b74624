"""The package installs anywhere: every third-party import is declared in pyproject.toml, every
console script resolves to a callable, and the scripts' default config paths and the shipped
files do not depend on the working directory."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {"envs", "jaxapr", "experiments", "tests"}
SOURCE_DIRS = ("envs", "jaxapr", "experiments", "tests")
# Import names whose distribution has another name, for packages that may not be installed
# here (installed ones are looked up in importlib.metadata).
IMPORT_TO_DIST = {
    "absl": "absl-py",
    "orbax": "orbax-checkpoint",
    "torch": "torch",
    "transformers": "transformers",
    "wandb": "wandb",
    "IPython": "ipython",
    "yaml": "pyyaml",
}


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def declared() -> dict[str, set[str]]:
    """Normalized distribution name -> the groups declaring it ("runtime" or an extra)."""
    project = _pyproject()["project"]
    groups: dict[str, set[str]] = {}
    for req in project["dependencies"]:
        groups.setdefault(_requirement_name(req), set()).add("runtime")
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for req in reqs:
            groups.setdefault(_requirement_name(req), set()).add(extra)
    return groups


def imported_modules(root: str = ROOT) -> dict[str, set[str]]:
    """Top-level module of every absolute import in the source tree -> the files importing it."""
    found: dict[str, set[str]] = {}
    for directory in SOURCE_DIRS:
        for dirpath, _, files in os.walk(os.path.join(root, directory)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        tops = [a.name.split(".")[0] for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        tops = [node.module.split(".")[0]]
                    else:
                        continue
                    for top in tops:
                        found.setdefault(top, set()).add(os.path.relpath(path, root))
    return found


def third_party(modules) -> set[str]:
    return {m for m in modules if m not in FIRST_PARTY and m not in sys.stdlib_module_names and m != "__future__"}


def distributions_of(module: str) -> set[str]:
    """The distributions that may provide ``module`` (a namespace such as ``orbax`` has several)."""
    dists = importlib.metadata.packages_distributions().get(module)
    return {_normalize(d) for d in dists} if dists else {_normalize(IMPORT_TO_DIST.get(module, module))}


def test_import_scan_sees_third_party_imports(tmp_path):
    # The scan itself: a plain, a dotted, a from- and a function-local import are all seen;
    # relative and first-party imports are not third-party.
    pkg = tmp_path / "jaxapr"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os\nimport a.b\nfrom c.d import e\nfrom . import f\nimport jaxapr\ndef g():\n    import h\n"
    )
    assert third_party(imported_modules(str(tmp_path))) == {"a", "c", "h"}


def test_every_third_party_import_is_declared():
    groups = declared()
    runtime_dirs = ("envs", "jaxapr", "experiments")
    missing = []
    for module, files in sorted(imported_modules().items()):
        if module not in third_party([module]):
            continue
        dists = distributions_of(module) & set(groups)
        if not dists:
            missing.append(f"{module} (distribution {sorted(distributions_of(module))}) imported by {sorted(files)}")
        elif all(groups[d] == {"dev"} for d in dists) and any(f.startswith(runtime_dirs) for f in files):
            runtime = sorted(f for f in files if f.startswith(runtime_dirs))
            missing.append(f"{module} is declared only in [dev] but imported by {runtime}")
    assert not missing, "undeclared imports:\n" + "\n".join(missing)


def test_runtime_dependencies_are_imported():
    # A runtime dependency nothing imports is dead weight on every install (tensorboard is the
    # reader of the event files tensorboardX writes, and jax brings jaxlib).
    groups = declared()
    used = set().union(*(distributions_of(m) for m in third_party(imported_modules())))
    unused = sorted(d for d, g in groups.items() if "runtime" in g and d not in used and d != "tensorboard")
    assert not unused, f"runtime dependencies never imported: {unused}"


def test_console_scripts_resolve_to_callables():
    scripts = _pyproject()["project"]["scripts"]
    from experiments import console

    assert set(scripts) == set(console.SCRIPTS)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        func = getattr(importlib.import_module(module), attr)
        assert callable(func), name
        assert attr == console.SCRIPTS[name], f"{name} -> {target}: expected the function of its module"
        assert importlib.util.find_spec(f"experiments.{console.SCRIPTS[name]}") is not None


def test_default_config_paths_exist():
    from experiments import cli

    for spec in ("data.py", "sft.py", "rl.py", "evaluate.py"):
        path = cli.config_path(spec + ":tiny").rsplit(":", 1)[0]
        assert os.path.isabs(path) and os.path.isfile(path), path


def test_package_data_covers_shipped_files():
    data = _pyproject()["tool"]["setuptools"]["package-data"]["experiments"]
    import fnmatch

    for rel in [
        "colab_quickstart.ipynb",
        *(os.path.join("checkpoints", f) for f in os.listdir(os.path.join(ROOT, "experiments", "checkpoints"))),
    ]:
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in data), f"experiments/{rel} is not package data"


def test_console_module_help_from_another_directory(tmp_path):
    # Run from tmp_path, with only this checkout on the path: the default --config (read
    # when the flag is defined) must load, so --help succeeds and shows the absolute default.
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    code = "import sys; from experiments import console; sys.argv = ['jaxapr-train-sft', '--help']; console.train_sft()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.join(ROOT, "experiments", "configs", "sft.py") + ":tiny" in proc.stdout + proc.stderr
