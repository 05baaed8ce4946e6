"""Mix sources whose path or kind is wrong fail before anything is loaded, naming the path and the YAML."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from scripts import load_script

from medvlm.data_curation.mix_sources import source_kinds
from medvlm.data_curation.mixing import MixError, build_mix
from medvlm.records import make_record

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def write_records(path: Path, n: int = 5) -> Path:
    rows = [make_record(id=f"r{i}", image="", question=f"What is shown {i}?", answer=f"finding {i}",
                        answer_type="open", source="gen", split="train", group_id=f"g{i}") for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_source_mix(tmp_path: Path, *sources: dict) -> Path:
    mix = {"seed": 0, "sources": list(sources),
           "phases": [{"name": "main", "weights": {s["name"]: 1.0 for s in sources}}]}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix))
    return path


def test_missing_json_path_names_the_path_and_the_yaml_before_loading_other_sources(tmp_path):
    present = {"name": "ok", "source": "json", "path": str(write_records(tmp_path / "ok.jsonl")),
               "filters": ["format"]}
    missing = {"name": "gen", "source": "json", "path": "/data/qa/nowhere-rocov2-gen"}
    mix = one_source_mix(tmp_path, present, missing)
    with pytest.raises(MixError) as err:
        build_mix(mix, tmp_path / "out")
    assert str(err.value) == (f"mix source 'gen': dataset folder/file '/data/qa/nowhere-rocov2-gen' does not "
                              f"exist: set `path:` in {mix} to your copy (a JSON-lines file or folder of "
                              "*.jsonl records)")
    assert not (tmp_path / "out" / "filters").exists()  # the first source was not loaded nor filtered


def test_json_source_reads_once_the_path_exists(tmp_path):
    src = {"name": "gen", "source": "json", "path": str(write_records(tmp_path / "gen.jsonl", 7))}
    build_mix(one_source_mix(tmp_path, src), tmp_path / "out", report=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"] == 7


@pytest.mark.parametrize("source, message", [
    ({"source": "json"}, "`source: json` needs `path:`"),
    ({"source": "medpix", "path": "/data/nowhere-MedPix-2.0"},
     "dataset folder/file '/data/nowhere-MedPix-2.0' does not exist: set `path:` in"),
    ({"source": "/data/nowhere/generated.jsonl"},
     "dataset folder/file '/data/nowhere/generated.jsonl' does not exist: set `source:` in"),
    ({"source": "jsn", "path": "/tmp"}, "unknown source 'jsn'. Did you mean 'json'.*Available: .*json, jsonl"),
])
def test_bad_source_kinds_and_paths_name_the_fix(tmp_path, source, message):
    with pytest.raises(MixError, match=message):
        build_mix(one_source_mix(tmp_path, {"name": "a", **source}), tmp_path / "out")


def test_json_folder_without_records_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixError, match="'.*empty' holds no JSON-lines records"):
        build_mix(one_source_mix(tmp_path, {"name": "a", "source": "json", "path": str(tmp_path / "empty")}),
                  tmp_path / "out")


def test_advertised_source_kinds_include_json_and_every_loader():
    kinds = source_kinds()
    assert {"json", "jsonl", "phantom", "medpix", "slake", "rocov2"} <= set(kinds)


@pytest.mark.skipif(Path("/data/qa/rocov2-gen").exists(), reason="the placeholder path exists on this machine")
def test_shipped_roco_medpix_mix_with_placeholder_paths_exits_2(tmp_path, monkeypatch, capsys):
    script = load_script("data_curation/build_mix.py")
    mix = REPO / "data_curation" / "mixes" / "roco_medpix.yaml"
    monkeypatch.setattr(sys, "argv", ["build_mix.py", str(mix), "--output", str(tmp_path / "out")])
    assert script.main() == 2
    err = capsys.readouterr().err
    assert "'/data/qa/rocov2-gen' does not exist: set `path:` in" in err and "roco_medpix.yaml" in err
    assert "is not 'phantom'" not in err and "Traceback" not in err
