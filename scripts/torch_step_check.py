"""`wafersim step` against PyTorch autograd, end to end through files, as a user would run it.

What it does, per case: builds a small Hugging Face `GPT2LMHeadModel` (eager attention, dropouts
0, tied LM head, tanh GELU, fixed torch seed; biases and LayerNorms randomised too so every
tensor's gradient is non-trivial), `save_pretrained`s it into a temporary folder, writes a
tokens JSON file (an array of arrays of ids), and runs

    target/release/wafersim step --checkpoint DIR --tokens PATH --sparsity S --fabric 8x8 --out OUT

Then it loads OUT/weights.safetensors (the weights wafersim actually used: pruned entries are 0)
into the same model in float64, takes the mean next-token cross-entropy itself in float64 (HF's
own `labels=` loss rounds logits to float32 with `.float()`; it is only checked to agree at
float32 precision), back-propagates, zeroes the gradient of every pruned weight (weights exactly
0 in the six sparsified kinds: Q/K/V inside `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj`), and compares with OUT/report.json and OUT/grads.safetensors:

- loss: |wafersim - torch| / torch < 1e-5;
- every tensor of grads.safetensors (and Q, K, V of each `c_attn` separately): relative L2
  ||g_wafersim - g_torch|| / max(||g_torch||, floor) < 1e-4, with floor = 1e-4 x the norm of the
  whole gradient. The floor exists for the key bias, whose true gradient is exactly zero: the
  score of query i and key j is q_i . (k_j + b_k) / sqrt(dh), and q_i . b_k is the same for every
  key j, so softmax's shift invariance removes b_k from the loss. Torch in float64 returns ~1e-18
  there, torch in float32 ~5e-9 and the fp32 fabric ~5e-9 (rounding of a sum that is 0
  exactly); a ratio of two rounding noises means nothing, so such a tensor is held to an
  absolute bound instead: error < 1e-4 x floor = 1e-8 x |whole gradient|. Every other tensor's
  norm is well above the floor (smallest ~1e-2 against a floor ~4e-4); the script checks that
  the key biases are the only tensors under it;
- pruned weights get exactly 0 gradient from wafersim; weights.safetensors equals the checkpoint
  except for exactly round(s * numel) zeros per sparsified matrix (Q, K and V counted apart);
- updated.safetensors equals torch.optim.AdamW (lr 6e-4, betas (0.9, 0.95), eps 1e-8, weight
  decay 0.1 on wte, wpe and Linear weights only) applied in float64 to wafersim's own weights and
  gradients, within 1e-6 absolute (an f32 rounding of values ~0.5).

Cases: sparsity 0.5 with 2 sequences, dense (--sparsity 0), and sparsity 0.5 with 3 sequences
(so the tokens split unevenly over the region's rows).

Run from the repository root after building the release binary:

    cargo build --release
    /opt/torchenv/bin/python scripts/torch_step_check.py            # all cases, ~20 s
    /opt/torchenv/bin/python scripts/torch_step_check.py --keep /tmp/stepcheck   # keep the files

Prints one PASS/FAIL table per case and the largest errors; exits 1 on any failure. Needs torch,
transformers 5.x and safetensors (tested with torch 2.15, transformers 5.24). The Rust tests do
not need Python; docs/validation.md records one run's numbers.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BINARY = os.path.join(ROOT, "target", "release", "wafersim")

N_LAYER, N_EMBD, N_HEAD, N_POSITIONS, VOCAB = 2, 32, 4, 32, 64
# Larger than GPT-2's 0.02 so attention is far from uniform and every path carries signal.
INIT_STD = 0.15
FABRIC = "8x8"
LR, BETAS, EPS, WEIGHT_DECAY = 6e-4, (0.9, 0.95), 1e-8, 0.1

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
FLOOR_FRACTION = 1e-4
UPDATE_TOL = 1e-6

SPARSE_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")

# (name, sparsity, sequences, tokens per sequence)
CASES = [
    ("sparse 0.5, 2 x 16", 0.5, 2, 16),
    ("dense, 2 x 16", 0.0, 2, 16),
    ("sparse 0.5, 3 x 12", 0.5, 3, 12),
]


def build_model(seed):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=N_POSITIONS,
        vocab_size=VOCAB, activation_function="gelu_new", initializer_range=INIT_STD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif ".ln_" in name:  # LayerNorm scales (biases are handled above)
                p.copy_(1.0 + torch.randn_like(p) * 0.1)
    return model


def float64_model(state):
    """The test model in float64 with `state` (HF names, no lm_head) loaded and the head tied."""
    model = build_model(0).to(torch.float64)
    missing, unexpected = model.load_state_dict(
        {k: v.to(torch.float64) for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" or not m.endswith(("weight", "bias")) for m in missing), missing
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model.train()


def token_rows(seed, sequences, length):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (sequences, length), generator=gen)


def run_wafersim(ckpt, tokens_path, sparsity, out):
    cmd = [BINARY, "step", "--checkpoint", ckpt, "--tokens", tokens_path,
           "--sparsity", repr(sparsity), "--fabric", FABRIC, "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, done


def mean_next_token_loss(model, ids):
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="mean")


def split_qkv(name, tensor):
    """`c_attn` packs Q | K | V along its last axis; other tensors come back as they are."""
    if "attn.c_attn." not in name:
        return [(name, tensor)]
    d = N_EMBD
    return [(f"{name}[{x}]", tensor[..., j * d:(j + 1) * d]) for j, x in enumerate("qkv")]


def rel_l2(got, want, floor):
    diff = (got - want).norm().item()
    return diff / max(want.norm().item(), floor), want.norm().item() < floor


class Table:
    def __init__(self, title):
        self.title, self.rows, self.failed = title, [], False

    def add(self, what, value, bound, ok, note=""):
        self.rows.append((what, value, bound, ok, note))
        self.failed |= not ok

    def print(self):
        print(f"\n== {self.title}")
        print(f"{'check':<58} {'measured':>10} {'bound':>6}  result")
        for what, value, bound, ok, note in self.rows:
            v = f"{value:.3e}" if isinstance(value, float) else str(value)
            b = f"{bound:.0e}" if isinstance(bound, float) else str(bound)
            print(f"{what:<58} {v:>10} {b:>6}  {'PASS' if ok else 'FAIL'}{note}")


def check_weights(table, original, used, sparsity):
    """weights.safetensors = the checkpoint, with exactly round(s * numel) zeros per matrix."""
    worst_zero_count, changed_kept = 0, 0
    for name, w in used.items():
        orig = original[name]
        if not name.endswith(SPARSE_SUFFIXES):
            changed_kept += int((w != orig).sum().item())
            continue
        kept = w != 0
        changed_kept += int((w[kept] != orig[kept]).sum().item())
        for _, block in split_qkv(name, w):
            zeros = int((block == 0).sum().item())
            expected = int(math.floor(sparsity * block.numel() + 0.5))
            worst_zero_count = max(worst_zero_count, abs(zeros - expected))
    table.add("weights: kept entries differing from checkpoint", changed_kept, 0,
              changed_kept == 0)
    table.add("weights: |zeros - round(s numel)|, worst matrix", worst_zero_count, 0,
              worst_zero_count == 0)


def torch_gradients(used, ids):
    model = float64_model(used)
    loss = mean_next_token_loss(model, ids)
    hf_loss = model(input_ids=ids, labels=ids).loss.item()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if name.endswith(SPARSE_SUFFIXES):
            g[used[name] == 0] = 0.0
        grads[name] = g
    return loss.item(), hf_loss, grads


def check_gradients(table, got, want, used):
    missing = sorted(set(want) ^ set(got))
    table.add("gradient tensor names match", len(missing), 0, not missing,
              f"  {missing}" if missing else "")
    floor = FLOOR_FRACTION * math.sqrt(sum(g.norm().item() ** 2 for g in want.values()))
    worst, worst_name, worst_floored, floored_names = 0.0, "", 0.0, []
    for name in sorted(set(want) & set(got)):
        w, g = want[name], got[name].to(torch.float64)
        for (pn, wp), (_, gp) in zip(split_qkv(name, w), split_qkv(name, g)):
            e, floored = rel_l2(gp, wp, floor)
            note = ""
            if floored:
                floored_names.append(pn)
                note = f"  (|true| {wp.norm().item():.1e} < floor {floor:.1e}: absolute)"
                worst_floored = max(worst_floored, e)
            elif e > worst:
                worst, worst_name = e, pn
            table.add(f"grad {pn}", e, GRAD_TOL, e < GRAD_TOL, note)
        if name.endswith(SPARSE_SUFFIXES):
            pruned = used[name] == 0
            nonzero = int((got[name][pruned] != 0).sum().item())
            table.add(f"  pruned grads nonzero in {name}", nonzero, 0, nonzero == 0)
    expected_floored = [f"transformer.h.{l}.attn.c_attn.bias[k]" for l in range(N_LAYER)]
    table.add("tensors under the floor = the key biases", len(floored_names), N_LAYER,
              sorted(floored_names) == expected_floored)
    return worst, worst_name, worst_floored


def adamw_reference(used, grads):
    """One torch AdamW step in float64 from wafersim's weights and gradients."""
    params = {n: w.to(torch.float64).clone().requires_grad_(True) for n, w in used.items()}
    decayed = [p for n, p in params.items() if n.endswith(".weight") and ".ln_" not in n
               and not n.startswith("transformer.ln_f")]
    plain = [p for n, p in params.items() if not any(p is q for q in decayed)]
    opt = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": WEIGHT_DECAY}, {"params": plain, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for n, p in params.items():
        p.grad = grads[n].to(torch.float64)
    opt.step()
    return {n: p.detach() for n, p in params.items()}


