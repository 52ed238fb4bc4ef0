"""PyTorch / Hugging Face ground truth for the reference training step (src/reference).

What it does: builds a Hugging Face `GPT2LMHeadModel` (eager attention, all dropouts 0, tied
LM head, tanh GELU "gelu_new") whose weights come from the closed formula of
`src/reference/fixtures.rs` (no RNG is shared with the Rust side), runs
`model(input_ids, labels=input_ids)` on the formula batch, back-propagates, and prints the
loss and, for every parameter tensor in `GptParams::tensors()` order, the gradient's L2 norm,
a probe `sum_i grad[i] * cos(0.11 i)` and its first entries. The printout is Rust source: the
constants pinned in `src/reference/tests/torch.rs` were produced by one run of this script.

The loss is `cross_entropy(logits[:, :-1], ids[:, 1:])` (mean), which is what
`model(input_ids, labels=input_ids).loss` computes; the script asserts the two agree, but takes
the gradient of its own because Hugging Face rounds logits to float32 inside its loss.

Two cases: "dense" (the formula weights) and "sparse" (the same, with element `i` of the six
sparsified matrices of tensor number `k` set to zero when `(i * i + k) % 5 == 0`). For the
sparse case the printed gradients are PyTorch's masked by that pattern, which is what the
reference must return (Hugging Face itself does not mask gradients).

Run (no arguments needed; float64 is what is pinned, float32 is printed for comparison):

    /opt/torchenv/bin/python scripts/torch_reference.py            # float64, the pinned values
    /opt/torchenv/bin/python scripts/torch_reference.py --dtype float32

Needs torch and transformers (tested with torch 2.15, transformers 5.24). The Rust tests do not
need Python.
"""

import argparse
import math

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

transformers.logging.set_verbosity_error()

# The pinned model: must match `pin_config()` in src/reference/tests/torch.rs.
N_LAYER, N_EMBD, N_HEAD, N_POSITIONS, VOCAB, N_INNER, LN_EPS = 2, 16, 4, 12, 37, 40, 1e-5
BATCH, SEQ = 2, 7

SPARSE_SUFFIXES = (
    "attn.q.weight",
    "attn.k.weight",
    "attn.v.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


def tensor_shapes():
    """(name, shape) in `GptParams::tensors()` order; weights are [in, out]."""
    d, f = N_EMBD, N_INNER
    out = [("wte.weight", (VOCAB, d)), ("wpe.weight", (N_POSITIONS, d))]
    for layer in range(N_LAYER):
        p = f"h.{layer}."
        out += [(p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,))]
        for name in ("attn.q", "attn.k", "attn.v", "attn.c_proj"):
            out += [(p + name + ".weight", (d, d)), (p + name + ".bias", (d,))]
        out += [(p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,))]
        out += [(p + "mlp.c_fc.weight", (d, f)), (p + "mlp.c_fc.bias", (f,))]
        out += [(p + "mlp.c_proj.weight", (f, d)), (p + "mlp.c_proj.bias", (d,))]
    out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return out


def is_layer_norm_scale(name):
    return "ln_" in name and name.endswith(".weight")


def sine_value(k, i, layer_norm_scale):
    """The formula of src/reference/fixtures.rs, same f64 operations in the same order."""
    x = float(i)
    a = 0.37 * x + 0.011 * x * x + 0.71 * float(k) + 0.13
    offset = 1.0 if layer_norm_scale else 0.0
    return offset + 0.2 * math.sin(a)


def is_pruned(name, k, i, sparse):
    return sparse and name.endswith(SPARSE_SUFFIXES) and (i * i + k) % 5 == 0


def formula_tensors(sparse):
    """name -> float32 tensor (rounded once from float64, as the Rust side does)."""
    out = {}
    for k, (name, shape) in enumerate(tensor_shapes()):
        n = math.prod(shape)
        values = [
            0.0 if is_pruned(name, k, i, sparse) else sine_value(k, i, is_layer_norm_scale(name))
            for i in range(n)
        ]
        out[name] = torch.tensor(values, dtype=torch.float64).to(torch.float32).reshape(shape)
    return out


def formula_tokens():
    rows = [[(7 * b + 5 * s * s + 3 * s + 1) % VOCAB for s in range(SEQ)] for b in range(BATCH)]
    return torch.tensor(rows, dtype=torch.long)


