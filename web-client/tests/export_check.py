"""Runs a Shoal safetensors export without Shoal: loads it with `safetensors` and numpy,
reads the task's held-out IDX files, runs the forward pass the model's metadata
describes, and prints the accuracy as JSON next to the one Shoal recorded.

    python export_check.py MODEL.safetensors TEST_IMAGES.idx TEST_LABELS.idx
"""

import json
import sys

import numpy as np
from safetensors import safe_open


def read_idx(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    return body.reshape(shape)


def conv2d(x, w, b, stride, padding):
    # x: [n, h, w, c] (NHWC); w: [k, k, c, f].
    k = w.shape[0]
    if padding:
        x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n, h, wd, c = x.shape
    oh = (h - k) // stride + 1
    ow = (wd - k) // stride + 1
    out = np.zeros((n, oh, ow, w.shape[3]), dtype=np.float32)
    for i in range(k):
        for j in range(k):
            patch = x[:, i : i + stride * oh : stride, j : j + stride * ow : stride, :]
            out += patch @ w[i, j]
    return out + b


def forward(model, tensors, x):
    for i, layer in enumerate(model["layers"]):
        kind = layer["type"]
        if kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif kind == "dense":
            x = x.reshape(x.shape[0], -1) @ tensors[f"layer{i}.weight"] + tensors[f"layer{i}.bias"]
        elif kind == "conv2d":
            x = conv2d(x, tensors[f"layer{i}.weight"], tensors[f"layer{i}.bias"],
                       layer.get("stride", 1), layer.get("padding", 0))
        elif kind == "relu":
            x = np.maximum(x, 0)
        elif kind == "max_pool":
            s = layer["size"]
            n, h, w, c = x.shape
            x = x[:, : h // s * s, : w // s * s, :].reshape(n, h // s, s, w // s, s, c).max(axis=(2, 4))
        else:
            raise ValueError(f"layer {i}: unknown type {kind}")
    return x


def main():
    model_path, images_path, labels_path = sys.argv[1:4]
    with safe_open(model_path, framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = json.loads(meta["model"])
    h, w, c = model["input"]
    images = read_idx(images_path).astype(np.float32) / 255.0
    labels = read_idx(labels_path)
    x = images.reshape(-1, h, w, c)
    logits = forward(model, tensors, x)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    print(json.dumps({
        "accuracy": accuracy,
        "shoal_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None,
        "version": int(meta["version"]),
        "task": meta["task"],
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": sorted({str(v.dtype) for v in tensors.values()}),
    }))


if __name__ == "__main__":
    main()
