"""Image preprocessing: decode + resize once into a tensor, normalise, and augment per batch on tensors."""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from taoke.errors import DataError, FormatError
from taoke.recipe import Augment


_PILLOW_ERRORS = (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning,
                  ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError)


def _decode(path, size: int | None, channels: int | None) -> np.ndarray:
    with warnings.catch_warnings():
        # past Pillow's warning size (~89M pixels) an image is refused, not decoded into gigabytes
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB") if channels else \
                (im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
            if size:
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0


def load_images(items, size: int | None, channels: int | None) -> torch.Tensor:
    """Decode images (file paths or HxW / HxWxC arrays) into a float tensor N x C x H x W in [0, 1]."""
    arrays = []
    for item in items:
        if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
            try:
                arr = _decode(item, size, channels)
            except _PILLOW_ERRORS as e:  # Pillow reports a corrupt file with any of these, depending on the codec
                raise FormatError(f"{item}: unreadable image ({e.__class__.__name__}: {str(e)[:100]}). Remove or "
                                  "replace the file.") from None
        else:
            arr = np.asarray(item, dtype=np.float32)
            if size and arr.shape[0] != size:
                t = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1)[None]
                arr = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
                arr = arr.squeeze(-1) if arr.shape[-1] == 1 else arr
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if channels == 3 and arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        arrays.append(arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"images have different sizes {sorted(shapes)[:3]}; add '- resize: {{size: N}}' to preprocess.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def augment(batch: torch.Tensor, cfg: Augment, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip, shift (crop after padding) and small rotation for a whole batch in one grid_sample.

    Written with affine_grid rather than torchvision, which does not import beside the CPU torch here.
    """
    if not (cfg.flip or cfg.crop or cfg.rotate):
        return batch
    n, _, h, w = batch.shape
    dev = batch.device
    rand = lambda: torch.rand(n, generator=generator).to(dev)  # noqa: E731
    angle = (rand() * 2 - 1) * math.radians(cfg.rotate)
    sx = torch.where(rand() < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n, device=dev)
    tx = (rand() * 2 - 1) * (2 * cfg.crop / w)
    ty = (rand() * 2 - 1) * (2 * cfg.crop / h)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, padding_mode="zeros", align_corners=False)
