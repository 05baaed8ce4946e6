"""Qwen2.5-VL: dynamic resolution (images of any size, grids per example), flattened patches, 3-D
positions computed by the model, window-ordered vision rows, the merger as the projector, and the
processor's image settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import eager_tiny

from medvlm.diagnostics.capture import capture, prepare_example
from medvlm.diagnostics.methods.gradcam import gradcam
from medvlm.diagnostics.methods.occlusion import occlusion
from medvlm.models import IGNORE_INDEX, get_family, load_model_and_processor
from medvlm.models.inputs import ImageStore, PreparedExamples, VLMCollator
from medvlm.models.qwen2_5_vl import QWEN_CHAT_TEMPLATE
from medvlm.training.arguments import LoraArguments
from medvlm.training.lora import lora_config

#: the tiny model (tests/tiny_models.py): 4-px patches merged 2x2, so a token cell is F = 8 pixels a side;
#: min_pixels 64², max_pixels 4 x 64² (a 64-px image keeps its size: an 8x8 token grid)
F, MIN_PIXELS, MAX_PIXELS = 8, 64 * 64, 4 * 64 * 64


@pytest.fixture(scope="module")
def tiny():
    return eager_tiny("qwen2_5_vl")


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _grid(batch, row: int = 0) -> tuple[int, int]:
    _, h, w = (int(x) for x in batch["image_grid_thw"][row])
    return h // 2, w // 2


# -- images of any size --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (64, 128), (100, 37)])
def test_a_prepared_image_gives_the_processors_own_pixels_without_resizing_again(tiny, shape):
    _, processor, family = tiny
    raw = _noise(*shape)
    prepared = family.prepare_images(processor, [raw])[0]
    assert prepared.dtype == np.uint8 and prepared.shape[0] % F == 0 and prepared.shape[1] % F == 0
    direct = processor.image_processor([raw], return_tensors="pt")
    again = processor.image_processor([prepared], return_tensors="pt", **family.processor_kwargs(prepared=True))
    assert torch.equal(direct["image_grid_thw"], again["image_grid_thw"])
    assert torch.allclose(direct["pixel_values"], again["pixel_values"], atol=1e-5)
    assert tuple(direct["image_grid_thw"][0, 1:].tolist()) == (2 * prepared.shape[0] // F, 2 * prepared.shape[1] // F)


def test_a_huge_image_is_shrunk_and_a_tiny_one_enlarged_never_refused(tiny):
    """The processor's rule (transformers, models/qwen2_vl/image_processing_qwen2_vl.py, smart_resize):
    sides are multiples of F; above max_pixels both sides scale by s = sqrt(max_pixels / (h·w)) and round
    down to F, below min_pixels by s = sqrt(min_pixels / (h·w)) and round up. 900 x 1400: s = 0.1140,
    102.6 -> 96, 159.6 -> 152; 10 x 12: s = 5.842, 58.4 -> 64, 70.1 -> 72."""
    model, processor, family = tiny
    huge, small = _noise(900, 1400), _noise(10, 12)
    big_out, small_out = family.prepare_images(processor, [huge, small])
    assert big_out.shape == (96, 152, 3) and small_out.shape == (64, 72, 3)
    assert big_out.shape[0] * big_out.shape[1] <= MAX_PIXELS
    assert abs(big_out.shape[0] / big_out.shape[1] - 900 / 1400) < 0.1  # the aspect ratio is kept
    assert small_out.shape[0] * small_out.shape[1] >= MIN_PIXELS
    for raw, out in ((huge, big_out), (small, small_out)):  # the pixels the processor itself makes
        direct = processor.image_processor([raw], return_tensors="pt")
        again = processor.image_processor([out], return_tensors="pt", **family.processor_kwargs(prepared=True))
        assert torch.equal(direct["image_grid_thw"], again["image_grid_thw"])
        assert torch.allclose(direct["pixel_values"], again["pixel_values"], atol=1e-5)
    ex = prepare_example(model, processor, family, huge, "where is the lesion?", "left lung")
    assert ex.span.grid == (big_out.shape[0] // F, big_out.shape[1] // F)
    assert ex.image.shape == big_out.shape


def test_images_of_different_sizes_batch_with_a_grid_each_and_blank_to_their_own_size(tiny):
    model, processor, family = tiny
    images = family.prepare_images(processor, [_noise(64, 64), _noise(64, 160, 1)])
    assert images[0].shape != images[1].shape
    examples = PreparedExamples(ImageStore(images=images), np.array([0, 1]), ["what?", "where?"], ["yes", "left"],
                                ["a", "b"], np.zeros(2, np.int64), np.ones(2, np.int64))
    batch = VLMCollator(family, processor)([examples[0], examples[1]])
    spans = family.image_spans(model, batch)
    assert [s.grid for s in spans] == [_grid(batch, 0), _grid(batch, 1)] and spans[0].grid != spans[1].grid
    assert [s.end - s.start for s in spans] == [int(g.prod()) // 4 for g in batch["image_grid_thw"]]
    blank = examples.blanked()
    assert [blank.image(i).shape for i in range(2)] == [im.shape for im in images]
    assert all((blank.image(i) == 128).all() for i in range(2))
    blank_batch = VLMCollator(family, processor)([blank[0], blank[1]])
    assert torch.equal(blank_batch["image_grid_thw"], batch["image_grid_thw"])
    assert torch.isfinite(model(**blank_batch).loss)


def test_pixel_values_are_checked_against_the_grid(tiny):
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, _noise(64, 96), "where?")
    family.check_pixels(model, ex.inputs)
    with pytest.raises(ValueError, match="flattened patches"):
        family.check_pixels(model, {**ex.inputs, "pixel_values": ex.inputs["pixel_values"][:-4]})
    with pytest.raises(ValueError, match="flattened patches"):
        family.check_pixels(model, {**ex.inputs, "pixel_values": torch.zeros(1, 3, 64, 64)})
    assert family.input_size(model) is None
    with pytest.raises(ValueError, match="image_grid_thw"):
        family.image_grid(model)


# -- labels and positions ------------------------------------------------------------------------
def test_the_loss_is_on_the_answer_and_its_im_end_with_the_real_template(tiny):
    model, processor, family = tiny
    tok = processor.tokenizer
    assert processor.chat_template == QWEN_CHAT_TEMPLATE
    images = family.prepare_images(processor, [_noise(64, 64), _noise(64, 64, 1)])
    batch = family.train_batch(processor, images, ["Is there a lesion?", "Where?"], ["yes", "left lower lung"],
                               prepared=True)
    for i, answer in enumerate(["yes", "left lower lung"]):
        n_image = int(batch["image_grid_thw"][i].prod()) // 4
        prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                  + "<|image_pad|>" * n_image + "<|vision_end|>" + ["Is there a lesion?", "Where?"][i]
                  + "<|im_end|>\n<|im_start|>assistant\n")
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        expected = torch.full_like(batch["labels"][i], IGNORE_INDEX)
        expected[n:n + len(target)] = torch.tensor(target)
        assert batch["labels"][i].tolist() == expected.tolist()  # not the newline after <|im_end|>, not padding
        assert tok.decode(batch["input_ids"][i, n + len(target)]) == "\n"


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(tiny):
    _, processor, family = tiny
    broken = QWEN_CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant:\n{% endif %}")
    processor_copy = type(processor)(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                     chat_template=broken)
    with pytest.raises(ValueError, match="not a token prefix"):
        family.train_batch(processor_copy, family.prepare_images(processor, [_noise(64, 64)]), ["q?"], ["yes"],
                           prepared=True)


def test_the_language_model_gets_3d_positions_in_training_generation_capture_and_occlusion(tiny):
    model, processor, family = tiny
    seen = []

    def keep(module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    handle = family.get_part(model, "language_model").register_forward_pre_hook(keep, with_kwargs=True)
    try:
        images = family.prepare_images(processor, [_noise(64, 64), _noise(64, 128, 1)])
        batch = family.model_inputs(family.train_batch(processor, images, ["a?", "b?"], ["yes", "no"], prepared=True))
        model(**batch)
        gen = family.model_inputs(family.generation_batch(processor, images, ["a?", "a longer question?"],
                                                          prepared=True))
        model.generate(**gen, max_new_tokens=2, pad_token_id=processor.tokenizer.pad_token_id)
        ex = prepare_example(model, processor, family, images[1], "where?", "left")
        capture(model, family, ex.inputs, layers=[-1], query_positions="last")
        occlusion(model, family, ex, batch_size=4)
    finally:
        handle.remove()
    assert seen and all(p is not None and p.ndim == 3 and p.shape[0] in (3, 4) for p in seen)
    first = seen[0][-3:]  # (time, row, column) of the training batch's second sequence
    span = family.image_spans(model, batch)[1]
    rows, cols = span.grid
    image_rows = first[1, 1, span.start:span.end].reshape(rows, cols)
    image_cols = first[2, 1, span.start:span.end].reshape(rows, cols)
    assert (image_rows[:, :1] == image_rows).all() and (image_rows[1:] - image_rows[:-1] == 1).all()
    assert (image_cols[:1] == image_cols).all() and (image_cols[:, 1:] - image_cols[:, :-1] == 1).all()


def test_sampled_answers_for_images_of_different_sizes(tiny):
    """The five-run consistency check samples several answers per question in one generate call: the
    pixel patches of images of different sizes must stay with their own rows when the batch is expanded."""
    from medvlm.eval.generate import generate_answers

    model, processor, family = tiny
    images = family.prepare_images(processor, [_noise(64, 64), _noise(64, 160, 1)])
    samples = generate_answers(model, processor, family, images, ["what?", "where is it?"], do_sample=True,
                               num_return_sequences=3, max_new_tokens=3, progress=False)
    assert [len(s) for s in samples] == [3, 3]
    greedy = generate_answers(model, processor, family, images, ["what?", "where is it?"], max_new_tokens=3,
                              progress=False)
    alone = [generate_answers(model, processor, family, [im], [q], max_new_tokens=3, progress=False)[0]
             for im, q in zip(images, ["what?", "where is it?"], strict=True)]
    assert greedy == alone  # batching (left padding, two grids) does not change an answer


# -- maps on the right grid ----------------------------------------------------------------------
def _with_lesion(h: int, w: int, cell: tuple[int, int], processor, family) -> np.ndarray:
    """A uniform prepared image of h x w (multiples of F) with a bright square filling token cell ``cell``."""
    image = np.full((h, w, 3), 60, np.uint8)
    r, c = cell
    image[r * F:(r + 1) * F, c * F:(c + 1) * F] = 250
    assert family.prepare_images(processor, [image])[0].shape == image.shape  # already the processor's size
    return image


def test_occluding_a_cell_equals_hiding_its_pixels_and_processing_again(tiny):
    model, processor, family = tiny
    image = family.prepare_images(processor, [_noise(64, 112, 3)])[0]
    ex = prepare_example(model, processor, family, image, "where?")
    rows, cols = ex.span.grid
    assert rows != cols
    mean = image.reshape(-1, 3).astype(np.float64).mean(0)
    for (r, c), block in [((1, 2), 1), ((rows - 1, cols - 1), 1), ((0, 2), 2)]:
        hidden = image.astype(np.float64)
        hidden[r * F:(r + block) * F, c * F:(c + block) * F] = mean
        by_hand = processor.image_processor([hidden], return_tensors="pt", do_resize=False)["pixel_values"]
        ours = family.occluded_batch(ex.inputs, ex.span, [(r, c)], block)
        assert torch.allclose(ours["pixel_values"], by_hand, atol=1e-5), (r, c, block)
    two = family.occluded_batch(ex.inputs, ex.span, [(0, 0), (1, 1)], 1)
    n = ex.inputs["pixel_values"].shape[0]
    assert two["pixel_values"].shape[0] == 2 * n and two["image_grid_thw"].shape == (2, 3)


def test_a_lesion_in_a_known_cell_of_a_non_square_image_peaks_there_on_its_grid(tiny):
    model, processor, family = tiny
    cell = (5, 9)
    image = _with_lesion(7 * F, 12 * F, cell, processor, family)  # 7 x 12 token cells
    ex = prepare_example(model, processor, family, image, "where is the lesion?", "left lung")
    assert ex.span.grid == (7, 12) == _grid(ex.inputs)
    drops = occlusion(model, family, ex, max_side=None, batch_size=28)
    assert drops.shape == (7, 12)
    assert np.unravel_index(np.abs(drops).argmax(), drops.shape) == cell
    assert gradcam(model, family, ex).shape == (7, 12)


def test_every_method_maps_a_non_square_image_on_its_own_grid_with_the_lesion_cell_in_place(tiny):
    """Each registered method's map is (h/2, w/2) of image_grid_thw, and the lesion mask pooled onto that
    grid lands in the lesion's cell (row 5 of 7, column 9 of 12), where occlusion points."""
    from medvlm.diagnostics.attention_quality import mask_to_grid, pointing_game
    from medvlm.diagnostics.methods import Context, registered

    model, processor, family = tiny
    cell = (5, 9)
    image = _with_lesion(7 * F, 12 * F, cell, processor, family)
    mask = np.zeros(image.shape[:2], bool)
    mask[cell[0] * F:(cell[0] + 1) * F, cell[1] * F:(cell[1] + 1) * F] = True
    ex = prepare_example(model, processor, family, image, "where is the lesion?", "left lung")
    grid = _grid(ex.inputs)
    assert grid == (7, 12) == ex.span.grid
    on_grid = mask_to_grid(mask, grid)
    assert on_grid[cell] == 1 and on_grid.sum() == 1  # the lesion is exactly that cell, nothing else
    methods = registered()
    ctx = Context(model, processor, family, ex, kinds={k for m in methods for k in m.shared} | {"hidden_states"})
    maps = {m.name: m.run(ctx).map for m in methods}
    for name, grid_map in maps.items():
        assert grid_map.shape == grid, f"{name}: {grid_map.shape} vs {grid}"
        assert np.isfinite(grid_map).all(), name
    assert pointing_game(np.abs(occlusion(model, family, ex, max_side=None, batch_size=28)), mask)


