"""Synthetic machined parts with planted defects, for tests, demos and clips (no downloads needed).

A part is a brushed-metal flange (rounded plate, centre bore, four bolt holes, a turned groove) on a
dark conveyor belt. Good parts vary by seed: small shifts and rotation, lighting gradient, brightness,
brushing texture and sensor noise, so a detector has to learn the normal variation rather than one image.
Defects are scratches, dark spots/stains, cracks and missing chunks; each comes with a pixel mask.
Everything is drawn with numpy + OpenCV and is deterministic in the seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np

Size = Union[int, tuple[int, int]]
DEFECT_KINDS = ("scratch", "spot", "crack", "missing")  # local surface defects: what patch models are for
OBJECT_KINDS = ("foreign",)  # a foreign object on the part: what image-level models are for


def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _brushed_texture(rng: np.random.Generator, h: int, w: int, angle: float) -> np.ndarray:
    """Anisotropic noise (long streaks along ``angle``), zero-mean, roughly unit std."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    length = max(9, (max(h, w) // 6) | 1)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), math.degrees(angle), 1.0)
    kernel = np.asarray(cv2.warpAffine(kernel, rot, (length, length)), np.float32)
    kernel /= max(float(kernel.sum()), 1e-6)
    streaks = cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return streaks / (float(streaks.std()) + 1e-6)


def _render_good(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A good part: BGR float32 image in [0, 255], the part's mask, and its geometry."""
    s = min(h, w)
    cy = h / 2 + rng.uniform(-0.03, 0.03) * s
    cx = w / 2 + rng.uniform(-0.03, 0.03) * s
    rot = rng.uniform(-4, 4)
    half = 0.36 * s * rng.uniform(0.98, 1.02)
    # Conveyor belt: dark, slightly blue-grey, fine noise and transverse seams.
    belt_level = rng.uniform(38, 48)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (belt_level + 6, belt_level + 2, belt_level)
    img += rng.normal(0, 2.5, (h, w, 1)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    seam_phase = rng.uniform(0, 2 * math.pi)
    img += (3.0 * np.sin(yy / max(s, 1) * 2 * math.pi * 3 + seam_phase))[..., None]
    # Plate: rounded square, rotated.
    part = np.zeros((h, w), np.uint8)
    corner = 0.22 * half
    box = cv2.boxPoints(((cx, cy), (2 * (half - corner), 2 * (half - corner)), rot))
    cv2.fillPoly(part, [np.round(box).astype(np.int32)], 255)
    part = np.asarray(cv2.dilate(part, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(2 * corner) | 1,) * 2)))
    # Bore and bolt holes go through the plate (belt shows through, darker: in shadow).
    holes = np.zeros((h, w), np.uint8)
    bore_r = 0.30 * half
    cv2.circle(holes, (round(cx), round(cy)), round(bore_r), 255, -1, cv2.LINE_AA)
    theta = math.radians(rot)
    for k in range(4):
        a = theta + math.pi / 4 + k * math.pi / 2
        radius = 0.70 * half * math.sqrt(2) * 0.85  # bolt circle
        px, py = cx + radius * math.cos(a), cy + radius * math.sin(a)
        cv2.circle(holes, (round(px), round(py)), max(2, round(0.09 * half)), 255, -1, cv2.LINE_AA)
    part_f = part.astype(np.float32) / 255 * (1 - holes.astype(np.float32) / 255)
    # Metal: brushed texture, lighting gradient, turned groove ring around the bore.
    base = rng.uniform(150, 175)
    tex = _brushed_texture(rng, h, w, math.radians(rot) + rng.uniform(-0.05, 0.05))
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    light_dir = rng.uniform(0, 2 * math.pi)
    grad = ((gx - cx) * math.cos(light_dir) + (gy - cy) * math.sin(light_dir)) / max(s, 1)
    metal = base + 8.0 * tex + 30.0 * grad
    r = np.sqrt((gx - cx) ** 2 + (gy - cy) ** 2)
    groove = np.exp(-((r - 0.55 * half) / max(0.035 * half, 0.8)) ** 2)
    metal -= 45.0 * groove
    metal += 18.0 * np.exp(-((r - 0.60 * half) / max(0.03 * half, 0.8)) ** 2)  # bright lip of the groove
    tint = np.array([1.0, 0.99, 0.96], np.float32) * rng.uniform(0.97, 1.03)
    metal_bgr = metal[..., None] * tint
    # Hole shadow: bore interior darker than the belt.
    img *= (1 - 0.4 * holes.astype(np.float32)[..., None] / 255)
    img = img * (1 - part_f[..., None]) + metal_bgr * part_f[..., None]
    # Soft drop shadow at the part's edge.
    edge = cv2.GaussianBlur(part.astype(np.float32) / 255, (0, 0), max(s / 120, 0.8))
    img *= (1 - 0.25 * np.clip(edge - part_f, 0, 1))[..., None]
    geometry = {"cx": cx, "cy": cy, "half": half, "rot": rot, "bore_r": bore_r}
    return img, part_f, geometry


