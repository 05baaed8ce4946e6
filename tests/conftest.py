"""Shared fixtures: offline, seeded, a private MEDVLM_HOME, and tiny models built from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from medvlm.models.families import FAMILIES  # noqa: E402

TINY = dict(vision_layers=2, text_layers=2, vision_hidden=64, text_hidden=64, vocab_size=400, patch_size=16)


def pytest_addoption(parser):
    parser.addoption("--real-shape", choices=("fast", "full"), default="fast",
                     help="real-shape tier (tests/test_real_shape.py): 'fast' runs its quick rooms and skips those "
                          "marked real_shape_full (minutes each on a CPU); 'full' runs every room")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--real-shape") == "full":
        return
    skip = pytest.mark.skip(reason="a real-shape room of minutes on a CPU: run with --real-shape=full")
    for item in items:
        if "real_shape_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def medvlm_home(tmp_path_factory):
    """One MEDVLM_HOME for the session (phantom data and prepared images are built once per config;
    nothing is written to the user's cache)."""
    home = tmp_path_factory.mktemp("medvlm_home")
    old = os.environ.get("MEDVLM_HOME")
    os.environ["MEDVLM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("MEDVLM_HOME", None)
    else:
        os.environ["MEDVLM_HOME"] = old


@pytest.fixture(scope="session")
def small_phantom(medvlm_home):
    from medvlm.data_curation.phantom import PhantomConfig, build_phantom

    cfg = PhantomConfig(n_patients=36)
    build_phantom(cfg)
    return cfg


def _tiny_folder(family: str, root, phantom_cfg):
    """A random tiny model of ``family`` saved with its processor (no pre-training: fast)."""
    from medvlm.demo.base import TinyConfig, phantom_corpus
    from medvlm.models.tiny import build_tiny, tiny_tokenizer

    cfg = TinyConfig(family=family, phantom=phantom_cfg, **TINY)
    tok = tiny_tokenizer(family, phantom_corpus(phantom_cfg), cfg.vocab_size)
    model, processor = build_tiny(family, cfg.sizes(), tok)
    folder = root / f"tiny-{family}"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, small_phantom):
    """``folder(family)``: the random tiny model folder of a family, built once per session."""
    root, built = tmp_path_factory.mktemp("models"), {}

    def folder(family: str):
        if family not in built:
            built[family] = _tiny_folder(family, root, small_phantom)
        return built[family]
    return folder


@pytest.fixture(scope="session")
def tiny_paligemma(tiny_folders):
    return tiny_folders("paligemma")


@pytest.fixture(scope="session")
def tiny_llava(tiny_folders):
    return tiny_folders("llava")


@pytest.fixture(params=list(FAMILIES))
def tiny_model(request, tiny_folders):
    """Every registered family, for contract tests run against every family."""
    return request.param, tiny_folders(request.param)
