"""Image questions: open an image from any source and preprocess it exactly as the official path does.

The official Mini-Omni2 code gives CLIP's standard 224 px transform a `PIL.Image.open(path)` with no
conversion (docs/model.md §7): resize the short side to 224 (bicubic, in the image's own mode), centre-crop
224 x 224, only then convert to RGB, scale to [0, 1] and normalise. The same PIL calls in the same
order give the same pixels; torchvision is not needed (nor usable next to the CPU torch).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageInputError

IMAGE_SIZE = 224  # CLIP ViT-B/32 input side, pixels
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per RGB channel, of pixels scaled to [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Beyond this many source pixels an image is shrunk before the official resize, so a huge file never
# holds memory in proportion to its size. 50 MP keeps every common camera photo on the exact path.
MAX_SOURCE_PIXELS = 50_000_000
# The most pixels decoded at full size, read from the header before any decoding (after a JPEG's draft,
# which decodes at 1/2, 1/4 or 1/8 scale): other formats cannot shrink while decoding, so a larger one is
# refused instead of costing memory in proportion to its pixels (a 161 KB PNG of 144 MP would take 172 MB).
MAX_DECODED_PIXELS = 64_000_000
# A longer side beyond this multiple of the short side is cropped away first (the official resize
# would make a 224 x (224 * ratio) intermediate; the centre crop keeps only the middle anyway).
MAX_ASPECT = 16

ImageSource = str | Path | bytes | np.ndarray | Image.Image


def open_image(source: ImageSource) -> Image.Image:
    """A decoded PIL image from a path, the bytes of an image file, a PIL image or an `(H, W[, 3|4])`
    uint8 array. Huge or extremely long images are reduced (see `MAX_SOURCE_PIXELS`, `MAX_ASPECT`)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(bytes(source)), "the image bytes")
    elif isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"image file not found: {source}")
        image = _open(source, str(source))
    else:
        raise TypeError(f"image must be a path, bytes, a PIL image or a uint8 array, got {type(source).__name__}")
    return _limit_aspect(image)


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageInputError(f"an image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); "
                         f"got {array.dtype} {array.shape}")
    if min(array.shape[:2]) == 0:
        raise ImageInputError(f"the image array is empty: {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _open(file: str | Path | io.BytesIO, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # our own limit below replaces PIL's size warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
            if image.width * image.height > MAX_SOURCE_PIXELS:
                _shrink_while_decoding(image)
            if image.width * image.height > MAX_DECODED_PIXELS:
                raise ImageInputError(f"{what} is {image.width} x {image.height} pixels; at most "
                                      f"{MAX_DECODED_PIXELS} pixels are decoded (MAX_DECODED_PIXELS): shrink it")
            image.load()
    except ImageInputError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{what} is too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageInputError(f"{what} is not an image PIL can read (JPEG, PNG, WebP, BMP, GIF, ...)") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated or corrupt data
        raise ImageInputError(f"{what} is corrupt or truncated ({e})") from e
    if image.width * image.height > MAX_SOURCE_PIXELS:
        factor = int(np.ceil(np.sqrt(image.width * image.height / MAX_SOURCE_PIXELS)))
        image = image.reduce(factor)
    return image


def _shrink_while_decoding(image: Image.Image) -> None:
    """JPEG decoders can scale by 1/2, 1/4 or 1/8 as they decode: ask for the smallest that stays
    at or above the pixel limit's share (other formats are reduced after decoding)."""
    scale = np.sqrt(MAX_SOURCE_PIXELS / (image.width * image.height))
    image.draft(image.mode, (int(image.width * scale), int(image.height * scale)))


def _limit_aspect(image: Image.Image) -> Image.Image:
    short, long = sorted(image.size)
    if long <= MAX_ASPECT * short:
        return image
    keep = MAX_ASPECT * short
    left, top = ((image.width - keep) // 2, 0) if image.width > image.height else (0, (image.height - keep) // 2)
    return image.crop((left, top, left + min(keep, image.width), top + min(keep, image.height)))


def resized_size(width: int, height: int) -> tuple[int, int]:
    """torchvision's `Resize(224)`: the short side becomes 224, the long one `int(224 * long / short)`."""
    short, long = min(width, height), max(width, height)
    long_out = int(IMAGE_SIZE * long / short)
    return (IMAGE_SIZE, long_out) if width <= height else (long_out, IMAGE_SIZE)


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision's `CenterCrop(224)` box, offsets rounded with Python's round (half to even)."""
    left = int(round((width - IMAGE_SIZE) / 2))
    top = int(round((height - IMAGE_SIZE) / 2))
    return left, top, left + IMAGE_SIZE, top + IMAGE_SIZE


def fit_image(image: Image.Image) -> Image.Image:
    """CLIP's `Resize(224, bicubic)` then `CenterCrop(224)`, in the image's own mode: the 224 px square."""
    size = resized_size(*image.size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image.crop(crop_box(*size))


def preprocess(image: Image.Image) -> torch.Tensor:
    """CLIP's 224 px transform, as the official path runs it: `(3, 224, 224)` float32."""
    image = fit_image(image).convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return pixels.sub(mean).div(std)


def load_image(source: ImageSource) -> torch.Tensor:
    """`open_image` then `preprocess`: the `(3, 224, 224)` CLIP input of any image source."""
    return preprocess(open_image(source))
