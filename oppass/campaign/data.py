"""Evaluation data: the bundled digits split, `.npz` arrays or an ImageNet-style image folder, fitted to a model.

A data set is opened against the model's inputs (`ModelInput`): a `.npz` holds one array per
input, named after it (a one-input model also takes `inputs` or `x`), and optional integer
labels (`labels` or `y`). An array whose first axis is the sample axis is cut into batches;
any other array is fed unchanged to every run. Arrays are cast to the model's element type
(with a note) when numpy casts them within their kind (float64 -> float32, say).

Models run in one of two modes (`batched`): a model whose inputs take a dynamic first axis
gets a whole batch per run, the samples stacked along it; a model with a fixed batch of one
(or whose data holds samples with the model's full shape) runs once per sample, and its
outputs are stacked along a new first axis. Either way a batch's output has the sample axis
first.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from oppass import files
from oppass.errors import OppassError

if TYPE_CHECKING:
    import onnx

DIGITS = "digits"
DIGITS_FILE = Path(__file__).resolve().parents[1] / "examples" / "digits_test.npz"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
INPUT_ALIASES = ("inputs", "x")
LABEL_NAMES = ("labels", "y")
# ImageNet preset (torchvision's): resize the shorter side to 256/224 of the crop, center crop, normalise.
CROP = 224
RESIZE_RATIO = 256 / 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
NUMERIC_KINDS = "biuf"  # numpy dtype kinds a model input can be: bool, integers, floats
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

Dims = tuple[int | None, ...]


@dataclass(frozen=True)
class ModelInput:
    """A graph input the data must feed: name, numpy element type, shape (None: unknown rank; a None
    dimension: dynamic)."""

    name: str
    dtype: np.dtype
    shape: Dims | None

    def describe(self) -> str:
        """E.g. `'x' float32 [N, 3, 224, 224]` (N for a dynamic dimension)."""
        dims = "?" if self.shape is None else "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name!r} {self.dtype} {dims}"

    @property
    def dynamic_batch(self) -> bool:
        """Whether the first axis is dynamic (or the shape unknown), so that it can carry a batch."""
        return self.shape is None or not self.shape or self.shape[0] is None


class Dataset(Protocol):
    """Samples addressed by index, with optional integer labels, shaped for one model."""

    @property
    def size(self) -> int:
        """Number of samples."""
        ...

    @property
    def labels(self) -> np.ndarray | None:
        """Integer labels per sample ([N] or [N, positions...]), if the data has labels."""
        ...

    @property
    def identity(self) -> str:
        """What identifies the samples in a campaign's identity."""
        ...

    @property
    def batched(self) -> bool:
        """Whether a run takes a whole batch (else one run per sample)."""
        ...

    @property
    def notes(self) -> list[str]:
        """What was adapted to fit the model (casts, crop size)."""
        ...

    @property
    def description(self) -> str:
        """One line for the report: source, samples, labels, arrays and their shapes."""
        ...

    def feeds(self, indices: np.ndarray) -> list[dict[str, np.ndarray]]:
        """The feeds of the samples at `indices`: one dict (one run) in batched mode, one per sample otherwise."""
        ...


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs held in memory: `samples` (sample axis first) and `shared` arrays, fed by input name."""

    samples: Mapping[str, np.ndarray]
    shared: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    identity: str
    batched: bool
    description: str
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of samples."""
        return int(next(iter(self.samples.values())).shape[0])

    def feeds(self, indices: np.ndarray) -> list[dict[str, np.ndarray]]:
        """One feed for the batch (batched) or one per sample, shared arrays in each."""
        if self.batched:
            return [{**self.shared, **{name: values[indices] for name, values in self.samples.items()}}]
        return [{**self.shared, **{name: values[index, ...] for name, values in self.samples.items()}}
                for index in indices]


