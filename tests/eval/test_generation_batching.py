"""Generation does not depend on how questions are batched or sharded; the batch fits memory.

Sampled answers are seeded per question (medvlm.eval.sampling), greedy answers are the same in
any batch; ``batch_size="auto"`` starts from a memory budget and a real allocation failure halves
the batch (medvlm.eval.batching)."""

from __future__ import annotations

import json

import pytest
import torch
from refused_allocation import refuse_batches_above

from medvlm.eval.batching import BatchRecord, auto_batch_size, parse_batch_size, row_bytes
from medvlm.eval.distributed import generation_summary, shard_bounds
from medvlm.eval.generate import generate_answers
from medvlm.eval.sampling import PerRowSampler, row_seed

N = 7  # odd: shards and batches of unequal sizes
SAMPLED = dict(do_sample=True, num_return_sequences=3, temperature=1.5, seed=11)


@pytest.fixture(scope="module", params=["paligemma", "llava"])
def family_setup(request, small_phantom):
    from medvlm.data_curation.phantom import load_phantom
    from medvlm.models.inputs import prepare_examples
    from medvlm.models.registry import load_model_and_processor

    folder = request.getfixturevalue(f"tiny_{request.param}")
    loaded = load_model_and_processor(str(folder), attn_implementation="sdpa")
    records = load_phantom(small_phantom, kind="qa", split="test").select(range(N))
    examples = prepare_examples(records, loaded.processor, loaded.family)
    setup = (loaded, examples.images(), examples.questions)
    # the reference: two questions per generate call
    return (*setup, _gen(setup, batch_size=2), _gen(setup, batch_size=2, **SAMPLED))


def _gen(setup, images=None, questions=None, **kw):
    loaded, all_images, all_questions = setup[:3]
    return generate_answers(loaded.model, loaded.processor, loaded.family,
                            all_images if images is None else images,
                            all_questions if questions is None else questions,
                            max_new_tokens=6, progress=False, **kw)


def test_greedy_and_sampled_answers_do_not_depend_on_the_batch_or_the_shard(family_setup):
    _, images, questions, greedy, sampled = family_setup
    assert _gen(family_setup, batch_size=3) == greedy
    assert _gen(family_setup, batch_size=N) == greedy
    assert _gen(family_setup, batch_size=3, **SAMPLED) == sampled
    assert any(len(set(s)) > 1 for s in sampled)  # really sampled
    # a shard (questions 4..6, as a second process gets them) passes its global indices: the same samples
    tail = _gen(family_setup, images[4:], questions[4:], batch_size=2, question_ids=range(4, N), **SAMPLED)
    assert tail == sampled[4:]
    # another seed gives other samples
    assert _gen(family_setup, batch_size=N, **{**SAMPLED, "seed": 12}) != sampled


def test_a_refused_allocation_halves_the_batch_and_the_answers_stay_the_same(family_setup, monkeypatch):
    loaded, _, _, expected, _ = family_setup
    sizes = refuse_batches_above(monkeypatch, type(loaded.model), "generate", 2)
    record = BatchRecord(requested=8)
    assert _gen(family_setup, batch_size=8, batch_record=record) == expected
    assert record.as_dict() == {"requested": 8, "start": N, "used": 1, "oom_halvings": [N, 3]}
    assert sizes == [7, 3] + [1] * N  # each failed batch is redone smaller; nothing is answered twice