def test_gradcam_rows_come_back_from_window_order(tiny):
    """The last vision block's rows are in window order; gradcam_order must undo it exactly as the tower
    undoes it for the merger's output (checked on a grid of several 4x4-cell windows)."""
    model, processor, family = tiny
    image = family.prepare_images(processor, [_noise(150, 330, 4)])[0]
    ex = prepare_example(model, processor, family, image, "where?")
    rows, cols = ex.span.grid
    assert rows > 4 and cols > 4  # more than one merger window
    acts = []
    handle = family.gradcam_layer(model).register_forward_hook(lambda m, a, o: acts.append(o))
    try:
        with torch.no_grad():
            pooled = model.get_image_features(pixel_values=ex.inputs["pixel_values"],
                                              image_grid_thw=ex.inputs["image_grid_thw"]).pooler_output[0]
    finally:
        handle.remove()
    order = family.gradcam_order(model, ex.inputs)
    assert sorted(order.tolist()) == list(range(rows * cols * 4))  # a permutation of the patches
    assert not torch.equal(order, torch.arange(order.numel()))  # and not the identity here
    with torch.no_grad():
        merged = family.get_part(model, "projector")(acts[-1][order])
    torch.testing.assert_close(merged, pooled)


# -- structure and LoRA ----------------------------------------------------------------------------
def test_the_merger_is_the_projector_for_counts_and_lora_targets(tiny):
    model, _, family = tiny
    names = [n for n, _ in model.named_modules()]
    assert family.tower_of("model.visual.merger.mlp.0.weight") == "projector"
    assert family.tower_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert family.tower_of("lm_head.weight") == "lm_head"
    import re

    for towers, expect in ((["vision"], "vision"), (["projector"], "projector"), (["language"], "language")):
        regex = re.compile(lora_config(family, LoraArguments(lora_towers=towers)).target_modules)
        hit = [n for n in names if regex.fullmatch(n)]
        assert hit and {family.tower_of(n) for n in hit} == {expect}, towers
        assert "model.visual.patch_embed.proj" not in hit
    full = re.compile(lora_config(family, LoraArguments()).target_modules)
    assert {"model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.2", "model.language_model.layers.0.mlp.gate_proj"} \
        <= {n for n in names if full.fullmatch(n)}


