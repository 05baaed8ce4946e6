"""build_mix --compare: every mix folder is its own column, labelled so that two runs' same-named mix
folders stay apart (or by --names)."""

from __future__ import annotations

import csv
import sys

import pytest
import yaml
from scripts import load_script

from medvlm.data_curation.mixing import build_mix
from medvlm.data_curation.reports import mix_labels

PHANTOM = {"n_patients": 30, "kind": "qa"}


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs' ``stage2/mix-phantom_stage2`` folders of 20 and 30 rows."""
    root = tmp_path_factory.mktemp("runs")
    folders = []
    for run, size in (("demo-a", 20), ("demo-b", 30)):
        mix = {"seed": 0, "sources": [{"name": "a", "source": "phantom", "options": PHANTOM}],
               "phases": [{"name": "main", "size": size, "weights": {"a": 1.0}}]}
        (root / f"{run}.yaml").write_text(yaml.safe_dump(mix))
        folder = root / run / "stage2" / "mix-phantom_stage2"
        build_mix(root / f"{run}.yaml", folder, report=False)
        folders.append(folder)
    return folders


def compare(monkeypatch, capsys, *args) -> tuple[int, str]:
    script = load_script("data_curation/build_mix.py")
    monkeypatch.setattr(sys, "argv", ["build_mix.py", *map(str, args)])
    code = script.main()
    return code, capsys.readouterr().err


def mixes_in_csv(path) -> list[str]:
    with open(path, newline="") as fh:
        return list(dict.fromkeys(row["mix"] for row in csv.DictReader(fh)))


def test_labels_are_the_shortest_path_suffix_that_tells_folders_apart(tmp_path):
    a, b = tmp_path / "demo-a" / "stage2" / "mix-x", tmp_path / "demo-b" / "stage2" / "mix-x"
    other = tmp_path / "demo-b" / "stage1" / "mix-y"
    assert mix_labels([a, b, other]) == ["demo-a/stage2/mix-x", "demo-b/stage2/mix-x", "mix-y"]
    assert mix_labels([a, tmp_path / "demo-a" / "stage1" / "mix-x"]) == ["stage2/mix-x", "stage1/mix-x"]
    assert mix_labels([a, a]) == ["mix-x", "mix-x #2"]  # the same folder twice still makes two columns
    assert mix_labels([a, b], names=["lr-a", "lr-b"]) == ["lr-a", "lr-b"]
    with pytest.raises(ValueError, match="1 names for 2 mix folders"):
        mix_labels([a, b], names=["only"])
    with pytest.raises(ValueError, match="repeats \\['x'\\]"):
        mix_labels([a, b], names=["x", "x"])


def test_two_runs_same_named_mix_folders_stay_two_columns(two_runs, tmp_path, monkeypatch, capsys):
    code, err = compare(monkeypatch, capsys, "--compare", *two_runs, "--output", tmp_path / "cmp")
    assert code == 0, err
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert ("Rows per mix: demo-a/stage2/mix-phantom_stage2 20, demo-b/stage2/mix-phantom_stage2 30"
            in md)
    assert f"| demo-b/stage2/mix-phantom_stage2 | {two_runs[1]} |" in md
    assert mixes_in_csv(tmp_path / "cmp" / "comparison.csv") == ["demo-a/stage2/mix-phantom_stage2",
                                                                  "demo-b/stage2/mix-phantom_stage2"]
    header = next(line for line in md.splitlines() if line.startswith("| value |"))
    assert header.count("mix-phantom_stage2") == 2
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000


def test_names_label_the_columns_and_must_fit(two_runs, tmp_path, monkeypatch, capsys):
    code, err = compare(monkeypatch, capsys, "--compare", *two_runs, "--names", "small", "large",
                        "--output", tmp_path / "cmp")
    assert code == 0, err
    assert "Rows per mix: small 20, large 30" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert mixes_in_csv(tmp_path / "cmp" / "comparison.csv") == ["small", "large"]
    code, err = compare(monkeypatch, capsys, "--compare", *two_runs, "--names", "one",
                        "--output", tmp_path / "cmp2")
    assert code == 2 and "1 names for 2 mix folders" in err and "Traceback" not in err
    assert not (tmp_path / "cmp2").exists()
