"""The phantom dataset: the embedded, offline stand-in for SLAKE, ROCOv2 and MedPix.

One patient = one image (CT, MRI or X-ray of the chest, abdomen or head), with a lesion half of
the time. From the same ground truth the generator writes
- SLAKE-style questions, closed (yes/no, side, modality, organ ...) and open (location, finding),
- a ROCO-style caption and a MedPix-style case text,
- the lesion's pixel mask (the record's ``roi``),
and splits by patient. Answers are balanced so that a model that ignores the image scores near
chance: yes/no questions are 50/50, sides 50/50, modality and body part uniform.

Question *types* are named so that recipes can pick a curriculum: stage 1 uses the basic ones
(modality, body part, presence), stage 2 adds the harder ones (side, location, finding).

``PhantomConfig`` is hashed into the cache key: change any field and the data are rebuilt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medvlm.data_curation.phantom_render import (
    BODY_PARTS,
    FINDINGS,
    MODALITIES,
    ORGANS_FOR_PHRASE,
    Lesion,
    render,
    sample_lesion,
)
from medvlm.records import make_record, to_dataset
from medvlm.utils.io import atomic_write_json, medvlm_home, sha256_json, write_manifest

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 10  # bump when the images or questions change: it invalidates caches

#: qa: SLAKE-style questions; captions: ROCO-style; cases: MedPix-style case text; generic:
#: general-domain short-answer VQA (the base model's pre-training mixture, see _generic_questions).
KINDS = ("qa", "captions", "cases", "generic")

BASIC_TYPES = ("modality", "modality_yn", "body_part", "presence")
ADVANCED_TYPES = ("side", "side_yn", "finding_yn", "location", "finding")
ALL_TYPES = BASIC_TYPES + ADVANCED_TYPES

SEXES = ("man", "woman")
SYMPTOMS = {
    "chest": ("cough", "chest pain", "shortness of breath", "haemoptysis"),
    "abdomen": ("flank pain", "haematuria", "abdominal pain", "weight loss"),
    "head": ("headache", "seizure", "dizziness", "blurred vision"),
}
DIAGNOSES = {"nodule": "solitary nodule", "mass": "suspected neoplasm", "cyst": "simple cyst"}
MODALITY_WORDS = {"CT": "CT", "MRI": "MRI", "X-ray": "X-ray"}


@dataclass
class PhantomConfig:
    """What the phantom generator makes. Every field enters the cache key."""

    n_patients: int = field(default=4000, metadata={"help": "Number of patients (one image each)."})
    image_size: int = field(default=64, metadata={"help": "Image side in pixels."})
    lesion_rate: float = field(default=0.5, metadata={"help": "Share of patients with a lesion."})
    seed: int = field(default=0, metadata={"help": "Seed of everything random."})
    split_ratios: tuple[float, float, float] = field(
        default=(0.8, 0.1, 0.1), metadata={"help": "train / validation / test shares, by patient."}
    )

    def key(self) -> str:
        return sha256_json({**asdict(self), "version": GENERATOR_VERSION})[:16]


@dataclass
class Patient:
    pid: str
    split: str
    modality: str
    body_part: str
    lesion: Lesion | None
    age: int
    sex: str
    symptom: str


def _patients(cfg: PhantomConfig, rng: np.random.Generator) -> list[Patient]:
    n = cfg.n_patients
    # balanced factors: cycle modality x body part x presence, then shuffle
    combos = [(m, b, les) for m in MODALITIES for b in BODY_PARTS for les in (False, True)]
    order = [combos[i % len(combos)] for i in range(n)]
    rng.shuffle(order)
    cut1 = int(round(cfg.split_ratios[0] * n))
    cut2 = cut1 + int(round(cfg.split_ratios[1] * n))
    out = []
    for i, (mod, bp, has_lesion) in enumerate(order):
        if has_lesion and rng.random() > cfg.lesion_rate * 2:  # lesion_rate < 0.5 thins lesions
            has_lesion = False
        view = "frontal" if mod == "X-ray" else "axial"
        lesion = sample_lesion(rng, bp, view) if has_lesion else None
        split = "train" if i < cut1 else "validation" if i < cut2 else "test"
        out.append(Patient(f"p{i:05d}", split, mod, bp, lesion, int(rng.integers(18, 90)),
                           SEXES[rng.integers(2)], SYMPTOMS[bp][rng.integers(4)]))
    return out


def caption(p: Patient) -> str:
    """ROCO-style caption."""
    view = "Frontal radiograph" if p.modality == "X-ray" else f"Axial {MODALITY_WORDS[p.modality]}"
    if p.lesion is None:
        return f"{view} of the {p.body_part} showing no abnormality."
    return f"{view} of the {p.body_part} showing a {p.lesion.finding} in the {p.lesion.location}."


def case_text(p: Patient, size_mm: int) -> str:
    """MedPix-style case text: history, findings, diagnosis."""
    hist = f"{p.age}-year-old {p.sex} presenting with {p.symptom}."
    if p.lesion is None:
        return f"History: {hist} Findings: {caption(p)} Diagnosis: normal study."
    finding = f"A {size_mm} mm {p.lesion.finding} in the {p.lesion.location}."
    return f"History: {hist} Findings: {finding} Diagnosis: {DIAGNOSES[p.lesion.finding]}."


def _questions(p: Patient, rng: np.random.Generator) -> list[tuple[str, str, str, str, list[str]]]:
    """(type, question, answer, answer_type, choices) for one patient."""
    q: list[tuple[str, str, str, str, list[str]]] = []
    yn = ["yes", "no"]
    q.append(("modality", "What modality is used to take this image?", p.modality, "closed",
              list(MODALITIES)))
    asked = p.modality if rng.random() < 0.5 else MODALITIES[(MODALITIES.index(p.modality)
                                                               + 1 + rng.integers(2)) % 3]
    q.append(("modality_yn", f"Is this a {asked} image?", "yes" if asked == p.modality else "no",
              "closed", yn))
    q.append(("body_part", "Which part of the body does this image show?", p.body_part, "closed",
              list(BODY_PARTS)))
    q.append(("presence", "Is there an abnormality in this image?",
              "yes" if p.lesion else "no", "closed", yn))
    if p.lesion is None:
        return q
    les = p.lesion
    organ = ORGANS_FOR_PHRASE[p.body_part]
    q.append(("side", f"Which side of the {organ} holds the abnormality, left or right?",
              les.side, "closed", ["left", "right"]))
    asked_side = les.side if rng.random() < 0.5 else ("left" if les.side == "right" else "right")
    q.append(("side_yn", f"Is the abnormality in the {asked_side} {organ}?",
              "yes" if asked_side == les.side else "no", "closed", yn))
    asked_f = les.finding if rng.random() < 0.5 else FINDINGS[(FINDINGS.index(les.finding)
                                                                + 1 + rng.integers(2)) % 3]
    q.append(("finding_yn", f"Is the abnormality a {asked_f}?",
              "yes" if asked_f == les.finding else "no", "closed", yn))
    q.append(("location", "Where is the abnormality?", les.location, "open", []))
    q.append(("finding", "What is the abnormality?", les.finding, "open", []))
    return q


SPOT_LOOKS = {"nodule": "a small round spot", "mass": "a large lobulated spot", "cyst": "a thin ring"}


def _generic_questions(p: Patient, rng: np.random.Generator) -> list[tuple[str, str, str, str, list[str]]]:
    """General-domain VQA about the same images, in lay words unlike the SLAKE-style set.

    They stand in for the short-answer and grounding part of a real base model's pre-training
    mixture (PaliGemma's includes VQA and detection; a base has said "yes", "no" and where things
    are long before medical fine-tuning). They speak of the *picture* (its left half, a ring),
    never of the patient's side or a diagnosis: mapping picture halves to the patient's side (the
    radiological convention flips them) and looks to findings is what fine-tuning has to learn.
    """
    yn = ["yes", "no"]
    out = [
        ("generic_normal", "Does this scan look normal?", "no" if p.lesion else "yes", "closed", yn),
        ("generic_kind", "What kind of scan is this?", p.modality, "closed", list(MODALITIES)),
        ("generic_region", "What region is imaged?", p.body_part, "closed", list(BODY_PARTS)),
    ]
    if p.lesion is not None:
        half = "right half" if p.lesion.side == "left" else "left half"  # patient's left = picture's right
        part = "upper part" if p.lesion.zone in ("upper", "frontal") else "lower part"
        out += [
            ("generic_half", "On which half of the picture is the spot?", half, "closed",
             ["left half", "right half"]),
            ("generic_part", "Is the spot in the upper or lower part of the picture?", part, "closed",
             ["upper part", "lower part"]),
            ("generic_look", "What does the spot look like?", SPOT_LOOKS[p.lesion.finding], "closed",
             list(SPOT_LOOKS.values())),
        ]
        asked_half = half if rng.random() < 0.5 else ("left half" if half == "right half" else "right half")
        look = SPOT_LOOKS[p.lesion.finding]
        asked_look = look if rng.random() < 0.5 else [v for v in SPOT_LOOKS.values() if v != look][int(rng.integers(2))]
        out += [
            ("generic_half_yn", f"Is the spot on the {asked_half} of the picture?",
             "yes" if asked_half == half else "no", "closed", yn),
            ("generic_look_yn", f"Does the spot look like {asked_look}?", "yes" if asked_look == look else "no",
             "closed", yn),
        ]
    return out


def _write_png(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


def build_phantom(cfg: PhantomConfig, root: str | Path | None = None) -> Path:
    """Generate the phantom dataset into ``root`` (default ``$MEDVLM_HOME/phantom/<key>``).

    Returns the folder, which holds ``images/``, ``masks/``, one Arrow dataset per
    representation (``qa`` SLAKE-style questions, ``captions`` ROCO-style, ``cases`` MedPix-style)
    and ``manifest.json`` (written last). An existing complete folder is reused.
    """
    root = Path(root) if root else medvlm_home() / "phantom" / cfg.key()
    if (root / "manifest.json").exists():
        return root
    logger.info("building phantom dataset (%d patients) in %s", cfg.n_patients, root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    patients = _patients(cfg, rng)
    qa, caps, cases, generic = [], [], [], []
    for p in tqdm(patients, desc="phantom", disable=None):
        img, mask = render(p.modality, p.body_part, p.lesion, cfg.image_size, rng)
        img_rel, mask_rel = f"images/{p.pid}.png", ""
        _write_png(root / img_rel, np.stack([img] * 3, axis=-1))
        truth = {"modality": p.modality, "body_part": p.body_part, "finding": "none", "side": "",
                 "location": "", "age": p.age, "sex": p.sex}
        size_mm = 0
        if p.lesion is not None:
            mask_rel = f"masks/{p.pid}.png"
            _write_png(root / mask_rel, (mask * 255).astype(np.uint8))
            size_mm = int(round(p.lesion.radius * 2 * 150))  # field of view ~300 mm across
            truth.update(finding=p.lesion.finding, side=p.lesion.side, location=p.lesion.location,
                         size_mm=size_mm, center=[p.lesion.cx, p.lesion.cy])
        common = dict(image=img_rel, split=p.split, group_id=p.pid, modality=p.modality,
                      body_part=p.body_part, roi=mask_rel)
        for k, (qtype, question, answer, atype, choices) in enumerate(_questions(p, rng)):
            qa.append(make_record(id=f"{p.pid}-q{k}", question=question, answer=answer,
                                  answer_type=atype, choices=choices, source="phantom-slake",
                                  meta={**truth, "qtype": qtype}, **common))
        for k, (qtype, question, answer, atype, choices) in enumerate(_generic_questions(p, rng)):
            generic.append(make_record(id=f"{p.pid}-g{k}", question=question, answer=answer, answer_type=atype,
                                       choices=choices, source="phantom-generic", meta={**truth, "qtype": qtype},
                                       **common))
        caps.append(make_record(id=f"{p.pid}-cap", question="Describe this image.", answer=caption(p),
                                answer_type="open", source="phantom-roco",
                                meta={**truth, "qtype": "caption"}, **common))
        cases.append(make_record(id=f"{p.pid}-case", question="Describe the case.",
                                 answer=case_text(p, size_mm), answer_type="open",
                                 source="phantom-medpix", meta={**truth, "qtype": "case"}, **common))
    counts = {}
    for name, rows in (("qa", qa), ("captions", caps), ("cases", cases), ("generic", generic)):
        ds = to_dataset(rows)
        ds.save_to_disk(str(root / name))
        counts[name] = len(ds)
    atomic_write_json(root / "config.json", asdict(cfg))
    write_manifest(root, counts=counts, key=cfg.key(), generator_version=GENERATOR_VERSION)
    return root


def load_phantom(
    cfg: PhantomConfig | None = None,
    kind: str = "qa",
    split: str | None = None,
    qtypes: tuple[str, ...] | list[str] | None = None,
    root: str | Path | None = None,
    label_noise: float = 0.0,
) -> datasets.Dataset:
    """Phantom records of one ``kind`` (see ``KINDS``), optionally one split and question types.

    ``label_noise`` > 0 stands in for QA generated by an LLM from captions: that share of the
    closed answers (seeded) is replaced by another of the question's choices, and the source is
    renamed ``phantom-gen``; annealing toward the clean set is then measurably useful.
    Image and mask paths are made absolute so the dataset can be used from any folder.
    """
    cfg = cfg or PhantomConfig()
    folder = build_phantom(cfg, root)
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {KINDS}")
    ds = datasets.load_from_disk(str(folder / kind))
    if split is not None:
        ds = ds.filter(lambda s: s == split, input_columns="split")
    if qtypes:
        unknown = set(qtypes) - set(ALL_TYPES)
        if unknown:
            raise ValueError(f"unknown phantom question types {sorted(unknown)}; known: {list(ALL_TYPES)}")
        wanted = set(qtypes)
        ds = ds.filter(lambda m: json.loads(m)["qtype"] in wanted, input_columns="meta")

    def absolute(rec, idx):
        rec["image"] = str(folder / rec["image"])
        rec["roi"] = str(folder / rec["roi"]) if rec["roi"] else ""
        if label_noise > 0:
            rec["source"] = "phantom-gen"
            rng = np.random.default_rng([cfg.seed, 7, idx])
            others = [c for c in rec["choices"] if c != rec["answer"]]
            if rec["answer_type"] == "closed" and others and rng.random() < label_noise:
                rec["answer"] = others[int(rng.integers(len(others)))]
        return rec

    return ds.map(absolute, with_indices=True)


def load_phantom_source(path: str | None = None, split: str | None = None, **options) -> datasets.Dataset:
    """Entry point for ``load_source("phantom", path)``: ``path`` is a phantom folder or None."""
    cfg = PhantomConfig(**{k: v for k, v in options.items() if k in PhantomConfig.__dataclass_fields__})
    return load_phantom(cfg, kind=options.get("kind", "qa"), split=split, qtypes=options.get("qtypes"),
                        root=path, label_noise=float(options.get("label_noise", 0.0)))