def test_head_layout_tied_unembedding_and_the_lens(tiny):
    model, processor, family = tiny
    assert family.head_layout(model) == (4, 2, 32)  # grouped-query heads, as the 3B checkpoint (16 / 2 / 128)
    assert family.unembed(model).weight is family.get_part(model, "language_model").embed_tokens.weight
    ex = prepare_example(model, processor, family, _noise(64, 64), "where?")
    out, cache = capture(model, family, ex.inputs, layers=[-1], attention=False, hidden_states=True)
    lens = family.lens_logits(model, cache["resid_post", -1][0, -1:])
    torch.testing.assert_close(lens[0], out.logits[0, -1].float(), atol=1e-4, rtol=1e-4)
    family.check_eager(model)


# -- the processor: checkpoints, image settings ----------------------------------------------------
def test_a_checkpoint_folder_in_the_hubs_layout_loads_and_its_pixel_bounds_can_be_overridden(tiny, tmp_path):
    """The hub's Qwen2.5-VL folder has a legacy preprocessor_config.json (min/max_pixels keys, 3B values)."""
    _, processor, family = tiny
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    loaded = family.load_processor(str(tmp_path))
    assert (loaded.image_processor.size.shortest_edge, loaded.image_processor.size.longest_edge) == (3136, 12845056)
    assert loaded.chat_template == QWEN_CHAT_TEMPLATE and loaded.image_token == "<|image_pad|>"
    custom = family.load_processor(str(tmp_path), min_pixels=200704, max_pixels=1003520)
    assert (custom.image_processor.size.shortest_edge, custom.image_processor.size.longest_edge) == (200704, 1003520)
    with pytest.raises(ValueError, match="min_pixels=.* is above max_pixels"):
        family.load_processor(str(tmp_path), min_pixels=10**6, max_pixels=10**5)
    with pytest.raises(ValueError, match="fixed input size"):
        get_family("llava").load_processor(str(tmp_path), max_pixels=10**5)


