"""How a round's mask is drawn: a coloured fill, its outline, its box and its round number.

One module for every picture of a conversation: the CLI's overlays (``demo``, ``chat``),
:meth:`RoundResult.overlay` and the web page's per-round layers. numpy + Pillow only (no torch),
so the web demo can draw in a torch-free environment.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: round k is drawn in PALETTE[(k - 1) % len(PALETTE)] (Tableau 10: distinct, readable on photos)
PALETTE = ((230, 25, 75), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (23, 190, 207), (227, 119, 194), (188, 189, 34), (140, 86, 75), (127, 127, 127))
FILL_ALPHA = 0.4


@dataclass(frozen=True)
class Mark:
    """What is drawn for one round: its number, its mask and box at the image's size, its question."""

    round: int
    mask: np.ndarray            # (H, W) bool
    box: np.ndarray | None      # (4,) xyxy, or None
    text: str = ""
    refs: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not bool(np.asarray(self.mask).any())


def mark_of(result) -> Mark:
    """A :class:`Mark` from a round result (local :class:`RoundResult` or a remote one)."""
    return Mark(int(result.round), np.asarray(result.mask, dtype=bool), np.asarray(result.box, dtype=np.float32),
                str(result.question), tuple(int(r) for r in result.refs))


def round_color(k: int) -> tuple[int, int, int]:
    return PALETTE[(int(k) - 1) % len(PALETTE)]


def line_width(hw: Sequence[int]) -> int:
    """Outline and box width for an image of this size: about 0.4 % of its shorter side, at least 2 px."""
    return max(2, int(round(min(hw[:2]) / 250)))


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's boundary band, ``width`` pixels thick, inside the mask (bool, same shape)."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(max(1, width)):
        e = inner.copy()
        e[1:, :] &= inner[:-1, :]
        e[:-1, :] &= inner[1:, :]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        # the image border counts as outside, so a mask touching it gets an edge there too
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        inner = e
    return mask & ~inner


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _label_size(hw) -> int:
    return max(11, int(round(min(hw[:2]) / 28)))


