#!/usr/bin/env python3
"""Count the FLOPs of one GPT-2 training step with PyTorch's FlopCounterMode.

This is the independent check of `wafersim flops` for the dense matmul total (docs/flops.md).

Usage (from the repository root; needs torch and transformers, e.g. /opt/torchenv):

    /opt/torchenv/bin/python scripts/flop_counter_check.py \
        --n-layer 2 --n-embd 64 --n-head 4 --vocab 256 --n-positions 64 --batch 2 --seq 32

    /opt/torchenv/bin/python scripts/flop_counter_check.py \
        --n-layer 12 --n-embd 768 --n-head 12 --vocab 50257 --n-positions 1024 --batch 1 --seq 128

and compare the printed total with

    cargo run -- flops --config <config.json of the same shape> --sparsity 0 --batch B --seq S

(`matmul dense` of the sparsity-0 row). The model is `GPT2LMHeadModel(GPT2Config(..., attn_implementation="eager"))`, and all
dropouts 0, on the CPU in float32, with random weights (FLOPs do not depend on the values). The
step is a forward with `labels=input_ids` (so the loss is Hugging Face's shifted cross-entropy)
and `loss.backward()`, both under one `FlopCounterMode`. FlopCounterMode counts only matmul-like
ops (mm, addmm, bmm, baddbmm, convolution, attention kernels) at 2 FLOPs per multiply-add; it
does not count softmax, LayerNorm, GELU, adds or the loss, which is why it is compared with the
matmul total only.
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, required=True)
    p.add_argument("--n-embd", type=int, required=True)
    p.add_argument("--n-head", type=int, required=True)
    p.add_argument("--n-inner", type=int, default=None, help="FFN width (default 4 n_embd)")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--n-positions", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    config = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        vocab_size=args.vocab,
        n_positions=args.n_positions,
        n_inner=args.n_inner,
        activation_function="gelu_new",
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    model.train()
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()

    total = counter.get_total_flops()
    print(f"shape: n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} "
          f"n_inner={args.n_inner or 4 * args.n_embd} vocab={args.vocab} n_positions={args.n_positions} batch={args.batch} seq={args.seq}")
    print(f"attn_implementation: {model.config._attn_implementation}")
    print(f"total_flops {total}")
    by_op = counter.get_flop_counts().get("Global", {})
    for op, flops in sorted(by_op.items(), key=lambda kv: str(kv[0])):
        print(f"  {op}: {flops}")


if __name__ == "__main__":
    main()
