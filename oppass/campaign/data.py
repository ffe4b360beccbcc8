"""Evaluation data: the bundled digits split, `.npz` arrays or an ImageNet-style image folder."""

from __future__ import annotations

import functools
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from oppass import files
from oppass.errors import OppassError

DIGITS = "digits"
DIGITS_FILE = Path(__file__).resolve().parents[1] / "examples" / "digits_test.npz"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# ImageNet preset (torchvision's): resize the shorter side to 256, center crop 224, normalise.
RESIZE, CROP = 256, 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
NUMERIC_KINDS = "biuf"  # numpy dtype kinds a model input can be: bool, integers, floats
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class Dataset(Protocol):
    """Samples addressed by index, with optional integer labels."""

    @property
    def size(self) -> int:
        """Number of samples."""
        ...

    @property
    def labels(self) -> np.ndarray | None:
        """Integer label per sample, if the data has labels."""
        ...

    @property
    def identity(self) -> str:
        """What identifies the samples in a campaign's configuration."""
        ...

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        """The model inputs of the samples at `indices`, stacked along axis 0."""
        ...


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs and labels held in memory."""

    values: np.ndarray
    labels: np.ndarray | None
    identity: str

    @property
    def size(self) -> int:
        """Number of samples."""
        return int(self.values.shape[0])

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        """The stored inputs at `indices`."""
        return self.values[indices]


class ImageFolderDataset:
    """`root/<class>/<image>` files; the class index is the sorted position of its folder name.

    Images are decoded lazily with PIL and kept as uint8 crops, so a worker pays decoding
    once per sample and holds 150 KB (not 600 KB of float32) per 224 x 224 image.
    """

    def __init__(self, root: Path) -> None:
        classes = sorted(path for path in root.iterdir() if path.is_dir())
        files = [(image, label) for label, folder in enumerate(classes) for image in sorted(folder.iterdir())
                 if image.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise OppassError(f"{root} holds no images in class sub-folders (expected root/<class>/<image>.jpg)")
        self.files = [image for image, _ in files]
        self.labels = np.array([label for _, label in files], dtype=np.int64)
        self.size = len(self.files)
        self.root = root
        self._crops: dict[int, np.ndarray] = {}

    @functools.cached_property
    def identity(self) -> str:
        """SHA-256 of each image's path under the root and of its bytes (computed when first asked)."""
        digest = hashlib.sha256()
        for image in self.files:
            digest.update(f"{image.relative_to(self.root)}\0".encode())
            with image.open("rb") as stream:
                digest.update(hashlib.file_digest(stream, "sha256").digest())
        return f"images:{digest.hexdigest()}"

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        """The normalised [N, 3, CROP, CROP] float32 crops of the images at `indices`."""
        crops = np.stack([self._crop(int(index)) for index in indices])
        return ((crops.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2).copy()

    def _crop(self, index: int) -> np.ndarray:
        if index not in self._crops:
            self._crops[index] = _center_crop(self.files[index])
        return self._crops[index]


def open_dataset(source: str) -> Dataset:
    """The data set named by `source`: "digits", a `.npz` file or an image folder."""
    if source == DIGITS:
        return _npz_dataset(DIGITS_FILE)
    path = Path(source)
    if path.is_dir():
        return ImageFolderDataset(path)
    if path.suffix == ".npz" and path.exists():
        files.check_input(path, ".npz file")  # a FIFO or device is said to be one, and never opened
        return _npz_dataset(path)
    raise OppassError(f"data {source!r} is neither 'digits', an existing .npz file nor an image folder")


def _npz_dataset(path: Path) -> ArrayDataset:
    """The arrays `inputs` ([N, ...] numbers, N >= 1) and optional `labels` (N non-negative integers) of a .npz."""
    if not zipfile.is_zipfile(path):
        raise OppassError(f"{path} is not a .npz file (not a zip archive of arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "inputs" not in arrays:
                raise OppassError(f"{path} has no 'inputs' array")
            values = arrays["inputs"]
            labels = arrays["labels"] if "labels" in arrays else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise OppassError(f"{path} is not a .npz file of numeric arrays ({str(error).splitlines()[0][:200]})") \
            from None
    if values.dtype.kind not in NUMERIC_KINDS or values.ndim == 0 or values.shape[0] == 0:
        raise OppassError(f"{path}: 'inputs' must be a numeric array of shape [N, ...] with N >= 1, got "
                          f"{values.dtype} {list(values.shape)}")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (values.shape[0],):
            raise OppassError(f"{path}: 'labels' must hold one integer per input, got {labels.dtype} "
                              f"{list(labels.shape)} for {values.shape[0]} inputs")
        if labels.min() < 0:
            raise OppassError(f"{path}: 'labels' must be class indices (>= 0), got {labels.min()}")
        labels = labels.astype(np.int64)
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    return ArrayDataset(values, labels, f"npz:{digest}")


def _center_crop(path: Path) -> np.ndarray:
    """RGB uint8 [CROP, CROP, 3]: shorter side resized to RESIZE (bilinear), then center-cropped."""
    try:
        from PIL import Image
    except ImportError:
        raise OppassError("image folders need Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises on a damaged or unknown image
        raise OppassError(f"image {path} cannot be read ({str(error).splitlines()[0][:200]}): remove or replace it") \
            from None
    scale = RESIZE / min(rgb.size)
    resized = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BILINEAR)
    left, top = (resized.width - CROP) // 2, (resized.height - CROP) // 2
    return np.asarray(resized.crop((left, top, left + CROP, top + CROP)), dtype=np.uint8)
