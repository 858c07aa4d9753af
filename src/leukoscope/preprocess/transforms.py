"""The preprocessing a model expects (resize, denoise, stain normalisation, normalise) and training augmentation.

:class:`Preprocess` is saved in every model directory so that prediction prepares an image exactly as training did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from leukoscope.preprocess.stain import apply_stain, hed_jitter

DENOISE_METHODS = ("none", "median", "bilateral", "nlm")
CROP_MODES = ("none", "cutout")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes the network's input.

    Attributes:
        size: side of the square input in pixels.
        mean, std: per-channel normalisation of [0, 1] values (the backbone's own).
        denoise: ``none``, ``median``, ``bilateral`` or ``nlm`` (non-local means).
        stain: fitted stain normaliser (see :mod:`leukoscope.preprocess.stain`), or None.
        crop: ``none``, or ``cutout``: an image of one cell cut out onto black (C-NMC 2019) is first cropped to the
            square around its cell (:func:`leukoscope.preprocess.background.cutout_frame`), so that the network sees
            the cell and not the black surround; other images are left whole.
    """

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    denoise: str = "none"
    stain: dict | None = None
    crop: str = "none"

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"Unknown crop {self.crop!r}. Available: {list(CROP_MODES)}")
        if self.denoise not in DENOISE_METHODS:
            raise ValueError(f"Unknown denoise method {self.denoise!r}. Available: {list(DENOISE_METHODS)}")
        if self.size < 16:
            raise ValueError(f"input size must be at least 16 pixels, got {self.size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.crop == "none":  # models (and stem caches) from before the option keep their keys
            del d["crop"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   denoise=d.get("denoise", "none"), stain=d.get("stain"), crop=d.get("crop", "none"))

    def frame(self, rgb: np.ndarray) -> tuple[int, int, int] | None:
        """The square ``(y0, x0, side)`` of ``rgb`` that :meth:`prepare` resizes, in the image's pixels (it may reach
        past the image, where it is black); None when the whole image is used."""
        if self.crop == "cutout":
            from leukoscope.preprocess.background import cutout_frame

            return cutout_frame(rgb)
        return None

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """Crop (see ``crop``), denoise and stain-normalise at the original resolution, then resize: uint8
        (size, size, 3)."""
        box = self.frame(rgb)
        img = rgb if box is None else crop_square(rgb, *box)
        img = denoise(img, self.denoise)
        if self.stain:
            img = apply_stain(img, self.stain)
        return resize(img, self.size)

    def to_input(self, heat: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """A map over ``rgb``'s pixels as a map over the prepared image (the inverse of :meth:`to_image`)."""
        box = self.frame(rgb)
        return cv2.resize(heat if box is None else crop_square(heat, *box), (self.size, self.size),
                          interpolation=cv2.INTER_AREA)

    def to_image(self, heat: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """A map over the prepared image (any square size) as a map over ``rgb``'s pixels: resized back, and 0 where
        a crop left the image out (the network never saw it)."""
        h, w = rgb.shape[:2]
        box = self.frame(rgb)
        if box is None:
            return cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR) if heat.shape != (h, w) else heat
        side = box[2]
        big = cv2.resize(heat, (side, side), interpolation=cv2.INTER_LINEAR) if heat.shape != (side, side) else heat
        out = np.zeros((h, w), heat.dtype)
        in_image, in_square = _overlap(*box, h, w)
        out[in_image] = big[in_square]
        return out

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (3, H, W) normalised."""
        # One OpenCV pass per channel (uint8 -> float32, scale, shift) straight into the planar output: 4x faster
        # than the NumPy expression (x / 255 - mean) / std over the interleaved image, equal to float rounding.
        out = np.empty((3, *rgb.shape[:2]), np.float32)
        for c, channel in enumerate(cv2.split(np.ascontiguousarray(rgb))):
            scale = 1.0 / (255.0 * self.std[c])
            out[c] = cv2.multiply(channel, 1.0, dtype=cv2.CV_32F)
            out[c] *= np.float32(scale)
            out[c] += np.float32(-self.mean[c] / self.std[c])
        return out

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.normalize(self.prepare(rgb))


def crop_square(rgb: np.ndarray, y0: int, x0: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` square of ``rgb`` at ``(y0, x0)``; black where it reaches past the image."""
    h, w = rgb.shape[:2]
    if y0 >= 0 and x0 >= 0 and y0 + side <= h and x0 + side <= w:
        return rgb[y0:y0 + side, x0:x0 + side]
    out = np.zeros((side, side, *rgb.shape[2:]), rgb.dtype)
    in_image, in_square = _overlap(y0, x0, side, h, w)
    out[in_square] = rgb[in_image]
    return out


def _overlap(y0: int, x0: int, side: int, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where the square at ``(y0, x0)`` and an ``h`` x ``w`` image overlap: (rows, cols) in the image's pixels and
    in the square's."""
    ys, xs = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
    return (ys, xs), (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    shrink = rgb.shape[0] > size or rgb.shape[1] > size
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def denoise(rgb: np.ndarray, method: str) -> np.ndarray:
    if method == "none":
        return rgb
    if method == "median":
        return cv2.medianBlur(rgb, 3)
    if method == "bilateral":
        return cv2.bilateralFilter(rgb, 5, 40, 5)
    if method == "nlm":
        return cv2.fastNlMeansDenoisingColored(rgb, None, 5, 5, 7, 21)
    raise ValueError(f"Unknown denoise method {method!r}. Available: {list(DENOISE_METHODS)}")


@dataclass(frozen=True)
class Augment:
    """Training augmentation on the prepared (resized) uint8 image. Every field 0 / False switches that part off."""

    rotate: float = 180.0  # max degrees; cells have no up
    flip: bool = True
    scale: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.03
    stain_jitter: float = 0.03
    background: float = 0.0  # probability of replacing a black surround with a smear-like one (preprocess/background)
    # Rotate and scale a cell on black (preprocess.background.is_cutout_view) over black, not reflecting its edges:
    # a tight crop's edges hold the cell, whose mirror images would appear in the corners. Left out of the repr (and
    # so of old stem-cache keys); train.stem_cache.stem_key adds it when set.
    cutout_fill: bool = field(default=False, repr=False)

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator, keep_background: bool = False) -> np.ndarray:
        """An augmented copy of ``rgb``. ``keep_background`` makes the same view (same draws) without replacing a
        black surround, e.g. to find the cell in it."""
        img = rgb
        border = cv2.BORDER_REFLECT_101
        if self.cutout_fill:
            from leukoscope.preprocess.background import is_cutout_view

            if is_cutout_view(rgb):
                border = cv2.BORDER_CONSTANT
        if self.background:  # no draw at 0: the views stay as they were before this option
            replace, seed = rng.random() < self.background, int(rng.integers(2**31))
            if replace and not keep_background:
                from leukoscope.preprocess.background import replace_background

                img = replace_background(img, np.random.default_rng(seed))
        if self.stain_jitter > 0:
            img = hed_jitter(img, rng, self.stain_jitter)
        h, w = img.shape[:2]
        angle = rng.uniform(-self.rotate, self.rotate) if self.rotate else 0.0
        s = rng.uniform(*self.scale) if self.scale else 1.0
        if angle or s != 1.0:
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, s)
            img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)
        if self.flip:
            if rng.random() < 0.5:
                img = img[:, ::-1]
            if rng.random() < 0.5:
                img = img[::-1]
        img = np.ascontiguousarray(img)
        if self.brightness or self.contrast or self.saturation or self.hue:
            img = _colour_jitter(img, rng, self.brightness, self.contrast, self.saturation, self.hue)
        return img


def _colour_jitter(img: np.ndarray, rng: np.random.Generator, b: float, c: float, s: float, h: float) -> np.ndarray:
    x = img.astype(np.float32)
    if b:
        x = x * rng.uniform(1 - b, 1 + b)
    if c:
        mean = x.mean()
        x = (x - mean) * rng.uniform(1 - c, 1 + c) + mean
    x = np.clip(x, 0, 255).astype(np.uint8)
    if s or h:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV).astype(np.float32)
        if h:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-h, h) * 180) % 180
        if s:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - s, 1 + s), 0, 255)
        x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return x
