"""Exports a GPT-2-shaped transformer (random weights, tied embeddings) to ONNX with torch.onnx.export.

    python tools/export_transformer.py --out model.onnx [--dtype fp32|fp16|bf16] [--no-folding]
        [--layers 2 --width 64 --heads 4 --vocab 128 --context 16] [--seed 0]

The network is GPT-2's: token and position embeddings, pre-LayerNorm blocks of causal
self-attention (one fused q/k/v projection) and a GELU MLP, a final LayerNorm, and a language
model head that shares the token embedding's weight. Input `tokens` [batch, context] (int64),
output `logits` [batch, context, vocab], batch dynamic. The weights are seeded random, in
`--dtype`. torch's TorchScript exporter writes the Linear layers as MatMul (3-d inputs) reading a
transposed weight: with constant folding (the default) the transpose is folded into a new
initializer (so the tied head gets a copy of the embedding); with `--no-folding` the MatMul reads
a Transpose node of the shared weight. Both are how exports come; tests/test_transformer.py
protects them. torch only here and in tests: never a dependency of oppass.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Block(nn.Module):
    """A GPT-2 block: x + attention(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)
        self.register_buffer("causal", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block applied to activations [batch, length, width]."""
        batch, length, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(width // self.heads)
        scores = scores.masked_fill(~self.causal[:length, :length], float("-inf"))
        attention = torch.softmax(scores.float(), dim=-1).to(x.dtype) @ v
        x = x + self.attn_proj(attention.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """Embeddings, blocks, final LayerNorm, and a head tied to the token embedding."""

    def __init__(self, layers: int, width: int, heads: int, vocab: int, context: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab] of token ids [batch, length]."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(layers: int, width: int, heads: int, vocab: int, context: int, dtype: str, seed: int) -> GPT:
    """The network with seeded random weights (GPT-2's initialisation scale), in eval mode and `dtype`."""
    torch.manual_seed(seed)
    model = GPT(layers, width, heads, vocab, context)
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1:
            nn.init.normal_(parameter, std=0.02)
        elif name.endswith("bias"):
            nn.init.normal_(parameter, std=0.01)
    return model.eval().to(DTYPES[dtype])


def export(model: GPT, path: Path, context: int, vocab: int, *, folding: bool) -> None:
    """TorchScript exporter (opset 17), batch dimension dynamic."""
    tokens = torch.randint(0, vocab, (2, context), generator=torch.Generator().manual_seed(1))
    torch.onnx.export(
        model, (tokens,), str(path), input_names=["tokens"], output_names=["logits"],
        dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        do_constant_folding=folding, dynamo=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Parses the arguments and writes the export."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the ONNX model")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight type (default: fp32)")
    parser.add_argument("--no-folding", action="store_true", help="keep the weights' Transpose nodes")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    model = build(arguments.layers, arguments.width, arguments.heads, arguments.vocab, arguments.context,
                  arguments.dtype, arguments.seed)
    with torch.no_grad():
        export(model, arguments.out, arguments.context, arguments.vocab, folding=not arguments.no_folding)
    print(f"{arguments.out}: {sum(p.numel() for p in model.parameters()):,} parameters, {arguments.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
