"""--push-to-hub of diagnostics/run_diagnostics.py: refused up front (before any work) when it cannot
work here, and a failed upload is one error line that points at the files saved locally. No network."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard, constants
from scripts import load_script


@pytest.fixture
def stage_run(tmp_path):
    """A run folder with one finished stage (adapter/ naming its base, final metrics), no diagnostics."""
    stage = tmp_path / "run" / "stage2"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "medvlm_adapter.json").write_text(json.dumps({"model_name_or_path": "demo:llava"}))
    (stage / "metrics.json").write_text(json.dumps({"closed": {"accuracy": 0.5, "n": 4}}))
    return tmp_path / "run"


@pytest.fixture
def online(monkeypatch):
    """As if the hub were reachable and a token configured (nothing is contacted)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")


def _run(argv, capsys):
    script = load_script("diagnostics/run_diagnostics.py")
    try:
        code = script.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err.strip()


def test_offline_mode_refuses_the_push_before_any_work(stage_run, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _run([str(stage_run), "--push-to-hub", "you/medvlm-adapter", "--no-compute"], capsys)
    assert code == 2
    assert "HF_HUB_OFFLINE" in err.splitlines()[-1] and "Traceback" not in err
    assert not (stage_run / "report").exists() and not (stage_run / "stage2" / "adapter" / "README.md").exists()


def test_a_missing_token_refuses_the_push_before_any_work(stage_run, online, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, err = _run([str(stage_run), "--push-to-hub", "you/medvlm-adapter", "--no-compute"], capsys)
    last = err.splitlines()[-1]
    assert code == 2 and "huggingface-cli login" in last and "HF_TOKEN" in last
    assert not (stage_run / "report").exists()


def test_a_malformed_repo_id_is_a_usage_error(stage_run, online, capsys):
    code, err = _run([str(stage_run), "--push-to-hub", "medvlm-adapter", "--no-compute"], capsys)
    assert code == 2 and "owner/name" in err.splitlines()[-1]


@pytest.mark.parametrize("failure", [
    huggingface_hub.errors.HTTPError("[Errno -2] Name or service not known"),
    ConnectionError("connection refused"),
])
def test_a_failed_upload_is_one_line_and_keeps_the_report_and_card(stage_run, online, monkeypatch, capsys,
                                                                   failure):
    def create_repo(self, repo_id, **kw):
        raise failure

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(ModelCard, "push_to_hub", lambda *a, **k: pytest.fail("card pushed after a failure"))
    code, err = _run([str(stage_run), "--push-to-hub", "you/medvlm-adapter", "--no-compute"], capsys)
    assert code == 3 and len(err.splitlines()) == 1 and "Traceback" not in err
    report, card = stage_run / "report" / "report.md", stage_run / "stage2" / "adapter" / "README.md"
    assert "you/medvlm-adapter" in err and str(report) in err and str(card) in err
    assert report.is_file() and "you/medvlm-adapter" in card.read_text()


def test_a_push_that_can_work_uploads_adapter_then_card(stage_run, online, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", self.token)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"])))
    monkeypatch.setattr(ModelCard, "push_to_hub", lambda self, repo_id, **kw: calls.append(("card", kw["token"]))
                        or "https://hub/you/medvlm-adapter")
    code, _ = _run([str(stage_run), "--push-to-hub", "you/medvlm-adapter", "--no-compute"], capsys)
    assert code == 0
    assert calls == [("create", "hf_test_token"), ("upload", "you/medvlm-adapter"), ("card", "hf_test_token")]
