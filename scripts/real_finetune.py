#!/usr/bin/env python3
"""A real (optimizer-trained) fine-tune of a generated base model, for the delta benchmark.

Hugging Face is not reachable from the development machine, so no pretrained model can be
downloaded; this takes a *generated* base (`examples/gen_model`, or the one
`scripts/bench_delta.py` makes: a randomly initialised LlamaForCausalLM in bf16) and trains it
for real with torch on the CPU:

* the model is loaded with transformers (`AutoModelForCausalLM.from_pretrained(BASE,
  torch_dtype=float32)`: f32 master weights, as mixed-precision fine-tuning keeps them);
* text: the repository's own documentation (README.md, ../shared/DESIGN.md when present, every
  `//!` module doc of src/), tokenized byte-level (token id = UTF-8 byte + 3, so ids 0-2 stay
  the base tokenizer's <unk>/<s>/</s>; the base's own tokenizer is a tiny test one that maps
  most words to <unk>);
* objective: the causal-LM loss (next-token cross entropy) on random windows of that text;
* optimizer: torch.optim.AdamW (lr --lr, betas (0.9, 0.999), weight decay 0.01), gradient norm
  clipped to 1.0, --steps steps of --batch windows of --seq tokens; every parameter trains.

The result is written as a Hugging Face directory with the base's layout: every tensor of every
base shard, under the same names and in the same shard files (rounded to the base's dtype, bf16,
round to nearest even as torch's `.to(torch.bfloat16)` does), the base's index and other files
copied. So the pair (BASE, OUT) is a genuinely optimizer-trained delta on a synthetic base: the
update is shaped by gradients and Adam's per-parameter normalisation (rows of embeddings of
unused tokens do not move; weights move by about lr per step, a few bf16 ulps), unlike the
benchmark's other fine-tune (every weight + Gaussian noise).

    /tmp/fcq/bin/python scripts/real_finetune.py BASE_DIR OUT_DIR [--steps 20] [--lr 1e-5]

Prints one JSON line: steps, losses (first / last), time, how many weights changed in bf16.
"""

import argparse
import glob
import json
import os
import random
import shutil
import sys
import time

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def corpus():
    paths = [os.path.join(REPO, "README.md"), os.path.join(REPO, "..", "shared", "DESIGN.md")]
    text = []
    for p in paths:
        if os.path.exists(p):
            text.append(open(p, encoding="utf-8").read())
    for p in sorted(glob.glob(os.path.join(REPO, "src", "**", "*.rs"), recursive=True)):
        doc = [line[4:] if line.startswith("//! ") else line[3:] for line in open(p, encoding="utf-8")
               if line.startswith("//!")]
        if doc:
            text.append("\n".join(doc))
    return "\n\n".join(text).encode("utf-8")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    data = torch.tensor(list(corpus()), dtype=torch.long) + 3
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.base, torch_dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), weight_decay=0.01)
    losses = []
    for step in range(a.steps):
        starts = [rng.randrange(0, len(data) - a.seq - 1) for _ in range(a.batch)]
        x = torch.stack([data[s:s + a.seq] for s in starts])
        out = model(input_ids=x, labels=x)  # transformers shifts the labels: next-token loss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        print(f"step {step + 1}/{a.steps}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    t_train = time.perf_counter() - t0

    # Write the base's layout: same shard files, same tensor names, the base's dtype.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    os.makedirs(a.out, exist_ok=True)
    changed = total = 0
    for f in sorted(os.listdir(a.base)):
        src = os.path.join(a.base, f)
        if not f.endswith(".safetensors"):
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(a.out, f))
            continue
        tensors = {}
        with safe_open(src, framework="pt") as base_file:
            meta = base_file.metadata()
            for name in base_file.keys():
                b = base_file.get_tensor(name)
                t = state[name].to(b.dtype) if name in state else b
                assert t.shape == b.shape, name
                tensors[name] = t.contiguous()
                if b.is_floating_point():
                    changed += int((t.view(torch.int16 if b.element_size() == 2 else torch.int32)
                                    != b.view(torch.int16 if b.element_size() == 2 else torch.int32)).sum())
                    total += b.numel()
        save_file(tensors, os.path.join(a.out, f), metadata=meta)
    print(json.dumps({"steps": a.steps, "lr": a.lr, "batch": a.batch, "seq": a.seq, "corpus_bytes": len(data),
                      "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                      "train_s": round(t_train, 1), "weights_changed": changed, "weights_total": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
