#!/usr/bin/env python3
"""PyTorch reference timings for the Rust benchmarks (`cargo xtask bench` drives this).

Run inside the venv made by tools/setup_torch_venv.sh:

    $VENV/bin/python tools/bench_torch.py [--threads N] [--fuse-bn] [--head]

Protocol (a persistent server, one request per line on stdin, one JSON line per answer on stdout):

    request:  "<model> <size> <reps>"            e.g. "resnet50 480 5"
    answer:   {"model": "resnet50", "size": 480, "times_ms": [t1, ..., t_reps], "cpu_ms": [c1, ...]}

    times_ms is wall time per forward; cpu_ms is the process CPU time (all threads) of each
    forward, which other load on the machine barely changes.

    on a bad request the answer is {"error": "<message>", "request": "<the line>"} and the
    server keeps going; an empty line is ignored; "quit" or end of input stops it.

Before the first request the server prints one line {"ready": true, "threads": N,
"torch": "<version>", "fuse_bn": bool} so the driver knows start-up (the slow torch import)
is over.

Models (random weights, timing only; input is 1x3xSIZExSIZE, float32, NCHW):
  resnet50           torchvision-style ResNet-50 (bottleneck, stride on the 3x3 conv) features
                     through layer4, no avgpool/fc.
  efficientnet_lite0 EfficientNet-Lite0 features: stem 3x3/2 32ch, 16 MBConv blocks, no SE,
                     ReLU6, BN, TF "SAME" padding; with --head also conv_head 1x1 320->1280.

POS requests (tools/pos_torch.py; `cargo xtask bench pos` drives them; an optional 4th field
is the batch, default 1):
  pos_forward_paper  POS forward (pixel decoder + decoder), paper config, batch x [res2..res5] of
                     a SIZE^2 ResNet-50 input, eval mode, inference_mode.
  pos_forward_cpu    the same with the cpu config (EfficientNet-Lite0 taps).
  pos_train_cpu      one stage-1 training iteration, cpu config, on fixed random features of a
                     batch x 3 x SIZE^2 input: forward + criterion (Hungarian matching with
                     scipy, point-sampled BCE/dice on all predictions, oracle few-shot loss) +
                     backward + clip_grad_norm_(0.01) + AdamW step. Its answer also carries
                     "phases_ms": {forward, criterion, backward, clip+step: [per rep]} and
                     "solver" (the assignment solver that ran).
  pos_train_paper    the same with the paper config (batch 8 at 480^2 is the paper's iteration).
  efficientnet_lite0 / resnet50 accept the batch field too.

--device cuda[:N] runs models and inputs there and synchronises before each clock read
(episode requests stay on the CPU).

Episode request (tools/episode_torch.py; `cargo xtask bench episode` drives it):
  episode_paper <size> <reps> <shots> [file]
                     one whole MM-Former V1 episode at the paper preset as the official code
                     runs it (detectron2 R-50 with FrozenBN unfolded, the POS of pos_torch.py,
                     the official mask matching with its per-shot (1, 256, 100, h, w) query
                     pooling), query and supports SIZE^2, under torch.no_grad() like the
                     official inference. `file` (optional) is a safetensors file with the
                     model's weights under the official names and the inputs `input.query`,
                     `input.support.{s}`, `input.support_label.{s}` (what bench_episode writes,
                     so both sides run the same weights on the same images); without it the
                     weights are random and the inputs N(0, 1) with a centred-square label.
                     The answer also carries "stages_ms" and "stages_cpu_ms": {stage: [per rep]}
                     for "backbone (query)", "pos", "backbone (supports)", "mm", "total";
                     times_ms / cpu_ms are the totals.

Each model/size pair gets one untimed warm-up forward on first use. Everything runs in eval
mode under torch.inference_mode() with torch.set_num_threads(N) (default 2).
--fuse-bn folds every BatchNorm into the preceding conv, as the Rust backbone does at load.
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + optional activation; `fuse()` folds the BN into the conv."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act=None, tf_same=False, pad=None):
        super().__init__()
        self.tf_same = tf_same
        padding = 0 if tf_same else (k // 2 if pad is None else pad)
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        # Random but non-trivial BN statistics so folding is not an identity.
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.1, 0.1)
        self.act = act
        self.fused = False

    def fuse(self):
        with torch.no_grad():
            scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            conv = self.conv
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, conv.groups, bias=True)
            fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            fused.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        self.conv = fused
        self.bn = nn.Identity()
        self.fused = True

    def forward(self, x):
        if self.tf_same:
            x = tf_same_pad(x, self.conv.kernel_size, self.conv.stride, self.conv.dilation)
        x = self.bn(self.conv(x))
        if self.act == "relu":
            x = F.relu(x)
        elif self.act == "relu6":
            x = F.relu6(x)
        return x


def tf_same_pad(x, k, s, d):
    """TensorFlow "SAME" padding: output = ceil(input / stride), extra pixel at bottom/right."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s[0]) - 1) * s[0] + (k[0] - 1) * d[0] + 1 - ih, 0)
    pw = max((math.ceil(iw / s[1]) - 1) * s[1] + (k[1] - 1) * d[1] + 1 - iw, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1 = ConvBN(cin, width, 1, act="relu")
        self.conv2 = ConvBN(width, width, 3, stride=stride, act="relu")
        self.conv3 = ConvBN(width, cout, 1)
        self.downsample = ConvBN(cin, cout, 1, stride=stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet50Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 64, 7, stride=2, act="relu", pad=3)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers = []
        cin = 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(self.maxpool(self.stem(x)))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, stride):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, act="relu6") if expand != 1 else None
        self.dw = ConvBN(mid, mid, k, stride=stride, groups=mid, act="relu6", tf_same=True)
        self.project = ConvBN(mid, cout, 1)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.dw(y))
        return y + x if self.skip else y


