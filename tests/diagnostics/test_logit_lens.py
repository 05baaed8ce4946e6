"""Logit lens at image positions: last layer equals the model's own prediction, best layers and the
per-layer table are consistent, and the HTML page is self-contained and escapes everything."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, eager_tiny

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.methods.logit_lens import (
    LogitLens,
    layer_table,
    lens_html,
    logit_lens,
    write_lens_html,
)


@pytest.fixture(scope="session")
def setup():
    out = {}
    rng = np.random.default_rng(2)
    for fam in FAMILIES:
        model, processor, family = eager_tiny(fam)
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        ex = prepare_example(model, processor, family, img, "where is the lesion?")
        out[fam] = (model, family, processor.tokenizer, ex)
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_last_layer_matches_the_models_prediction(setup, fam):
    model, family, tok, ex = setup[fam]
    lens = logit_lens(model, family, ex, tok, k=5, chunk=10)
    span = family.image_span(model, ex.inputs["input_ids"][0], ex.inputs)
    with torch.no_grad():
        probs = torch.softmax(model(**ex.inputs).logits[0, span.start:span.end].float(), -1)
    top = probs.topk(5, -1)
    assert lens.layers == [0, 1] and lens.top_ids.shape == (2, 64, 5)
    np.testing.assert_array_equal(lens.top_ids[-1], top.indices.numpy())
    np.testing.assert_allclose(lens.top_probs[-1], top.values.numpy(), rtol=1e-4)
    assert (np.diff(lens.top_probs, axis=-1) <= 1e-12).all()  # sorted descending
    assert lens.top_tokens[-1][0][0] == tok.decode([int(top.indices[0, 0])])


@pytest.mark.parametrize("fam", FAMILIES)
def test_best_layer_and_table(setup, fam):
    model, family, tok, ex = setup[fam]
    lens = logit_lens(model, family, ex, tok, layers=[-1, 0], k=3)
    top1 = lens.top_probs[:, :, 0]
    assert set(lens.best_layer) <= {0, 1}
    np.testing.assert_array_equal(lens.best_layer, np.asarray(lens.layers)[top1.argmax(0)])
    np.testing.assert_allclose(lens.confidence_map(), top1.max(0).reshape(8, 8))
    assert lens.best_layer_map().shape == (8, 8)
    table = layer_table(lens, n=3)
    assert [row["layer"] for row in table] == [0, 1]
    for li, row in enumerate(table):
        counts = [t["count"] for t in row["tokens"]]
        assert counts == sorted(counts, reverse=True) and 1 <= len(counts) <= 3
        first = [cell[0] for cell in lens.top_tokens[li]]
        assert counts[0] == max(first.count(t) for t in set(first))
        assert row["tokens"][0]["share"] == pytest.approx(counts[0] / 64)


def small_lens(tokens: list[str]) -> LogitLens:
    probs = np.tile(np.array([0.5, 0.2, 0.1, 0.05, 0.05]), (1, 4, 1))
    return LogitLens([0], [0, 1, 2, 3], (2, 2), np.zeros((1, 4, 5), int), probs,
                     [[list(tokens) for _ in range(4)]])


def test_html_escapes_the_question_and_the_tokens(tmp_path):
    evil = ["</script><img src=x onerror=alert(1)>", "a&b", "<i>", '"q"', "ok"]
    page = lens_html(small_lens(evil), np.zeros((16, 16, 3), np.uint8), "is it <script>alert('x')</script>?")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page  # jinja2's autoescape
    assert len(re.findall(r"<script", page)) == 2 and len(re.findall(r"</script>", page)) == 2  # only ours
    assert "<img" not in page
    assert "<i>" not in page
    data = re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', page, re.S).group(1)
    cell = json.loads(data)["cells"][0]
    assert cell["top"][0][0] == evil[0] and cell["layer"] == 0  # the text survives as data
    assert "http" not in page  # self-contained: no network resource
    path = write_lens_html(tmp_path / "lens.html", small_lens(evil), np.zeros((16, 16, 3), np.uint8), "q")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("fam", FAMILIES)
def test_html_page_of_a_real_lens(setup, fam):
    model, family, tok, ex = setup[fam]
    lens = logit_lens(model, family, ex, tok)
    page = lens_html(lens, ex.image, ex.question)
    data = re.search(r'id="lens-data">(.*?)</script>', page, re.S).group(1)
    cells = json.loads(data)["cells"]
    assert len(cells) == 64 and all(len(c["top"]) == 5 for c in cells)
    assert [c["layer"] for c in cells] == lens.best_layer.tolist()
    assert "data:image/png;base64," in page
