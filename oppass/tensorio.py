"""Reading the values of an in-memory TensorProto, refusing data that does not fill its dims."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from oppass.errors import OppassError


def to_array(tensor: onnx.TensorProto, what: str = "tensor", raw: bytes | None = None) -> np.ndarray:
    """`numpy_helper.to_array(tensor)`, after checking that its raw or typed data holds exactly prod(dims) values.

    `what` names the tensor in errors (e.g. "packed tensor"). External data must have been
    loaded (`modelio.load_model` does): it is never read here, relative to any folder. `raw`: the
    bytes of an external tensor read by the caller (`ModelFile.tensor_bytes`), checked and viewed
    (read-only, not copied) in its place.
    """
    name = repr(tensor.name)
    if raw is None and tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise OppassError(f"{what} {name} keeps its data in an external file that was not loaded")
    if tensor.HasField("segment"):
        raise OppassError(f"{what} {name} is stored in segments, which are not supported")
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        field = helper.tensor_dtype_to_field(tensor.data_type)
    except KeyError:
        raise OppassError(f"{what} {name} has unknown data type {tensor.data_type}") from None
    if any(dim < 0 for dim in tensor.dims):
        raise OppassError(f"{what} {name} has negative dims {list(tensor.dims)}")
    count = math.prod(tensor.dims)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise OppassError(f"{what} {name} has {len(raw)} bytes of data, expected "
                              f"{count * dtype.itemsize} for {dtype} {list(tensor.dims)}")
        return np.frombuffer(raw, dtype.newbyteorder("<")).reshape(tuple(tensor.dims))
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != count * dtype.itemsize:
            raise OppassError(f"{what} {name} has {len(tensor.raw_data)} bytes of data, expected "
                              f"{count * dtype.itemsize} for {dtype} {list(tensor.dims)}")
    elif len(getattr(tensor, field)) != count:
        raise OppassError(f"{what} {name} holds {len(getattr(tensor, field))} values, expected {count} for "
                          f"{list(tensor.dims)}")
    return numpy_helper.to_array(tensor)
