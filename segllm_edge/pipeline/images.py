"""Image input and the preprocessing of the released model, in PIL + numpy (no torch, no torchvision).

* CLIP (``CLIPImageProcessor`` of openai/clip-vit-large-patch14): convert RGB, resize the shortest side
  to 224 (PIL bicubic), centre crop 224, /255, normalise.
* HIPIE: SAM's ``ResizeLongestSide(1024)`` (bilinear PIL resize of the uint8 RGB image, new size
  ``int(dim * 1024 / max(h, w) + 0.5)``), zero padding bottom/right to 1024x1024, then ``(x - mean) / std``
  over the whole padded frame (the padding is normalised too; HIPIE gets no padding mask).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from ..limits import MAX_IMAGE_PIXELS, check_image_bytes, check_image_size

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
MAX_PIXELS = MAX_IMAGE_PIXELS  # the limit is defined once, in segllm_edge.limits


def _from_pil(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        # composite on black, which is what PIL's convert("RGB") does for RGBA (drops alpha)
        img = img.convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_image(source, where: str, verb: str = "read") -> np.ndarray:
    """Open an encoded image (a path or a binary file object) → HxWx3 uint8 RGB, safely:

    the size and aspect ratio come from the header and are checked (:mod:`segllm_edge.limits`)
    before anything is decoded; the EXIF orientation is applied (the image as a viewer shows it).
    """
    from PIL import ImageOps

    try:
        with Image.open(source) as img:
            check_image_size(img.width, img.height, where)
            img.load()
            return load_image(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where} is far over the limit of {MAX_IMAGE_PIXELS} pixels ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot {verb} {where}: {exc}") from None


def load_image(image) -> np.ndarray:
    """A path, PIL image or array → HxWx3 uint8 RGB.

    Grayscale, palette, RGBA (alpha dropped, as ``convert("RGB")`` does) and 16-bit images are
    converted; image files are turned by their EXIF orientation (PIL images and arrays are taken
    as given); sizes outside :mod:`segllm_edge.limits` and anything else unusable raise
    :class:`ImageError` naming the problem.
    """
    if isinstance(image, (str, Path)):
        if isinstance(image, str) and "://" in image:
            raise ImageError(f"{image!r} is a URL; segllm-edge reads local files only: download the image first")
        p = Path(image)
        if not p.is_file():
            raise ImageError(f"image file not found: {p}")
        check_image_bytes(p.stat().st_size, f"image file {p}")
        return read_image(p, f"image {p}")
    if isinstance(image, Image.Image):
        check_image_size(image.width, image.height)
        return np.ascontiguousarray(_from_pil(image))
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor (without importing torch)
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4; got shape {tuple(image.shape)}")
        if a.shape[0] < 1 or a.shape[1] < 1:
            raise ImageError(f"image array is empty: shape {tuple(image.shape)}")
        check_image_size(a.shape[1], a.shape[0], "image array")
        if a.dtype == np.uint16:
            a = (a.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
        elif a.dtype != np.uint8:
            raise ImageError(f"image array must be uint8 (or uint16); got {a.dtype}")
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        elif a.shape[2] == 4:
            a = a[:, :, :3]
        return np.ascontiguousarray(a)
    raise ImageError(f"unsupported image type {type(image).__name__}: give a path, a PIL image or an HxWx3 uint8 array")


def clip_preprocess(rgb: np.ndarray, size: int = 224) -> np.ndarray:
    """HxWx3 uint8 → (3, size, size) float32, exactly as CLIPImageProcessor does it."""
    img = Image.fromarray(rgb)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    a = np.asarray(img, dtype=np.uint8)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    if top < 0 or left < 0:  # CLIPImageProcessor pads when the crop is larger; never happens after resize
        raise ImageError("internal: CLIP crop larger than the resized image")
    a = a[top:top + size, left:left + size].astype(np.float32) * np.float32(1 / 255)
    a = (a - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(a.transpose(2, 0, 1))


HIPIE_SIZE = 1024
HIPIE_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
HIPIE_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def resized_hw(h: int, w: int, target: int = HIPIE_SIZE) -> tuple[int, int]:
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def hipie_preprocess(rgb_uint8_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Return ``(normalized (1,3,1024,1024) float32, resized_padded uint8 (1024,1024,3), (h, w))``.

    ``(h, w)`` is the resized size before padding (the valid area of the 1024 frame).
    """
    img = np.asarray(rgb_uint8_hwc)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    nh, nw = resized_hw(h, w)
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    padded = np.zeros((HIPIE_SIZE, HIPIE_SIZE, 3), dtype=np.uint8)
    padded[:nh, :nw] = resized
    x = padded.transpose(2, 0, 1).astype(np.float32)
    normalized = ((x - HIPIE_MEAN[:, None, None]) / HIPIE_STD[:, None, None])[None]
    return np.ascontiguousarray(normalized), padded, (nh, nw)
