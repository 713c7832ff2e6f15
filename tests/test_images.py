"""Image input: formats, conversions, errors; CLIP preprocessing vs the research code."""
import numpy as np
import pytest
from PIL import Image

from segllm_edge import ImageError
from segllm_edge.pipeline.images import clip_preprocess, load_image


def test_clip_preprocess_matches_research_code(golden_image, golden_rounds):
    x = clip_preprocess(load_image(golden_image))
    assert np.abs(x - golden_rounds[1]["image_encode_pixel_values"]).max() < 1e-6


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_modes_are_converted(tmp_path, mode):
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257))
    else:
        img = img.convert(mode)
    p = tmp_path / "x.png"
    img.save(p)
    a = load_image(p)
    assert a.shape == (20, 30, 3) and a.dtype == np.uint8
    if mode == "I;16":
        assert np.array_equal(a[:, :, 0], rgb[:, :, 0])


def test_arrays(tmp_path):
    g = np.zeros((5, 6), np.uint8)
    assert load_image(g).shape == (5, 6, 3)
    assert load_image(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    assert load_image(np.full((5, 6, 3), 65535, np.uint16)).max() == 255


@pytest.mark.parametrize("bad,match", [
    (np.zeros((5, 6, 2), np.uint8), "HxW"),
    (np.zeros((5, 6, 3), np.float32), "uint8"),
    (np.zeros((0, 6, 3), np.uint8), "empty"),
    (42, "unsupported image type"),
])
def test_bad_arrays(bad, match):
    with pytest.raises(ImageError, match=match):
        load_image(bad)


def test_unreadable_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "none.png")
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(p)
