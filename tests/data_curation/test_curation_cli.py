"""Curation as a user runs it: script exit codes and messages, the default LLM cache, loader skips and
hashes in a mix folder, oversampled phase sizes, candidate-mix comparison."""

from __future__ import annotations

import csv
import json
import runpy
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import yaml
from fixtures_sources import write_slake
from llm_responders import caption_records, qa_responder, write_jsonl
from ollama_stub import OllamaStub, StubHTTPError

from medvlm.data_curation.mixing import build_mix
from medvlm.data_curation.qa_generation import QAGenConfig, generate_qa
from medvlm.utils.io import hash_rows, sha256_file

REPO = Path(__file__).resolve().parents[2]
PHANTOM = {"n_patients": 30, "kind": "qa"}


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_script(monkeypatch, capsys):
    """Run a top-level script in this process as ``python <script> args...`` (exit code + output)."""
    def run(script: str, *args) -> Ran:
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / script), run_name="__main__")
        out = capsys.readouterr()
        return Ran(exit_info.value.code, out.out, out.err)

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- QA generation

def test_responses_are_cached_next_to_the_outputs_by_default(tmp_path):
    """No ``llm.cache_dir`` in the config: answers still land on disk, so items lost by a kill (their
    journal lines never written) are re-made from the cache without a single new request."""
    with OllamaStub(responder=qa_responder) as stub:
        cfg = QAGenConfig(input=write_jsonl(tmp_path / "in.jsonl", caption_records(3)), output_dir=str(tmp_path / "out"),
                          n_questions={"image": 2, "literature": 1},
                          llm={"backend": "ollama", "model": "stub-model", "host": stub.host})
        first = generate_qa(cfg)
        sent = stub.n_requests
        assert sent == 4 * 2 and (tmp_path / "out" / "llm_cache" / "responses.jsonl").is_file()
        (tmp_path / "out" / "items.jsonl").unlink()  # as if the run died before journaling anything
        second = generate_qa(cfg)
        assert stub.n_requests == sent  # nothing asked twice
    assert second["n_records"] == first["n_records"] == 4 * 3 and second["complete"]


