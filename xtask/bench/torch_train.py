"""PyTorch's side of `cargo xtask bench train-throughput`: the demo MLP and CNN trained on
the demo digits at batch 64 with Adam, on the CPU with one thread, exactly as Shoal's
native benchmark does. Prints one JSON line of median samples/s.

Usage: python torch_train.py DATA_DIR   (DATA_DIR holds train-images.idx, train-labels.idx)
"""

import json
import warnings
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

BATCH = 64


def read_idx(path: Path) -> torch.Tensor:
    raw = path.read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = bytearray(raw[4 + 4 * dims :])
    return torch.frombuffer(body, dtype=torch.uint8).reshape(shape)


def models():
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )
    return {"mlp": (mlp, 20, 100), "cnn": (cnn, 10, 30)}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = Path(sys.argv[1])
    images = read_idx(data / "train-images.idx").float().div(255.0).unsqueeze(1)
    labels = read_idx(data / "train-labels.idx").long()
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(1)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, (model, warm, steps) in models().items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        order = torch.randperm(n, generator=gen)
        cursor = 0

        def run(k: int) -> float:
            nonlocal cursor, order
            loss = torch.zeros(())
            for _ in range(k):
                if cursor + BATCH > n:
                    order = torch.randperm(n, generator=gen)
                    cursor = 0
                idx = order[cursor : cursor + BATCH]
                cursor += BATCH
                x, y = images[idx], labels[idx]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
            return float(loss.detach())

        run(warm)
        rates = []
        for _ in range(5):
            start = time.perf_counter()
            run(steps)
            rates.append(steps * BATCH / (time.perf_counter() - start))
        out[name] = statistics.median(rates)
        print(f"PyTorch {name}: {out[name]:.0f} samples/s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
