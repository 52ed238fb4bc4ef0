"""Writes tests/fixtures/hf-tiny/: a tiny GPT-2 checkpoint saved by real Hugging Face transformers.

Usage (from the repository root; needs torch and transformers 5.x, e.g. /opt/torchenv/bin/python):

    /opt/torchenv/bin/python scripts/make_hf_fixture.py            # (re)writes the fixture
    /opt/torchenv/bin/python scripts/make_hf_fixture.py --print    # only prints the checked values

The Rust test `model::checkpoint::tests::the_transformers_fixture_loads_with_the_values_torch_saw`
loads this folder and compares a few values with the ones printed here (they are written into the
test by hand). The model is random (fixed torch seed): its values mean nothing, only that they
arrive where transformers put them. Regenerating with another torch/transformers version may change
the values; then update the test from this script's output.
"""

import argparse
import os
import sys

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf-tiny")


def build_model() -> GPT2LMHeadModel:
    torch.manual_seed(20240531)
    config = GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        n_positions=32,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    # Initialisation leaves biases at 0 and LayerNorms at 1/0; give them random values too so the
    # test can tell every tensor apart.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def print_checked_values(model: GPT2LMHeadModel) -> None:
    sd = model.state_dict()
    d = model.config.n_embd
    c_attn_w = sd["transformer.h.1.attn.c_attn.weight"]  # [d, 3d]: columns are q | k | v
    c_attn_b = sd["transformer.h.0.attn.c_attn.bias"]  # [3d]
    checks = {
        "wte[3,5]": sd["transformer.wte.weight"][3, 5],
        "wpe[31,15]": sd["transformer.wpe.weight"][31, 15],
        "h.1 c_attn.weight[2, 1] (q[2,1])": c_attn_w[2, 1],
        "h.1 c_attn.weight[2, d+1] (k[2,1])": c_attn_w[2, d + 1],
        "h.1 c_attn.weight[2, 2d+1] (v[2,1])": c_attn_w[2, 2 * d + 1],
        "h.0 c_attn.bias[2d+7] (v.bias[7])": c_attn_b[2 * d + 7],
        "h.0 attn.c_proj.weight[4,9]": sd["transformer.h.0.attn.c_proj.weight"][4, 9],
        "h.1 mlp.c_fc.weight[15,63]": sd["transformer.h.1.mlp.c_fc.weight"][15, 63],
        "h.1 mlp.c_proj.weight[63,0]": sd["transformer.h.1.mlp.c_proj.weight"][63, 0],
        "h.0 ln_2.weight[3]": sd["transformer.h.0.ln_2.weight"][3],
        "ln_f.bias[10]": sd["transformer.ln_f.bias"][10],
    }
    for label, value in checks.items():
        # The shortest decimal that round-trips the f32, and its bits for an exact comparison.
        v = np.float32(value.item())
        print(f"{label:40s} {v!s:>16s}  bits 0x{v.view(np.uint32):08x}")
    print("numel", sum(p.numel() for p in model.parameters()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="only print the checked values")
    args = parser.parse_args()
    model = build_model()
    if not args.print:
        model.save_pretrained(OUT)
        extra = os.path.join(OUT, "generation_config.json")
        if os.path.exists(extra):
            os.remove(extra)  # not needed by wafersim
        print("wrote", os.path.normpath(OUT), sorted(os.listdir(OUT)))
    print_checked_values(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
