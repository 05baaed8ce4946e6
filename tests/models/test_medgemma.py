"""The MedGemma (Gemma 3) family: its chat format and answer mask, the image-token mask the model builds
from token_type_ids, pan-and-scan, the lens and head shares the model's own head and norms give,
Grad-CAM pooled like the projector, the bare projector, and the real checkpoint's grid and heads."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tiny_models import eager_tiny
from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

from medvlm.diagnostics.capture import capture, prepare_example
from medvlm.diagnostics.methods.occlusion import occlusion
from medvlm.models import IGNORE_INDEX, get_family
from medvlm.models.base import TinySizes
from medvlm.models.gemma3 import START_OF_TURN
from medvlm.models.inputs import VLMCollator
from medvlm.models.tiny import build_tiny, tiny_tokenizer
from medvlm.training.arguments import LoraArguments
from medvlm.training.lora import attach_lora, log_trainable, lora_config

QUESTIONS = ["Is there an abnormality in this image?", "Which part of the body does this image show?"]
ANSWERS = ["yes", "left lower lung"]


@pytest.fixture(scope="module")
def tiny():
    """Eager tiny MedGemma: 64-pixel images, 8x8 token grid (16x16 SigLIP patches pooled 2x2)."""
    model, processor, family = eager_tiny("medgemma")
    rng = np.random.default_rng(0)
    images = family.prepare_images(processor, [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)])
    return model, processor, family, images


def test_golden_layout_and_answer_mask(tiny):
    model, processor, family, images = tiny
    tok = processor.tokenizer
    batch = family.train_batch(processor, images, QUESTIONS, ANSWERS, prepared=True)
    ids, labels, tt, am = (batch[k] for k in ("input_ids", "labels", "token_type_ids", "attention_mask"))
    n = 64
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        prompt = (f"<bos><start_of_turn>user\n\n\n<start_of_image>{'<image_soft_token>' * n}<end_of_image>\n\n{q}"
                  "<end_of_turn>\n<start_of_turn>model\n")
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<end_of_turn>")]
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        assert ids[i, :len(p)].tolist() == p  # the Gemma 3 chat format, one <bos>
        expected = torch.full_like(labels[i], IGNORE_INDEX)
        expected[len(p):len(p) + len(answer)] = torch.tensor(answer)
        assert labels[i].tolist() == expected.tolist()  # the answer and its <end_of_turn>, nothing else
        assert am[i].sum() == len(p) + len(answer) + len(newline)  # right padding after "<end_of_turn>\n"
        assert tt[i].tolist() == (ids[i] == family.image_token_id(model)).long().tolist()  # 1 on image tokens
        assert int(tt[i].sum()) == n
    gen = family.generation_batch(processor, images[:1], QUESTIONS[:1], prepared=True)
    prompt = tok.decode(gen["input_ids"][0])
    assert prompt.endswith(f"{START_OF_TURN}model\n") and "token_type_ids" in gen
    assert family.stop_token_ids(processor) == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]


def test_a_row_without_a_model_turn_is_named(tiny):
    _, processor, family, _ = tiny
    ids = processor.tokenizer("<bos><start_of_turn>user\nhello<end_of_turn>\n", add_special_tokens=False,
                              return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="row 0 holds no '<start_of_turn>model"):
        family.answer_labels(processor.tokenizer, ids, torch.ones_like(ids))


def test_image_tokens_attend_both_ways_and_text_stays_causal(tiny):
    """The mask comes from token_type_ids: with them an image token sees the whole image (and the text
    never sees the future); without them the image is causal too."""
    model, processor, family, images = tiny
    inputs = family.model_inputs(family.generation_batch(processor, images[:1], QUESTIONS[:1], prepared=True))
    span = family.image_spans(model, inputs)[0]
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, output_attentions=True).attentions
    for layer in range(len(att)):
        a = att[layer][0]  # [heads, S, S]
        image = a[:, span.start:span.end, span.start:span.end]
        assert (image > 0).all()  # every image token reads every other, later ones included
        assert torch.triu(a[:, span.end:, :], diagonal=span.end + 1).abs().max() == 0  # text: no future
        assert torch.triu(a[:, :span.start, :span.start], diagonal=1).abs().max() == 0
        assert torch.triu(causal[layer][0][:, span.start:span.end, span.start:span.end], diagonal=1).abs().max() == 0


def test_two_images_never_read_a_later_image(tiny):
    model, processor, family, images = tiny
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare"}]}], add_generation_prompt=True,
        tokenize=False)
    inputs = processor(images=[images], text=[text], add_special_tokens=False, return_tensors="pt",
                       **family.processor_kwargs(prepared=True))
    runs = (inputs["input_ids"][0] == family.image_token_id(model)).nonzero().flatten()
    first, second = runs[:64], runs[64:]
    with torch.no_grad():
        a = model(**family.model_inputs(inputs), output_attentions=True).attentions[0][0]
    assert (a[:, first][:, :, first] > 0).all() and (a[:, second][:, :, second] > 0).all()
    assert a[:, first][:, :, second].abs().max() == 0  # the first image never reads the second
    assert (a[:, second][:, :, first] > 0).all()  # a later image reads an earlier one (causal order)


def _pan_and_scan_family():
    tok = tiny_tokenizer("medgemma", ["where is the lesion? the left lung"] * 4, 300)
    model, processor = build_tiny("medgemma", TinySizes(vision_layers=1, text_layers=2, patch_size=16), tok)
    processor.image_processor.do_pan_and_scan = True  # as a checkpoint's preprocessor_config.json sets it
    processor.image_processor.pan_and_scan_min_crop_size = 32
    return model.eval(), processor, get_family("medgemma")


def test_pan_and_scan_adds_crops_of_256_tokens_each_and_maps_stay_on_the_original_view():
    model, processor, family = _pan_and_scan_family()
    wide = np.random.default_rng(3).integers(0, 256, (64, 160, 3), dtype=np.uint8)
    prepared = family.prepare_images(processor, [wide])
    assert prepared[0].shape == (64, 160, 3)  # kept as it comes: the crops are cut from the original
    batch = family.train_batch(processor, prepared, ["where is the lesion?"], ["left lung"], prepared=True)
    inputs = family.model_inputs(batch)
    assert "num_crops" not in inputs
    n_views = inputs["pixel_values"].shape[0]
    assert n_views == 4  # the original and three crops (160 / 64 rounds to 3)
    assert int((inputs["input_ids"] == family.image_token_id(model)).sum()) == int(inputs["token_type_ids"].sum()) \
        == 16 * n_views
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).loss)
    span = family.image_spans(model, inputs)[0]
    assert span.end - span.start == 16 and span.grid == (4, 4)
    assert int(inputs["input_ids"][0, span.start - 1]) == processor.tokenizer.boi_token_id  # the first view
    model.set_attn_implementation("eager")
    ex = prepare_example(model, processor, family, wide, "where is the lesion?", "left lung")
    with pytest.raises(ValueError, match="crops still show a cell"):
        occlusion(model, family, ex)
    batch = family.repeat_inputs(inputs, 3)  # knockout and the neuron checks batch one example this way
    assert batch["pixel_values"].shape[0] == 3 * n_views
    with torch.no_grad():
        one, three = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits, model(
            **{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(three, one.expand_as(three), atol=1e-5, rtol=1e-4)
    assert family.image_settings(processor)["do_pan_and_scan"] is True  # a new image cache when it is turned on


def test_pan_and_scan_is_off_unless_the_processor_settings_turn_it_on(tiny):
    _, processor, family, _ = tiny
    assert family.pan_and_scan(processor) == {"do_pan_and_scan": False}
    wide = np.zeros((64, 160, 3), np.uint8)
    prepared = family.prepare_images(processor, [wide])
    assert prepared[0].shape == (64, 64, 3)
    batch = family.generation_batch(processor, prepared, ["where?"], prepared=True)
    assert batch["pixel_values"].shape[0] == 1


def test_lens_gives_the_models_logits_and_ignores_a_configured_softcap(tiny):
    """Gemma3ForConditionalGeneration applies no final-logit soft-capping even when the config sets one,
    and its embedding scale is inside embed_tokens: the lens of the last layer is the output logits."""
    model, processor, family, images = tiny
    inputs = family.model_inputs(family.generation_batch(processor, images[:1], QUESTIONS[:1], prepared=True))
    text = model.config.get_text_config()
    try:
        text.final_logit_softcapping = 0.5  # random logits reach ~0.9: capping would show
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
            lens = family.lens_logits(model, out.hidden_states[-1][0])
    finally:
        text.final_logit_softcapping = None
    assert out.logits.abs().max() > 0.5  # not capped
    torch.testing.assert_close(lens, out.logits[0].float(), atol=1e-4, rtol=1e-4)
    embed = family.get_part(model, "language_model").embed_tokens
    ids = inputs["input_ids"][:, :3]
    torch.testing.assert_close(out.hidden_states[0][0, :3], embed.weight[ids[0]] * text.hidden_size ** 0.5)


def test_head_shares_sum_to_the_post_attention_norm_output(tiny):
    model, processor, family, images = tiny
    ex = prepare_example(model, processor, family, images[0], QUESTIONS[0], ANSWERS[0])
    q = ex.target_positions[0]
    _, cache = capture(model, family, ex.inputs, query_positions=[q], values=True, head_outputs=True)
    from medvlm.diagnostics.methods.logprob import head_contributions

    for layer, block in enumerate(family.decoder_layers(model)):
        attn = family.attention_module(block)
        out = attn.o_proj(cache["head_out", layer][0, 0].flatten())
        with torch.no_grad():
            want = block.post_attention_layernorm(out[None])[0]  # what the layer adds to the residual
        seq = list(range(ex.inputs["input_ids"].shape[1]))
        torch.testing.assert_close(head_contributions(model, family, cache, layer, q, seq).sum((0, 1)), want,
                                   atol=1e-4, rtol=1e-4)


def test_gradcam_is_pooled_from_the_patch_grid_like_the_projector(tiny):
    model, processor, family, images = tiny
    gen = torch.Generator().manual_seed(0)
    acts, grads = torch.randn(1, 256, 8, generator=gen), torch.randn(1, 256, 8, generator=gen)  # 16x16 patches
    span = family.image_spans(model, family.generation_batch(processor, images[:1], ["q"], prepared=True))[0]
    cam = family.gradcam_map(acts, grads, span, {})
    patch = (acts[0] @ grads[0].mean(0)).reshape(16, 16).numpy()
    want = np.maximum(patch.reshape(8, 2, 8, 2).mean((1, 3)), 0)  # 2x2 blocks, the projector's avg_pool
    assert cam.shape == span.grid == (8, 8)
    np.testing.assert_allclose(cam.numpy(), want, atol=1e-5)
    assert family.gradcam_layer(model) is family.get_part(model, "vision_tower").encoder.layers[-1]


def test_the_bare_projector_is_trained_fully_and_lora_stays_in_its_tower(tiny, caplog):
    model, processor, family, images = tiny
    assert "model.multi_modal_projector" in family.bare_parameters()
    cfg = lora_config(family, LoraArguments())
    assert cfg.modules_to_save == ["model.multi_modal_projector"]
    assert lora_config(family, LoraArguments(lora_towers=["vision", "language"])).modules_to_save is None
    import copy

    peft_model = attach_lora(copy.deepcopy(model), family, LoraArguments(lora_r=4, lora_alpha=8), "x")
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    vision = [n for n in wrapped if ".vision_tower." in n]
    language = [n for n in wrapped if ".language_model." in n]
    assert len(vision) + len(language) == len(wrapped) and vision and language
    assert {n.rsplit(".", 1)[1] for n in vision} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert {n.rsplit(".", 1)[1] for n in language} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.model.multi_modal_projector.modules_to_save.default."
                         "mm_input_projection_weight",
                         "base_model.model.model.multi_modal_projector.modules_to_save.default.mm_soft_emb_norm.weight"}
    assert {family.tower_of(n.replace("base_model.model.", "")) for n in trainable} == {"projector"}
    with caplog.at_level(logging.INFO, logger="medvlm.training.lora"):
        counts = log_trainable(peft_model, family)
    assert counts["projector"]["trainable"] == counts["projector"]["total"]  # all of it, not a LoRA share
    said = [r.getMessage() for r in caplog.records if "model.multi_modal_projector takes no LoRA" in r.getMessage()]
    assert len(said) == 1 and "bare nn.Parameter" in said[0] and "trained fully" in said[0]


def test_the_real_checkpoints_grid_heads_and_cells():
    """MedGemma-4B's widths and grid (/work/shared/REAL_SHAPES.md), cut to two layers per tower, on the
    meta device: 16x16 tokens pooled from 64x64 patches, 8 heads / 4 KV heads / 256 dims, 56-pixel cells."""
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                                image_size=896, patch_size=14, vision_use_head=False)
    text = Gemma3TextConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, vocab_size=262_208, sliding_window=1024)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=256)
    family = get_family(config.model_type)
    with torch.device("meta"):
        model = family.model_class(config)
    assert family.name == "medgemma" and family.image_grid(model) == (16, 16)
    assert family.head_layout(model) == (8, 4, 256) and family.image_token_id(model) == 262_144
    assert family.input_size(model) == (896, 896) and family.logit_softcap(model) is None
    ids = torch.tensor([2] + [262_144] * 256 + [1])
    span = family.image_span(model, ids)
    assert (span.start, span.end, span.grid) == (1, 257, (16, 16))
    cam = family.gradcam_map(torch.rand(1, 64 * 64, 4), torch.rand(1, 64 * 64, 4), span, {})
    assert cam.shape == (16, 16)
    px = torch.zeros(1, 3, 896, 896)
    hidden = family.occluded_batch({"pixel_values": px, "input_ids": ids[None]}, span, [(3, 5)], 1)["pixel_values"]
    changed = (hidden[0, 0] != 0).nonzero()
    assert hidden.shape == px.shape  # a uniform image is its own mean: nothing changes
    assert changed.numel() == 0
    px[0, :, 3 * 56, 5 * 56] = 1.0  # one bright pixel in token cell (3, 5): hiding the cell removes it
    hidden = family.occluded_batch({"pixel_values": px, "input_ids": ids[None]}, span, [(3, 5)], 1)["pixel_values"]
    assert hidden[0, 0, 3 * 56, 5 * 56] < 1.0 and hidden[0, 0, 3 * 56 - 1, 5 * 56] == px[0, 0, 3 * 56 - 1, 5 * 56]


def test_an_unregistered_model_type_names_the_families_and_the_file_to_add():
    with pytest.raises(ValueError) as err:
        get_family("idefics3")
    message = str(err.value)
    assert "\n" not in message and "'idefics3'" in message and "medgemma" in message and "paligemma" in message
    assert "medvlm/models/<family>.py" in message and "medvlm/models/families.py" in message
    assert get_family("gemma3").name == "medgemma"


@pytest.mark.parametrize("stage2_towers", [["vision", "projector", "language"], ["vision", "language"]])
def test_a_merge_mode_stage_saves_an_adapter_that_plain_peft_reproduces(tiny, tmp_path, stage2_towers):
    """Stage 1 (LoRA + the fully trained projector) merged into the base (adapter_mode: merge), stage 2
    on top, saved as a stage saves it: plain PEFT on the original base gives stage 2's logits. The
    projector is stage 2's copy when stage 2 trains it, else stage 1's (merged into stage 2's base)."""
    from peft import PeftModel

    from medvlm.training.stage import save_adapter

    model, processor, family, images = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    weight = "multi_modal_projector.modules_to_save.default.mm_input_projection_weight"

    def load():
        return family.model_class.from_pretrained(base_dir, attn_implementation="eager")

    def perturb(peft_model, seed):  # as training would: every trainable weight moves
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    first = attach_lora(load(), family, LoraArguments(lora_r=4, lora_alpha=8), str(base_dir))
    perturb(first, 1)
    save_adapter(first, tmp_path / "s1", str(base_dir), family.name, [])
    second = attach_lora(load(), family, LoraArguments(lora_r=2, lora_alpha=8, lora_towers=stage2_towers,
                                                       init_adapter=str(tmp_path / "s1"), adapter_mode="merge"),
                         str(base_dir))
    perturb(second, 2)
    save_adapter(second, tmp_path / "s2", str(base_dir), family.name, [str(tmp_path / "s1")])
    batch = family.model_inputs(family.generation_batch(processor, images, QUESTIONS, prepared=True))
    plain = PeftModel.from_pretrained(load(), tmp_path / "s2").eval()
    assert plain.peft_config["default"].r == 4 + 2  # the two ranks side by side
    projector = dict(plain.named_parameters())[f"base_model.model.model.{weight}"]
    stage1 = dict(first.named_parameters())[f"base_model.model.model.{weight}"]
    if "projector" in stage2_towers:
        want = dict(second.named_parameters())[f"base_model.model.model.{weight}"]
        assert not torch.equal(want, stage1)
    else:
        want = second.get_base_model().model.multi_modal_projector.mm_input_projection_weight
        assert torch.equal(want, stage1)  # stage 1's projector, merged into stage 2's base
    torch.testing.assert_close(projector, want.detach(), atol=0, rtol=0)
    with torch.no_grad():
        got, expected, base = plain(**batch).logits, second.eval()(**batch).logits, load()(**batch).logits
    assert (expected - base).abs().max() > 1e-2  # both stages changed the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_training_batches_carry_token_type_ids_and_the_loss_uses_them(tiny):
    """The collator the trainer uses keeps token_type_ids (1 on image tokens); the model builds the
    image's two-way mask from them, so the training loss differs without them."""
    model, processor, family, images = tiny
    batch = VLMCollator(family, processor)([{"image": im, "question": q, "answer": a}
                                            for im, q, a in zip(images, QUESTIONS, ANSWERS, strict=True)])
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == family.image_token_id(model)).long())
    with torch.no_grad():
        both_ways = model(**batch).loss
        causal = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).loss
    assert torch.isfinite(both_ways) and abs(float(both_ways - causal)) > 1e-4


