"""Model-family adapters: exact label masks, LoRA targets per tower, image spans, loading."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from medvlm.models import IGNORE_INDEX, get_family, load_model_and_processor
from medvlm.training.arguments import LoraArguments
from medvlm.training.lora import attach_lora, lora_config, trainable_by_tower

IMAGES = [np.full((64, 64, 3), 30, np.uint8), np.full((64, 64, 3), 200, np.uint8)]
N_IMAGE = (64 // 16) ** 2  # tiny models: 64-pixel images, 16-pixel patches (tests/conftest.py)
QUESTIONS = ["Is there an abnormality in this image?", "Which part of the body does this image show?"]
ANSWERS = ["yes", "left lower lung"]


def _labelled(tokenizer, labels_row):
    return tokenizer.decode([int(t) for t in labels_row if t != IGNORE_INDEX])


def test_paligemma_golden_label_mask(tiny_paligemma):
    loaded = load_model_and_processor(str(tiny_paligemma))
    fam, proc = loaded.family, loaded.processor
    tok = proc.tokenizer
    batch = fam.train_batch(proc, IMAGES, QUESTIONS, ANSWERS, prepared=True)
    ids, labels, tt, am = (batch[k] for k in ("input_ids", "labels", "token_type_ids", "attention_mask"))
    n_image = N_IMAGE
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        prompt = tok(f"answer en {q}", add_special_tokens=False)["input_ids"]
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        prefix = n_image + 1 + len(prompt) + len(newline)  # image tokens, <bos>, prompt, "\n"
        length = prefix + len(answer)
        expected = torch.full_like(labels[i], IGNORE_INDEX)
        expected[prefix:length] = torch.tensor(answer)
        assert labels[i].tolist() == expected.tolist()
        # prefix-LM: token_type_ids are 1 exactly on the answer (and its EOS)
        assert tt[i, :length].tolist() == [0] * prefix + [1] * len(answer)
        assert am[i].sum() == length  # right padding after the answer
        assert ids[i, :n_image].tolist() == [proc.image_token_id] * n_image
        assert ids[i, n_image] == tok.bos_token_id
        assert _labelled(tok, labels[i]) == a + tok.eos_token


def test_llava_golden_label_mask(tiny_llava):
    loaded = load_model_and_processor(str(tiny_llava))
    fam, proc = loaded.family, loaded.processor
    tok = proc.tokenizer
    batch = fam.train_batch(proc, IMAGES, QUESTIONS, ANSWERS, prepared=True)
    ids, labels, am = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        prompt = f"{tok.bos_token}USER: {'<image>' * N_IMAGE}\n{q} ASSISTANT:"
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        answer = tok(f" {a}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected = torch.full_like(labels[i], IGNORE_INDEX)
        expected[n_prompt:n_prompt + len(answer)] = torch.tensor(answer)
        assert labels[i].tolist() == expected.tolist()
        assert am[i].sum() == n_prompt + len(answer)
        assert _labelled(tok, labels[i]).strip() == a + tok.eos_token
        assert (ids[i] == proc.image_token_id).sum() == N_IMAGE


def test_generation_batch_is_left_padded_and_ends_at_the_prompt(tiny_model):
    family, folder = tiny_model
    loaded = load_model_and_processor(str(folder))
    images = loaded.family.prepare_images(loaded.processor, IMAGES)
    batch = loaded.family.generation_batch(loaded.processor, images, ["short?", QUESTIONS[1]], prepared=True)
    am = batch["attention_mask"]
    assert am[0, 0] == 0 and am[0, -1] == 1 and am[1].all()  # left padding
    assert "labels" not in batch or batch["labels"] is None
    loaded.family.check_pixels(loaded.model, batch)  # as the processor makes them, not resized again
    assert [s.grid for s in loaded.family.image_spans(loaded.model, batch)] == [(4, 4)] * 2


def test_image_span_comes_from_the_sequence(tiny_model):
    family, folder = tiny_model
    loaded = load_model_and_processor(str(folder))
    images = loaded.family.prepare_images(loaded.processor, IMAGES[:1])
    batch = loaded.family.generation_batch(loaded.processor, images, ["where?"], prepared=True)
    span = loaded.family.image_span(loaded.model, batch["input_ids"][0], batch, 0)
    assert span.grid == (4, 4) and span.end - span.start == N_IMAGE
    with pytest.raises(ValueError, match="no image tokens"):
        loaded.family.image_span(loaded.model, torch.tensor([1, 2, 3]))


def _targets(model):
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A")}


def test_paper_preset_misses_siglip_out_proj_and_mlp_full_preset_covers_them(tiny_paligemma):
    fam = get_family("paligemma")
    paper = attach_lora(load_model_and_processor(str(tiny_paligemma)).model, fam,
                        LoraArguments(lora_preset="paper", lora_towers=["vision", "language"]), "x")
    full = attach_lora(load_model_and_processor(str(tiny_paligemma)).model, fam,
                       LoraArguments(lora_preset="full"), "x")
    paper_t, full_t = _targets(paper), _targets(full)
    vision = lambda names, leaf: [n for n in names if "vision_tower" in n and n.endswith(leaf)]  # noqa: E731
    for leaf in ("q_proj", "k_proj", "v_proj"):
        assert vision(paper_t, leaf) and vision(full_t, leaf)
    for leaf in ("out_proj", "fc1", "fc2"):
        assert not vision(paper_t, leaf), f"paper names should miss SigLIP {leaf}"
        assert vision(full_t, leaf)
    assert any("multi_modal_projector" in n for n in full_t)
    assert not any("multi_modal_projector" in n for n in paper_t)
    assert lora_config(fam, LoraArguments(lora_preset="paper")).r == 12


def test_trainable_parameters_per_tower(tiny_model):
    family, folder = tiny_model
    fam = get_family(family)
    model = attach_lora(load_model_and_processor(str(folder)).model, fam,
                        LoraArguments(lora_towers=["language"]), "x")
    counts = trainable_by_tower(model, fam)
    assert counts["language"]["trainable"] > 0
    assert counts["vision"]["trainable"] == 0 and counts["vision"]["total"] > 0
    assert counts["projector"]["trainable"] == 0


def test_a_fully_trained_module_counts_once(tiny_model):
    """A module in modules_to_save is trainable whole: its frozen original (kept by peft) is not counted."""
    from peft import LoraConfig, get_peft_model

    family, folder = tiny_model
    fam = get_family(family)
    base = load_model_and_processor(str(folder)).model
    size = sum(p.numel() for p in fam.get_part(base, "projector").parameters())
    total = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=2, target_modules=lora_config(fam, LoraArguments()).target_modules,
                                            modules_to_save=[fam.parts["projector"]]))
    counts = trainable_by_tower(model, fam)
    assert counts["projector"] == {"trainable": size, "total": size}
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(c["total"] for c in counts.values()) == total + lora  # every other parameter once


def test_unknown_family_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'paligemma'"):
        get_family("paligema")


@pytest.mark.parametrize("model_type", ["idefics3", "medfoo_vl"])  # known to transformers, and not even that
def test_a_checkpoint_no_family_handles_gets_one_line_naming_the_families_and_the_file(tmp_path, model_type,
                                                                                       capsys, small_phantom):
    from medvlm.models import FAMILIES
    from medvlm.training.cli import main

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    with pytest.raises(ValueError) as err:
        load_model_and_processor(str(folder))
    message = str(err.value)
    assert "\n" not in message and f"model_type {model_type!r}" in message
    assert f"Registered families: {', '.join(sorted(FAMILIES))}." in message
    assert "medvlm/models/<family>.py" in message and "medvlm/models/families.py" in message
    assert main("stage1", ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "run"),
                           "--phantom_patients", "36", "--report_to", "none"]) == 2
    printed = capsys.readouterr().err.strip().splitlines()  # data-loading progress bars, then the error
    assert printed[-1] == f"error: {message}" and not [line for line in printed[:-1] if "error" in line.lower()]


def test_loading_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_processor(str(tmp_path / "nope"))


def test_a_hub_id_is_loaded_from_the_hub_cache_not_taken_for_a_missing_folder(tiny_llava, tmp_path):
    # owner/name has a slash like a path; offline it must still load from the hub cache
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--owner--tiny-llava"
    shutil.copytree(tiny_llava, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = """
from medvlm.models import load_model_and_processor
print(load_model_and_processor("owner/tiny-llava").family.name)
try:
    load_model_and_processor("owner/not-cached")
except OSError as err:
    print("ERROR", err)
try:
    load_model_and_processor("runs/no/such-adapter")
except FileNotFoundError as err:
    print("ERROR", err)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, not_cached, missing = out.stdout.strip().split("ERROR ")
    assert loaded.strip() == "llava"
    assert not_cached.startswith("cannot load owner/not-cached from the Hugging Face hub (HF_HUB_OFFLINE is set")
    assert missing.startswith("model folder runs/no/such-adapter does not exist")


def test_path_or_hub_id(tmp_path, monkeypatch):
    from medvlm.utils.hub import looks_like_hub_id, looks_like_missing_folder

    assert looks_like_hub_id("google/paligemma-3b-mix-448") and looks_like_hub_id("llava-hf/llava-1.5-7b-hf")
    assert not looks_like_hub_id("runs/a/b") and not looks_like_hub_id("/abs/path") and not looks_like_hub_id("gpt2")
    assert not looks_like_missing_folder("google/paligemma-3b-mix-448") and not looks_like_missing_folder("gpt2")
    assert looks_like_missing_folder("runs/a/adapter") and looks_like_missing_folder("./model")
    assert looks_like_missing_folder("/no/such/folder") and not looks_like_missing_folder(os.getcwd())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # beside a runs/ folder, runs/stage2 is a mistyped path, not a hub id
    assert not looks_like_hub_id("runs/stage2") and looks_like_missing_folder("runs/stage2")


def test_run_eval_checks_pass_a_hub_id_and_stop_a_missing_folder(tmp_path):
    from medvlm.eval.evaluate import ModelEvalConfig, ModelEvalError, check_inputs

    check_inputs(ModelEvalConfig(model="google/paligemma-3b-mix-448", output=str(tmp_path)))  # left to the hub
    with pytest.raises(ModelEvalError, match="model folder runs/x/stage2 does not exist"):
        check_inputs(ModelEvalConfig(model="runs/x/stage2", output=str(tmp_path)))


def test_an_adapter_from_another_demo_base_is_refused_before_any_base_is_built(tmp_path, monkeypatch):
    import json

    from medvlm.demo import base as demo_base
    from medvlm.eval.evaluate import ModelEvalConfig, ModelEvalError, check_inputs

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    (adapter / "medvlm_adapter.json").write_text(json.dumps(
        {"model_name_or_path": "demo:llava", "resolved_path": "/another/home/base/llava-0123"}))
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path / "home"))  # an empty cache: building would take minutes

    def no_build(*args, **kwargs):
        raise AssertionError("the base model was built just to be compared")

    monkeypatch.setattr(demo_base, "ensure_base_model", no_build)
    with pytest.raises(ModelEvalError) as err:
        check_inputs(ModelEvalConfig(model="demo:llava", adapter=str(adapter), output=str(tmp_path / "out")))
    assert "MEDVLM_HOME points elsewhere" in str(err.value) and "--model" in str(err.value)
    assert "model_name_or_path" not in str(err.value)