def test_other_errors_are_not_taken_for_out_of_memory(family_setup, monkeypatch):
    loaded = family_setup[0]

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch in the projector")

    monkeypatch.setattr(type(loaded.model), "generate", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _gen(family_setup, batch_size=4)


def test_auto_batch_fits_the_memory_budget_per_sampled_row(family_setup):
    loaded, images, questions, _, sampled = family_setup
    model, processor, family = loaded.model, loaded.processor, loaded.family
    _, est = auto_batch_size(model, processor, family, images, questions, rows_per_question=1, max_new_tokens=6,
                             budget_bytes=10**12)
    per_row = row_bytes(model, family, est["prompt_tokens"], family.vision_tokens(
        model, family.generation_batch(processor, images[:1], questions[:1], prepared=True)), 6)
    assert abs(est["row_mb"] - per_row / 2**20) < 1e-2
    # a budget for exactly two questions of three samples each
    two, _ = auto_batch_size(model, processor, family, images, questions, rows_per_question=3, max_new_tokens=6,
                             budget_bytes=per_row * 3 * 2 + 1)
    greedy_two, _ = auto_batch_size(model, processor, family, images, questions, rows_per_question=1,
                                    max_new_tokens=6, budget_bytes=per_row * 3 * 2 + 1)
    assert (two, greedy_two) == (2, 6)
    assert auto_batch_size(model, processor, family, images, questions, rows_per_question=3, max_new_tokens=6,
                           budget_bytes=1)[0] == 1  # nothing fits: one question, and a warning
    record = BatchRecord(requested="auto")
    assert _gen(family_setup, batch_size="auto", memory_budget=per_row * 3 * 2 + 1, batch_record=record,
                **SAMPLED) == sampled
    assert record.start == record.used == 2 and record.estimate["rows_per_question"] == 3


def test_the_estimate_grows_with_the_prompt_and_the_answer(family_setup):
    loaded = family_setup[0]
    base = row_bytes(loaded.model, loaded.family, 100, 16, 8)
    assert row_bytes(loaded.model, loaded.family, 200, 16, 8) > base
    assert row_bytes(loaded.model, loaded.family, 100, 64, 8) > base
    assert row_bytes(loaded.model, loaded.family, 100, 16, 64) > base


def test_the_sampler_draws_from_the_tempered_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    plain = PerRowSampler(range(4000), 1, seed=0)(None, logits.clone())
    assert torch.isinf(plain).sum(dim=1).eq(2).all()  # one token per row kept, as a one-hot score
    freq = torch.bincount(plain.argmax(dim=1), minlength=3) / 4000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    hot = PerRowSampler(range(4000), 1, seed=0, temperature=2.0)(None, logits.clone())
    tempered = torch.tensor([0.6, 0.3, 0.1]) ** 0.5
    assert torch.allclose(torch.bincount(hot.argmax(dim=1), minlength=3) / 4000, tempered / tempered.sum(),
                          atol=0.03)
    nucleus = PerRowSampler(range(4000), 1, seed=0, top_p=0.5)(None, logits.clone())
    assert nucleus.argmax(dim=1).eq(0).all()  # top-p 0.5 keeps the 0.6 token alone
    with pytest.raises(ValueError, match="rows of scores"):
        PerRowSampler(range(3), 2, seed=0)(None, logits[:5])


def test_row_seeds_and_shards():
    seeds = {row_seed(0, q, s) for q in range(50) for s in range(5)}
    assert len(seeds) == 250 and row_seed(0, 3, 1) == row_seed(0, 3, 1) != row_seed(1, 3, 1)
    assert [shard_bounds(7, r, 2) for r in range(2)] == [(0, 4), (4, 7)]
    assert [shard_bounds(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert parse_batch_size("auto") == "auto" and parse_batch_size("16") == 16 == parse_batch_size(16)
    for bad in ("0", "-2", "1.5", "big"):
        with pytest.raises(ValueError, match="'auto' or an integer"):
            parse_batch_size(bad)


def test_model_mode_metrics_and_manifest_say_which_batch_was_used(tiny_llava, tmp_path):
    from scripts import load_script

    run_eval = load_script("eval/run_eval.py")
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_llava), "--phantom-patients", "36", "--max-samples", "5", "--bootstrap", "0",
            "--consistency", "--samples", "2", "--batch-size", "2", "--output", str(out), "--quiet"]
    assert run_eval.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    gen = json.loads((out / "metrics.json").read_text())["generation"]
    assert manifest["generation"] == gen and manifest["world_size"] == 1
    assert gen["questions_per_process"] == [5] and gen["batch_size"] == {"greedy": [2], "samples": [2]}
    assert gen["passes"]["samples"]["batches"][0]["requested"] == 2
    assert run_eval.main([*argv[:-5], "--batch-size", "many", "--output", str(tmp_path / "bad"), "--quiet"]) == 2


def test_generation_summary_names_each_pass():
    from medvlm.eval.distributed import ShardedAnswers

    greedy = ShardedAnswers(["a"] * 7, [0.1] * 7, [4, 3], [{"used": 4}, {"used": 3}])
    para = ShardedAnswers(["b"] * 2, [0.1] * 2, [1, 1], [{"used": 1}, {"used": 1}])
    summary = generation_summary({"greedy": greedy, "paraphrases": para})
    assert summary["world_size"] == 2 and summary["questions_per_process"] == [4, 3]
    assert summary["batch_size"] == {"greedy": [4, 3], "paraphrases": [1, 1]}
