"""Inputs the explorer offers without an upload: phantom cases (with their lesion masks, so every
map gets an ROI mass) and the real CT and MR DICOM slices that ship with pydicom."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medvlm.utils.io import medvlm_home

#: (modality, body part, question): one phantom case each, drawn like the demo's training data.
PHANTOM_CASES = (
    ("CT", "chest", "Where is the abnormality?"),
    ("MRI", "head", "Which side of the hemisphere holds the abnormality, left or right?"),
    ("X-ray", "chest", "Is there an abnormality in this image?"),
    ("CT", "abdomen", "What is the abnormality?"),
)
#: pydicom's own test files: real scans, anonymised, bundled with the library.
DICOM_FILES = (("CT_small.dcm", "What modality is used to take this image?"),
               ("MR_small.dcm", "Which part of the body does this image show?"))


@dataclass
class Sample:
    """One ready input: ``image`` path (PNG or DICOM), a suggested question, optional mask path."""

    label: str
    image: str
    question: str
    mask: str | None = None


def _phantom(folder: Path, index: int, modality: str, body_part: str, question: str, size: int) -> Sample:
    from medvlm.data_curation.phantom_render import render, sample_lesion

    label = f"phantom {modality} {body_part} #{index}"
    image, mask = folder / f"phantom{index}.png", folder / f"phantom{index}_mask.png"
    if not (image.is_file() and mask.is_file()):
        rng = np.random.default_rng(1000 + index)  # fixed: the same cases every start
        view = "frontal" if modality == "X-ray" else "axial"
        pixels, lesion_mask = render(modality, body_part, sample_lesion(rng, body_part, view), size, rng)
        Image.fromarray(pixels).save(image)
        Image.fromarray(lesion_mask.astype(np.uint8) * 255).save(mask)
    return Sample(label, str(image), question, str(mask))


def samples(folder: str | Path | None = None, size: int = 64) -> list[Sample]:
    """The phantom cases (rendered once into ``folder``, default ``$MEDVLM_HOME/explorer``) and the
    bundled DICOM slices."""
    folder = Path(folder) if folder else medvlm_home() / "explorer"
    folder.mkdir(parents=True, exist_ok=True)
    out = [_phantom(folder, i, *case, size) for i, case in enumerate(PHANTOM_CASES)]
    try:
        from pydicom.data import get_testdata_file

        for name, question in DICOM_FILES:
            path = get_testdata_file(name)
            if path:
                out.append(Sample(f"DICOM {name} (pydicom)", str(path), question))
    except ImportError:  # pragma: no cover - pydicom is a dependency
        pass
    return out
