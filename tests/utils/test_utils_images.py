"""The one image and mask reader: every input kind gives the same pixels; bad input names itself."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fixtures_sources import write_ct as _write_ct
from PIL import Image

from medvlm.utils.images import ImageError, read_image, read_mask


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_kind_reads_to_the_same_rgb_pixels(tmp_path):
    arr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    (tmp_path / "a.png").write_bytes(_png_bytes(arr))
    inputs = {"path": tmp_path / "a.png", "str": str(tmp_path / "a.png"), "bytes": _png_bytes(arr),
              "hf dict": {"bytes": _png_bytes(arr), "path": "a.png"}, "hf dict path": {"path": str(tmp_path / "a.png")},
              "pil": Image.fromarray(arr), "array": arr, "float array": arr / 255.0}
    for kind, value in inputs.items():
        got = np.asarray(read_image(value))
        assert got.shape == (4, 6, 3) and got.dtype == np.uint8, kind
        assert np.abs(got.astype(int) - arr).max() <= 1, kind  # float input rounds down by at most 1


def test_dicom_reads_the_same_from_a_file_and_from_its_bytes(tmp_path):
    path = _write_ct(tmp_path / "ct.dcm", [-1024, -500, 0, 500])
    from_file = np.asarray(read_image(path))
    assert from_file[0, :, 0].tolist() == [0, 64, 128, 191]
    assert np.array_equal(np.asarray(read_image(path.read_bytes())), from_file)
    assert np.array_equal(np.asarray(read_image({"bytes": path.read_bytes(), "path": "ct.dcm"})), from_file)


def test_what_is_not_an_image_is_refused_with_its_name(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(ImageError, match="notes.png is not a readable image"):
        read_image(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="bytes that are not an image"):
        read_image(b"x" * 200)
    with pytest.raises(ImageError, match="without bytes or path"):
        read_image({"bytes": None, "path": None})
    for bad in (np.zeros((64, 64, 7)), np.zeros(64), np.array([["a", "b"], ["c", "d"]])):
        with pytest.raises(ImageError, match="is not an image"):
            read_image(bad)
    assert read_image(np.zeros((5, 6))).size == (6, 5)


def test_one_mask_threshold_for_binary_and_8_bit_masks(tmp_path):
    eight_bit = np.array([[0, 127], [128, 255]], np.uint8)
    assert read_mask(eight_bit).tolist() == [[False, False], [True, True]]
    assert read_mask(np.array([[0, 1], [1, 0]])).tolist() == [[False, True], [True, False]]
    Image.fromarray(eight_bit).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False], [True, True]]
    big = read_mask(tmp_path / "m.png", size=(4, 4))  # nearest neighbour keeps labels crisp
    assert big.shape == (4, 4) and big.sum() == 8
    with pytest.raises(FileNotFoundError, match="roi path"):
        read_mask(tmp_path / "none.png")
    with pytest.raises(ValueError, match="2-D"):
        read_mask(np.zeros(5))