def _tag_size(text: str, size: int) -> tuple[int, int, int]:
    """(width, height, padding) of a round-number tag."""
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    l, t, r, b = probe.textbbox((0, 0), text, font=_font(size))
    pad = max(2, size // 5)
    return r - l + 2 * pad, b - t + 2 * pad, pad


def _anchor(mark: Mark, hw) -> tuple[float, float]:
    """Where a round's tag goes: the top-left corner of its box (of its mask without a box)."""
    h, w = int(hw[0]), int(hw[1])
    if mark.box is not None:
        x0, y0, x1, y1 = (float(v) for v in mark.box)
        return min(max(min(x0, x1), 0), w - 1), min(max(min(y0, y1), 0), h - 1)
    ys, xs = np.asarray(mark.mask, dtype=bool).nonzero()
    return float(xs.min()), float(ys.min())


def tag_positions(marks: Sequence[Mark], hw: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Top-left corner of each non-empty round's tag, inside the image; a tag that would cover an earlier
    round's tag moves right (then down), so rounds with the same box stay readable. A round's position
    depends only on the rounds before it."""
    h, w = int(hw[0]), int(hw[1])
    size = _label_size((h, w))
    placed: list[tuple[int, int, int, int]] = []
    out = {}
    for m in marks:
        if m.empty:
            continue
        tw, th, _ = _tag_size(str(m.round), size)
        ax, ay = _anchor(m, (h, w))
        x = int(min(max(0, ax), max(0, w - tw)))
        y = int(min(max(0, ay), max(0, h - th)))
        for _ in range(4 * len(placed) + 1):
            hit = next((p for p in placed if x < p[2] and p[0] < x + tw and y < p[3] and p[1] < y + th), None)
            if hit is None:
                break
            x = hit[2] + 1
            if x + tw > w:
                x, y = 0, min(hit[3] + 1, max(0, h - th))
        placed.append((x, y, x + tw, y + th))
        out[m.round] = (x, y)
    return out


def _draw_tag(draw: ImageDraw.ImageDraw, xy, text: str, color, size: int) -> None:
    """A filled tag with white text, its top-left at ``xy``."""
    font = _font(size)
    l, t, _, _ = draw.textbbox((0, 0), text, font=font)
    w, h, pad = _tag_size(text, size)
    x, y = int(xy[0]), int(xy[1])
    draw.rectangle((x, y, x + w - 1, y + h - 1), fill=tuple(color) + (255,))
    draw.text((x + pad - l, y + pad - t), text, fill=(255, 255, 255, 255), font=font)


def round_layer(mark: Mark, hw: Sequence[int], color=None, alpha: float = FILL_ALPHA,
                tag_at: tuple[int, int] | None = None) -> np.ndarray:
    """One round drawn on a transparent (H, W, 4) uint8 RGBA layer: fill, outline, box, round number
    (its tag at ``tag_at``, default: from :func:`tag_positions` of this round alone)."""
    h, w = int(hw[0]), int(hw[1])
    color = tuple(int(c) for c in (color if color is not None else round_color(mark.round)))
    layer = np.zeros((h, w, 4), dtype=np.uint8)
    mask = np.asarray(mark.mask, dtype=bool)
    if mask.shape != (h, w):
        raise ValueError(f"mask of shape {mask.shape} for an image of {h}x{w}")
    lw = line_width((h, w))
    layer[mask] = color + (int(round(alpha * 255)),)
    layer[outline(mask, lw)] = color + (255,)
    if mark.empty:
        return layer
    img = Image.fromarray(layer, "RGBA")
    draw = ImageDraw.Draw(img)
    if mark.box is not None:
        x0, y0, x1, y1 = (float(v) for v in mark.box)
        x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
        y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
        draw.rectangle((x0, y0, x1, y1), outline=color + (255,), width=lw)
    if tag_at is None:
        tag_at = tag_positions([mark], (h, w))[mark.round]
    _draw_tag(draw, tag_at, str(mark.round), color, _label_size((h, w)))
    return np.asarray(img)


def composite(rgb: np.ndarray, layers: Iterable[np.ndarray]) -> np.ndarray:
    """Layers alpha-blended over an (H, W, 3) uint8 image, in order (later on top)."""
    out = np.asarray(rgb, dtype=np.float32).copy()
    for layer in layers:
        a = layer[..., 3:4].astype(np.float32) / 255.0
        out = out * (1.0 - a) + layer[..., :3].astype(np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def draw_overlay(rgb: np.ndarray, marks: Sequence[Mark], color=None, alpha: float = FILL_ALPHA) -> np.ndarray:
    """The image with these rounds drawn on it (HxWx3 uint8); later rounds on top."""
    hw = np.asarray(rgb).shape[:2]
    tags = tag_positions(marks, hw)
    return composite(rgb, [round_layer(m, hw, color=color, alpha=alpha, tag_at=tags.get(m.round)) for m in marks])


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur] if cur else lines or [""]


def legend_image(rgb: np.ndarray, marks: Sequence[Mark]) -> np.ndarray:
    """Every round drawn on the image, with a legend below: colour, round number, question, references."""
    over = draw_overlay(rgb, marks)
    h, w = over.shape[:2]
    width = max(w, 360)
    size = max(12, min(24, int(round(width / 45))))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(size * 1.35)
    pad = size // 2
    sw = line_h
    rows = []
    for m in marks:
        text = f"{m.round}: {m.text}"
        if m.refs:
            text += "  (refers to " + ", ".join(str(r) for r in m.refs) + ")"
        if m.empty:
            text += "  (empty mask)"
        rows.append((m, _wrap(probe, text, font, width - sw - 3 * pad)))
    legend_h = pad + sum(len(lines) * line_h + pad for _, lines in rows) if rows else 0
    canvas = Image.new("RGB", (width, h + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(over), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + pad
    for m, lines in rows:
        draw.rectangle((pad, y + 2, pad + sw - 4, y + sw - 2), fill=round_color(m.round))
        for i, line in enumerate(lines):
            draw.text((2 * pad + sw, y + i * line_h + (line_h - size) // 2), line, fill=(20, 20, 20), font=font)
        y += len(lines) * line_h + pad
    return np.asarray(canvas)


def to_png(a: np.ndarray) -> bytes:
    """An (H, W), (H, W, 3) or (H, W, 4) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, dtype=np.uint8)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
