"""Attention maps (one head, fused), the reverse reading, rollout, Grad-CAM and overlays on both families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import FAMILIES, eager_tiny

from medvlm.diagnostics.capture import capture, prepare_example
from medvlm.diagnostics.methods.gradcam import gradcam
from medvlm.diagnostics.overlay import overlay, save_overlay
from medvlm.diagnostics.saliency import (
    attention_map,
    attention_rollout,
    fuse,
    image_to_response,
    last_quarter,
    raw_attention,
    rollout,
)
from medvlm.models.families import get_family


@pytest.fixture(scope="session")
def setup():
    out = {}
    rng = np.random.default_rng(0)
    for fam in FAMILIES:
        model, processor, family = eager_tiny(fam)
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        ex = prepare_example(model, processor, family, img, "where is the lesion?", "left lung")
        with torch.no_grad():
            ref = model(**ex.inputs, output_attentions=True).attentions
        out[fam] = (model, family, ex, [a[0] for a in ref])
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_single_head_map_is_that_heads_attention_to_the_image(setup, fam):
    model, family, ex, ref = setup[fam]
    span = family.image_span(model, ex.inputs["input_ids"][0], ex.inputs)
    got = raw_attention(model, family, ex, layer=0, head=2)
    want = ref[0][2, ex.target_positions, span.start:span.end].mean(0).reshape(8, 8)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fam", FAMILIES)
def test_mean_fusion_averages_the_last_quarter(setup, fam):
    model, family, ex, ref = setup[fam]
    span = family.image_span(model, ex.inputs["input_ids"][0], ex.inputs)
    assert last_quarter(2) == [1] and last_quarter(26) == [20, 21, 22, 23, 24, 25]
    got = raw_attention(model, family, ex, fusion="mean")
    want = ref[-1][:, ex.target_positions, span.start:span.end].mean((0, 1)).reshape(8, 8)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)
    assert (raw_attention(model, family, ex, fusion="max") >= got - 1e-9).all()  # max over heads >= mean


def test_entropy_fusion_ignores_uniform_heads():
    focused = torch.tensor([0.0, 0.0, 0.9, 0.1])
    rows = torch.stack([torch.full((4,), 0.25), focused])[None, :, None, :]  # [L=1, H=2, Q=1, N=4]
    torch.testing.assert_close(fuse(rows, "entropy"), focused)
    torch.testing.assert_close(fuse(rows, "max"), torch.tensor([0.25, 0.25, 0.9, 0.25]))
    torch.testing.assert_close(fuse(rows, "mean"), (rows[0, 0, 0] + focused) / 2)
    uniform = torch.full((1, 2, 1, 4), 0.25)
    torch.testing.assert_close(fuse(uniform, "entropy"), torch.full((4,), 0.25))  # falls back to the mean
    with pytest.raises(ValueError, match="fusion='median'"):
        fuse(rows, "median")


@pytest.mark.parametrize("fam", FAMILIES)
def test_image_patch_to_response_tokens(setup, fam):
    model, family, ex, ref = setup[fam]
    span = family.image_span(model, ex.inputs["input_ids"][0], ex.inputs)
    _, cache = capture(model, family, ex.inputs, query_positions=ex.target_positions)
    weights = image_to_response(cache, (2, 5), ex.target_positions, layer=1, head=0)
    want = ref[1][0, ex.target_positions, span.start + 2 * 8 + 5]
    np.testing.assert_allclose(weights, want.numpy(), rtol=1e-5)
    fused = image_to_response(cache, 21, ex.target_positions)
    assert fused.shape == (len(ex.target_positions),)
    # the reverse reading agrees with the forward map: its mean over responses is that map's cell
    forward = attention_map(cache, ex.target_positions)
    assert fused.mean() == pytest.approx(forward[2, 5], rel=1e-6)
    with pytest.raises(ValueError, match="outside the 8x8 image grid"):
        image_to_response(cache, 64, ex.target_positions)


@pytest.mark.parametrize("fam", FAMILIES)
def test_rollout_matches_the_product_of_mixed_head_means(setup, fam):
    model, family, ex, ref = setup[fam]
    span = family.image_span(model, ex.inputs["input_ids"][0], ex.inputs)
    joint = np.eye(ref[0].shape[-1])
    for a in ref:
        a_hat = 0.5 * a.mean(0).double().numpy() + 0.5 * np.eye(a.shape[-1])
        joint = (a_hat / a_hat.sum(-1, keepdims=True)) @ joint
    want = joint[ex.target_positions, span.start:span.end].mean(0).reshape(8, 8)
    np.testing.assert_allclose(attention_rollout(model, family, ex), want, rtol=1e-4, atol=1e-7)
    _, partial = capture(model, family, ex.inputs, layers=[1])
    with pytest.raises(ValueError, match="every layer"):
        rollout(partial, ex.target_positions)


@pytest.mark.parametrize("fam", FAMILIES)
def test_gradcam_follows_the_target_and_frozen_weights(setup, fam):
    model, family, ex, _ = setup[fam]
    cam = gradcam(model, family, ex)
    assert cam.shape == (8, 8) and (cam >= 0).all() and cam.max() > 0
    other = gradcam(model, family, ex, target_ids=[7] * len(ex.target_positions))
    assert not np.allclose(cam, other)
    predicted = gradcam(model, family, ex, positions=[ex.target_positions[0]])
    assert predicted.shape == (8, 8)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        np.testing.assert_allclose(gradcam(model, family, ex), cam, rtol=1e-4, atol=1e-8)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    with pytest.raises(ValueError, match="one id per position"):
        gradcam(model, family, ex, target_ids=[1])


def test_overlay_blends_a_coloured_map_over_the_image(tmp_path):
    img = np.full((64, 64, 3), 40, np.uint8)
    grid = np.zeros((8, 8))
    grid[0, 7] = 1.0
    assert np.array_equal(np.asarray(overlay(img, grid, alpha=0.0)), img)
    full = np.asarray(overlay(img, grid, alpha=1.0, cmap="gray"))
    assert full.shape == (64, 64, 3)
    assert full[3, 60].mean() > 200 and full[60, 3].mean() < 5  # hot corner white, far corner black
    path = save_overlay(tmp_path / "sub" / "o.png", img, grid)
    assert Image.open(path).size == (64, 64) and not list(path.parent.glob(".*tmp*"))
    with pytest.raises(ValueError, match="2-D"):
        overlay(img, np.zeros(64))
    with pytest.raises(ValueError, match="NaN"):
        overlay(img, np.full((8, 8), np.nan))


def test_overlay_outlines_the_lesion_mask():
    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((128, 128), bool)  # another resolution over the same extent
    mask[40:80, 40:80] = True  # image pixels 20..39
    out = np.asarray(overlay(img, np.zeros((4, 4)), alpha=0.0, outline=mask))
    white = (out == 255).all(-1)
    assert white[20, 25] and white[39, 30] and white[30, 20]  # the boundary
    assert not white[30, 30] and not white[5, 5]  # not the inside, not the background
    with pytest.raises(ValueError, match="2-D"):
        overlay(img, np.zeros((4, 4)), outline=np.zeros(5))


def test_gradcam_hooks_the_layer_llava_15_reads(tmp_path):
    """LLaVA-1.5 reads the vision tower's penultimate layer (vision_feature_layer -2): Grad-CAM hooks
    that layer (the last one's output never reaches the projector, and has no gradient)."""
    from medvlm.models.base import TinySizes
    from medvlm.models.tiny import build_tiny, tiny_tokenizer

    tok = tiny_tokenizer("llava", ["where is the lesion? the left lung"] * 4, 300)
    model, processor = build_tiny("llava", TinySizes(vision_layers=3, text_layers=2, patch_size=8), tok)
    model.config.vision_feature_layer = -2
    model.model.config.vision_feature_layer = -2
    model.set_attn_implementation("eager")
    family = get_family("llava")
    assert family.gradcam_layer(model) is family.vision_layers(model)[-2]
    ex = prepare_example(model.eval(), processor, family, np.full((64, 64, 3), 90, np.uint8), "where?", "left lung")
    cam = gradcam(model, family, ex)
    assert cam.shape == (8, 8) and np.isfinite(cam).all()
    model.config.vision_feature_layer = 2  # hidden state 2 is the output of layer index 1 (0 = embeddings)
    assert family.gradcam_layer(model) is family.vision_layers(model)[1]
