"""Procedural radiology-like images: CT, MRI and X-ray of the chest, abdomen and head.

Each image is drawn from tissue shapes (ellipses in normalised coordinates ``[-1, 1]``) and a
modality maps tissues to intensities, so the same anatomy looks like a CT slice (air black,
bone white), a T2-weighted MRI slice (fluid bright, bone dark, a smooth bias field) or a
frontal radiograph (projection: wider silhouette, blurred). Lesions (nodule, mass, cyst) are
drawn inside a named organ at a known position with a pixel mask, so saliency can be scored.

Orientation follows the radiological convention used by SLAKE and clinical viewers: the
patient's left is on the image's right. ``Lesion.side`` is the *patient's* side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODALITIES = ("CT", "MRI", "X-ray")
BODY_PARTS = ("chest", "abdomen", "head")
FINDINGS = ("nodule", "mass", "cyst")
SIDES = ("left", "right")

# Tissue → intensity in [0, 1] per modality. CT follows Hounsfield ordering (air < fat < fluid <
# soft tissue < bone); T2 MRI makes fluid brightest and bone/air dark; radiographs follow
# attenuation like CT but are projections (drawn with other shapes, see _shapes).
TISSUE = {
    "CT": {"air": 0.0, "lung": 0.08, "fat": 0.28, "fluid": 0.38, "soft": 0.5, "organ": 0.58,
           "brain": 0.52, "csf": 0.32, "bone": 0.96, "lesion": 0.78},
    "MRI": {"air": 0.02, "lung": 0.06, "fat": 0.7, "fluid": 0.95, "soft": 0.38, "organ": 0.3,
            "brain": 0.45, "csf": 0.92, "bone": 0.12, "lesion": 0.82},
    "X-ray": {"air": 0.05, "lung": 0.18, "fat": 0.4, "fluid": 0.55, "soft": 0.55, "organ": 0.62,
              "brain": 0.6, "csf": 0.55, "bone": 0.92, "lesion": 0.85},
}

# Where a lesion may sit, per body part: organ name, and centres of the left/right organ in
# image coordinates for the *patient's* right (image left, x < 0). Zones split each organ.
ORGANS = {
    "chest": {"organ": "lung", "zones": ("upper", "lower")},
    "abdomen": {"organ": "kidney", "zones": ("upper", "lower")},
    "head": {"organ": "hemisphere", "zones": ("frontal", "occipital")},
}


@dataclass(frozen=True)
class Lesion:
    finding: str          # nodule | mass | cyst
    side: str             # the patient's side: left | right
    zone: str             # upper | lower (chest, abdomen), frontal | occipital (head)
    cx: float             # centre, normalised image coordinates
    cy: float
    radius: float         # normalised radius
    contrast: float       # intensity change against the organ
    organ_key: str = "chest"  # the body part whose organ holds the lesion

    @property
    def location(self) -> str:
        organ = ORGANS_FOR_PHRASE[self.organ_key]
        if self.organ_key == "head":
            return f"{self.side} {self.zone} lobe"
        if self.organ_key == "abdomen":
            return f"{self.zone} pole of the {self.side} kidney"
        return f"{self.side} {self.zone} {organ}"


ORGANS_FOR_PHRASE = {"chest": "lung", "abdomen": "kidney", "head": "hemisphere"}


def _ellipse(xx, yy, cx, cy, ax, ay, soft=0.04):
    """Soft-edged ellipse membership in [0, 1] (anti-aliased edge of width ``soft``)."""
    d = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    return np.clip((1.0 - d) / soft + 0.5, 0.0, 1.0)


def _paired_organs(body_part: str, view: str) -> dict[str, tuple[float, float, float, float]]:
    """Centres and half-axes of the paired organs (patient right = image left)."""
    if body_part == "chest":
        if view == "frontal":
            return {"right": (-0.38, -0.05, 0.27, 0.55), "left": (0.38, -0.05, 0.27, 0.55)}
        return {"right": (-0.38, -0.05, 0.26, 0.42), "left": (0.38, -0.05, 0.26, 0.42)}
    if body_part == "abdomen":
        return {"right": (-0.42, 0.15, 0.16, 0.3), "left": (0.42, 0.15, 0.16, 0.3)}
    return {"right": (-0.27, 0.0, 0.28, 0.62), "left": (0.27, 0.0, 0.28, 0.62)}


def _shapes(body_part: str, view: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Painter's-order list of (tissue, ellipse) for one anatomy and view."""
    organs = _paired_organs(body_part, view)
    if body_part == "chest":
        body = [("fat", (0, 0, 0.9, 0.7)), ("soft", (0, 0, 0.84, 0.64))]
        if view == "frontal":
            body = [("soft", (0, 0.05, 0.92, 0.95))]
        paired = [("lung", organs["right"]), ("lung", organs["left"])]
        rest = [("organ", (0.08, 0.12, 0.2, 0.22)), ("bone", (0, 0.5 if view == "axial" else 0, 0.07,
                                                                0.08 if view == "axial" else 0.95))]
        return body + paired + rest
    if body_part == "abdomen":
        body = [("fat", (0, 0, 0.9, 0.68)), ("soft", (0, 0, 0.82, 0.6))]
        if view == "frontal":
            body = [("soft", (0, 0.05, 0.92, 0.95))]
        liver = [("organ", (-0.35, -0.25, 0.4, 0.28))]
        paired = [("organ", organs["right"]), ("organ", organs["left"])]
        spine = [("bone", (0, 0.45 if view == "axial" else 0, 0.08, 0.09 if view == "axial" else 0.95))]
        gas = [("air", (0.15, -0.15, 0.08, 0.06)), ("air", (-0.05, 0.1, 0.06, 0.05))]
        return body + liver + paired + spine + gas
    skull = [("bone", (0, 0, 0.72, 0.9)), ("brain", (0, 0, 0.64, 0.82))]
    paired = [("brain", organs["right"]), ("brain", organs["left"])]
    ventricles = [("csf", (-0.07, -0.05, 0.05, 0.2)), ("csf", (0.07, -0.05, 0.05, 0.2))]
    if view == "frontal":
        return skull[:1] + [("soft", (0, 0, 0.64, 0.82))] + [("air", (0, -0.05, 0.16, 0.12))]
    return skull + paired + ventricles


