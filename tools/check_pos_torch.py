#!/usr/bin/env python3
"""Checks that tools/pos_torch.py computes the same function as our POS.

    cargo test --release -p mmformer --test profile dump_pos_for_torch -- --ignored     # writes /tmp/pos_dump.safetensors
    $VENV/bin/python tools/check_pos_torch.py [/tmp/pos_dump.safetensors]

The dump holds a cpu-preset POS with our seeded initialisation (official parameter names under
`sem_seg_head.`), random backbone features and our outputs. This loads the weights into
`pos_torch.Pos("cpu")` (strict: every parameter must be present, nothing left over), runs its
forward on the same features and prints max|diff|/max|ref| for the pixel decoder outputs and
every mask prediction. Attention masks threshold logits at 0, so a logit within float noise of 0
can flip a mask bit between implementations and make later predictions differ locally.
"""

import sys

import torch

import pos_torch
from episode_torch import load_safetensors


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/pos_dump.safetensors"
    t = load_safetensors(path)
    prefix = "sem_seg_head."
    state = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    model = pos_torch.Pos("cpu").eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    feats = [t[f"input.res{i}"] for i in range(2, 6)]
    with torch.no_grad():
        mask_features, _, multi_scale = model.pixel_decoder.forward_features(feats)
        out = model.predictor(multi_scale, mask_features)
    preds = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]

    def rel(a, ref):
        return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-12))

    worst = 0.0
    rows = [("mask_features", mask_features, t["output.mask_features"])]
    rows += [(f"multi_scale.{i}", m, t[f"output.multi_scale.{i}"]) for i, m in enumerate(multi_scale)]
    rows += [(f"pred_masks.{i}", p, t[f"output.pred_masks.{i}"]) for i, p in enumerate(preds)]
    for name, a, ref in rows:
        r = rel(a, ref)
        worst = max(worst, r)
        print(f"{name:<18} max|diff|/max|ref| = {r:.2e}")
    print(f"worst {worst:.2e} over {len(rows)} outputs ({sum(p.numel() for p in model.parameters())} parameters)")


if __name__ == "__main__":
    main()
