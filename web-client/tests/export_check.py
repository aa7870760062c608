"""Runs a Shoal safetensors export without Shoal: loads it with `safetensors` and numpy,
reads the task's held-out data, runs the forward pass the model's metadata and the README
describe, and prints the held-out accuracy (and, for a language model, the loss) as JSON
next to the ones Shoal recorded.

    python export_check.py MODEL.safetensors TEST_IMAGES.idx TEST_LABELS.idx
    python export_check.py MODEL.safetensors TEXT.txt        (a language model)
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


def layer_norm(x, gain, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gain + bias


def gelu(u):
    return 0.5 * u * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u**3)))


def lm_logits(model, t, tokens, eps):
    """Logits [n, context, vocab] of the windows `tokens` [n, context]."""
    h = None
    for i, layer in enumerate(model["layers"]):
        kind = layer["type"]
        p = f"layer{i}."
        if kind == "embedding":
            h = t[p + "token"][tokens] + t[p + "position"]
        elif kind == "transformer_block":
            n, ctx, d = h.shape
            heads = layer["heads"]
            hd = d // heads
            a = layer_norm(h, t[p + "ln1.gain"], t[p + "ln1.bias"], eps)
            qkv = a @ t[p + "attn.qkv.weight"] + t[p + "attn.qkv.bias"]
            q, k, v = (qkv[..., j * d : (j + 1) * d].reshape(n, ctx, heads, hd).transpose(0, 2, 1, 3)
                       for j in range(3))
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
            future = np.triu(np.ones((ctx, ctx), dtype=bool), 1)
            scores = np.where(future, -np.inf, scores)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            o = (probs @ v).transpose(0, 2, 1, 3).reshape(n, ctx, d)
            h = h + o @ t[p + "attn.out.weight"] + t[p + "attn.out.bias"]
            b = layer_norm(h, t[p + "ln2.gain"], t[p + "ln2.bias"], eps)
            up = gelu(b @ t[p + "mlp.up.weight"] + t[p + "mlp.up.bias"])
            h = h + up @ t[p + "mlp.down.weight"] + t[p + "mlp.down.bias"]
        elif kind == "layer_norm":
            h = layer_norm(h, t[p + "gain"], t[p + "bias"], eps)
        elif kind == "lm_head":
            h = h @ (t["layer0.token"].T if layer.get("tied") else t[p + "weight"])
        else:
            raise ValueError(f"layer {i}: unknown type {kind}")
    return h


def check_language_model(meta, model, tensors, text_path):
    ctx = int(meta["context"])
    data = np.frombuffer(open(text_path, "rb").read(), dtype=np.uint8)
    windows = (len(data) - 1) // ctx
    # The fraction as Shoal holds it (an f32), rounded half away from zero as Rust does;
    # without one, the text is the task's test file, held out whole.
    if "holdout" in meta:
        held = int(np.floor(windows * float(np.float32(meta["holdout"])) + 0.5))
    else:
        held = windows
    x = data[: windows * ctx].reshape(windows, ctx)[-held:]
    y = data[1 : windows * ctx + 1].reshape(windows, ctx)[-held:]
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    eps = float(meta["layer_norm_eps"])
    total, correct = 0.0, 0
    for s in range(0, held, 128):
        logits = lm_logits(model, t, x[s : s + 128], eps)
        m = logits.max(axis=-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]
        yy = y[s : s + 128]
        picked = np.take_along_axis(logits, yy[..., None].astype(np.int64), axis=-1)[..., 0]
        total += float((lse - picked).sum())
        correct += int((logits.argmax(axis=-1) == yy).sum())
    loss = total / (held * ctx)
    return {
        "loss": loss,
        "bits_per_byte": loss / np.log(2.0),
        "accuracy": correct / (held * ctx),
        "shoal_loss": float(meta["test_loss"]) if "test_loss" in meta else None,
        "shoal_bits_per_byte": float(meta["test_bits_per_byte"]) if "test_bits_per_byte" in meta else None,
        "held_out_windows": held,
    }


def main():
    model_path = sys.argv[1]
    with safe_open(model_path, framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = json.loads(meta["model"])
    common = {
        "version": int(meta["version"]),
        "task": meta["task"],
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": sorted({str(v.dtype) for v in tensors.values()}),
    }
    if model["layers"][0]["type"] == "embedding":
        result = check_language_model(meta, model, tensors, sys.argv[2])
        result["shoal_accuracy"] = float(meta["test_accuracy"]) if "test_accuracy" in meta else None
        print(json.dumps({**result, **common}))
        return
    images_path, labels_path = sys.argv[2:4]
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
