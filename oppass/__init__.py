"""oppass: Opportunistic Parity protection of ONNX model weights."""

__version__ = "0.1.0"
