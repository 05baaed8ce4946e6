"""Model-parameter randomisation test and ROI scores on phantom lesions, both families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, eager_tiny

from medvlm.data_curation.phantom import PhantomConfig, load_phantom
from medvlm.diagnostics.attention_quality import score_map
from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.sanity import randomization_test, randomize_top_layers, sanity_methods
from medvlm.utils.images import read_mask

CORPUS = ["where is the abnormality? the lesion is in the left lung, near the liver and the kidney."] * 4


@pytest.fixture(scope="session")
def lesion_record(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDVLM_HOME", str(tmp_path_factory.mktemp("medvlm_home")))
    try:
        ds = load_phantom(PhantomConfig(n_patients=12), kind="qa")
    finally:
        mp.undo()
    return next(r for r in ds if r["roi"] and r["question"] == "Where is the abnormality?")


@pytest.fixture(scope="session")
def setup(lesion_record):
    out = {}
    for fam in FAMILIES:
        model, processor, family = eager_tiny(fam, CORPUS)
        ex = prepare_example(model, processor, family, lesion_record["image"], lesion_record["question"],
                             lesion_record["answer"])
        out[fam] = (model, family, ex)
    return out


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("fam", FAMILIES)
def test_randomize_touches_only_the_top_layers_of_a_copy(setup, fam):
    model, family, _ = setup[fam]
    layers = family.decoder_layers(model)
    original = [params(layer) for layer in layers]
    state = torch.get_rng_state()
    clone = randomize_top_layers(model, family, top_k=1, tower="language", seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    new = family.decoder_layers(clone)
    assert same(params(new[0]), original[0]) and not same(params(new[1]), original[1])
    assert all(same(params(layer), orig) for layer, orig in zip(layers, original, strict=True))  # model intact
    again = randomize_top_layers(model, family, top_k=1, tower="language", seed=3)
    assert same(params(family.decoder_layers(again)[1]), params(new[1]))  # seeded
    vis = randomize_top_layers(model, family, top_k=1, tower="vision", seed=3)
    assert same(params(family.decoder_layers(vis)[1]), original[1])
    assert not same(params(family.vision_layers(vis)[-1]), params(family.vision_layers(model)[-1]))
    with pytest.raises(ValueError, match="top_k=5"):
        randomize_top_layers(model, family, top_k=5)
    with pytest.raises(ValueError, match="tower='text'"):
        randomize_top_layers(model, family, tower="text")


@pytest.mark.parametrize("fam", FAMILIES)
def test_randomisation_flags_maps_that_ignore_the_model(setup, fam):
    model, family, ex = setup[fam]
    image_only = ex.image.mean(-1).reshape(8, 8, 8, 8).mean((1, 3))  # depends on the input, never the weights

    def broken(m, f, e):
        raise ValueError("cannot compute")

    methods = {**sanity_methods(), "image_only": lambda m, f, e: image_only,
               "constant": lambda m, f, e: np.ones((8, 8)), "broken": broken}
    report = randomization_test(model, family, ex, methods, top_k=1, tower="language", seed=0)
    assert report.scores["image_only"]["spearman"] == pytest.approx(1.0)
    assert report.scores["image_only"]["flagged"] is True
    assert "image_only" in report.untrustworthy
    # the last layer's attention is rebuilt from new weights: its map must move
    assert report.scores["attention"]["flagged"] is False
    assert report.scores["attention"]["spearman"] < 0.8
    assert report.scores["constant"]["flagged"] is None and "constant" in report.scores["constant"]["reason"]
    assert report.scores["broken"]["flagged"] is None and "cannot compute" in report.scores["broken"]["reason"]
    for name in sanity_methods():
        s = report.scores[name]
        assert -1.0 <= s["spearman"] <= 1.0 and -1.0 <= s["pearson"] <= 1.0, name
        assert report.original[name].shape == report.randomized[name].shape == (8, 8)


def test_roi_scores_on_a_phantom_lesion(setup, lesion_record):
    mask = read_mask(lesion_record["roi"])
    assert mask.shape == (64, 64) and 0 < mask.sum() < mask.size
    _, _, ex = setup["paligemma"]
    pooled = mask.reshape(8, 8, 8, 8).mean((1, 3))
    far = np.zeros((8, 8))
    r, c = np.argwhere(pooled == 0)[0]  # a cell the lesion does not touch
    far[r, c] = 1.0
    signed = pooled - 0.5 * pooled.max()
    scores = {name: score_map(grid, mask) for name, grid in
              {"on_lesion": pooled, "far": far, "signed": signed, "zero": np.zeros((8, 8))}.items()}
    assert scores["on_lesion"]["pointing_game"] is True and scores["on_lesion"]["roi_mass_ratio"] > 1.0
    assert scores["on_lesion"]["roi_mass"] == pytest.approx(1.0 * (pooled**2).sum() / pooled.sum())
    assert scores["far"]["pointing_game"] is False and scores["far"]["roi_mass"] == 0.0
    assert scores["signed"]["pointing_game"] is True  # negatives clipped, the lesion core stays
    assert np.isnan(scores["zero"]["roi_mass"]) and scores["zero"]["nan_reasons"]["roi_mass"]
    assert ex.image.shape == (64, 64, 3)


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_method_scores_on_the_phantom(setup, lesion_record, fam):
    model, family, ex = setup[fam]
    maps = {name: fn(model, family, ex) for name, fn in sanity_methods().items()}
    mask = read_mask(lesion_record["roi"])
    scores = {name: score_map(grid, mask) for name, grid in maps.items()}
    assert set(scores) == set(sanity_methods())
    for name, s in scores.items():
        if s.get("nan_reasons"):
            assert np.isnan(s["roi_mass"]), name
        else:
            assert 0.0 <= s["roi_mass"] <= 1.0 and s["pointing_game"] in (True, False), name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_mask("/nonexistent/mask.png")
