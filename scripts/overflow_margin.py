"""How large a loss scale an fp16 step of a checkpoint survives: the largest activation gradient
of the backward pass, from PyTorch float64 autograd, against fp16's largest finite value.

The fabric's fp16 step stores every matmul input in fp16, the backward pass's activation
gradients included, and scales the loss by a power of two `L` (docs/validation.md, "fp16 and
loss scaling"): a stored gradient `L g` overflows once `|L g|` rounds above 65504 (it does from
65520 on). So the step overflows exactly when `L * max|g| >= 65520`, with `max|g|` taken over
every activation gradient of the unscaled mean loss: the logits', the final LayerNorm's input
and output, and per block the residual stream, both LayerNorms' outputs, the packed Q/K/V
projection, Q, K, V, the attention scores and probabilities, the attention output, both
projections' outputs, the MLP's hidden layer before and after GELU. The script prints each
tensor's largest gradient and the largest power of two `L` whose `L * max|g|` stays below 65520,
and, for a dynamic run starting at `--start` that halves after every overflow on batches like
this one (the weights stay while steps are skipped), which step is the first clean one.

Usage (from the repository root; the checkpoint a wafersim run wrote, the tokens it read):

    /opt/torchenv/bin/python scripts/overflow_margin.py --checkpoint OUT/step-1 \
        --tokens same.json --batch 2 [--start 16777216]

The token file's first `--batch` sequences are the batch (tests/cli_train.rs uses a file whose
sequences are all the same, so every batch of the run is that batch). Needs torch and
safetensors; the Rust tests do not need Python.
"""

import argparse
import json
import math

import torch
from safetensors.torch import load_file

FP16_OVERFLOW = 65520.0  # the smallest value that rounds to infinity in fp16


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def forward(t, cfg, ids):
    """The mean next-token loss and every intermediate, named, each with retain_grad()."""
    kept = {}

    def keep(name, value):
        value.retain_grad()
        kept[name] = value
        return value

    b, s = ids.shape
    d, heads = cfg["n_embd"], cfg["n_head"]
    dh = d // heads
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    x = keep("embed", t["transformer.wte.weight"][ids] + t["transformer.wpe.weight"][:s])
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = keep(f"h{i}.ln_1", layer_norm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps))
        qkv = keep(f"h{i}.c_attn", h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"])
        q, k, v = (
            keep(f"h{i}.{n}", z.reshape(b, s, heads, dh).transpose(1, 2))
            for n, z in zip("qkv", qkv.split(d, dim=-1))
        )
        scores = keep(f"h{i}.scores", (q @ k.transpose(-1, -2)) / math.sqrt(dh))
        probs = keep(f"h{i}.probs", torch.softmax(scores.masked_fill(~mask, float("-inf")), -1))
        attn = keep(f"h{i}.attn", (probs @ v).transpose(1, 2).reshape(b, s, d))
        o = keep(f"h{i}.attn_proj", attn @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"])
        x = keep(f"h{i}.resid_attn", x + o)
        h2 = keep(f"h{i}.ln_2", layer_norm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps))
        f = keep(f"h{i}.fc", h2 @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
        g = keep(f"h{i}.gelu", gelu_new(f))
        m = keep(f"h{i}.fc_proj", g @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"])
        x = keep(f"h{i}.resid_mlp", x + m)
    xf = keep("ln_f", layer_norm(x, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps))
    logits = keep("logits", xf @ t["transformer.wte.weight"].T)
    v = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="mean"
    )
    return loss, kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--start", type=float, default=2.0**24)
    a = ap.parse_args()
    cfg = json.load(open(f"{a.checkpoint}/config.json"))
    weights = load_file(f"{a.checkpoint}/model.safetensors")
    t = {k: v.double().requires_grad_(True) for k, v in weights.items()}
    ids = torch.tensor(json.load(open(a.tokens))[: a.batch])
    loss, kept = forward(t, cfg, ids)
    loss.backward()
    worst = {name: value.grad.abs().max().item() for name, value in kept.items()}
    for name, g in sorted(worst.items(), key=lambda kv: -kv[1]):
        print(f"{name:>16}  max|grad| {g:.6e}")
    name, g = max(worst.items(), key=lambda kv: kv[1])
    clean = 2.0 ** math.floor(math.log2(FP16_OVERFLOW / g))
    if clean * g >= FP16_OVERFLOW:
        clean /= 2
    print(f"loss {loss.item():.6f}; largest activation gradient {g:.6e} ({name})")
    print(f"largest clean loss scale: {clean:.0f} (L max|g| = {clean * g:.1f} < {FP16_OVERFLOW:.0f});"
          f" 2x it gives {2 * clean * g:.1f}")
    skips = max(0, round(math.log2(a.start / clean)))
    print(f"from {a.start:.0f}: {skips} skipped steps, the first clean step is step {skips + 1}")


if __name__ == "__main__":
    main()