def _random_point_on_part(rng: np.random.Generator, part: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(part > 0.99)
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def _plant_defect(rng: np.random.Generator, img: np.ndarray, part: np.ndarray, geo: dict,
                  kind: str) -> np.ndarray:
    """Draw one defect of ``kind`` into ``img`` (in place); returns its uint8 mask (255 = defect)."""
    h, w = part.shape
    s = min(h, w)
    mask = np.zeros((h, w), np.uint8)
    thick = max(1, round(s / 110))
    if kind == "scratch":
        # A thin, slightly bent line centred on a point of the plate; redrawn until most of it is on metal.
        for _ in range(20):
            mask[:] = 0
            xc, yc = _random_point_on_part(rng, part)
            ang = rng.uniform(0, math.pi)
            length = rng.uniform(0.18, 0.30) * s
            pts = []
            for i in range(7):
                t = (i / 6 - 0.5) * length
                bend = rng.normal(0, 0.008 * s)
                pts.append((xc + t * math.cos(ang) - bend * math.sin(ang),
                            yc + t * math.sin(ang) + bend * math.cos(ang)))
            poly = np.round(np.array(pts)).astype(np.int32)
            cv2.polylines(mask, [poly], False, 255, thick, cv2.LINE_AA)
            on_part = float((mask.astype(np.float32) / 255 * part).sum())
            if on_part >= 0.8 * float(mask.sum()) / 255:
                break
        bright = rng.random() < 0.5
        value = np.array([250, 250, 252] if bright else [45, 45, 50], np.float32)
        alpha = (mask.astype(np.float32) / 255 * part)[..., None] * 0.95
        img[:] = img * (1 - alpha) + value * alpha
        mask = (mask.astype(np.float32) * part > 127).astype(np.uint8) * 255
    elif kind == "spot":
        x0, y0 = _random_point_on_part(rng, part)
        rx, ry = rng.uniform(0.025, 0.05) * s, rng.uniform(0.02, 0.045) * s
        cv2.ellipse(mask, (round(x0), round(y0)), (max(2, round(rx)), max(2, round(ry))),
                    rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA)
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), max(s / 200, 0.6)) * part
        colour = np.array([rng.uniform(20, 40), rng.uniform(45, 70), rng.uniform(80, 110)], np.float32)  # rust/oil
        alpha = soft[..., None] * 0.8
        img[:] = img * (1 - alpha) + colour * alpha
    elif kind == "crack":
        x, y = _random_point_on_part(rng, part)
        ang = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(int(rng.integers(10, 16))):
            ang += rng.normal(0, 0.6)
            step = rng.uniform(0.012, 0.022) * s
            x, y = x + step * math.cos(ang), y + step * math.sin(ang)
            pts.append((x, y))
        poly = np.round(np.array(pts)).astype(np.int32)
        cv2.polylines(mask, [poly], False, 255, max(2, round(s / 80)), cv2.LINE_8)
        alpha = (mask.astype(np.float32) / 255 * part)[..., None] * 0.9
        img[:] = img * (1 - alpha) + np.float32(25.0) * alpha
    elif kind == "missing":
        # A chunk broken off the plate's rim: that region shows the belt instead of metal.
        cx, cy, half, rot = geo["cx"], geo["cy"], geo["half"], geo["rot"]
        side = int(rng.integers(4))
        a = math.radians(rot) + side * math.pi / 2
        t = rng.uniform(-0.5, 0.5) * half
        ex = cx + half * math.cos(a) - t * math.sin(a)
        ey = cy + half * math.sin(a) + t * math.cos(a)
        r = rng.uniform(0.10, 0.16) * half
        cv2.circle(mask, (round(ex), round(ey)), max(2, round(r * 1.6)), 255, -1, cv2.LINE_AA)
        mask = (mask.astype(np.float32) / 255 * part > 0.5).astype(np.uint8) * 255
        belt = float(np.median(img[part < 0.01]))
        m = mask.astype(np.float32)[..., None] / 255
        img[:] = img * (1 - m) + (belt + rng.normal(0, 2.5, img.shape).astype(np.float32)) * m
    elif kind == "foreign":
        # A stray hex nut left on the part: an object-sized anomaly, with its shadow on the metal.
        x0, y0 = _random_point_on_part(rng, part)
        r = rng.uniform(0.20, 0.26) * geo["half"]
        turn = rng.uniform(0, math.pi / 3)
        hexagon = np.round([(x0 + r * math.cos(turn + k * math.pi / 3), y0 + r * math.sin(turn + k * math.pi / 3))
                            for k in range(6)]).astype(np.int32)
        shadow = np.zeros((h, w), np.uint8)
        cv2.fillPoly(shadow, [hexagon + round(0.25 * r)], 255, cv2.LINE_AA)
        img[:] = img * (1 - shadow[..., None].astype(np.float32) / 255 * 0.5)
        cv2.fillPoly(mask, [hexagon], 255, cv2.LINE_AA)
        m = mask.astype(np.float32)[..., None] / 255
        img[:] = img * (1 - m) + np.array([rng.uniform(95, 120)] * 3, np.float32) * m  # darker, oiled steel
        cv2.circle(img, (round(x0), round(y0)), max(1, round(0.45 * r)), (30.0, 30.0, 32.0), -1, cv2.LINE_AA)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS + OBJECT_KINDS)}")
    return (mask > 127).astype(np.uint8) * 255


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Camera effects: global exposure, sensor noise, slight blur; to uint8 BGR."""
    img = img * rng.uniform(0.92, 1.08) + rng.uniform(-6, 6)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def render_part(rng: np.random.Generator, size: Size, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One part image (BGR uint8, ``size`` = side or (height, width)) and its defect mask (uint8 0/255).

    ``defect`` is one of DEFECT_KINDS or None for a good part (all-zero mask).
    """
    h, w = _hw(size)
    img, part, geo = _render_good(rng, h, w)
    # The defect draws from its own stream, so the same seed gives the same part with or without it.
    defect_rng = np.random.default_rng(int(rng.integers(2**63)))
    mask = np.zeros((h, w), np.uint8) if defect is None else _plant_defect(defect_rng, img, part, geo, defect)
    return _finish(rng, img), mask


