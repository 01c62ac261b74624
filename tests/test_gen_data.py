"""experiments.gen_data's output directory: a recorded identity, --overwrite replaces the whole
dataset (no stale kinds), and prepare() (the quickstart's and the pipeline's data step) reuses
only a dataset of the same config."""

import json
import os

import pytest

from experiments import gen_data
from experiments.configs import data as data_configs


def small(preset="tiny", **problems):
    c = data_configs.get_config(preset)
    c.problems.update(dict(dict(train=20, val=4, test=4), **problems))
    c.num_workers = 0
    return c


def quiet(*_):
    pass


def test_identity_is_recorded_and_overwrite_leaves_no_stale_kinds(tmp_path):
    out = str(tmp_path / "d")
    gen_data.run(small(), out, log=quiet)
    assert gen_data.recorded_identity(out) == gen_data.identity(small())
    assert "num_workers" not in gen_data.recorded_identity(out)  # it does not change the data
    assert sorted(os.listdir(out)) == ["apr", "config.json", "gen_data.json", "identity.json", "problems", "sosp"]
    with pytest.raises(ValueError, match=r"is not empty: expected a new directory \(or --overwrite"):
        gen_data.run(small(), out, log=quiet)
    fewer = small(train=24)
    fewer.kinds = ("sosp",)
    gen_data.run(fewer, out, overwrite=True, log=quiet)
    assert sorted(os.listdir(out)) == ["config.json", "gen_data.json", "identity.json", "problems", "sosp"]
    assert json.load(open(os.path.join(out, "problems", "manifest.json")))["config"]["sizes"]["train"] == 24
    assert gen_data.recorded_identity(out)["kinds"] == ["sosp"]


def test_overwrite_never_deletes_files_gen_data_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds files that gen_data did not write"):
        gen_data.run(small(), str(tmp_path), overwrite=True, log=quiet)
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_prepare_reuses_the_same_config_and_refuses_another_preset(tmp_path):
    out = str(tmp_path / "data")
    lines = []
    gen_data.prepare(small(), out, log=lines.append)
    built = os.path.getmtime(os.path.join(out, "gen_data.json"))
    again = small()
    again.num_workers = 2  # not part of the identity
    gen_data.prepare(again, out, log=lines.append)
    assert os.path.getmtime(os.path.join(out, "gen_data.json")) == built and "reusing" in lines[-1]
    # The quickstart's --preset=mini after a tiny run in the same work directory: one line.
    with pytest.raises(
        ValueError,
        match=r"holds the dataset of another config: .*preset=\"tiny\" differs from this "
        r"run's \"mini\"",
    ) as e:
        gen_data.prepare(small("mini"), out, log=quiet)
    assert "problems.num_numbers=3 differs from this run's 4" in str(e.value) and "\n" not in str(e.value)
    # An interrupted build of the same config is built again.
    os.remove(os.path.join(out, "gen_data.json"))
    gen_data.prepare(small(), out, log=lines.append)
    assert any("interrupted build" in line for line in lines)
    assert gen_data.is_complete(small(), out)
    # A directory with other files and no identity is never taken.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(ValueError, match="holds files but no gen_data identity"):
        gen_data.prepare(small(), str(tmp_path / "other"), log=quiet)


def test_progress_is_a_bar_per_kind_and_the_table_is_printed(tmp_path, capsys):
    lines = []
    gen_data.run(small(), str(tmp_path / "d"), log=lines.append)
    err = capsys.readouterr().err
    for kind in ("sosp", "apr"):  # a tqdm bar with the rate in problems per second, ending at every problem
        assert f"{kind} traces" in err and "problem/s" in err and "28/28" in err
    assert not any("problems (" in line for line in lines)  # no progress lines in the log
    assert any(line.startswith("kind") and "tokens/problem" in line for line in lines)  # the table stays


def test_prepare_without_progress_draws_no_bar(tmp_path, capsys):
    # the quickstart's --progress=False reaches the data step too
    gen_data.prepare(small(), str(tmp_path / "d"), log=quiet, progress=False)
    assert "traces" not in capsys.readouterr().err


def test_prepare_serves_fewer_kinds_from_more_and_adds_missing_ones(tmp_path):
    # The quickstart needs only the problems; its from-scratch demo adds SoS+ demonstrations.
    out, lines = str(tmp_path / "data"), []
    none = small()
    none.kinds = ()
    gen_data.prepare(none, out, log=lines.append)
    assert sorted(os.listdir(out)) == ["config.json", "gen_data.json", "identity.json", "problems"]
    problems = open(os.path.join(out, "problems", "manifest.json")).read()
    sosp = small()
    sosp.kinds = ("sosp",)
    gen_data.prepare(sosp, out, log=lines.append)
    assert any("without ['sosp']: building it again with them" in line for line in lines)
    assert gen_data.recorded_identity(out)["kinds"] == ["sosp"] and gen_data.is_complete(sosp, out)
    assert open(os.path.join(out, "problems", "manifest.json")).read() == problems  # the same problems
    built = os.path.getmtime(os.path.join(out, "gen_data.json"))
    gen_data.prepare(none, out, log=lines.append)  # a superset of the kinds serves
    assert "reusing" in lines[-1] and os.path.getmtime(os.path.join(out, "gen_data.json")) == built
    other = small(train=24)
    other.kinds = ()
    with pytest.raises(ValueError, match=r"holds the dataset of another config: problems.train=20 differs"):
        gen_data.prepare(other, out, log=quiet)
