"""Reading and writing ONNX model files: external data, the 2 GB protobuf limit, atomic saves.

Neither direction holds the weights twice. Reading parses the model without the bytes of
its large main-graph initializers, which become ordinary ONNX external data pointing into
the model's own file, then reads each of those on its own; `read_model(..., defer=True)`
leaves them in the file until asked (`ModelFile`). Writing serialises the model without
its main-graph initializers and streams each one's bytes into the file. `lazy_copy` does
in memory what `defer=True` does on disk.

- `wire`: the protobuf wire format (fields of serialised bytes, on disk or in memory);
- `fields`: field-by-field copies of messages, the model's tensors and graphs, `LazyCopy`;
- `reader`: `read_model`, `ModelFile`, and the checks on external data;
- `writer`: `save_model`, streamed and atomic, with external data when needed;
- `produced`: placeholders whose bytes are produced while the model is saved (`ProducingModelFile`).

Only `reader` and `writer` use onnx's serialisation internals.
"""

from oppass.modelio.fields import LazyCopy, all_graphs, all_tensors, lazy_copy
from oppass.modelio.produced import (
    Producer,
    ProducingModelFile,
    add_placeholder,
    fill_placeholder,
    is_placeholder,
)
from oppass.modelio.reader import ModelFile, is_protobuf_file, load_model, read_model
from oppass.modelio.writer import PROTOBUF_LIMIT, check_destination, save_model

__all__ = [
    "PROTOBUF_LIMIT",
    "LazyCopy",
    "ModelFile",
    "Producer",
    "ProducingModelFile",
    "add_placeholder",
    "all_graphs",
    "all_tensors",
    "check_destination",
    "fill_placeholder",
    "is_placeholder",
    "is_protobuf_file",
    "lazy_copy",
    "load_model",
    "read_model",
    "save_model",
]
