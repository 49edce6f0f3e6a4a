"""Image folders: PNG and JPEG files found recursively, decoded with Pillow.

Every image is converted to grey (``L``) or RGB, resized so its shorter side is
``model.image_size`` (Pillow's antialiased bicubic filter) and centre-cropped to a
square, as guided-diffusion's ``center_crop_arr`` does. When every image lies inside
a first-level subfolder, the sorted subfolder names are the classes and give labels.

Files that cannot be used -- zero bytes, not an image, truncated, or a pixel mode
without a faithful 8-bit conversion (16-bit, 32-bit integer, float) -- are skipped,
counted and reported in ONE warning per load.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np

from ipu_diffusion._keras import keras
from ipu_diffusion.data.common import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Pillow modes that convert faithfully to 8-bit L/RGB. Others ("I", "I;16", "F", ...)
#: hold more than 8 bits per sample and Pillow would clip them: skipped.
MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
#: Example paths quoted in the skipped-files warning.
MAX_EXAMPLES = 3


def find_images(root: str) -> List[str]:
    """All PNG/JPEG paths under ``root``, recursively, in sorted (deterministic) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return found


def class_of(path: str, root: str) -> Optional[str]:
    """The first-level subfolder of ``path`` below ``root``, or None if directly in it."""
    parts = os.path.relpath(path, root).split(os.sep)
    return parts[0] if len(parts) > 1 else None


def _fit(img, size: int):
    """Resize the shorter side to ``size`` (bicubic, antialiased), then centre-crop."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_image(path: str, size: int, channels: int) -> Tuple[Optional[np.ndarray], str]:
    """Decode one file to uint8 ``[size, size, channels]``; on failure ``(None, reason)``."""
    from PIL import Image

    if os.path.getsize(path) == 0:
        return None, "zero bytes"
    try:
        with Image.open(path) as img:
            img.load()  # decodes everything: raises on truncated data
            if img.mode not in MODES:
                return None, f"unsupported pixel mode {img.mode}"
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")  # resolve the palette (and its transparency)
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(_fit(img, size), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # Pillow signals unreadable or truncated files with OSError (UnidentifiedImageError
        # is one) and some broken PNG chunks with SyntaxError.
        text = str(e).lower()
        cut = "truncated" in text or "broken data stream" in text
        reason = "truncated" if cut else "unreadable"
        return None, f"{reason} ({type(e).__name__}: {e})"
    return (arr[..., None] if arr.ndim == 2 else arr), ""


def _warn_skipped(root: str, skipped: List[Tuple[str, str]]) -> None:
    reasons: Dict[str, int] = {}
    for _, why in skipped:
        key = why.split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    examples = "; ".join(f"{p} [{why}]" for p, why in skipped[:MAX_EXAMPLES])
    more = " ..." if len(skipped) > MAX_EXAMPLES else ""
    warnings.warn(f"data.path {root!r}: skipped {len(skipped)} unusable image file(s) "
                  f"({summary}), e.g. {examples}{more}", UserWarning, stacklevel=3)


def load_folder(root: str, size: int, channels: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """All usable images under ``root`` as uint8 ``[N, size, size, channels]`` and int32
    labels ``[N]`` (sorted first-level subfolder names; None when any image lies
    directly in ``root``)."""
    if not root:
        raise DataError("data.path is empty; data.source 'folder' needs the image folder")
    if not os.path.isdir(root):
        raise DataError(f"data.path {root!r} is not a directory (data.source 'folder')")
    paths = find_images(root)
    if not paths:
        raise DataError(f"data.path {root!r} holds no image files "
                        f"(searched recursively for {', '.join(EXTENSIONS)})")
    images, kept, skipped = [], [], []
    bar = keras.utils.Progbar(len(paths), unit_name="file")
    for i, path in enumerate(paths):
        arr, why = read_image(path, size, channels)
        if arr is None:
            skipped.append((path, why))
        else:
            images.append(arr)
            kept.append(path)
        bar.update(i + 1)
    if skipped:
        _warn_skipped(root, skipped)
    if not images:
        raise DataError(f"data.path {root!r}: none of the {len(paths)} image files could be "
                        f"read (e.g. {skipped[0][0]}: {skipped[0][1]})")
    return np.stack(images), _labels(kept, root)


def _labels(paths: List[str], root: str) -> Optional[np.ndarray]:
    classes = [class_of(p, root) for p in paths]
    if any(c is None for c in classes):
        return None
    names = sorted(set(classes))
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[c] for c in classes], np.int32)
