"""The explorer driven in a real browser (Debian's chromium through Playwright), as a person would:
upload a scan, ask, wait for the answer and the overlays, click a token and a patch, switch the
fusion, read the downloads, and see errors as messages while the app keeps serving.

The model has the demo model's architecture (random weights, two random LoRA adapters), so the
answer latency printed here is the demo model's. Screenshots and the latency go to
``$MEDVLM_ARTIFACTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if os.environ.get("MEDVLM_REQUIRE_BROWSER"):  # make test: a missing browser is a failure, not a skip
    if not CHROMIUM:
        raise RuntimeError("the browser tests need Debian's chromium: apt-get install chromium (make test does)")
    import playwright.sync_api as playwright
else:
    if not CHROMIUM:
        pytest.skip("chromium is not installed (make test installs it)", allow_module_level=True)
    playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")

from explorer_fixtures import build_model_with_adapters  # noqa: E402

# Flags for a machine without network: no background fetches, no sandbox (root in CI).
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"]
XSS = ('Where is the abnormality? <img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the default family, MedGemma (Gemma 3: token_type_ids, <end_of_turn>), and Qwen2.5-VL, whose preview
#: keeps the upload's aspect ratio (a non-square grid)
BROWSER_FAMILIES = ["llava", "medgemma", "qwen2_5_vl"]


@pytest.fixture(scope="module", params=BROWSER_FAMILIES)
def served(request, tmp_path_factory, small_phantom):
    from medvlm.diagnostics.explorer import load_explorer_model
    from medvlm.diagnostics.explorer_app import Server, build_app, launch
    from medvlm.diagnostics.explorer_samples import samples

    root = tmp_path_factory.mktemp(f"browser-{request.param}")
    folder, adapters = build_model_with_adapters(root, request.param, small_phantom)
    server = Server(load_explorer_model(str(folder), [str(a) for a in adapters]), load_explorer_model,
                    samples(root / "samples"))
    app = build_app(server)
    port = _free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield server, f"http://127.0.0.1:{port}/", root
    app.close()


@pytest.fixture(scope="module")
def page(served):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1500, "height": 1200})
        pg.set_default_timeout(60_000)
        pg.goto(served[1])
        pg.wait_for_selector("#ask")
        yield pg
        browser.close()


def _artifacts(root: Path) -> Path:
    out = Path(os.environ.get("MEDVLM_ARTIFACTS", root / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _upload(page, path) -> None:
    clear = page.query_selector("#upload button[aria-label='Clear']")
    if clear:  # a file is shown: remove it, as a person would, to get the drop zone back
        clear.click()
    page.set_input_files("#upload input[type=file]", str(path))


def _src(page, selector: str) -> str:
    return page.get_attribute(selector, "src") or ""


def _toast(page, expected: str) -> str:
    """Wait for the message holding ``expected`` (not any message: an earlier one may still be
    fading out), return its text, and close every message."""
    body = page.wait_for_selector(f".toast-body:has-text({json.dumps(expected)})", timeout=30_000)
    text = body.inner_text()
    page.evaluate("document.querySelectorAll('.toast-close').forEach(b => b.click())")  # all at once
    return text


def _ask(page) -> float:
    """Click Ask and wait for both variants' six overlays; returns the seconds it took."""
    before = page.evaluate("(document.querySelector('#gallery1 img') || {}).src || ''")
    start = time.perf_counter()
    page.click("#ask")
    page.wait_for_function("document.querySelectorAll('#gallery0 img').length >= 6"
                           " && document.querySelectorAll('#gallery1 img').length >= 6"
                           f" && document.querySelector('#gallery1 img').src !== {json.dumps(before)}")
    return time.perf_counter() - start


def _wide_upload(server, root) -> Path:
    """A phantom case saved at 320x240 (not the model's 64x64, not square), as uploads come."""
    from PIL import Image

    case = next(s for s in server.samples if s.mask)
    path = root / "wide.png"
    Image.open(case.image).convert("RGB").resize((320, 240)).save(path)
    return path