def test_image_settings_reach_the_processor_and_follow_the_adapter(tiny, tmp_path):
    from peft import get_peft_model

    from medvlm.models.adapters import adapter_record, load_with_adapter, write_record

    model, processor, family = tiny
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    saved = json.loads((tmp_path / "base" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"  # loads with AutoProcessor where torchvision exists
    settings = {"min_pixels": 96 * 96, "max_pixels": 96 * 96}
    loaded = load_model_and_processor(str(tmp_path / "base"), image_settings=settings)
    assert loaded.processor.image_processor.size.longest_edge == 96 * 96
    peft_model = get_peft_model(loaded.model, lora_config(family, LoraArguments(lora_towers=["language"])))
    peft_model.save_pretrained(tmp_path / "adapter")
    write_record(tmp_path / "adapter", str(tmp_path / "base"), family.name, image_settings=settings)
    assert adapter_record(tmp_path / "adapter")["image_settings"] == settings
    again = load_with_adapter(None, tmp_path / "adapter")
    assert again.processor.image_processor.size.longest_edge == 96 * 96
    assert family.prepare_images(again.processor, [_noise(64, 64)])[0].shape == (96, 96, 3)


# -- the explorer on a non-square image ------------------------------------------------------------
def test_the_explorer_draws_and_maps_clicks_on_a_non_square_image(tmp_path, small_phantom):
    from explorer_fixtures import build_model_with_adapters

    from medvlm.diagnostics.explorer import (
        analyze,
        display_image,
        draw_overlay,
        load_explorer_model,
        patch_of,
    )

    folder, adapters = build_model_with_adapters(tmp_path, "qwen2_5_vl", small_phantom)
    em = load_explorer_model(str(folder), [str(a) for a in adapters])
    f = em.processor.image_processor.patch_size * em.processor.image_processor.merge_size
    image = np.full((5 * f, 11 * f, 3), 60, np.uint8)
    image[3 * f:4 * f, 8 * f:9 * f] = 250  # a lesion in cell (3, 8)
    mask = np.zeros(image.shape[:2], bool)
    mask[3 * f:4 * f, 8 * f:9 * f] = True
    a = analyze(em, em.variants[0], image, "where is the lesion?", mask=mask)
    assert a.grid == (5, 11) and a.image.shape[:2] == (5 * f, 11 * f) and a.errors == {}
    assert all(m.shape == (5, 11) for m in a.maps.values())
    shown = display_image(a.image)
    assert shown.size[0] * 5 == shown.size[1] * 11  # the preview keeps the model input's aspect
    assert draw_overlay(a.image, a.maps["occlusion"], mask=a.mask).size == shown.size
    x, y = (8.5 / 11) * shown.size[0], (3.5 / 5) * shown.size[1]  # a click in the lesion's cell
    assert patch_of(x, y, shown.size, a.grid) == (3, 8)
    drops = np.abs(a.maps["occlusion"])  # an 11-wide grid is occluded in 2x2 blocks: the lesion's block peaks
    assert drops[3, 8] == drops.max() > 10 * np.median(drops)


# -- an adapter of another family ------------------------------------------------------------------
@pytest.mark.parametrize("trained, loaded", [("llava", "qwen2_5_vl"), ("qwen2_5_vl", "llava")])
def test_an_adapter_of_another_family_is_refused_before_any_weights_load(tiny_folders, tmp_path, monkeypatch,
                                                                         trained, loaded):
    from peft import get_peft_model

    from medvlm.models.adapters import AdapterError, load_with_adapter, write_record

    source = load_model_and_processor(str(tiny_folders(trained)))
    peft_model = get_peft_model(source.model, lora_config(source.family, LoraArguments(lora_towers=["language"])))
    peft_model.save_pretrained(tmp_path / "adapter")
    write_record(tmp_path / "adapter", str(tiny_folders(trained)), trained)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the adapter was checked")

    for name in (trained, loaded):
        monkeypatch.setattr(get_family(name).model_class, "from_pretrained", no_weights)
    with pytest.raises(AdapterError) as err:
        load_with_adapter(str(tiny_folders(loaded)), tmp_path / "adapter")
    message = str(err.value)
    assert f"was trained on a {trained} model" in message and f"is a {loaded} model" in message
    assert str(tiny_folders(trained)) in message  # and which base to set instead


# -- the real-checkpoint configs ---------------------------------------------------------------------
def test_the_qwen2_5_vl_3b_configs_train_on_slake_then_anneal_rocov2_qa_toward_medpix(tmp_path):
    from pathlib import Path

    from medvlm.data_curation.mixing import MixConfig
    from medvlm.training.cli import parse_stage_config

    root = Path(__file__).parents[2]
    configs = root / "recipes" / "configs"
    stages = {}
    for name in ("qwen2_5_vl_3b_slake_stage1.yaml", "qwen2_5_vl_3b_roco_medpix_stage2.yaml"):
        stages[name] = parse_stage_config([str(configs / name)])
    (m1, d1, _, a1), (m2, d2, l2, a2) = stages.values()
    assert m1.model_name_or_path == m2.model_name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert (a1.stage, a2.stage) == ("stage1", "stage2")
    assert l2.init_adapter == f"{a1.output_dir}/adapter"  # stage 2 continues stage 1's adapter
    # 256 to 1,280 merged tokens of 28 x 28 px, the same in both stages
    assert m1.image_settings() == m2.image_settings() == {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}
    slake = MixConfig.from_yaml(root / d1.dataset)
    assert [s.source for s in slake.sources] == ["slake"] and slake.sources[0].split == "train"
    mix = MixConfig.from_yaml(root / d2.dataset)
    kinds = {s.name: s.source for s in mix.sources}
    assert kinds == {"roco_generated": "json", "medpix": "medpix"}  # QA generated from ROCOv2 captions, MedPix
    main, anneal = mix.phases
    assert anneal.name == "anneal" and anneal.weights["medpix"] > main.weights["medpix"]  # toward MedPix
    assert "slake" in d1.eval_dataset and d1.eval_dataset == d2.eval_dataset  # both scored on SLAKE's test split
