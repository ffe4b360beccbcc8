"""Train the bundled example CNN on scikit-learn's digits and export it to ONNX.

Run with an interpreter that has torch, scikit-learn and onnxruntime (torch is a tool
dependency only, never imported by the oppass package):

    python tools/train_digits_cnn.py --out oppass/examples

Data: `sklearn.datasets.load_digits` (1797 real 8x8 handwritten digits, pixel values
0..16). Split: `train_test_split(test_size=0.25, stratify=labels, random_state=0)`.
Normalisation: pixels / 16, giving float32 in [0, 1], shaped [N, 1, 8, 8].
Training is reproducible: fixed torch seed, deterministic algorithms, one CPU thread.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SPLIT_SEED = 0
TORCH_SEED = 0
TEST_FRACTION = 0.25
PIXEL_MAX = 16.0
EPOCHS = 40
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
OPSET = 17
MIN_TEST_ACCURACY = 0.97


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train inputs, train labels, test inputs, test labels); inputs float32 [n,1,8,8] in [0,1]."""
    digits = load_digits()
    images = (digits.images / PIXEL_MAX).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return train_x, train_y, test_x, test_y


def digits_cnn() -> nn.Sequential:
    """conv3x3(1->16)-relu-conv3x3(16->32)-relu-maxpool2-flatten-linear(512->64)-relu-linear(64->10)."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, kernel_size=3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, kernel_size=3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, 10),
        )
    )


def train(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> None:
    """Adam on cross-entropy with seeded mini-batch shuffling."""
    data = torch.utils.data.TensorDataset(torch.from_numpy(inputs), torch.from_numpy(labels))
    batches = torch.utils.data.DataLoader(
        data, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(TORCH_SEED)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        for batch_inputs, batch_labels in batches:
            optimizer.zero_grad()
            loss_function(model(batch_inputs), batch_labels).backward()
            optimizer.step()
    model.eval()


def torch_accuracy(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the torch model."""
    with torch.no_grad():
        predictions = model(torch.from_numpy(inputs)).argmax(dim=1).numpy()
    return float(np.mean(predictions == labels))


def onnx_accuracy(path: Path, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the exported model in onnxruntime."""
    session = ort.InferenceSession(str(path))
    (logits,) = session.run(["logits"], {"image": inputs})
    return float(np.mean(logits.argmax(axis=1) == labels))


def export(model: nn.Module, path: Path) -> None:
    """TorchScript ONNX export: opset 17, weights as initializers, dynamic batch."""
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        opset_version=OPSET,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        do_constant_folding=True,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def weight_count(path: Path) -> int:
    """Number of scalars in the model's initializers (weights and biases)."""
    return sum(int(np.prod(tensor.dims)) for tensor in onnx.load(str(path)).graph.initializer)


def main() -> None:
    """Trains the CNN, checks its accuracy and writes the model and test split to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "oppass" / "examples")
    args = parser.parse_args()
    torch.manual_seed(TORCH_SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    train_x, train_y, test_x, test_y = digits_split()
    model = digits_cnn()
    train(model, train_x, train_y)
    torch_acc = torch_accuracy(model, train_x, train_y), torch_accuracy(model, test_x, test_y)

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "digits_cnn.onnx"
    export(model, model_path)
    onnx_acc = onnx_accuracy(model_path, test_x, test_y)
    if onnx_acc < MIN_TEST_ACCURACY:
        raise SystemExit(f"test accuracy {onnx_acc:.4f} in onnxruntime is below {MIN_TEST_ACCURACY}")
    np.savez_compressed(args.out / "digits_test.npz", inputs=test_x, labels=test_y)

    print(f"train/test samples: {len(train_y)}/{len(test_y)}")
    print(f"torch accuracy: train {torch_acc[0]:.4f}, test {torch_acc[1]:.4f}")
    print(f"onnxruntime test accuracy: {onnx_acc:.4f} ({round(onnx_acc * len(test_y))}/{len(test_y)})")
    print(f"weights (initializer scalars): {weight_count(model_path)}")
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes) and {args.out / 'digits_test.npz'}")


if __name__ == "__main__":
    main()