def test_generate_qa_script_exit_codes(tmp_path, run_script):
    rows = write_jsonl(tmp_path / "in.jsonl", caption_records(2))
    cfg = tmp_path / "qa.yaml"
    cfg.write_text(yaml.safe_dump({"input": rows, "output_dir": str(tmp_path / "out"), "kinds": ["image"],
                                   "retries": 0, "llm": {"backend": "ollama", "model": "stub-model"}}))
    down = run_script("data_curation/generate_qa.py", cfg, f"llm.host=http://127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "ollama serve" in down.stderr and "Traceback" not in down.stderr

    def responder(prompt, request):
        if "case 1)" in prompt:
            raise StubHTTPError(500, "GPU out of memory")
        return qa_responder(prompt, request)

    with OllamaStub(responder=responder) as stub:
        partial = run_script("data_curation/generate_qa.py", cfg, f"llm.host={stub.host}")
    assert partial.returncode == 3 and "run the same command again" in partial.stderr
    assert json.loads((tmp_path / "out" / "incomplete.json").read_text())["failed"].keys() == {"rocov2-img1"}
    bad_key = run_script("data_curation/generate_qa.py", cfg, "n_question=3")
    assert bad_key.returncode == 2 and "unknown keys ['n_question']" in bad_key.stderr


# ---------------------------------------------------------------- mixes

def slake_with_bad_rows(root: Path) -> Path:
    """The SLAKE fixture plus a row whose image escapes the root and one with a non-string answer."""
    write_slake(root)
    rows = json.loads((root / "train.json").read_text())
    rows += [{**rows[0], "qid": 100, "img_name": "../../etc/passwd"}, {**rows[0], "qid": 101, "answer": ["Yes"]}]
    (root / "train.json").write_text(json.dumps(rows))
    return root


def test_loader_skips_and_dataset_hash_reach_the_mix_folder(tmp_path):
    slake = slake_with_bad_rows(tmp_path / "slake")
    mix = {"seed": 0, "stopping_strategy": "oversample",
           "sources": [{"name": "slake", "source": "slake", "path": str(slake), "split": "train",
                        "filters": ["format"]}],
           "phases": [{"name": "main", "size": 11, "weights": {"slake": 1.0}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    out = tmp_path / "out"
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "stale.arrow").write_text("left by a run that died before its manifest")
    data_dir = build_mix(tmp_path / "mix.yaml", out)
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = [json.loads(x) for x in (out / "filters" / "slake" / "load_skipped.jsonl").read_text().splitlines()]
    reasons = " | ".join(s["reason"] for s in skipped)
    assert len(skipped) == 3 and "empty answer" in reasons and "escapes the dataset root" in reasons
    assert "answer is list" in reasons and {s["file"] for s in skipped} == {"train.json"}
    loader = manifest["sources"]["slake"]["loader"]
    assert loader["skipped"] == 3 and loader["skipped_sha256"] == sha256_file(out / "filters/slake/load_skipped.jsonl")
    assert any("difficulty" in w for w in loader["warnings"])  # the unknown column, kept in meta
    # oversample: 4 good English train rows repeated up to the phase size
    ds = datasets.load_from_disk(str(data_dir))
    assert manifest["rows"] == len(ds) == 11 and len(set(ds["id"])) == 4
    # the dataset folder holds only the saved dataset (no stale files, no report cache files), hashed
    assert sorted(p.name for p in data_dir.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                          "state.json"]
    assert manifest["dataset_sha256"] == hash_rows(f"{p.name}:{sha256_file(p)}" for p in sorted(data_dir.glob("*.arrow")))


def test_undersample_phase_stays_below_its_size_and_says_so(tmp_path, caplog):
    mix = {"seed": 0, "stopping_strategy": "undersample",
           "sources": [{"name": "a", "source": "phantom", "options": PHANTOM}],
           "phases": [{"name": "main", "size": 10_000, "weights": {"a": 1.0}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    build_mix(tmp_path / "mix.yaml", tmp_path / "out", report=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["sources"]["a"]["rows"] < 10_000  # each example at most once
    assert "use stopping_strategy: oversample" in caplog.text


def test_build_mix_script_builds_compares_and_refuses_bad_mixes(tmp_path, run_script):
    good = {"seed": 0, "sources": [{"name": "a", "source": "phantom", "options": PHANTOM}],
            "phases": [{"name": "main", "size": 40, "weights": {"a": 1.0}}]}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    built = run_script("data_curation/build_mix.py", tmp_path / "good.yaml", "--output", tmp_path / "m1")
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout.split("\n", 1)[1])
    assert summary["rows"] == 40 and summary["loader_skipped"] == {"a": 0} and len(summary["dataset_sha256"]) == 64
    compared = run_script("data_curation/build_mix.py", "--compare", tmp_path / "m1", tmp_path / "m1",
                          "--output", tmp_path / "cmp")
    assert compared.returncode == 0 and (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    bad = {**good, "phases": [{"name": "main", "weights": {"a": 1.0, "medpix": 0.3}}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = run_script("data_curation/build_mix.py", tmp_path / "bad.yaml", "--output", tmp_path / "m2")
    assert refused.returncode == 2 and "['medpix']" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "m2" / "manifest.json").exists()


def test_review_sheet_round_trip_through_a_mix(tmp_path):
    """review_sample writes a sheet; the filled sheet, named by ``review``, rejects and edits rows."""
    source = {"name": "gen", "source": "phantom", "options": PHANTOM, "filters": ["format"], "review_sample": 4}
    mix = {"seed": 0, "stopping_strategy": "oversample", "sources": [source],
           "phases": [{"name": "main", "size": 400, "weights": {"gen": 1.0}}]}
    (tmp_path / "r1.yaml").write_text(yaml.safe_dump(mix))
    build_mix(tmp_path / "r1.yaml", tmp_path / "o1", report=False)
    rows = list(csv.DictReader(open(tmp_path / "o1" / "review" / "gen.csv", encoding="utf-8")))
    assert len(rows) == 4 and all(r["decision"] == "" for r in rows)
    rows[0].update(decision="reject", note="laterality wrong")
    rows[1].update(decision="edit", corrected_answer="left kidney", note="more precise")
    with open(tmp_path / "filled.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    del source["review_sample"]
    source["review"] = str(tmp_path / "filled.csv")
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(mix))
    ds = datasets.load_from_disk(str(build_mix(tmp_path / "r2.yaml", tmp_path / "o2", report=False)))
    assert rows[0]["id"] not in set(ds["id"])
    edited = ds.filter(lambda i: i == rows[1]["id"], input_columns="id")
    assert len(edited) and set(edited["answer"]) == {"left kidney"}
    assert json.loads(edited[0]["meta"])["review"]["original_answer"] == rows[1]["answer"]
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    step = manifest["filters"]["gen"]["counts"][-1]
    assert step["step"] == "human_review" and step["rejected"] == 1 and step["n_edit"] == 1
    last = json.loads((tmp_path / "o2" / "filters" / "gen" / "rejects.jsonl").read_text().splitlines()[-1])
    assert last["id"] == rows[0]["id"] and last["reason"] == "human review: laterality wrong"


def test_a_generate_qa_folder_is_a_mix_source(tmp_path):
    """The QA output folder also holds items.jsonl and rejects.jsonl: only generated.jsonl is read."""
    rows = caption_records(3) + [{**caption_records(1)[0], "id": "rocov2-empty", "answer": " "}]
    with OllamaStub(responder=qa_responder) as stub:
        cfg = QAGenConfig(input=write_jsonl(tmp_path / "in.jsonl", rows), output_dir=str(tmp_path / "qa"),
                          kinds=["image"], n_questions={"image": 2},
                          llm={"backend": "ollama", "model": "stub-model", "host": stub.host})
        summary = generate_qa(cfg)
    assert summary["n_rejects"] == 1 and (tmp_path / "qa" / "items.jsonl").is_file()
    mix = {"seed": 0, "sources": [{"name": "gen", "source": "json", "path": str(tmp_path / "qa"), "split": "train",
                                   "filters": ["format"]}],
           "phases": [{"name": "main", "weights": {"gen": 1.0}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    ds = datasets.load_from_disk(str(build_mix(tmp_path / "mix.yaml", tmp_path / "mix", report=False)))
    generated = [json.loads(line) for line in open(tmp_path / "qa" / "generated.jsonl", encoding="utf-8")]
    assert len(generated) == 4 * 2  # 3 ROCOv2 train items + the MedPix test case, 2 questions each
    assert sorted(ds["id"]) == sorted(r["id"] for r in generated if r["split"] == "train")
    assert len(ds) == 3 * 2 and set(ds["source"]) == {"rocov2-gen"}


def test_overlong_generated_answers_are_rejected_by_the_schema(tmp_path):
    """The schema caps answer length (it also bounds constrained decoding of local models)."""
    def rambling(prompt, request):
        return json.dumps({"questions": [{"question": "What is shown here?", "answer": "a finding " * 40,
                                          "answer_type": "open", "kind": "image"}]})

    with OllamaStub(responder=rambling) as stub:
        cfg = QAGenConfig(input=write_jsonl(tmp_path / "in.jsonl", caption_records(1)[:1]),
                          output_dir=str(tmp_path / "qa"), kinds=["image"], retries=0,
                          llm={"backend": "ollama", "model": "stub-model", "host": stub.host})
        summary = generate_qa(cfg)
    reject = json.loads((tmp_path / "qa" / "rejects.jsonl").read_text())
    assert summary["n_records"] == 0 and "schema violation at questions/0/answer" in reject["reason"]
    assert "is too long" in reject["reason"]


def test_blind_check_from_the_mix_yaml_is_cached_across_a_rebuild(tmp_path):
    from medvlm.records import make_record

    rows = [make_record(id=f"q{i}", image=f"/img/{i}.png", question=f"Which modality is image {i}?",
                        answer="CT" if i % 2 else "MRI", answer_type="open", source="gen", split="train",
                        group_id=f"g{i}") for i in range(6)]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    with OllamaStub(responder=lambda prompt, request: "CT") as stub:  # a blind guess that is right for odd i
        blind = {"blind_check": {"llm": {"backend": "ollama", "model": "stub-model", "host": stub.host}}}
        mix = {"seed": 0, "sources": [{"name": "gen", "source": "json", "path": str(tmp_path / "gen.jsonl"),
                                       "filters": [blind]}],
               "phases": [{"name": "main", "weights": {"gen": 1.0}}]}
        (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
        data_dir = build_mix(tmp_path / "mix.yaml", tmp_path / "out", report=False)
        assert sorted(datasets.load_from_disk(str(data_dir))["id"]) == ["q0", "q2", "q4"]
        assert stub.n_requests == 6
        (tmp_path / "out" / "manifest.json").unlink()  # as if the build died before finishing
        build_mix(tmp_path / "mix.yaml", tmp_path / "out", report=False)
        assert stub.n_requests == 6  # answers came from out/llm_cache
    rejects = [json.loads(x) for x in (tmp_path / "out" / "filters" / "gen" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rejects} == {"q1", "q3", "q5"}
    assert {r["reason"] for r in rejects} == {"answerable without the image"}