def render_frame(rng: np.random.Generator, size: Size, defect: bool,
                 kinds: Sequence[str] = DEFECT_KINDS) -> np.ndarray:
    """A BGR uint8 video frame of one part (``size`` = side or (height, width)); a random defect of ``kinds``
    if asked."""
    kind = str(rng.choice(list(kinds))) if defect else None
    return render_part(rng, size, kind)[0]


def make_dataset(root: str | Path, n_train: int = 40, n_test_good: int = 10, n_test_defect: int = 16,
                 size: Size = 160, seed: int = 0, n_val_defect: int = 0,
                 kinds: Sequence[str] = DEFECT_KINDS) -> Path:
    """Write an MVTec-AD-like folder: train/good, test/good, test/<kind>, ground_truth/<kind>/<name>_mask.png.

    Defective test images cycle through ``kinds`` (default the surface DEFECT_KINDS). ``n_val_defect`` > 0
    also writes val/good and
    val/<kind> (labelled validation data the trainer uses for an F1-optimal threshold). Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)

    def write(folder: Path, name: str, img: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), img)

    for i in range(n_train):
        write(root / "train" / "good", f"{i:03d}.png", render_part(rng, size)[0])
    for i in range(n_test_good):
        write(root / "test" / "good", f"{i:03d}.png", render_part(rng, size)[0])
    for i in range(n_test_defect):
        kind = kinds[i % len(kinds)]
        img, mask = render_part(rng, size, kind)
        write(root / "test" / kind, f"{i:03d}.png", img)
        write(root / "ground_truth" / kind, f"{i:03d}_mask.png", mask)
    for i in range(n_val_defect):
        write(root / "val" / "good", f"{i:03d}.png", render_part(rng, size)[0])
        kind = kinds[i % len(kinds)]
        write(root / "val" / kind, f"{i:03d}.png", render_part(rng, size, kind)[0])
    return root


DEMO_SIZE = (240, 320)  # camera-like stills; `make demo` trains on these, benchmarks/pipeline.py times that fit


def make_demo_dataset(root: str | Path) -> Path:
    """The parts `make demo` trains and evaluates on, in one place so the benchmark that times the demo's fit
    fits exactly what the demo does."""
    return make_dataset(root, n_train=60, n_test_good=20, n_test_defect=20, size=DEMO_SIZE, seed=0)


def write_clip(path: str | Path, size: Size, n_frames: int, defects: Sequence[tuple[int, int]],
               fps: float = 10.0, seed: int = 0, kinds: Sequence[str] = DEFECT_KINDS, codec: str = "FFV1") -> Path:
    """A video of parts passing the camera; frames in any [start, stop) of ``defects`` carry a defect.

    Lossless (FFV1) by default: the model learns from PNG images, and a lossy codec alone shifts the scores of
    good parts. On a station, train on frames captured through the station's own camera and codec.
    ``codec="MJPG"`` gives what most USB cameras send (for speed measurements: FFV1 decodes far slower).
    """
    path = Path(path)
    h, w = _hw(size)
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter.fourcc(*codec), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write {codec} video here (no FFmpeg backend)")
    rng = np.random.default_rng(seed)
    try:
        for i in range(n_frames):
            writer.write(render_frame(rng, (h, w), any(a <= i < b for a, b in defects), kinds))
    finally:
        writer.release()
    return path


PASTE_MIN_CONTRAST = 30.0  # mean |pasted - covered| per channel, grey levels: a paste that shows
PASTE_TRIES = 20


def plant_on_frame(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defect drawn into a copy of any BGR frame (no part geometry needed): a scratch, a stain or
    a pasted patch of the frame itself (as the cut-and-paste self-supervised methods paint), in a colour that
    contrasts with the spot it lands on.
    Returns (frame, mask 0/255). Used where a retrain has no labelled defects to compare models on.

    A pasted patch must differ from what it covers by ``PASTE_MIN_CONTRAST`` grey levels on average: brushed
    metal turned by 180 degrees, or background pasted on background, is no defect at all, and counting it as a
    miss made champion/challenger comparisons turn on label noise. Without such a patch it becomes a stain."""
    out = image.astype(np.float32).copy()
    h, w = image.shape[:2]
    s = min(h, w)
    mask = np.zeros((h, w), np.uint8)
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    kind = int(rng.integers(3))
    if kind == 2:  # a rotated patch of another part of the frame pasted here
        side = max(6, int(rng.uniform(0.1, 0.18) * s))
        x0, y0 = int(np.clip(cx - side / 2, 0, w - side)), int(np.clip(cy - side / 2, 0, h - side))
        covered = out[y0:y0 + side, x0:x0 + side]
        for _ in range(PASTE_TRIES):
            sx, sy = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            patch = np.rot90(out[sy:sy + side, sx:sx + side], int(rng.integers(1, 4)))
            if float(np.abs(patch - covered).mean()) >= PASTE_MIN_CONTRAST:
                out[y0:y0 + side, x0:x0 + side] = patch.copy()
                mask[y0:y0 + side, x0:x0 + side] = 255
                return np.clip(out, 0, 255).round().astype(np.uint8), mask
        kind = 1  # a uniform frame: nothing to paste that would show
    if kind == 0:  # scratch: a thin bent line
        ang, length = rng.uniform(0, math.pi), rng.uniform(0.2, 0.35) * s
        pts = [(cx + t * math.cos(ang) + rng.normal(0, 0.01 * s), cy + t * math.sin(ang) + rng.normal(0, 0.01 * s))
               for t in np.linspace(-length / 2, length / 2, 7)]
        cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 255, max(2, round(s / 60)),
                      cv2.LINE_AA)
    else:  # stain: a soft-edged blob
        axes = (max(3, int(rng.uniform(0.04, 0.09) * s)), max(3, int(rng.uniform(0.03, 0.07) * s)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    local = out[mask > 0].mean(axis=0) if mask.any() else np.full(3, 128.0)
    colour = np.float32(25.0 if float(local.mean()) > 127 else 235.0)
    alpha = (cv2.GaussianBlur(mask, (0, 0), 0.8).astype(np.float32) / 255)[..., None]
    blended = out * (1 - alpha) + colour * alpha
    return np.clip(blended, 0, 255).round().astype(np.uint8), mask