def build_model(tensors, dtype):
    config = GPT2Config(
        n_layer=N_LAYER,
        n_embd=N_EMBD,
        n_head=N_HEAD,
        n_positions=N_POSITIONS,
        vocab_size=VOCAB,
        n_inner=N_INNER,
        activation_function="gelu_new",
        layer_norm_epsilon=LN_EPS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    state = {"transformer.wte.weight": tensors["wte.weight"],
             "transformer.wpe.weight": tensors["wpe.weight"]}
    for layer in range(N_LAYER):
        p, hf = f"h.{layer}.", f"transformer.h.{layer}."
        for kind in ("weight", "bias"):
            # c_attn packs Q, K, V along its output dimension.
            state[hf + "attn.c_attn." + kind] = torch.cat(
                [tensors[p + f"attn.{x}.{kind}"] for x in ("q", "k", "v")], dim=-1)
            for name in ("ln_1", "ln_2", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                state[hf + f"{name}.{kind}"] = tensors[p + f"{name}.{kind}"]
    state["transformer.ln_f.weight"] = tensors["ln_f.weight"]
    state["transformer.ln_f.bias"] = tensors["ln_f.bias"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    # Only the tied head may be missing; the causal-mask buffer is not a parameter.
    assert all(m == "lm_head.weight" or not m.endswith(("weight", "bias")) for m in missing), missing
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model.to(dtype).train()


def our_grads(model):
    """Gradients in `GptParams::tensors()` naming (c_attn unpacked into q, k, v)."""
    g = {"wte.weight": model.transformer.wte.weight.grad,
         "wpe.weight": model.transformer.wpe.weight.grad,
         "ln_f.weight": model.transformer.ln_f.weight.grad,
         "ln_f.bias": model.transformer.ln_f.bias.grad}
    d = N_EMBD
    for layer, block in enumerate(model.transformer.h):
        p = f"h.{layer}."
        for kind in ("weight", "bias"):
            packed = getattr(block.attn.c_attn, kind).grad
            for j, x in enumerate(("q", "k", "v")):
                g[p + f"attn.{x}.{kind}"] = packed[..., j * d:(j + 1) * d]
            g[p + f"attn.c_proj.{kind}"] = getattr(block.attn.c_proj, kind).grad
            g[p + f"mlp.c_fc.{kind}"] = getattr(block.mlp.c_fc, kind).grad
            g[p + f"mlp.c_proj.{kind}"] = getattr(block.mlp.c_proj, kind).grad
        g[p + "ln_1.weight"] = block.ln_1.weight.grad
        g[p + "ln_1.bias"] = block.ln_1.bias.grad
        g[p + "ln_2.weight"] = block.ln_2.weight.grad
        g[p + "ln_2.bias"] = block.ln_2.bias.grad
    return g


def run(sparse, dtype):
    tensors = formula_tensors(sparse)
    model = build_model(tensors, dtype)
    ids = formula_tokens()
    # Hugging Face's loss upcasts logits with `.float()`, i.e. rounds float64 to float32; so the
    # same mean next-token cross-entropy is taken here in the model's dtype, and checked against
    # HF's own `labels=` loss at float32 precision.
    hf_loss = model(input_ids=ids, labels=ids).loss.item()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="mean")
    assert abs(loss.item() - hf_loss) <= 1e-6 * abs(hf_loss), (loss.item(), hf_loss)
    loss.backward()
    grads = our_grads(model)
    rows = []
    for k, (name, shape) in enumerate(tensor_shapes()):
        flat = grads[name].detach().to(torch.float64).reshape(-1).clone()
        for i in range(flat.numel()):
            if is_pruned(name, k, i, sparse):
                flat[i] = 0.0
        probe = torch.cos(0.11 * torch.arange(flat.numel(), dtype=torch.float64))
        rows.append((name, flat.norm().item(), (flat * probe).sum().item(), flat[:3].tolist()))
    return loss.item(), rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    dtype = getattr(torch, parser.parse_args().dtype)
    for case, sparse in (("DENSE", False), ("SPARSE", True)):
        loss, rows = run(sparse, dtype)
        print(f"const {case}_LOSS: f64 = {loss!r};")
        print(f"/// (tensor, |grad|_2, sum_i grad[i] cos(0.11 i), first three entries)")
        print(f"const {case}_GRADS: &[(&str, f64, f64, [f64; 3])] = &[")
        for name, norm, probe, first in rows:
            first = ", ".join(repr(x) for x in first)
            print(f'    ("{name}", {norm!r}, {probe!r}, [{first}]),')
        print("];")


if __name__ == "__main__":
    main()
