"""The package installs from a wheel (not editable) with the templates it reads at run time: QA
generation, the judge and the blind filter run from a fresh virtual environment, outside the
checkout, against the stand-in Ollama server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

SCRIPT = r'''
import json, re, sys
from pathlib import Path
import medvlm
from ollama_stub import OllamaStub
from medvlm.data_curation.filters import BlindCheck, FilterPipeline
from medvlm.data_curation.qa_generation import QAGenConfig, generate_qa
from medvlm.eval.judge import judge_records
from medvlm.llm import OllamaLLM
from medvlm.records import make_record, to_dataset

out = Path(sys.argv[1])

def responder(prompt, request):
    if "Caption:" in prompt:  # question generation
        n = int(re.search(r"Write (\d+)", prompt).group(1))
        kind = "image" if 'Set "kind" to "image"' in prompt else "literature"
        return json.dumps({"questions": [{"question": f"Is there a nodule ({kind} {j})?", "answer": "Yes.",
                                          "answer_type": "closed", "kind": kind} for j in range(n)]})
    if "Reference answer" in prompt or "reference" in prompt.lower():  # the judge
        return json.dumps({"score": 8, "verdict": "yes", "reason": "matches"})
    return "Paris"  # the blind check: answers without the image

def rec(i, q, a, t="open"):
    return make_record(id=f"r{i}", image="img.png", question=q, answer=a, answer_type=t, source="s", split="train",
                       group_id=f"g{i}", meta={"concepts": ["Lung Nodule"]})

with OllamaStub(responder=responder) as stub:
    rows = [rec(0, "Describe the image.", "Axial CT of the chest showing a nodule in the right upper lobe.")]
    (out / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = QAGenConfig(input=str(out / "in.jsonl"), output_dir=str(out / "qa"), n_questions={"image": 2, "literature": 1},
                      llm={"backend": "ollama", "model": "stub-model", "host": stub.host})
    summary = generate_qa(cfg)
    judged = judge_records([{"id": "a", "question": "Where?", "answer": "left lung", "prediction": "left lung"}],
                           OllamaLLM("stub-model", host=stub.host))
    result = FilterPipeline([BlindCheck(llm=OllamaLLM("stub-model", host=stub.host))]).run(
        to_dataset([rec(1, "What is the capital of France?", "paris"), rec(2, "What is the finding?", "nodule")]),
        out / "filters")
print(json.dumps({"file": medvlm.__file__, "qa": sorted(summary) if isinstance(summary, dict) else str(summary),
                  "qa_records": len((out / "qa" / "generated.jsonl").read_text().splitlines()),
                  "judge_mean": judged["mean_score"], "kept": sorted(result.dataset["id"])}))
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True, timeout=300)
    (found,) = out.glob("medvlm-*.whl")
    return found


def test_the_wheel_holds_the_templates_the_library_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "medvlm" / "templates").rglob("*") if p.is_file()}
    assert shipped and shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"


def test_qa_generation_judge_and_blind_filter_run_from_a_wheel_install(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # the venv sees this machine's packages (torch & co.), an editable medvlm among them: the wheel is
    # installed over it in the venv (--ignore-installed), and its copy must be the one imported
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(TESTS), MEDVLM_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([str(py), "-c", SCRIPT, str(work)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(venv), got["file"]  # the wheel's copy, not the checkout
    assert got["qa_records"] == 3 and got["judge_mean"] == 8.0
    assert got["kept"] == ["r2"]  # the blind model knew the capital of France, not the finding
