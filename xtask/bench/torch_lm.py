"""PyTorch's side of `cargo xtask bench train-lm`: the demo language model of
tasks/fortunes.toml (byte embedding + learned positions, pre-norm transformer blocks with
causal multi-head attention and a tanh-GELU MLP, final layer norm, head tied to the
embedding) trained with AdamW (betas 0.9/0.95, decoupled decay 0.1 on matrices and
embeddings, global-norm clipping at 1.0) on windows of the demo corpus, on the CPU with
one thread, as Shoal's native benchmark does. Prints one JSON line of median tokens/s.

Usage: python torch_lm.py CORPUS CONTEXT DIM BLOCKS HEADS BATCH
"""

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=1e-5)
        self.up = nn.Linear(dim, ratio * dim)
        self.down = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        shape = (n, t, self.heads, d // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(n, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class LM(nn.Module):
    def __init__(self, context: int, dim: int, blocks: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4) for _ in range(blocks))
        self.ln = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.ln(h) @ self.tok.weight.t()


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    corpus, context, dim, blocks, heads, batch = sys.argv[1:7]
    context, dim, blocks, heads, batch = map(int, (context, dim, blocks, heads, batch))
    raw = bytearray(Path(corpus).read_bytes())
    data = torch.frombuffer(raw, dtype=torch.uint8).long()
    windows = (data.numel() - 1) // context
    x_all = data[: windows * context].view(windows, context)
    y_all = data[1 : windows * context + 1].view(windows, context)
    model = LM(context, dim, blocks, heads)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(1)

    def run(k: int) -> None:
        for _ in range(k):
            idx = torch.randint(0, windows, (batch,), generator=gen)
            logits = model(x_all[idx])
            loss = F.cross_entropy(logits.reshape(-1, 256), y_all[idx].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    run(5)
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        steps = 20
        run(steps)
        rates.append(steps * batch * context / (time.perf_counter() - start))
    params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "parameters": params,
                "tokens_per_s": statistics.median(rates),
            }
        )
    )


if __name__ == "__main__":
    main()