def test_upload_ask_and_see_answers_overlays_and_numbers(served, page):
    server, _, root = served
    _upload(page, _wide_upload(server, root))
    page.wait_for_selector("#preview img")
    page.fill("#question textarea", XSS)
    seconds = _ask(page)
    analyses = json.loads(Path(next(f for f in _downloads(page, server) if f.endswith("numbers.json")))
                          .read_text())["analyses"]
    assert [a["variant"] for a in analyses] == ["A: stage1", "B: stage2"]
    for i, a in enumerate(analyses):  # each side shows its own variant's answer and numbers
        assert a["variant"] in page.inner_text(f"#header{i}")
        assert page.input_value(f"#answer{i} textarea") == a["answer"]
        if a["tokens"]:
            shown = page.inner_text(f"#probs{i}")
            assert f"{a['tokens'][0]['prob']:.4f}".rstrip("0") in shown
        captions = page.inner_text(f"#gallery{i}")
        for method in ("attention", "rollout", "gradcam", "logprob", "logit_lens", "occlusion"):
            assert method in captions
        assert len(page.query_selector_all(f"#heads{i} [role=row]")) == 11  # header + top-10 heads
    # the question's markup is text everywhere: in the page and inside the logit-lens frame
    assert page.evaluate("window.__pwned") is None
    assert page.input_value("#question textarea") == XSS
    lens = next(f for f in page.frames if f.url == "about:srcdoc")
    assert XSS in lens.inner_text("body")
    assert lens.evaluate("window.__pwned") is None
    out = _artifacts(root)
    page.screenshot(path=str(out / "explorer.png"), full_page=True)
    (out / "explorer_latency.json").write_text(json.dumps({"first_answer_with_all_overlays_s": seconds,
                                                           "variants": 2}))
    print(f"\nexplorer: first answer with all overlays for two adapters in {seconds:.2f} s "
          f"(screenshot {out / 'explorer.png'})")


def _downloads(page, server) -> list[str]:
    names = page.inner_text("#downloads")
    files = sorted(str(p) for p in server.out_root.rglob("*") if p.is_file())
    assert files and all(Path(f).name.split(".")[0][:12] in names for f in files[-3:])
    newest = max(server.out_root.iterdir(), key=lambda p: p.stat().st_mtime)
    return [str(p) for p in newest.iterdir()]


def test_clicking_a_token_and_a_patch_and_switching_fusion(served, page):
    server, _, root = served
    _upload(page, _wide_upload(server, root))
    page.wait_for_selector("#preview img")
    page.fill("#question textarea", "Where is the abnormality?")
    _ask(page)
    rows, cols = json.loads(Path(next(f for f in _downloads(page, server) if f.endswith("numbers.json")))
                            .read_text())["analyses"][1]["grid"]
    tokens = page.query_selector_all("#tokens1 .token")
    assert tokens, "the answer of B has no tokens to click"
    tokens[0].click()
    page.wait_for_selector("#tokenmap1 img")
    assert "attention to the image" in page.inner_text("#tokenmap1")
    # after Ask the preview is the model's own view (its aspect ratio too), so a click maps onto the
    # token grid: 4x4 for the fixed-size families (row 1, col 2), 6x9 for Qwen2.5-VL's 320x240 upload
    box = page.query_selector("#preview img").bounding_box()
    assert abs(box["width"] / box["height"] - cols / rows) < 0.05
    page.mouse.click(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.45)
    cell = f"row {int(0.45 * rows)}, col {int(0.7 * cols)}"
    page.wait_for_function(f"document.querySelector('#patch1').innerText.includes({json.dumps(cell)})")
    before = _src(page, "#attn1 img")
    page.click("#fusion label:has-text('max')")
    page.wait_for_function(f"document.querySelector('#attn1 img').src !== {json.dumps(before)}")
    assert _src(page, "#attn1 img") != before


def test_dicom_upload_with_a_window_preset(served, page):
    server, _, _ = served
    ct = next(s.image for s in server.samples if s.image.endswith("CT_small.dcm"))
    _upload(page, ct)
    page.wait_for_selector("#preview img")
    first = _src(page, "#preview img")
    page.click("#window input")
    page.click("ul[role=listbox] li:has-text('bone')")
    page.wait_for_function(f"document.querySelector('#preview img').src !== {json.dumps(first)}")


def test_errors_show_in_the_page_and_the_app_keeps_serving(served, page, capfd, caplog):
    server, _, root = served
    bad = root / "not-a-scan.png"
    bad.write_text("plain text, not an image")
    _upload(page, bad)
    assert "not-a-scan.png is not an image" in _toast(page, "not-a-scan.png")
    page.click("button:has-text('Model')")
    model_box = page.get_by_label("model (hub id, folder or demo:llava)")
    # The panel mounts its fields when it opens; text typed before the mount sets its initial
    # value is overwritten, and Load would then reload the served model (seen once in CI).
    playwright.expect(model_box).to_have_value(server.model.name)
    missing = str(root / "no-such-model")
    model_box.fill(missing)
    playwright.expect(model_box).to_have_value(missing)
    page.click("#load")
    assert "cannot load model" in _toast(page, "cannot load model")
    # expected failures are a line in the server's log, not a traceback
    assert "Traceback" not in capfd.readouterr().err
    assert any("not-a-scan.png is not an image" in r.getMessage() for r in caplog.records)
    # still serving the model it had: a phantom case is answered
    page.click("#sample input")
    page.click("ul[role=listbox] li:has-text('phantom X-ray chest')")
    page.wait_for_function("document.querySelector('#question textarea').value.length > 0")
    _ask(page)  # waits for the new overlays, not for a status text that a progress bar can hold
    assert "Answered" in page.inner_text("#status")
    assert server.model.name.endswith(f"demo-arch-{server.model.family.name}")