class ImageFolderDataset:
    """`root/<class>/<image>` files; the class index is the sorted position of its folder name.

    Images are centre-cropped to the model's input height and width (224 x 224 when dynamic)
    after resizing the shorter side to 256/224 of the crop, and normalised with ImageNet's mean
    and standard deviation. They are decoded lazily with PIL and kept as uint8 crops, so a
    worker pays decoding once per sample.
    """

    def __init__(self, root: Path, model_input: ModelInput) -> None:
        classes = sorted(path for path in root.iterdir() if path.is_dir())
        found = [(image, label) for label, folder in enumerate(classes) for image in sorted(folder.iterdir())
                 if image.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise OppassError(f"{root} holds no images in class sub-folders (expected root/<class>/<image>.jpg)")
        self.crop = _crop_size(model_input)
        self.input_name = model_input.name
        self.dtype = model_input.dtype
        self.batched = model_input.dynamic_batch
        self.files = [image for image, _ in found]
        self.labels = np.array([label for _, label in found], dtype=np.int64)
        self.size = len(self.files)
        self.root = root
        crop = f"{self.crop[0]}x{self.crop[1]}"
        self._crop_text = crop
        self.notes = [] if self.crop == (CROP, CROP) else [f"images are centre-cropped to the model's {crop} input"]
        self.description = (f"image folder {root}: {self.size} images in {len(classes)} classes, resized and "
                            f"centre-cropped to {crop}, ImageNet mean/std, fed as {model_input.describe()}")
        self._crops: dict[int, np.ndarray] = {}

    @functools.cached_property
    def identity(self) -> str:
        """SHA-256 of each image's path under the root and of its bytes, and the crop (computed when first asked)."""
        digest = hashlib.sha256()
        for image in self.files:
            digest.update(f"{image.relative_to(self.root)}\0".encode())
            with image.open("rb") as stream:
                digest.update(hashlib.file_digest(stream, "sha256").digest())
        return f"images:{digest.hexdigest()}:{self._crop_text}"

    def feeds(self, indices: np.ndarray) -> list[dict[str, np.ndarray]]:
        """The normalised [N, 3, H, W] crops of the images at `indices` (one [1, 3, H, W] per run unbatched)."""
        crops = np.stack([self._crop(int(index)) for index in indices])
        images = ((crops.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2).astype(self.dtype)
        if self.batched:
            return [{self.input_name: images}]
        return [{self.input_name: image[None]} for image in images]

    def _crop(self, index: int) -> np.ndarray:
        if index not in self._crops:
            self._crops[index] = _center_crop(self.files[index], self.crop)
        return self._crops[index]


def open_dataset(source: str, inputs: Sequence[ModelInput], batched: bool | None = None) -> Dataset:
    """The data set named by `source` ("digits", a `.npz` file or an image folder) shaped for a model with
    `inputs`; `batched` False forces one run per sample (None: batched when the model allows)."""
    if source == DIGITS:
        dataset: Dataset = _npz_dataset(DIGITS_FILE, inputs, batched, "the bundled digits test split")
        return dataset
    path = Path(source)
    if path.is_dir():
        if len(inputs) != 1:
            raise OppassError(f"an image folder feeds one image input, but the model has {len(inputs)} inputs "
                              f"({', '.join(i.name for i in inputs)}): give a .npz with one array per input")
        folder = ImageFolderDataset(path, inputs[0])
        if batched is False:
            folder.batched = False
        return folder
    if path.suffix == ".npz" and path.exists():
        files.check_input(path, ".npz file")  # a FIFO or device is said to be one, and never opened
        return _npz_dataset(path, inputs, batched, str(path))
    raise OppassError(f"data {source!r} is neither 'digits', an existing .npz file nor an image folder")


def _npz_dataset(path: Path, inputs: Sequence[ModelInput], batched: bool | None, name: str) -> ArrayDataset:
    if not zipfile.is_zipfile(path):
        raise OppassError(f"{path} is not a .npz file (not a zip archive of arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise OppassError(f"{path} is not a .npz file of numeric arrays ({str(error).splitlines()[0][:200]})") \
            from None
    input_names = {i.name for i in inputs}
    label_key = next((key for key in LABEL_NAMES if key in arrays and key not in input_names), None)
    keys = {i.name: _key_for(i, arrays, inputs, path) for i in inputs}
    chosen = {name: arrays[key] for name, key in keys.items()}
    notes: list[str] = []
    labels = None
    if label_key is not None:
        labels = _labels(arrays[label_key], label_key, path)
    first = chosen[inputs[0].name]
    count = len(labels) if labels is not None else (int(first.shape[0]) if first.ndim else 0)
    if count == 0:
        raise OppassError(f"{path} holds no samples")
    samples, shared, one_by_one = {}, {}, []
    for model_input in inputs:
        values = _cast(chosen[model_input.name], model_input, notes)
        kind = _sample_kind(values, model_input, count)
        if kind == "shared":
            if model_input is inputs[0]:
                raise OppassError(_no_sample_axis(path, model_input, values, count))
            shared[model_input.name] = values
            continue
        _check_sample_shape(values, model_input, kind, path)
        samples[model_input.name] = values
        if kind != "batch":
            one_by_one.append((model_input.name, kind))
    if batched is None:
        batched = not one_by_one
    if not batched:  # every per-sample array gets the model's full shape per sample
        kinds = dict(one_by_one)
        samples = {key: (values if kinds.get(key) == "whole" else values[:, None]) for key, values in samples.items()}
    unused = sorted(set(arrays) - set(keys.values()) - {label_key})
    if unused:
        notes.append(f"{path.name}: arrays {', '.join(unused)} are not model inputs: ignored")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    wanted = {i.name: i for i in inputs}
    described = ", ".join(
        f"{key} {list(chosen[name].shape)} {chosen[name].dtype}"
        + (f" for input {name!r}" if key != name else "")
        + (f" (cast to {wanted[name].dtype})" if chosen[name].dtype != wanted[name].dtype else "")
        for name, key in keys.items()
    )
    description = (f"{name}: {count} samples, {'labels ' + repr(label_key) if labels is not None else 'no labels'}; "
                   f"{described}" + (f"; fed unchanged: {', '.join(shared)}" if shared else "")
                   + ("" if batched else "; one run per sample"))
    return ArrayDataset(samples, shared, labels, f"npz:{digest}", batched, description, notes)


def _key_for(model_input: ModelInput, arrays: Mapping[str, np.ndarray], inputs: Sequence[ModelInput],
             path: Path) -> str:
    """The array feeding `model_input`: the one of its name, or (one-input models) `inputs` or `x`."""
    if model_input.name in arrays:
        return model_input.name
    if len(inputs) == 1:
        alias = next((key for key in INPUT_ALIASES if key in arrays), None)
        if alias is not None:
            return alias
    found = ", ".join(f"{key} {list(values.shape)}" for key, values in arrays.items()) or "no arrays"
    wanted = ", ".join(repr(i.name) for i in inputs) + (f" (or {' or '.join(map(repr, INPUT_ALIASES))})"
                                                        if len(inputs) == 1 else "")
    raise OppassError(f"{path} has no array for the model input {model_input.name!r}: it holds {found}; expected "
                      f"{wanted}, and optionally integer labels as {' or '.join(map(repr, LABEL_NAMES))}")


def _labels(values: np.ndarray, key: str, path: Path) -> np.ndarray:
    if values.ndim == 0 or values.dtype.kind not in "biuf" or (
            values.dtype.kind == "f" and not np.array_equal(values, np.round(values))):
        raise OppassError(f"{path}: labels {key!r} must be integers with one entry per sample, got "
                          f"{list(values.shape)} {values.dtype}")
    if values.size and values.min() < 0:
        raise OppassError(f"{path}: labels {key!r} must be class indices (>= 0), got {values.min()}")
    return values.astype(np.int64)


def _cast(values: np.ndarray, model_input: ModelInput, notes: list[str]) -> np.ndarray:
    if values.dtype == model_input.dtype:
        return values
    if not np.can_cast(values.dtype, model_input.dtype, "same_kind"):
        raise OppassError(f"the model input {model_input.describe()} cannot take the data's {values.dtype} array: "
                          f"store it as {model_input.dtype}")
    notes.append(f"the data's {values.dtype} array for input {model_input.name!r} is cast to the model's "
                 f"{model_input.dtype}")
    return values.astype(model_input.dtype)


def _sample_kind(values: np.ndarray, model_input: ModelInput, count: int) -> str:
    """"batch": sample axis first, the model batches it; "single": sample axis first, the model takes one
    sample per run along its first axis; "whole": each entry along axis 0 is a full model input; "shared"."""
    if values.ndim == 0 or values.shape[0] != count:
        return "shared"
    shape = model_input.shape
    if shape is None:
        return "batch"
    if values.ndim == len(shape) + 1:
        return "whole"
    if values.ndim == len(shape) and shape:
        if shape[0] is None:
            return "batch"
        if shape[0] == 1 and count != 1:
            return "single"
    return "shared"


def _check_sample_shape(values: np.ndarray, model_input: ModelInput, kind: str, path: Path) -> None:
    """Refuses samples whose fixed dimensions differ from the model input's."""
    if model_input.shape is None:
        return
    per_run = values.shape[1:] if kind == "whole" else (None, *values.shape[1:])
    expected = model_input.shape if kind == "whole" else (None, *model_input.shape[1:])
    if len(per_run) != len(expected) or any(e is not None and e != got for e, got in zip(expected, per_run,
                                                                                           strict=True)):
        raise OppassError(f"the model input {model_input.describe()} does not fit the data: {path.name} holds "
                          f"{values.shape[0]} samples of {list(values.shape[1:])}")


def _no_sample_axis(path: Path, model_input: ModelInput, values: np.ndarray, count: int) -> str:
    return (f"{path.name}: the array for input {model_input.name!r} ({list(values.shape)}) has no sample axis of "
            f"{count} (the labels' length) in front; stack the samples along axis 0")


def _crop_size(model_input: ModelInput) -> tuple[int, int]:
    shape = model_input.shape
    if shape is None or len(shape) != 4 or shape[1] not in (3, None):
        raise OppassError(f"an image folder feeds [N, 3, H, W] ImageNet-normalised crops, but the model input is "
                          f"{model_input.describe()}: give a .npz of ready inputs instead")
    height, width = shape[2] or CROP, shape[3] or CROP
    return int(height), int(width)


def _center_crop(path: Path, crop: tuple[int, int]) -> np.ndarray:
    """RGB uint8 [H, W, 3]: shorter side resized to 256/224 of the crop's larger side (bilinear), center-cropped."""
    try:
        from PIL import Image
    except ImportError:
        raise OppassError("image folders need Pillow: pip install pillow") from None
    height, width = crop
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises on a damaged or unknown image
        raise OppassError(f"image {path} cannot be read ({str(error).splitlines()[0][:200]}): remove or replace it") \
            from None
    scale = round(max(crop) * RESIZE_RATIO) / min(rgb.size)
    resized = rgb.resize((max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale))),
                         Image.Resampling.BILINEAR)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """The inputs of a model that the data must feed (graph inputs without an initializer)."""
    from onnx import helper

    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    found = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape: Dims | None = None
        if tensor_type.HasField("shape"):
            shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
                          for dim in tensor_type.shape.dim)
        found.append(ModelInput(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), shape))
    if not found:
        raise OppassError("the model has no inputs to feed")
    return found