def test_the_frozen_final_norm_keeps_gemmas_one_plus_weight_gain(tiny):
    """Gemma's RMS norm multiplies by 1 + w (w starts at zero, so a fresh model cannot tell g from 1 + g):
    with a trained-looking w the frozen norm is x · (1 + w) / rms_eps(reference), as the heads read it."""
    model, _, family, _ = tiny
    norm = family.final_norm(model)
    saved = norm.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, norm.weight.shape[0], generator=gen) * torch.tensor([[1.0], [5.0]])
    try:
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-0.5, 2.0, norm.weight.shape[0]))
            want = x * (1.0 + norm.weight) / torch.sqrt(ref.pow(2).mean() + norm.eps)
            torch.testing.assert_close(family.frozen_final_norm(model, x, ref), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(family.lens_logits(model, x, ref), family.unembed(model)(want).float(),
                                       atol=1e-4, rtol=1e-4)
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)


def test_a_262k_vocabulary_is_unembedded_in_bounded_chunks(tiny, monkeypatch):
    """Gemma 3's vocabulary is 262,208 tokens: the logit lens and the log-prob readouts unembed at most
    UNEMBED_BYTES of float32 logits at a time (63 rows, where their default chunks are 64 and 512),
    and give what one unembedding of everything gives."""
    import copy

    from medvlm.diagnostics.methods.base import UNEMBED_BYTES
    from medvlm.diagnostics.methods.logit_lens import logit_lens
    from medvlm.diagnostics.methods.logprob import target_logprobs

    model, processor, family, images = tiny
    config = copy.deepcopy(model.config)
    config.text_config.vocab_size = 262_208
    torch.manual_seed(0)
    big = family.model_class(config).eval()
    ex = prepare_example(big, processor, family, images[0], QUESTIONS[0])
    rows: list[int] = []
    real = type(family).lens_logits

    def spy(self, m, resid, reference=None):
        rows.append(resid.shape[0])
        return real(self, m, resid, reference)

    monkeypatch.setattr(type(family), "lens_logits", spy)
    lens = logit_lens(big, family, ex, processor.tokenizer, layers=[1], k=1)
    vectors = torch.randn(150, config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    logp = target_logprobs(big, family, vectors, 262_000, None)
    assert max(rows) * 262_208 * 4 <= UNEMBED_BYTES and max(rows) == UNEMBED_BYTES // (4 * 262_208) == 63
    assert sum(rows) == 64 + 150  # the 8x8 image positions of one layer, then every vector once
    monkeypatch.undo()
    with torch.no_grad():
        _, cache = capture(big, family, ex.inputs, layers=[1], attention=False, hidden_states=True)
        span = cache.image_span
        probs = torch.softmax(family.lens_logits(big, cache["resid_post", 1][0, span.start:span.end]), -1)
        want = torch.log_softmax(family.lens_logits(big, vectors), -1)[:, 262_000]
    np.testing.assert_allclose(lens.top_probs[0, :, 0], probs.max(-1).values.numpy(), atol=1e-6)
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)