def sample_lesion(rng: np.random.Generator, body_part: str, view: str) -> Lesion:
    """A lesion inside one of the paired organs, with varied size, contrast and position."""
    finding = FINDINGS[rng.integers(len(FINDINGS))]
    side = SIDES[rng.integers(2)]
    zones = ORGANS[body_part]["zones"]
    zone = zones[rng.integers(2)]
    ocx, ocy, oax, oay = _paired_organs(body_part, view)[side]
    radius = {"nodule": rng.uniform(0.08, 0.11), "mass": rng.uniform(0.19, 0.24),
              "cyst": rng.uniform(0.14, 0.18)}[finding]
    # upper / frontal zone is the top half of the organ (smaller y)
    sign = -1.0 if zone == zones[0] else 1.0
    cy = ocy + sign * rng.uniform(0.3, 0.6) * oay
    cx = ocx + rng.uniform(-0.35, 0.35) * oax
    contrast = rng.uniform(0.45, 0.7)
    return Lesion(finding, side, zone, float(cx), float(cy), float(radius), float(contrast), body_part)


def render(
    modality: str,
    body_part: str,
    lesion: Lesion | None,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image. Returns ``(image uint8 [size, size], lesion mask bool [size, size])``."""
    if modality not in MODALITIES or body_part not in BODY_PARTS:
        raise ValueError(f"unknown modality/body part {modality!r}/{body_part!r}; "
                         f"expected one of {MODALITIES} / {BODY_PARTS}")
    view = "frontal" if modality == "X-ray" else "axial"
    lin = (np.arange(size) + 0.5) / size * 2 - 1
    xx, yy = np.meshgrid(lin, lin)
    table = TISSUE[modality]
    # per-patient anatomical jitter: scale and shift
    sx, sy = rng.uniform(0.92, 1.05, size=2)
    dx, dy = rng.uniform(-0.04, 0.04, size=2)
    img = np.full((size, size), table["air"], dtype=np.float64)
    for tissue, (cx, cy, ax, ay) in _shapes(body_part, view):
        m = _ellipse(xx, yy, cx * sx + dx, cy * sy + dy, ax * sx, ay * sy)
        img = img * (1 - m) + table[tissue] * m
    mask = np.zeros((size, size), dtype=bool)
    if lesion is not None:
        lcx, lcy = lesion.cx * sx + dx, lesion.cy * sy + dy
        r = lesion.radius
        if lesion.finding == "mass":  # lobulated outline: union of three overlapping blobs
            m = np.zeros_like(img)
            for _ in range(3):
                ang = rng.uniform(0, 2 * np.pi)
                ox, oy = 0.45 * r * np.cos(ang), 0.45 * r * np.sin(ang)
                m = np.maximum(m, _ellipse(xx, yy, lcx + ox, lcy + oy, r * 0.75, r * 0.7))
        else:
            m = _ellipse(xx, yy, lcx, lcy, r, r * rng.uniform(0.85, 1.0))
        base = float(np.sum(img * m) / max(np.sum(m), 1e-6))
        if lesion.finding == "cyst":  # thin bright wall; air-filled in the lung, fluid elsewhere
            rim = np.clip(m - _ellipse(xx, yy, lcx, lcy, r * 0.6, r * 0.6), 0, 1)
            inner = m - rim
            fluid = table["air"] if body_part == "chest" else table["fluid"]
            inner_value = fluid if abs(fluid - base) > 0.25 else base
            # the wall contrasts with the content: dark around bright fluid (T2), bright otherwise
            wall = max(base - lesion.contrast, 0.0) if inner_value > base else min(base + lesion.contrast, 1.0)
            img = img * (1 - m) + wall * rim + inner_value * inner
        else:
            target = base + lesion.contrast if base < 0.6 else base - lesion.contrast
            img = img * (1 - m) + target * m
        mask = m > 0.5
    img = _texture(img, modality, size, rng)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def _texture(img: np.ndarray, modality: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Modality-typical noise: fine Gaussian (CT), bias field + Rician-like (MRI), blur (X-ray)."""
    if modality == "CT":
        return img + rng.normal(0, 0.025, img.shape)
    if modality == "MRI":
        lin = np.linspace(-1, 1, size)
        xx, yy = np.meshgrid(lin, lin)
        a, b = rng.uniform(-0.15, 0.15, size=2)
        bias = 1 + a * xx + b * yy
        re = img * bias + rng.normal(0, 0.03, img.shape)
        im = rng.normal(0, 0.03, img.shape)
        return np.sqrt(re**2 + im**2)
    # X-ray: separable box blur of the projection, then quantum-like noise
    k = 3
    pad = np.pad(img, k // 2, mode="edge")
    blurred = sum(pad[i:i + size, k // 2:k // 2 + size] for i in range(k)) / k
    pad = np.pad(blurred, k // 2, mode="edge")
    blurred = sum(pad[k // 2:k // 2 + size, j:j + size] for j in range(k)) / k
    return blurred + rng.normal(0, 0.02, img.shape)