# (expand ratio, kernel, stride, out channels, repeats) of EfficientNet-Lite0.
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class EfficientNetLite0Features(nn.Module):
    def __init__(self, head=False):
        super().__init__()
        self.stem = ConvBN(3, 32, 3, stride=2, act="relu6", tf_same=True)
        blocks = []
        cin = 32
        for expand, k, stride, cout, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if r == 0 else 1))
                cin = cout
        assert len(blocks) == 16
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(320, 1280, 1, act="relu6") if head else None

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return x if self.head is None else self.head(x)


def build(name, args):
    if name == "resnet50":
        model = ResNet50Features()
    elif name == "efficientnet_lite0":
        model = EfficientNetLite0Features(head=args.head)
    else:
        raise ValueError(f"unknown model {name!r} (expected resnet50 or efficientnet_lite0)")
    model.eval()
    if args.fuse_bn:
        for m in model.modules():
            if isinstance(m, ConvBN):
                m.fuse()
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pos(name, size, reps, batch, models, warmed, device):
    """The POS requests (see the module docstring); the model is built once per (name, size, batch)."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pos_torch

    key = (name, size, batch)
    times, cpu, phases = [], [], {}
    if name in ("pos_forward_paper", "pos_forward_cpu"):
        preset = name.rsplit("_", 1)[1]
        if key not in models:
            torch.manual_seed(0)
            feats = [f.to(device) for f in pos_torch.random_features(preset, size, batch)]
            models[key] = (pos_torch.Pos(preset).eval().to(device), feats)
        model, feats = models[key]
        with torch.inference_mode():
            if key not in warmed:
                model(feats)
                sync(device)
                warmed.add(key)
            for _ in range(reps):
                c0, t0 = time.process_time(), time.perf_counter()
                model(feats)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
        return {"model": name, "size": size, "batch": batch, "times_ms": times, "cpu_ms": cpu}
    if name in ("pos_train_cpu", "pos_train_paper"):
        if key not in models:
            models[key] = pos_torch.TrainBench(name.rsplit("_", 1)[1], size, batch, device)
        bench = models[key]
        if key not in warmed:
            bench.step()
            warmed.add(key)
        for _ in range(reps):
            c0, t0 = time.process_time(), time.perf_counter()
            bench.step(phases)
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        return {"model": name, "size": size, "batch": batch, "times_ms": times, "cpu_ms": cpu,
                "phases_ms": phases, "solver": pos_torch.solver_name()}
    raise ValueError(f"unknown POS request {name!r} (pos_forward_paper, pos_forward_cpu, pos_train_cpu, pos_train_paper)")


def run_episode(parts, models, warmed):
    """`episode_paper <size> <reps> <shots> [file]` (see the module docstring)."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import episode_torch

    if parts[0] != "episode_paper" or len(parts) not in (4, 5):
        raise ValueError("expected 'episode_paper <size> <reps> <shots> [file]'")
    size, reps, shots = int(parts[1]), int(parts[2]), int(parts[3])
    path = parts[4] if len(parts) == 5 else None
    if size < 32 or reps < 1 or not 1 <= shots <= 5:
        raise ValueError("size must be >= 32, reps >= 1 and shots in 1..=5")
    key = ("episode_paper", size, path)
    if key not in models:
        # One model at a time: the paper model is 55 M parameters.
        for k in [k for k in models if k[0] == "episode_paper"]:
            del models[k]
        models[key] = episode_torch.EpisodeBench(size, path)
    bench = models[key]
    if (key, shots) not in warmed:
        bench.run(shots)
        warmed.add((key, shots))
    stages = {n: [] for n in episode_torch.STAGES}
    stages_cpu = {n: [] for n in episode_torch.STAGES}
    for _ in range(reps):
        wall, cpu = bench.run(shots)
        for n, w, c in zip(episode_torch.STAGES, wall, cpu):
            stages[n].append(w)
            stages_cpu[n].append(c)
    return {"model": "episode_paper", "size": size, "shots": shots, "weights": path or "random",
            "times_ms": stages["total"], "cpu_ms": stages_cpu["total"],
            "stages_ms": stages, "stages_cpu_ms": stages_cpu}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fuse-bn", action="store_true")
    parser.add_argument("--head", action="store_true", help="add EfficientNet-Lite0's conv_head")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (models, inputs and timings)")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {}
    warmed = set()
    emit({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__,
          "fuse_bn": args.fuse_bn, "device": str(device)})

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "quit":
            break
        try:
            parts = line.split()
            if parts and parts[0].startswith("episode_"):
                emit(run_episode(parts, models, warmed))
                continue
            if len(parts) not in (3, 4):
                raise ValueError("expected '<model> <size> <reps> [batch]'")
            name, size, reps = parts[0], int(parts[1]), int(parts[2])
            batch = int(parts[3]) if len(parts) == 4 else 1
            if size < 32 or reps < 1 or batch < 1:
                raise ValueError("size must be >= 32, reps >= 1 and batch >= 1")
            if name.startswith("pos_"):
                emit(run_pos(name, size, reps, batch, models, warmed, device))
                continue
            if name not in models:
                models[name] = build(name, args).to(device)
            model = models[name]
            x = torch.randn(batch, 3, size, size).to(device)
            times, cpu = [], []
            with torch.inference_mode():
                if (name, size, batch) not in warmed:
                    model(x)
                    sync(device)
                    warmed.add((name, size, batch))
                for _ in range(reps):
                    c0, t0 = time.process_time(), time.perf_counter()
                    model(x)
                    sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                    cpu.append((time.process_time() - c0) * 1e3)
            emit({"model": name, "size": size, "batch": batch, "times_ms": times, "cpu_ms": cpu})
        except Exception as e:  # the driver gets the reason and the server stays up
            emit({"error": str(e), "request": line})


if __name__ == "__main__":
    main()
