"""campe.data.imageprep: every image mode against a conversion written here in numpy, the border resize against its
geometry and against a real img2dataset download, 16-bit vs 8-bit embeddings, undecodable bytes."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from campe.data.imageprep import (ImageDecodeError, SkipCounter, TooManySkipsError, UndecodableImageWarning, decode_image,
                                  preprocess_image)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB [h, w, 3]: smooth gradients, a few shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * x / w, 255 * y / h, 127 + 100 * np.sin(x / 7 + y / 11)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, max(h, w) / 4)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).round().astype(np.uint8)


def out(im: Image.Image, size: int | None = None) -> np.ndarray:
    """preprocess_image as HWC numpy (the conversion under test)."""
    t = preprocess_image(im, size)
    assert t.dtype == torch.uint8 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


def matte(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference: composite on white, alpha in 0..255 (the standard over-white formula, rounded half to even)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(a * rgb.astype(np.float64) + (1.0 - a) * 255.0).astype(np.uint8)


def grey3(g: np.ndarray) -> np.ndarray:
    return np.stack([g, g, g], -1)


# ------------------------------------------------------------------------------------------------------- modes

def test_rgb_square_is_passed_through_untouched():
    p = photo(32, 32)
    assert np.array_equal(out(Image.fromarray(p), 32), p)
    assert np.array_equal(out(Image.fromarray(p)), p)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grey_is_rescaled_not_clipped(mode):
    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, (24, 40)).astype(np.int64)
    v[0, :4] = [0, 128, 129, 65535]  # round(v / 257) boundaries: 0, 0, 1, 255
    im = Image.fromarray(v.astype({"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]))
    assert im.mode == mode
    ref = np.floor(v / 257.0 + 0.5).astype(np.uint8)  # round half up; v / 257 is never exactly .5
    got = out(im)
    assert np.array_equal(got, grey3(ref))
    assert got[0, :4, 0].tolist() == [0, 0, 1, 255]
    # Pillow's own conversion clips: a typical 16-bit photo turns almost white.
    assert np.asarray(im.convert("RGB")).mean() > 240 and got.mean() < 160


def test_sixteen_bit_png_file_opens_as_i16_and_matches_its_eight_bit_twin(tmp_path):
    p8 = photo(30, 50)[..., 1]
    Image.fromarray(p8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(p8).save(tmp_path / "g8.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    assert torch.equal(decode_image(tmp_path / "g16.png", 32), decode_image(tmp_path / "g8.png", 32))
    assert np.array_equal(decode_image(tmp_path / "g8.png").permute(1, 2, 0).numpy(), grey3(p8))


def test_palette_with_and_without_transparency():
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 16, (20, 30)).astype(np.uint8)
    pal = rng.integers(0, 256, (16, 3)).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(pal.flatten().tolist())
    assert np.array_equal(out(im), pal[idx])
    im.info["transparency"] = 5
    ref = pal[idx].copy()
    ref[idx == 5] = 255  # fully transparent entry -> the white matte
    assert np.array_equal(out(im), ref)
    # A per-entry alpha table (PNG tRNS with several values)
    alphas = rng.integers(0, 256, 16).astype(np.uint8)
    im.info["transparency"] = bytes(alphas.tolist())
    assert np.array_equal(out(im), matte(pal[idx], alphas[idx]))


def test_a_transparent_colour_of_an_rgb_png_is_matted_like_img2dataset_a_grey_one_is_not():
    p = (np.random.default_rng(7).integers(0, 4, (12, 20, 3)) * 60).astype(np.uint8)
    key = (60, 120, 0)
    ref = p.copy()
    ref[(p == key).all(-1)] = 255  # the colour named transparent -> the white matte
    im = Image.fromarray(p)
    im.info["transparency"] = key
    assert (p == key).all(-1).any() and np.array_equal(out(im), ref)
    grey = Image.fromarray(p[..., 1])
    grey.info["transparency"] = 120  # OpenCV, so img2dataset, does not apply it: neither do we
    assert np.array_equal(out(grey), grey3(p[..., 1]))


def test_cmyk():
    rng = np.random.default_rng(3)
    cmyk = rng.integers(0, 256, (16, 24, 4)).astype(np.uint8)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    ref = (255.0 - c) * (255.0 - k) / 255.0  # R = (1 - C)(1 - K), likewise G with M and B with Y
    got = out(Image.fromarray(cmyk, "CMYK")).astype(np.float64)
    assert np.abs(got - ref).max() <= 1.0


def test_grey_alpha_la():
    rng = np.random.default_rng(4)
    la = rng.integers(0, 256, (18, 26, 2)).astype(np.uint8)
    la[0, 0, 1], la[0, 1, 1] = 0, 255
    got = out(Image.fromarray(la, "LA"))
    assert np.array_equal(got, matte(grey3(la[..., 0]), la[..., 1]))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [la[0, 1, 0]] * 3


def test_one_bit():
    rng = np.random.default_rng(5)
    bits = rng.random((21, 35)) > 0.5
    im = Image.fromarray(bits)
    assert im.mode == "1"
    assert np.array_equal(out(im), grey3(np.where(bits, 255, 0).astype(np.uint8)))


def test_rgba():
    rng = np.random.default_rng(6)
    rgba = rng.integers(0, 256, (22, 14, 4)).astype(np.uint8)
    got = out(Image.fromarray(rgba, "RGBA"))
    ref = matte(rgba[..., :3], rgba[..., 3])
    # The matte formula in float64 can land exactly on .5 differently from the reference's (1 - a) form: off by one
    # at most, on few pixels.
    d = np.abs(got.astype(int) - ref.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 0.01


# --------------------------------------------------------------------------------------------- size: the border

@pytest.mark.parametrize("h,w", [(128, 64), (64, 128), (96, 192)])
def test_non_square_keeps_the_aspect_and_is_centred_on_white(h, w):
    """Integer downscale factors: INTER_AREA is then the block mean, written here in numpy."""
    p = photo(h, w)
    f = max(h, w) // 64
    nh, nw = h // f, w // f
    block = p.reshape(nh, f, nw, f, 3).astype(np.float64).mean(axis=(1, 3))
    ref = np.full((64, 64, 3), 255, np.uint8)
    top, left = (64 - nh) // 2, (64 - nw) // 2
    ref[top:top + nh, left:left + nw] = np.floor(block + 0.5).astype(np.uint8)
    got = out(Image.fromarray(p), 64)
    assert got.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    border = np.ones((64, 64), bool)
    border[top:top + nh, left:left + nw] = False
    assert (got[border] == 255).all()


def test_odd_padding_goes_to_the_bottom_and_enlarging_keeps_the_aspect():
    p = photo(45, 64)  # 19 rows of padding: 9 above, 10 below
    got = out(Image.fromarray(p), 64)
    assert (got[:9] == 255).all() and (got[54:] == 255).all() and np.array_equal(got[9:54], p)
    small = photo(10, 20)  # enlarged (Lanczos) to 32 x 64, then 16 rows of border above and below
    got = out(Image.fromarray(small), 64)
    assert (got[:16] == 255).all() and (got[48:] == 255).all()
    assert abs(got[16:48].astype(float).mean() - small.astype(float).mean()) < 3


# ------------------------------------------------------------------------------- against a real img2dataset run

@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """Raw photos (PNG: no loss before the download) of several shapes and modes, through `campe download`
    (img2dataset, file:// URLs, resize_mode border, JPEG quality 95 at 64 px)."""
    from campe.data.shards import iter_samples
    from stages.download import DownloadParams, run_stage as download_stage

    tmp = tmp_path_factory.mktemp("imageprep_dl")
    shapes = {"wide": (96, 160), "tall": (150, 70), "small": (20, 37), "square": (64, 64)}
    paths = []
    for i, (name, (h, w)) in enumerate(shapes.items()):
        Image.fromarray(photo(h, w, seed=10 + i)).save(tmp / f"{name}.png")
        paths.append(tmp / f"{name}.png")
    p = photo(80, 120, seed=20)
    rgba = np.dstack([p, np.random.default_rng(21).integers(0, 256, (80, 120)).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp / "rgba.png")
    Image.fromarray(p).quantize(32).save(tmp / "palette.png")
    Image.fromarray(p[..., 0]).save(tmp / "grey.png")
    paths += [tmp / "rgba.png", tmp / "palette.png", tmp / "grey.png"]
    pd.DataFrame({"url": [x.as_uri() for x in paths], "caption": [x.stem for x in paths]}).to_parquet(
        tmp / "urls.parquet")
    stats = download_stage(DownloadParams(url_list=str(tmp / "urls.parquet"), output_dir=str(tmp / "shards"),
                                          stats_file=str(tmp / "stats.json"), extra_columns=[], image_size=64,
                                          encode_quality=95, processes_count=1, thread_count=2))
    assert stats["successes"] == len(paths)
    shard = {s["txt"]: s["jpg"] for s in iter_samples(tmp / "shards", decode="pil")}
    return paths, shard


def test_a_raw_photo_evaluated_directly_equals_it_after_the_download(downloaded):
    """Direct evaluation vs the downloaded shard: they differ by the shard's JPEG error only. Exactly so: encoding
    the direct pixels with img2dataset's encoder (OpenCV, quality 95; grey images as grey) gives the shard's
    pixels, so before the encoding they were the same."""
    import cv2

    from campe.embed import load_images

    paths, shard = downloaded
    for path in paths:
        direct = load_images([str(path)], 64)[0].permute(1, 2, 0).numpy()
        after = out(shard[path.stem])  # the downloaded JPEG, as training decodes it
        d = np.abs(direct.astype(int) - after.astype(int))
        grey = path.stem == "grey"
        ok, jpg = cv2.imencode(".jpg", direct[..., 0] if grey else direct[..., ::-1],
                               [int(cv2.IMWRITE_JPEG_QUALITY), 95])
        assert np.array_equal(out(Image.open(io.BytesIO(jpg.tobytes()))), after), path.name
        assert d.mean() < 6.0, (path.name, d.mean())  # JPEG q95, 4:2:0 chroma: sharp colour edges err most
        if path.stem in ("wide", "tall"):
            # The old evaluation (stretch to a square, bicubic) is far from what training saw.
            with Image.open(path) as im:
                stretched = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)).astype(int)
            assert np.abs(stretched - after.astype(int)).mean() > 10 * d.mean(), (path.name, d.mean())