def check_update(table, used, grads, updated):
    want = adamw_reference(used, grads)
    worst = max((updated[n].to(torch.float64) - want[n]).abs().max().item() for n in want)
    table.add("updated vs torch AdamW on wafersim grads (abs)", worst, UPDATE_TOL,
              worst < UPDATE_TOL)
    stayed = all(bool((updated[n][used[n] == 0] == 0).all()) for n in used
                 if n.endswith(SPARSE_SUFFIXES))
    table.add("updated: pruned weights stay exactly 0", "yes" if stayed else "no", "yes", stayed)


def run_case(title, sparsity, sequences, length, work):
    table = Table(f"{title}  (--sparsity {sparsity}, --fabric {FABRIC})")
    ckpt, out = os.path.join(work, "checkpoint"), os.path.join(work, "out")
    tokens_path = os.path.join(work, "tokens.json")
    model = build_model(20250101)
    model.save_pretrained(ckpt)
    ids = token_rows(7 + sequences, sequences, length)
    with open(tokens_path, "w") as f:
        json.dump(ids.tolist(), f)
    cmd, done = run_wafersim(ckpt, tokens_path, sparsity, out)
    if done.returncode != 0:
        table.add("wafersim step exit code", done.returncode, 0, False,
                  f"\n  {' '.join(cmd)}\n  {done.stderr.strip()}")
        return table, {}
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    used = load_file(os.path.join(out, "weights.safetensors"))
    original = {n: t for n, t in model.state_dict().items() if n in used}
    got = load_file(os.path.join(out, "grads.safetensors"))
    updated = load_file(os.path.join(out, "updated.safetensors"))
    check_weights(table, original, used, sparsity)

    loss, hf_loss, want = torch_gradients(used, ids)
    loss_err = abs(report["loss"] - loss) / loss
    table.add(f"loss {report['loss']:.7f} vs torch {loss:.7f}", loss_err, LOSS_TOL,
              loss_err < LOSS_TOL)
    hf_err = abs(hf_loss - loss) / loss
    table.add("  HF labels= loss (float32 logits) vs ours", hf_err, 1e-6, hf_err < 1e-6)
    worst, worst_name, worst_floored = check_gradients(table, got, want, used)
    check_update(table, used, got, updated)
    return table, {"loss": loss_err, "grad": worst, "grad_name": worst_name,
                   "floored": worst_floored,
                   "flops": report["flops"], "cycles": report["cycles"]["total"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="keep each case's files under DIR")
    args = parser.parse_args()
    if not os.path.exists(BINARY):
        print(f"error: {BINARY} not found: run `cargo build --release` first", file=sys.stderr)
        return 2
    summary, failed = [], False
    for i, (title, sparsity, sequences, length) in enumerate(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            work = os.path.join(args.keep, f"case{i}") if args.keep else tmp
            os.makedirs(work, exist_ok=True)
            table, numbers = run_case(title, sparsity, sequences, length, work)
        table.print()
        failed |= table.failed
        summary.append((title, table.failed, numbers))
    print("\n== summary")
    print("(grad rel L2: the worst tensor other than the key biases; key bias: its error over the")
    print(" floor, i.e. |error| / (1e-4 |whole gradient|); both bounded by 1e-4)")
    print(f"{'case':<20} {'loss rel':>9} {'grad rel L2':>12}  {'(tensor)':<38} {'key bias':>9} result")
    for title, case_failed, n in summary:
        verdict = "FAIL" if case_failed else "PASS"
        if n:
            print(f"{title:<20} {n['loss']:>9.2e} {n['grad']:>12.2e}  {n['grad_name']:<38} "
                  f"{n['floored']:>9.2e} {verdict}")
        else:
            print(f"{title:<20} {'-':>9} {'-':>12}  {'':<38} {'-':>9} FAIL")
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
