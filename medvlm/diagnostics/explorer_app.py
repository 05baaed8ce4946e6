"""The explorer's web page (Gradio): ask a checkpoint a question about an image and see why it
answered. All computing is in :mod:`medvlm.diagnostics.explorer`; this module lays out the page and
turns its events into calls.

Every text the page shows comes from a model, a file or the user, so it goes into components
that render text (Textbox, HighlightedText, Dataframe) or is escaped with :func:`html.escape`
before it reaches Markdown or HTML; the logit-lens page is shown in a sandboxed ``iframe``.
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from medvlm.diagnostics.explorer import (  # noqa: E402
    BASE,
    Analysis,
    ExplorerError,
    ExplorerModel,
    analyze,
    check_fusion,
    compute_method,
    display_image,
    draw_overlay,
    export,
    lens_page,
    overlays,
    patch_of,
    read_image,
)
from medvlm.diagnostics.explorer_samples import Sample  # noqa: E402
from medvlm.utils.images import read_mask  # noqa: E402

logger = logging.getLogger(__name__)

UPLOAD = "(upload a file)"
WINDOWS = ["file", "lung", "mediastinum", "brain", "bone", "custom"]
FUSED = "fused (last quarter)"
ALL_HEADS = "all"
SLOTS = 2  # variants shown side by side
#: the two head rankings of the log-probability increase (medvlm.diagnostics.methods.logprob)
HEAD_RANKINGS = {"head importance (whole output, eq. 6)": "top_heads",
                 "image positions only (summed increase)": "image_top_heads"}
HEAD_COLUMNS = ["layer", "head", "importance (eq. 6)", "image-position sum"]
CSS = ".mv-answer textarea {font-size: 1.15em; font-weight: 600}"


@dataclass
class Server:
    """What every session shares: the model (swapped by the Model panel) and a lock around it."""

    model: ExplorerModel
    loader: Callable[[str, list[str]], ExplorerModel]
    samples: list[Sample]
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: seconds the saliency methods may take per answer; the costlier ones are skipped (listed in
    #: the page) and computed when asked (the "Compute the skipped maps" button). None: no limit
    budget_s: float | None = None
    out_root: Path = field(default_factory=lambda: _download_root())


def _download_root() -> Path:
    """A temporary folder for the downloads, removed when the process exits."""
    import atexit
    import shutil

    root = Path(tempfile.mkdtemp(prefix="medvlm-explorer-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _fail(err: Exception) -> gr.Error:
    """A message shown in the page; the app keeps serving. An expected failure (a bad file, an
    unknown model) is one log line; anything else also prints its traceback to the console."""
    expected = isinstance(err, (ExplorerError, FileNotFoundError, ValueError))
    logger.warning("explorer: %s", err)
    text = str(err) if expected else f"{type(err).__name__}: {err}"
    return gr.Error(text, print_exception=not expected)


# -- events ---------------------------------------------------------------------------------------
def _load_input(server: Server, sample: str, upload: str | None, window: str, level: float | None,
                width: float | None) -> tuple[Any, Any, str | None]:
    """(preview image, PIL input, mask path) for the chosen sample or the uploaded file."""
    if sample and sample != UPLOAD:
        chosen = next((s for s in server.samples if s.label == sample), None)
        if chosen is None:
            raise ExplorerError(f"unknown sample {sample!r}")
        path, mask = chosen.image, chosen.mask
    elif upload:
        path, mask = upload, None
    else:
        return None, None, None
    image = read_image(path, window, level, width)
    return image, image, mask


def _layer_head(layer: str, head: str) -> tuple[int | None, int | None]:
    return (None if layer in (None, FUSED) else int(layer)), (None if head in (None, ALL_HEADS) else int(head))


def _gallery(a: Analysis) -> list[tuple[Any, str]]:
    items = []
    for name, img in overlays(a).items():
        s = a.scores.get(name, {})
        caption = f"{name}  focus {s.get('focus', float('nan')):.2f}"
        if "roi_mass" in s:
            caption += f"  ROI mass {s['roi_mass']:.2f} (chance {s.get('roi_chance', float('nan')):.2f})"
        items.append((img, caption))
    return items


def _tokens_table(a: Analysis) -> list[list[Any]]:
    return [[i, t.text, round(t.prob, 4), ", ".join(f"{x!r} {p:.3f}" for x, p in t.top)]
            for i, t in enumerate(a.tokens)]


def _head_table(a: Analysis | None, ranking: str) -> Any:
    """The top-10 heads of one slot under the chosen ranking, both scores shown, the label naming the ranking."""
    if a is None:
        return None
    key = HEAD_RANKINGS.get(ranking, "top_heads")
    rows = [[h["layer"], h["head"], round(h.get("importance", float("nan")), 6),
             round(h.get("image_increase", float("nan")), 6)] for h in getattr(a, key)]
    label = ("Top-10 heads by head importance: the head's whole output at the first answer position, "
             "log p(w | h + o) - log p(w | h) (Yu & Ananiadou eq. 6)" if key == "top_heads" else
             "Top-10 heads by the log-probability increase summed over the image positions")
    return gr.update(value=rows, label=label)


def _slot_values(a: Analysis | None, layer: str, head: str, fusion: str,
                 ranking: str = next(iter(HEAD_RANKINGS))) -> list[Any]:
    """Outputs of one side-by-side slot: header, answer, tokens (clickable), token table, gallery,
    the attention map under the controls, top heads, logit-lens iframe."""
    if a is None:
        return [gr.update(visible=False)] + [None] * 7
    lay, hd = _layer_head(layer, head)
    attn = draw_overlay(a.image, a.attention(None, lay, hd, fusion), mask=a.mask) if a.attn is not None else None
    lens = ("<iframe sandbox='allow-scripts' style='width:100%;height:560px;border:0' srcdoc=\""
            + html.escape(lens_page(a), quote=True) + "\"></iframe>") if a.lens is not None else ""
    errors = "".join(f"\n\n*{html.escape(k)} failed:* {html.escape(v)}" for k, v in a.errors.items())
    skipped = "".join(f"\n\n*{html.escape(k)} skipped:* {html.escape(v)}" for k, v in a.skipped.items())
    header = f"### {html.escape(a.variant)}\n{a.timings['total']:.2f} s{errors}{skipped}"
    return [gr.update(value=header, visible=True), a.answer, [(t.text, t.prob) for t in a.tokens],
            _tokens_table(a), _gallery(a), attn, _head_table(a, ranking), lens]


def build_app(server: Server, allow_model_loading: bool = True) -> gr.Blocks:
    """The page. Returns the Blocks (launch it with :func:`launch`).

    ``allow_model_loading``: show the Model panel, which loads any model or adapter path for every
    user of the app (the explorer is a local, single-user tool: switch it off when serving others).
    """
    em = server.model
    layers = [FUSED] + [str(i) for i in range(em.n_layers)]
    heads = [ALL_HEADS] + [str(i) for i in range(em.n_heads)]
    with gr.Blocks(title="medvlm explorer", analytics_enabled=False) as app:
        model_title = gr.Markdown(f"# medvlm explorer\nModel: `{html.escape(em.name)}`")
        results = gr.State([])
        mask_state = gr.State(None)
        image_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                sample = gr.Dropdown([UPLOAD] + [s.label for s in server.samples], value=UPLOAD,
                                     label="Phantom or bundled sample", elem_id="sample")
                upload = gr.File(label="Upload an image (PNG, JPEG or DICOM)", type="filepath",
                                 file_types=[".png", ".jpg", ".jpeg", ".dcm", ".dicom"], elem_id="upload")
                with gr.Row():
                    window = gr.Dropdown(WINDOWS, value="file", label="DICOM window", elem_id="window")
                    level = gr.Number(40, label="level (HU)", elem_id="level")
                    width = gr.Number(400, label="width (HU)", elem_id="width")
                preview = gr.Image(label="Input: click a patch to see which answer tokens attend to it",
                                   type="pil", interactive=False, elem_id="preview")
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                variants = gr.CheckboxGroup(em.variants + ([BASE] if em.adapters else []),
                                            value=em.variants[:SLOTS], label=f"Compare (up to {SLOTS})",
                                            elem_id="variants")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                more = gr.Button("Compute the skipped maps", elem_id="more", size="sm")
                with gr.Accordion("Attention controls", open=True):
                    layer = gr.Dropdown(layers, value=FUSED, label="layer", elem_id="layer")
                    head = gr.Dropdown(heads, value=ALL_HEADS, label="head", elem_id="head")
                    fusion = gr.Radio(["mean", "max", "entropy"], value="mean", label="head fusion",
                                      elem_id="fusion")
                ranking = gr.Radio(list(HEAD_RANKINGS), value=next(iter(HEAD_RANKINGS)),
                                   label="Top-10 heads ranked by", elem_id="ranking")
                with gr.Accordion("Model", open=False, visible=allow_model_loading):
                    model_box = gr.Textbox(em.name, label="model (hub id, folder or demo:llava)")
                    adapters_box = gr.Textbox("\n".join(em.adapter_paths),
                                              label="adapters (one folder per line, at most two)", lines=2)
                    load = gr.Button("Load model", elem_id="load")
                downloads = gr.File(label="Download overlays, logit-lens pages and numbers.json",
                                    file_count="multiple", interactive=False, elem_id="downloads")
            with gr.Column(scale=3):
                slots = []
                with gr.Row():
                    for i in range(SLOTS):
                        with gr.Column(elem_id=f"slot{i}"):
                            header = gr.Markdown(visible=False, elem_id=f"header{i}")
                            answer = gr.Textbox(label="Answer", interactive=False, elem_id=f"answer{i}",
                                                elem_classes="mv-answer")
                            tokens = gr.HighlightedText(label="Answer tokens, coloured by probability: click one "
                                                        "for its map", elem_id=f"tokens{i}", show_legend=False)
                            with gr.Row():
                                token_map = gr.Image(label="Selected token: attention to the image", type="pil",
                                                     elem_id=f"tokenmap{i}", height=200)
                                patch_tokens = gr.HighlightedText(label="Selected patch: attention of each "
                                                                  "answer token", elem_id=f"patch{i}",
                                                                  show_legend=False)
                            slot = [
                                header, answer, tokens,
                                gr.Dataframe(headers=["#", "token", "p", "top-5 alternatives"],
                                             label="Token probabilities", elem_id=f"probs{i}", interactive=False),
                                gr.Gallery(label="Saliency of every method", columns=3, height="auto",
                                           elem_id=f"gallery{i}"),
                                gr.Image(label="Attention under the controls", type="pil", elem_id=f"attn{i}"),
                                gr.Dataframe(headers=HEAD_COLUMNS, label="Top-10 heads by head importance "
                                             "(whole output at the first answer position, eq. 6)",
                                             elem_id=f"heads{i}", interactive=False),
                                gr.HTML(elem_id=f"lens{i}", label="Logit lens (hover a patch)"),
                            ]
                            slots.append((slot, token_map, patch_tokens))
        status = gr.Markdown(elem_id="status")

        def on_input(sample_v, upload_v, window_v, level_v, width_v):
            try:
                shown, image, mask = _load_input(server, sample_v, upload_v, window_v, level_v, width_v)
            except Exception as err:  # noqa: BLE001 - any unreadable input becomes a message
                raise _fail(err) from err
            preset = next((s.question for s in server.samples if s.label == sample_v), None)
            # a new input drops the previous analyses, so clicks never read another image's maps
            return (display_image(np.asarray(shown)) if shown is not None else None, image, mask,
                    gr.update(value=preset) if preset else gr.update(), [])

        input_events = [sample.change, upload.upload, window.change, level.submit, width.submit]
        for event in input_events:
            event(on_input, [sample, upload, window, level, width],
                  [preview, image_state, mask_state, question, results])

        def on_ask(image, mask_path, question_v, chosen, layer_v, head_v, fusion_v, ranking_v,
                   progress=gr.Progress()):  # noqa: B008 - Gradio injects progress via this default
            if image is None:
                raise gr.Error("pick a sample or upload an image first", print_exception=False)
            chosen = [v for v in (chosen or [])][:SLOTS] or server.model.variants[:1]
            out: list[Analysis] = []
            try:
                check_fusion(fusion_v)
                mask = read_mask(mask_path) if mask_path else None  # an upload has no mask
                with server.lock:
                    for k, variant in enumerate(chosen):
                        def report(f, text, k=k, variant=variant):
                            progress((k + f) / len(chosen), desc=f"{variant}: {text}")
                        out.append(analyze(server.model, variant, image, question_v, mask=mask, progress=report,
                                           budget_s=server.budget_s))
                files = export(out, Path(tempfile.mkdtemp(dir=server.out_root)))
                # the preview becomes what the model saw (its input resolution, enlarged), so a click
                # on it maps to the image-token grid whatever the uploaded size or the processor's crop
                values: list[Any] = [out, [str(f) for f in files], display_image(out[0].image)]
                for i in range(SLOTS):
                    values += _slot_values(out[i] if i < len(out) else None, layer_v, head_v, fusion_v, ranking_v)
            except Exception as err:  # noqa: BLE001
                raise _fail(err) from err
            seconds = sum(a.timings["total"] for a in out)
            values.append(f"Answered in {seconds:.2f} s ({', '.join(html.escape(a.variant) for a in out)}).")
            return values

        slot_outputs = [c for slot, _, _ in slots for c in slot]
        ask_outputs = [results, downloads, preview] + slot_outputs + [status]
        ask_inputs = [image_state, mask_state, question, variants, layer, head, fusion, ranking]
        ask.click(on_ask, ask_inputs, ask_outputs)
        question.submit(on_ask, ask_inputs, ask_outputs)

        def on_more(analyses, layer_v, head_v, fusion_v, ranking_v, progress=gr.Progress()):  # noqa: B008 - as above
            if not analyses:
                raise gr.Error("ask a question first", print_exception=False)
            try:
                with server.lock:
                    for a in analyses:
                        for name in list(a.skipped):
                            progress(0.5, desc=f"{a.variant}: {name}")
                            compute_method(server.model, a, name)
                files = export(analyses, Path(tempfile.mkdtemp(dir=server.out_root)))
                values: list[Any] = [analyses, [str(f) for f in files], display_image(analyses[0].image)]
                for i in range(SLOTS):
                    values += _slot_values(analyses[i] if i < len(analyses) else None, layer_v, head_v, fusion_v,
                                           ranking_v)
            except Exception as err:  # noqa: BLE001
                raise _fail(err) from err
            values.append("Computed the skipped maps.")
            return values

        more.click(on_more, [results, layer, head, fusion, ranking], ask_outputs)

        def on_ranking(analyses, ranking_v):
            return [_head_table(analyses[i] if i < len(analyses) else None, ranking_v) for i in range(SLOTS)]

        ranking.change(on_ranking, [results, ranking], [slot[6] for slot, _, _ in slots])

        def on_controls(analyses, layer_v, head_v, fusion_v):
            lay, hd = _layer_head(layer_v, head_v)
            try:
                return [draw_overlay(a.image, a.attention(None, lay, hd, fusion_v), mask=a.mask) if a.attn is not None else None
                        for a in analyses] + [None] * (SLOTS - len(analyses))
            except Exception as err:  # noqa: BLE001
                raise _fail(err) from err

        for control in (layer, head, fusion):
            control.change(on_controls, [results, layer, head, fusion], [slot[5] for slot, _, _ in slots])

        for i, (slot, token_map, patch_tokens) in enumerate(slots):
            def on_token(analyses, layer_v, head_v, fusion_v, evt: gr.SelectData, i=i):
                if i >= len(analyses):
                    return None
                a, lay_hd = analyses[i], _layer_head(layer_v, head_v)
                try:
                    grid = a.attention(evt.index if isinstance(evt.index, int) else evt.index[0], *lay_hd, fusion_v)
                except Exception as err:  # noqa: BLE001
                    raise _fail(err) from err
                return gr.update(value=draw_overlay(a.image, grid, mask=a.mask),
                                 label=f"Selected token {a.tokens[evt.index].text!r}: attention to the image"
                                 if isinstance(evt.index, int) else "Selected token")

            slot[2].select(on_token, [results, layer, head, fusion], [token_map])

            def on_patch(analyses, layer_v, head_v, fusion_v, evt: gr.SelectData, i=i):
                if i >= len(analyses):
                    return None
                a = analyses[i]
                size = display_image(a.image).size
                row, col = patch_of(evt.index[0], evt.index[1], size, a.grid)
                try:
                    pairs = a.patch_to_tokens(row, col, *_layer_head(layer_v, head_v), fusion_v)
                except Exception as err:  # noqa: BLE001
                    raise _fail(err) from err
                top = max((w for _, w in pairs), default=1.0) or 1.0
                return gr.update(value=[(t, w / top) for t, w in pairs],
                                 label=f"Patch row {row}, col {col}: attention of each answer token "
                                 f"(max {top:.3f})")

            preview.select(on_patch, [results, layer, head, fusion], [patch_tokens])

        def on_load(name, adapters_text, progress=gr.Progress()):  # noqa: B008 - as above
            if not allow_model_loading:
                raise gr.Error("loading models is switched off on this server", print_exception=False)
            adapters = [line.strip() for line in (adapters_text or "").splitlines() if line.strip()]
            progress(0.1, desc=f"loading {name}")
            try:
                with server.lock:
                    server.model = server.loader(name.strip(), adapters)
            except Exception as err:  # noqa: BLE001 - unknown model: message, keep the old one
                raise _fail(err) from err
            m = server.model
            return (f"# medvlm explorer\nModel: `{html.escape(m.name)}`",
                    gr.update(choices=m.variants + ([BASE] if m.adapters else []), value=m.variants[:SLOTS]),
                    gr.update(choices=[FUSED] + [str(i) for i in range(m.n_layers)], value=FUSED),
                    gr.update(choices=[ALL_HEADS] + [str(i) for i in range(m.n_heads)], value=ALL_HEADS))

        load.click(on_load, [model_box, adapters_box], [model_title, variants, layer, head])
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
           allowed: list[str] | None = None):
    """Serve ``app`` on ``host:port`` (loopback unless asked), offline (no share link, no analytics)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: the explorer is reachable from other machines", host)
    return app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=not block, show_error=True,
        quiet=not block, ssr_mode=False, allowed_paths=allowed or [], css=CSS, footer_links=[])