def test_sixteen_and_eight_bit_versions_of_a_photo_embed_alike(tmp_path):
    from campe.embed import Embedder
    from campe.model import build_model

    torch.manual_seed(0)
    model, _ = build_model("tiny")  # 32 px
    emb = Embedder(model, model.text.tokenize, progress=False)
    grey = photo(48, 80)[..., 0]
    Image.fromarray(grey).save(tmp_path / "p8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "p16.png")
    noisy16 = np.clip(grey.astype(np.int64) * 257 + np.random.default_rng(0).integers(-100, 101, grey.shape), 0,
                      65535)  # real 16-bit data: the low byte is not a copy of the high one
    Image.fromarray(noisy16.astype(np.uint16)).save(tmp_path / "p16n.png")
    e = emb.images([str(tmp_path / n) for n in ("p8.png", "p16.png", "p16n.png")])
    cos = e @ e.T
    assert cos[0, 1] > 0.9999 and cos[0, 2] > 0.999, cos
    # Pillow's clipping conversion would have given a white image: a very different embedding.
    with Image.open(tmp_path / "p16n.png") as im:
        clipped = torch.from_numpy(np.array(im.convert("RGB").resize((32, 32)))).permute(2, 0, 1)[None]
    with torch.no_grad():
        e_clipped = model.encode_image(clipped)
    assert float(e_clipped[0] @ e[0]) < float(cos[0, 2]) - 1e-3


# ------------------------------------------------------------------------------------------ undecodable images

@pytest.mark.parametrize("data", [b"", b"garbage, not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 40])
def test_undecodable_bytes_raise_image_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_truncated_jpeg_raises_image_decode_error():
    buf = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buf, "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_a_missing_file_stays_a_file_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "nope.jpg")


def test_skip_counter_warns_counts_and_stops_past_the_fraction():
    c = SkipCounter("stage", total=200, max_fraction=0.01, param="x.max_skip_fraction")
    with pytest.warns(UndecodableImageWarning, match=r"stage: skipping k1 of shard-a: undecodable image \(bad\)"):
        c.skip("shard-a", "k1", "undecodable image (bad)")
    c.add_known(["shard-b:k2"])
    assert c.record() == {"count": 2, "first": ["shard-a:k1", "shard-b:k2"]}
    with pytest.raises(TooManySkipsError, match=r"3 of 200 samples could not be decoded .*x.max_skip_fraction=0.01 .*"
                                                r"shard-a:k1"):
        with pytest.warns(UndecodableImageWarning):
            c.skip("shard-c", "k3", "bad")
