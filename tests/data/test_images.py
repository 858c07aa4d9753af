"""Reading images robustly: every format and mode to RGB uint8; every bad-file case gets its own clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError


@pytest.fixture(scope="module")
def cell(data_root) -> np.ndarray:
    return read_image(load_dataset("all_idb2").samples[0].path)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp")])
def test_formats_read_as_rgb(fmt, suffix, cell, tmp_path):
    path = _save(Image.fromarray(cell), tmp_path / f"c{suffix}", format=fmt)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == cell.shape
    tol = 12 if fmt == "JPEG" else 0
    assert np.abs(out.astype(int) - cell).mean() <= tol


def test_real_tiff_matches_pixels(data_root):
    s = load_dataset("all_idb2").samples[0]
    with Image.open(s.path) as im:
        ref = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(read_image(s.path), ref)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1", "I;16"])
def test_modes_become_rgb(mode, cell, tmp_path):
    img = Image.fromarray(cell)
    if mode == "I;16":
        arr16 = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
        img = Image.fromarray(arr16)  # 16-bit grayscale
        suffix, fmt = ".tif", "TIFF"
    else:
        img = img.convert(mode)
        suffix, fmt = (".tif", "TIFF") if mode == "CMYK" else (".png", "PNG")
    out = read_image(_save(img, tmp_path / f"m{suffix}", format=fmt))
    assert out.shape == cell.shape and out.dtype == np.uint8
    if mode in ("L", "I;16"):
        gray = np.asarray(Image.fromarray(cell).convert("L"))
        assert np.abs(out[..., 0].astype(int) - gray).max() <= 1
        assert (out[..., 0] == out[..., 2]).all()


def test_rgba_transparent_background_becomes_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:4, 2:4] = (200, 0, 0, 255)
    out = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[2, 2]) == (200, 0, 0)


def test_16bit_rgb_tiff(cell, tmp_path):
    import tifffile

    arr16 = cell.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "rgb16.tif", arr16, photometric="rgb")
    out = read_image(tmp_path / "rgb16.tif")
    assert np.abs(out.astype(int) - cell).max() <= 1


def test_multipage_tiff_reads_first_page(cell, tmp_path):
    first = Image.fromarray(cell)
    second = Image.fromarray(255 - cell)
    path = tmp_path / "multi.tif"
    first.save(path, save_all=True, append_images=[second])
    np.testing.assert_array_equal(read_image(path), cell)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255  # white band on the left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (20, 10, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now on top


def test_bytes_input(cell):
    buf = io.BytesIO()
    Image.fromarray(cell).save(buf, format="PNG")
    np.testing.assert_array_equal(read_image(buf.getvalue(), name="upload.png"), cell)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.png: file does not exist"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: file is empty \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)


def test_non_image_file(tmp_path):
    (tmp_path / "notes.png").write_text("this is a text file, not a picture\n")
    with pytest.raises(ImageReadError, match=r"notes\.png: not a recognised image format"):
        read_image(tmp_path / "notes.png")


def test_truncated_files_from_the_real_data(data_root):
    ds = load_dataset("deepapl")
    bad = [s.path for s in ds.samples if s.path.name in ("SMU_15364290.jpg", "BL_6611696.jpg")]
    assert len(bad) == 2
    for p in bad:
        with pytest.raises(ImageReadError, match="truncated") as exc:
            read_image(p)
        assert exc.value.path == str(p)


def test_truncated_png(cell, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(cell).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png: .*(truncated|corrupt)"):
        read_image(tmp_path / "cut.png")


def test_corrupt_bytes_in_jpeg(cell, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(cell).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    data[2:200] = b"\x00" * 198  # destroy the headers
    (tmp_path / "bad.jpg").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"bad\.jpg"):
        read_image(tmp_path / "bad.jpg")


def test_absurdly_large_image_is_refused(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(path)  # compresses to a few KB, decodes to 144 Mpx
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageReadError, match=r"12000x12000 = 144,000,000 pixels, above the limit"):
        read_image(path)
    with pytest.raises(ImageReadError, match="above the limit of 100"):
        read_image(_save(Image.new("RGB", (20, 10)), tmp_path / "small.png"), max_pixels=100)


def test_batched_gives_full_batches_then_the_rest() -> None:
    from leukoscope.data.images import batched

    assert [b for b in batched(range(7), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 4)) == []
    assert list(batched(iter("ab"), 2)) == [["a", "b"]]
    with pytest.raises(ValueError, match="at least 1"):
        list(batched([1], 0))
