"""eval/compare.py: runs and checkpoints side by side in Markdown, escaped self-contained HTML and PNG plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from scripts import load_script

from medvlm.eval.compare import CompareError, collect_entries
from medvlm.eval.scoring import score_records

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compare():
    return load_script("eval/compare.py")


def _metrics(n_correct: int) -> dict:
    """score_records' result for 4 closed questions (n_correct right) and one open one."""
    rows = [{"id": f"c{i}", "answer": "yes", "prediction": "yes" if i < n_correct else "no", "answer_type": "closed",
             "qtype": "presence" if i % 2 else "modality_yn", "modality": "CT" if i < 2 else "MRI"} for i in range(4)]
    rows.append({"id": "o", "answer": "left lung", "prediction": "left lung" if n_correct > 2 else "right kidney",
                 "answer_type": "open", "qtype": "location", "modality": "CT"})
    return score_records(rows, bootstrap=20, slice_by=("qtype", "modality"))


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _run(root: Path, name: str, accuracies: dict[int, int], final: int | None) -> Path:
    run = root / name
    history = [{"step": s, "loss": 2.0 / s} for s in range(1, max(accuracies) + 1)]
    for step, n_correct in accuracies.items():
        _write(run / f"checkpoint-{step}" / "metrics.json", {**_metrics(n_correct), "global_step": step})
        _write(run / f"checkpoint-{step}" / "trainer_state.json",
               {"global_step": step, "log_history": [h for h in history if h["step"] <= step]})
    if final is not None:
        _write(run / "metrics.json", _metrics(final))
        _write(run / "trainer_state.json", {"global_step": max(accuracies), "log_history": history})
    (run / "checkpoint-9").mkdir()  # a checkpoint saved without evaluation
    return run


def test_compare_writes_markdown_html_json_and_plots(compare, tmp_path):
    a = _run(tmp_path, "stage1", {2: 1, 4: 3}, final=4)
    b = _run(tmp_path, "<script>alert(1)</script>".replace("/", "∕"), {2: 2}, final=None)
    out = tmp_path / "cmp"
    assert compare.main([str(a), str(b / "checkpoint-2"), "--names", "stage1", "<script>alert(1)</script>",
                         "--output", str(out)]) == 0

    result = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["stage1/checkpoint-2", "stage1/checkpoint-4", "stage1 (final)",
                      "<script>alert(1)</script>/checkpoint-2"]
    acc = {r["label"]: r["accuracy"] for r in result["rows"]}
    assert acc["stage1/checkpoint-2"] == 0.25 and acc["stage1/checkpoint-4"] == 0.75 and acc["stage1 (final)"] == 1.0
    losses = {r["label"]: r["loss"] for r in result["rows"]}
    assert losses["stage1/checkpoint-2"] == 1.0 and losses["stage1/checkpoint-4"] == 0.5
    assert result["rows"][0]["slices"]["modality"] == {"CT": 0.5, "MRI": 0.0}
    assert result["skipped"] == [{"path": str(a / "checkpoint-9"), "reason": "no metrics.json in this checkpoint"}]

    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| stage1/checkpoint-4 | 4 | 0.5 | 4 | 0.75 |" in md and "Closed-question accuracy by qtype" in md
    # open-only question types get their own ROUGE-L table, not an empty closed-accuracy column
    assert result["rows"][0]["open_slices"]["qtype"]["location"] == 0.0
    assert "## Open-question ROUGE-L by qtype\n\n| label | location |" in md
    assert "| label | location |" not in md.split("## Open-question ROUGE-L")[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "<script>" not in md  # no raw HTML tag in the table

    page = (out / "comparison.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;/checkpoint-2" in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained

    for name in ("accuracy_rouge.png", "slices_qtype.png", "slices_modality.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not list(out.glob(".*.tmp"))


def test_inputs_with_nothing_to_compare_are_refused(compare, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds no metrics.json" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CompareError, match="2 names for 1 inputs"):
        collect_entries([tmp_path / "empty"], names=["a", "b"])
