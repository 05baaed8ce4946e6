"""DiagnosticsCallback: checkpoint-N/diagnostics in a Trainer run, the time budget, W&B logging."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback, TrainerControl, TrainerState

from medvlm.diagnostics.callback import DiagnosticsCallback, costs_from_timings, plan_probe
from medvlm.diagnostics.methods import method_names


class FakeClock:
    """A clock that only moves when told to, so budgets are exact and tests never time anything."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def probe_records(small_phantom):
    from medvlm.data_curation.phantom import load_phantom

    return load_phantom(small_phantom, kind="qa")


@pytest.fixture(scope="module")
def paligemma(tiny_paligemma):
    from medvlm.models.registry import load_model_and_processor

    return load_model_and_processor(str(tiny_paligemma))


def test_trainer_run_writes_diagnostics_into_every_checkpoint(tiny_llava, probe_records, tmp_path):
    from peft import LoraConfig, get_peft_model

    from medvlm.models.inputs import VLMCollator, prepare_examples
    from medvlm.models.registry import load_model_and_processor
    from medvlm.training.arguments import StageArguments
    from medvlm.training.trainer import MedVLMTrainer

    lm = load_model_and_processor(str(tiny_llava))
    model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    clock = FakeClock()

    class Tick(TrainerCallback):  # each step "takes" 100 s, so the 10 % budget is ample
        def on_step_end(self, args, state, control, **kwargs):
            clock.t += 100.0

    diag = DiagnosticsCallback(lm.family, lm.processor, probe_records, max_examples=3, clock=clock)
    args = StageArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                          report_to=[], logging_steps=1, save_strategy="steps", disable_tqdm=True)
    train = prepare_examples(probe_records.select(range(4)), lm.processor, lm.family)
    trainer = MedVLMTrainer(model=model, args=args, train_dataset=train,
                            data_collator=VLMCollator(lm.family, lm.processor), callbacks=[Tick(), diag])
    trainer.train()
    for step in (1, 2):
        data = json.loads((tmp_path / f"checkpoint-{step}" / "diagnostics" / "diagnostics.json").read_text())
        assert data["status"] == "ok" and data["global_step"] == step and data["n_examples"] == 3
        assert set(data["summary"]) == set(method_names())
        assert "knockout" not in data  # the knockout curves are the final probe's, not a checkpoint's
        assert data["budget"]["skipped"] == [] and data["budget"]["train_seconds_since_last_save"] == 100.0
        assert data["geometry"]["groups"]["image"] > 3 * 16  # more images than the probe set, for geometry
    assert diag.cost and diag.train_seconds == 200.0


def _state(step: int, main: bool = True) -> TrainerState:
    state = TrainerState()
    state.global_step, state.epoch, state.is_world_process_zero = step, 0.5, main
    return state


def test_budget_shrinks_the_probe_and_records_what_was_skipped(paligemma, probe_records, tmp_path):
    clock = FakeClock()
    cb = DiagnosticsCallback(paligemma.family, paligemma.processor, probe_records, clock=clock)
    # measured per-example costs (s): 1 + 0.5 + 3 + 2 = 6.5; a randomisation test 2x that. Rollout,
    # occlusion and knockout were never measured: their cost comes from the shapes (one forward pass timed
    # by the fake clock: about nothing), so the costliest measured methods are dropped first
    cb.cost = {"capture": 1.0, "logit_lens": 0.5, "gradcam": 3.0, "logprob": 2.0, "geometry": 0.0,
               "sanity_ratio": 2.0}
    args, control = SimpleNamespace(output_dir=str(tmp_path)), TrainerControl()
    cb.on_train_begin(args, _state(0), control)
    clock.t = 100.0  # 100 s of training -> a 10 s budget
    cb.on_save(args, _state(10), control, model=paligemma.model)
    data = json.loads((tmp_path / "checkpoint-10" / "diagnostics" / "diagnostics.json").read_text())
    assert data["budget"]["budget_s"] == pytest.approx(10.0)
    assert data["n_examples"] == 2 and data["methods"] == [m for m in method_names() if m not in ("gradcam", "logprob")]
    assert len(data["sanity"]["examples"]) == 1
    skipped = {(s["what"], s.get("name"), s.get("n")) for s in data["budget"]["skipped"]}
    assert skipped == {("examples", None, 6), ("randomisation_test_examples", None, 1),
                       ("method", "gradcam", None), ("method", "logprob", None)}
    assert data["budget"]["estimate_s"] <= 10.0
    # almost no training since: the budget cannot hold one example -> skipped, and said so
    cb.cost = {**cb.cost, "capture": 50.0}
    clock.t += 1.0
    cb.on_save(args, _state(11), control, model=paligemma.model)
    data = json.loads((tmp_path / "checkpoint-11" / "diagnostics" / "diagnostics.json").read_text())
    assert data["status"] == "skipped" and data["skipped"][0]["what"] == "probe"
    # other processes never probe
    cb.on_save(args, _state(12, main=False), control, model=paligemma.model)
    assert not (tmp_path / "checkpoint-12").exists()


def test_plan_runs_in_full_before_any_measurement_and_learns_costs():
    plan = plan_probe(0.5, {}, 8, ["attention", "gradcam"], 2)
    assert plan["run"] and plan["n_examples"] == 8 and plan["skipped"] == []
    cost = costs_from_timings({"capture": 4.0, "gradcam": 2.0, "sanity": 6.0, "n_examples": 4, "n_sanity": 2})
    assert cost["capture"] == 1.0 and cost["gradcam"] == 0.5 and cost["sanity_ratio"] == pytest.approx(2.0)
    assert costs_from_timings({"n_examples": 0}, cost) == cost
    with pytest.raises(ValueError, match="budget_fraction"):
        DiagnosticsCallback(None, None, [], budget_fraction=0.0)


def test_logs_scalars_and_an_overlay_to_an_active_wandb_run(paligemma, probe_records, tmp_path, monkeypatch):
    logged = []
    fake = types.ModuleType("wandb")
    fake.run = object()
    fake.log = logged.append
    fake.Image = lambda path, caption=None: ("image", path, caption)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    clock = FakeClock()
    cb = DiagnosticsCallback(paligemma.family, paligemma.processor, probe_records, max_examples=2,
                             methods=("attention", "rollout"), clock=clock)
    args, control = SimpleNamespace(output_dir=str(tmp_path)), TrainerControl()
    cb.on_train_begin(args, _state(0), control)
    clock.t = 1000.0
    cb.on_save(args, _state(5), control, model=paligemma.model)
    assert len(logged) == 1
    payload = logged[0]
    assert payload["train/global_step"] == 5 and "diag/roi_mass/attention" in payload
    assert payload["diag/overlay"][0] == "image" and payload["diag/overlay"][1].endswith(".png")
    fake.run = None  # no active run: nothing logged
    clock.t = 2000.0
    cb.on_save(args, _state(6), control, model=paligemma.model)
    assert len(logged) == 1
