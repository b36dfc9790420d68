"""Reading one image file into uint8: PNG, JPEG, TIFF and BMP through Pillow, DICOM through pydicom.

Everything becomes 8-bit gray (H, W) or RGB (H, W, 3), as MedMNIST stores it:
- 16-bit integers (Pillow modes `I;16*` and `I`, uint16 arrays) become `round(v / 257)` clipped to
  [0, 255]: 65535 → 255, the top byte rounded, what an 8-bit viewer shows.
- Float images (TIFF mode `F`) are clipped to [0, 1] when their maximum is at most 1, else divided by
  their maximum; then ×255, rounded.
- DICOM applies RescaleSlope/RescaleIntercept, then maps the first WindowCenter/WindowWidth
  (c - w/2 … c + w/2) to [0, 255], or the image's own min … max when the file has no window;
  MONOCHROME1 is inverted (its 0 is white). A multi-frame file gives its first frame.
- Palette, RGBA, CMYK and the like become RGB (alpha dropped); 1-bit and LA become gray.
Resizing is MedMNIST's own: PIL bicubic straight to the square, without cropping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medkd.errors import MedkdError, first_line

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)
_DICOM_MAGIC = b"DICM"  # at byte 128, after the preamble
_GRAY_MODES = ("L", "1", "LA", "La")


@dataclass(frozen=True)
class DecodedImage:
    """A file's pixels as uint8, at its own size and channels, and how they were brought to 8 bits."""

    array: np.ndarray  # (H, W) gray or (H, W, 3) RGB
    depth: str  # "8-bit", "16-bit", "float" or "dicom"


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file's suffix is one medkd reads (hidden files never are)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def is_colour(array: np.ndarray) -> bool:
    """True for a 3-channel image whose channels are not all equal (a gray image saved as RGB is not)."""
    if array.ndim != 3 or array.shape[-1] != 3:
        return False
    return not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]))


def read_image(path: str | os.PathLike, channels: int | None, size: int | None) -> np.ndarray:
    """uint8 (H, W) for `channels` 1, (H, W, 3) for 3, the file's own for None; `size` px square if given."""
    array = to_channels(decode_image(path).array, channels)
    return resize_square(array, size) if size is not None else array


def decode_image(path: str | os.PathLike) -> DecodedImage:
    """The pixels of one image file as uint8 by the rules above; a one-line error if it cannot be read."""
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_magic(path):
            return DecodedImage(_read_dicom(path), "dicom")
        return _read_pillow(path)
    except MedkdError:
        raise
    except Exception as err:  # Pillow and pydicom raise many types for damaged or foreign files
        raise MedkdError(f"cannot read {path} as an image ({first_line(err)})") from err


def to_channels(array: np.ndarray, channels: int | None) -> np.ndarray:
    """Gray (H, W) for 1 (Pillow's "L" of colour), RGB (H, W, 3) for 3, unchanged for None."""
    if channels is None or (channels == 1 and array.ndim == 2) or (channels == 3 and array.ndim == 3):
        return array
    if channels == 3:
        return np.repeat(array[..., None], 3, axis=-1)
    if channels == 1:
        from PIL import Image

        return np.asarray(Image.fromarray(array).convert("L"))
    raise MedkdError(f"channels must be 1 or 3, not {channels}")


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """`array` at (size, size) by PIL bicubic (MedMNIST's resampling), unchanged when already that size."""
    if array.shape[:2] == (size, size):
        return array
    from PIL import Image

    resized = Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def _has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == _DICOM_MAGIC


def _read_pillow(path: Path) -> DecodedImage:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        if mode == "F":
            return DecodedImage(_float_to_uint8(np.asarray(image, dtype=np.float64)), "float")
        if mode.startswith("I"):
            return DecodedImage(_sixteen_to_uint8(np.asarray(image)), "16-bit")
        if mode not in ("L", "RGB"):
            image = image.convert("L" if mode in _GRAY_MODES else "RGB")
        return DecodedImage(np.array(image, dtype=np.uint8), "8-bit")


def _sixteen_to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.round(array.astype(np.float64) / 257), 0, 255).astype(np.uint8)


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    top = float(np.nanmax(array)) if array.size else 0.0
    scaled = np.clip(array, 0, 1) if top <= 1 else np.clip(array / top, 0, 1)
    return np.round(np.nan_to_num(scaled) * 255).astype(np.uint8)


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise MedkdError("reading DICOM needs pydicom: pip install 'medkd[dicom]'") from None
    ds = pydicom.dcmread(path, force=True)
    pixels = np.asarray(ds.pixel_array)
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if pixels.ndim == (4 if samples == 3 else 3):  # (frames, H, W[, 3])
        pixels = pixels[0]
    if samples == 3:  # colour DICOM (ultrasound, photographs): no window, 16 bits as everywhere else
        return pixels.astype(np.uint8) if pixels.dtype == np.uint8 else _sixteen_to_uint8(pixels)
    values = pixels.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
    values += float(getattr(ds, "RescaleIntercept", 0) or 0)
    low, high = _dicom_window(ds, values)
    # A constant image has no range: black.
    scaled = np.clip((values - low) / (high - low), 0, 1) if high > low else np.zeros_like(values)
    gray = np.round(scaled * 255).astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _dicom_window(ds, values: np.ndarray) -> tuple[float, float]:
    centre, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if centre is not None and width is not None:
        # Several windows (MultiValue) are alternatives; the first is the one the modality suggests.
        c = float(centre[0] if _is_multi(centre) else centre)
        w = float(width[0] if _is_multi(width) else width)
        if w > 0:
            return c - w / 2, c + w / 2
    return float(values.min()), float(values.max())


def _is_multi(value) -> bool:
    return not isinstance(value, str | bytes) and hasattr(value, "__len__")
