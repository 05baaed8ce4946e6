"""build_mix: per-source filters, exact counts, manifest counts and hashes, streaming, bad input."""

from __future__ import annotations

import json

import datasets
import pytest
import yaml

from medvlm.data_curation.mixing import MixConfig, MixError, build_mix
from medvlm.records import make_record

PHANTOM = {"n_patients": 30, "kind": "qa"}


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def write_mix(tmp_path, mix, name="mix.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(mix))
    return path


def two_sources(gen_filters=None, clean_filters=None):
    return [{"name": "generated", "source": "phantom", "options": {**PHANTOM, "label_noise": 0.2},
             "filters": gen_filters or []},
            {"name": "clean", "source": "phantom", "options": PHANTOM, "filters": clean_filters or []}]


def test_filters_and_exact_counts_reach_the_manifest(tmp_path):
    pathology = {"pathology": {"keywords": ["nodule", "mass", "cyst"], "min_count": 5}}
    mix = {"seed": 0, "sources": two_sources(["format", pathology], ["format"]),
           "phases": [{"name": "main", "count": {"generated": 40, "clean": 10}},
                      {"name": "anneal", "size": 20, "weights": {"clean": 0.9, "generated": 0.1}}]}
    data_dir = build_mix(write_mix(tmp_path, mix), tmp_path / "out")
    ds = datasets.load_from_disk(str(data_dir))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts_per_phase_by_mix_source"]["main"] == {"generated": 40, "clean": 10}
    assert sum(manifest["counts_per_phase"]["anneal"].values()) == 20
    assert ds["phase_name"][:50] == ["main"] * 50 and ds["phase"][50:] == [1] * 20
    steps = manifest["filters"]["generated"]["counts"]
    assert [s["step"] for s in steps] == ["format", "pathology"]
    # phantom rows of patients without a lesion mention no finding: the pathology step rejects them
    assert steps[1]["rejected"] > 0 and steps[1]["out"] == steps[1]["in"] - steps[1]["rejected"]
    assert manifest["sources"]["generated"]["rows"] == steps[1]["out"]
    rejects = (tmp_path / "out" / "filters" / "generated" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == steps[1]["rejected"]
    assert json.loads(rejects[0])["reason"] == "no pathology from the list is mentioned"
    assert len(manifest["ids_hash"]) == 64 and len(manifest["config_sha256"]) == 64
    assert set(manifest["files"]) == {"report.png", "report.md", "report.csv"}
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000


def test_weights_phase_keeps_its_behaviour_and_reuses_finished_folder(tmp_path):
    mix = {"seed": 0, "stopping_strategy": "undersample", "sources": two_sources(),
           "phases": [{"name": "main", "size": 60, "weights": {"generated": 0.8, "clean": 0.2}},
                      {"name": "anneal", "size": 30, "weights": {"clean": 0.9, "generated": 0.1}}]}
    path = write_mix(tmp_path, mix)
    first = datasets.load_from_disk(str(build_mix(path, tmp_path / "out")))
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts_per_phase_by_mix_source"]
    assert len(first) == 90 and counts["main"]["generated"] > counts["main"]["clean"]
    assert counts["anneal"]["clean"] > counts["anneal"]["generated"]
    again = build_mix(path, tmp_path / "out2", report=False)
    assert datasets.load_from_disk(str(again))["id"] == first["id"]  # seeded
    assert not (tmp_path / "out2" / "report.png").exists()


def test_counts_beyond_a_source_need_oversample(tmp_path):
    mix = {"sources": two_sources(), "phases": [{"name": "main", "count": {"clean": 100000}}]}
    with pytest.raises(MixError, match="phase 'main', source 'clean': asked for 100000 rows, the source has"):
        build_mix(write_mix(tmp_path, mix), tmp_path / "out")
    mix["stopping_strategy"] = "oversample"
    mix["phases"] = [{"name": "main", "count": {"clean": 400}}]
    ds = datasets.load_from_disk(str(build_mix(write_mix(tmp_path, mix), tmp_path / "out2", report=False)))
    assert len(ds) == 400 and len(set(ds["id"])) < 400


@pytest.mark.parametrize("phases, sources, message", [
    ([{"name": "main", "weights": {"clean": 1.0, "missing": 1.0}}], None,
     "phase 'main' names source\\(s\\) \\['missing'\\] that the mix does not define"),
    ([{"name": "main", "weights": {"clean": 0.0}}], None, "phase 'main' is empty"),
    ([{"name": "main", "count": {"clean": 0}}], None, "phase 'main' is empty"),
    ([{"name": "main", "weights": {"clean": 1}, "count": {"clean": 3}}], None, "either `weights` or `count`"),
    ([{"name": "main", "size": 5, "count": {"clean": 3}}], None, "size 5 differs from the sum"),
    ([{"name": "main", "weights": {"clean": 1}}], [{"name": "clean", "source": "phantom", "filters": ["dedup"]}],
     "unknown filter step 'dedup'"),
    ([{"name": "main", "weights": {"clean": 1}}],
     [{"name": "clean", "source": "phantom", "filters": ["exact_duplicatess"]}], "Did you mean 'exact_duplicates'"),
])
def test_bad_configs_name_the_problem(tmp_path, phases, sources, message):
    mix = {"sources": sources or two_sources(), "phases": phases}
    with pytest.raises(MixError, match=message):
        MixConfig.from_yaml(write_mix(tmp_path, mix))


def test_missing_source_data_gives_clear_errors(tmp_path):
    mix = {"sources": [{"name": "roco", "source": "rocov", "path": str(tmp_path)}],
           "phases": [{"name": "main", "weights": {"roco": 1}}]}
    with pytest.raises(MixError, match="mix source 'roco' in .*mix.yaml: unknown source 'rocov'.*Did you mean 'rocov2'"):
        build_mix(write_mix(tmp_path, mix), tmp_path / "out")
    mix["sources"] = [{"name": "roco", "source": "rocov2", "path": str(tmp_path / "nowhere")}]
    with pytest.raises(MixError, match="mix source 'roco': dataset folder/file '.*nowhere' does not exist: "
                                       "set `path:` in .*mix.yaml to your copy"):
        build_mix(write_mix(tmp_path, mix), tmp_path / "out")
    with pytest.raises(MixError, match="does not exist"):
        MixConfig.from_yaml(tmp_path / "no.yaml")


def jsonl_source(tmp_path, n=30):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [make_record(id=f"g{i}", image=str(bad), question=f"What is finding {i}?",
                        answer="" if i % 10 == 0 else f"finding {i}", answer_type="open", source="gen",
                        split="train", group_id=f"g{i}") for i in range(n)]
    path = tmp_path / "generated.jsonl"
    path.write_text("".join(json.dumps({**r, "extra": 1}) + "\n" for r in rows))
    return path


def test_jsonl_source_with_corrupt_images_records_rejects(tmp_path):
    path = jsonl_source(tmp_path)
    mix = {"sources": [{"name": "gen", "source": "json", "path": str(path), "filters": ["format", "duplicate_images"]},
                       {"name": "clean", "source": "phantom", "options": PHANTOM}],
           "phases": [{"name": "main", "weights": {"clean": 1.0}}]}
    with pytest.raises(MixError, match="mix source 'gen' \\(json\\) has no rows left after its filters"):
        build_mix(write_mix(tmp_path, mix), tmp_path / "out")
    rejects = [json.loads(x) for x in (tmp_path / "out/filters/gen/rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 30
    assert sum(r["reason"] == "empty answer" for r in rejects) == 3
    assert all(r["reason"].startswith("image unreadable") for r in rejects if r["step"] == "duplicate_images")


def test_streamed_source_filters_row_wise(tmp_path):
    path = jsonl_source(tmp_path, n=50)
    gen = {"name": "gen", "source": str(path), "streaming": True, "shuffle_buffer": 8, "filters": ["format"]}
    mix = {"sources": [gen, {"name": "clean", "source": "phantom", "options": PHANTOM}],
           "phases": [{"name": "main", "count": {"gen": 20, "clean": 10}}]}
    ds = datasets.load_from_disk(str(build_mix(write_mix(tmp_path, mix), tmp_path / "out", report=False)))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts_per_phase_by_mix_source"]["main"] == {"gen": 20, "clean": 10}
    assert all(a for a in ds["answer"])  # the format filter ran on the stream
    assert manifest["filters"]["gen"]["streamed"] and manifest["filters"]["gen"]["counts"]["format"]["rejected"] > 0
    assert not (tmp_path / "out" / ".cache").exists()
    gen["filters"] = ["exact_duplicates"]
    with pytest.raises(MixError, match="needs a pass over the whole source"):
        MixConfig.from_yaml(write_mix(tmp_path, mix, "stream.yaml"))