def test_the_do_pan_and_scan_config_key_reaches_the_processor(tiny, tmp_path):
    """Off as the checkpoint saved it; the config key turns it on (the stage records it with the adapter,
    every loader passes it to load_processor); settings of other families are refused, naming them."""
    from pathlib import Path

    from transformers import AutoProcessor

    from medvlm.training.cli import parse_stage_config

    _, processor, family, _ = tiny
    processor.save_pretrained(tmp_path)
    saved = AutoProcessor.from_pretrained(tmp_path)
    saved.image_processor.pan_and_scan_min_crop_size = 32  # crops of a 64-px-high image are allowed
    saved.save_pretrained(tmp_path)
    off = family.load_processor(str(tmp_path))
    on = family.load_processor(str(tmp_path), do_pan_and_scan=True)
    assert family.pan_and_scan(off) == {"do_pan_and_scan": False}
    assert family.pan_and_scan(on) == {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
    wide = np.zeros((64, 160, 3), np.uint8)
    views = [family.generation_batch(p, family.prepare_images(p, [wide]), ["where?"], prepared=True)["pixel_values"]
             for p in (off, on)]
    assert views[0].shape[0] == 1 and views[1].shape[0] == 4  # the original view, then plus three crops
    with pytest.raises(ValueError, match="max_pixels set, but the medgemma family"):
        family.load_processor(str(tmp_path), max_pixels=10**5)
    with pytest.raises(ValueError, match="do_pan_and_scan set, but the llava family"):
        get_family("llava").load_processor(str(tmp_path), do_pan_and_scan=True)
    config = Path(__file__).parents[2] / "recipes" / "configs" / "demo_medgemma_stage1.yaml"
    model_args = parse_stage_config([str(config), "--output_dir", str(tmp_path / "o"), "--do_pan_and_scan", "true"])[0]
    assert model_args.image_settings() == {"do_pan_and_scan": True}
    assert parse_stage_config([str(config), "--output_dir", str(tmp_path / "o")])[0].image_settings() == {}
