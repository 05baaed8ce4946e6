"""The contract every registered model family keeps: registering a family is enough to test it.

For each family of :data:`medvlm.models.families.FAMILIES`, on a tiny model of its real class with
random weights: the training batch labels exactly the answer (and its end-of-sequence), one
training step changes every trainable parameter, generation answers, the image span and grid come
from the inputs, every registered diagnostic method gives a map on that grid, and a saved adapter
loads with plain transformers + PEFT and reproduces the logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.methods import Context, registered
from medvlm.eval.generate import generate_answers
from medvlm.models.adapters import adapter_record, write_record
from medvlm.models.base import IGNORE_INDEX, TinySizes
from medvlm.models.families import FAMILIES, get_family
from medvlm.models.tiny import build_tiny, tiny_tokenizer
from medvlm.training.arguments import LoraArguments
from medvlm.training.lora import attach_lora
from medvlm.training.trainer import answer_loss, answer_positions

CORPUS = ["is there a lesion in the left lung? yes no the abnormality is in the right upper lobe near the liver",
          "which organ is shown? chest abdomen head CT MRI X-ray nodule mass cyst"] * 4
QUESTIONS = ["Is there a lesion in the left lung?", "Which organ is shown?"]
ANSWERS = ["yes", "the right upper lobe"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request):
    name = request.param
    tok = tiny_tokenizer(name, CORPUS, 300)
    model, processor = build_tiny(name, TinySizes(vision_layers=2, text_layers=2, patch_size=8), tok)
    model.set_attn_implementation("eager")
    family = get_family(name)
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in QUESTIONS]
    images = family.prepare_images(processor, raw)
    return name, model.eval(), processor, family, images


def test_labels_are_exactly_the_answer_and_its_end(tiny):
    _, model, processor, family, images = tiny
    batch = family.train_batch(processor, images, QUESTIONS, ANSWERS, prepared=True)
    tok = processor.tokenizer
    for i, answer in enumerate(ANSWERS):
        labelled = [int(t) for t in batch["labels"][i] if t != IGNORE_INDEX]
        assert tok.decode(labelled, skip_special_tokens=True).strip() == answer
        # the answer ends with a token that stops generation (eos, or the chat format's end of turn)
        assert labelled[-1] in family.stop_token_ids(processor), tok.convert_ids_to_tokens(labelled[-1:])
        ids = batch["input_ids"][i]
        is_image = ids == family.image_token_id(model)
        assert (batch["labels"][i][is_image] == IGNORE_INDEX).all()  # no loss on image tokens
        assert (batch["labels"][i][batch["attention_mask"][i] == 0] == IGNORE_INDEX).all()  # nor on padding


def test_one_training_step_changes_every_trainable_parameter(tiny):
    name, model, processor, family, images = tiny
    import copy

    peft_model = attach_lora(copy.deepcopy(model), family, LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0),
                             "x")
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    towers = {family.tower_of(n.replace("base_model.model.", "")) for n in trainable}
    assert {"vision", "language"} <= towers, f"{name}: LoRA reached only {towers}"
    batch = family.model_inputs(family.train_batch(processor, images, QUESTIONS, ANSWERS, prepared=True))
    peft_model.train()
    # LoRA's B starts at zero, so A gets no gradient at the first step: two steps move both
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = peft_model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    unchanged = [n for n, p in peft_model.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])]
    assert not unchanged, f"{name}: parameters a step did not change: {unchanged[:5]}"


def test_the_trainer_loss_unembeds_only_the_answer_positions_and_equals_the_model_loss(tiny):
    name, model, processor, family, images = tiny
    batch = family.model_inputs(family.train_batch(processor, images, QUESTIONS, ANSWERS, prepared=True))
    positions, targets = answer_positions(batch["labels"])
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    assert len(positions) < batch["input_ids"].shape[1] and int((targets != IGNORE_INDEX).sum()) == labelled
    grads = []
    for loss_of in (lambda: model(**batch).loss, lambda: answer_loss(model, batch)[0],
                    lambda: answer_loss(model, batch, num_items_in_batch=2 * labelled)[0] * 2):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((float(loss.detach()), model.get_input_embeddings().weight.grad.clone()))
    (full, g_full), (kept, g_kept), (counted, g_counted) = grads
    assert kept == pytest.approx(full, rel=1e-5) and counted == pytest.approx(full, rel=1e-5), name
    assert torch.allclose(g_kept, g_full, atol=1e-6) and torch.allclose(g_counted, g_full, atol=1e-6), name
    model.zero_grad(set_to_none=True)


def test_generation_answers_from_a_left_padded_batch(tiny):
    _, model, processor, family, images = tiny
    batch = family.generation_batch(processor, images, ["short?", QUESTIONS[1]], prepared=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    answers = generate_answers(model, processor, family, images, QUESTIONS, batch_size=2, max_new_tokens=4,
                               progress=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_generation_stops_at_every_stop_token(tiny):
    _, model, processor, family, images = tiny
    steps = []
    for stop in family.stop_token_ids(processor):
        def force(module, args, logits, stop=stop):  # the stop token wins at every position
            steps.append(stop)
            out = logits.clone()
            out[..., stop] = out.max() + 10.0
            return out

        handle = family.unembed(model).register_forward_hook(force)
        try:
            answers = generate_answers(model, processor, family, images, QUESTIONS, batch_size=2, max_new_tokens=5,
                                       progress=False)
        finally:
            handle.remove()
        assert answers == ["", ""]
    assert len(steps) == len(family.stop_token_ids(processor)), "generation went on past a stop token"


def test_image_span_and_grid_come_from_the_inputs(tiny):
    _, model, processor, family, images = tiny
    batch = family.generation_batch(processor, images, QUESTIONS, prepared=True)
    spans = family.image_spans(model, batch)
    for span, ids in zip(spans, batch["input_ids"], strict=True):
        rows, cols = span.grid
        assert span.end - span.start == rows * cols
        assert (ids[span.start:span.end] == family.image_token_id(model)).all()


def test_repeated_inputs_are_a_batch_of_the_same_example(tiny):
    """Knockout and the neuron checks run n edits of one example as one batch: every row of the
    repeated inputs must give the single example's logits (Qwen2.5-VL's patches are not batch-first)."""
    name, model, processor, family, images = tiny
    ex = prepare_example(model, processor, family, images[0], QUESTIONS[0], ANSWERS[0])
    inputs = family.model_inputs(ex.inputs)
    with torch.no_grad():
        one = model(**inputs, use_cache=False).logits
        three = model(**family.repeat_inputs(inputs, 3), use_cache=False).logits
    assert three.shape[0] == 3, name
    for row in three:
        torch.testing.assert_close(row, one[0], atol=1e-5, rtol=1e-4)


def test_every_registered_method_gives_a_map_on_the_grid(tiny):
    name, model, processor, family, images = tiny
    ex = prepare_example(model, processor, family, images[0], QUESTIONS[0], ANSWERS[0])
    methods = registered()
    kinds = {k for m in methods for k in m.shared} | {"hidden_states"}
    ctx = Context(model, processor, family, ex, kinds=kinds)
    for method in methods:
        result = method.run(ctx)
        assert result.map.shape == ex.span.grid, f"{name} {method.name}: {result.map.shape} vs {ex.span.grid}"
        assert np.isfinite(result.map).all(), f"{name} {method.name}"


def test_a_saved_adapter_loads_with_plain_peft_and_reproduces_the_logits(tiny, tmp_path):
    from peft import PeftModel

    name, model, processor, family, images = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    peft_model = attach_lora(family.model_class.from_pretrained(base_dir, attn_implementation="eager"), family,
                             LoraArguments(lora_r=4, lora_alpha=8), str(base_dir))
    with torch.no_grad():  # a non-zero adapter: B is zero at initialisation
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    write_record(tmp_path / "adapter", str(base_dir), family.name)
    assert adapter_record(tmp_path / "adapter")["family"] == name
    batch = family.model_inputs(family.generation_batch(processor, images, QUESTIONS, prepared=True))
    plain = PeftModel.from_pretrained(family.model_class.from_pretrained(base_dir, attn_implementation="eager"),
                                      tmp_path / "adapter").eval()
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, peft_model(**batch).logits)
