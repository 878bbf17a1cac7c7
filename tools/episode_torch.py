"""PyTorch reference of one whole MM-Former V1 episode at the paper preset, standing in for the
official code (Picsart-AI-Research/Mask-Matching-Transformer at 9e7c687, `MMFormer.forward` in
eval mode) in `cargo xtask bench episode`, and checked against our outputs on the same weights by
tools/check_episode_torch.py.

It follows the official computation op for op (spec ../shared/spec/mmformer-v1.md §1.2, §2, §3),
including where that is wasteful, because it is the official cost that is being measured:

  - backbone: detectron2 R-50 (`build_resnet_backbone`: BasicStem, BottleneckBlock with the stride
    on the 3x3 conv, blocks [3, 4, 6, 3]) with FrozenBatchNorm2d as a separate op after every conv,
    NOT folded into it: under no_grad detectron2's FrozenBatchNorm2d runs
    `F.batch_norm(training=False)`, which is what this does;
  - POS: tools/pos_torch.py with the "paper" config (Mask2Former pixel decoder with the official
    pure-PyTorch deformable attention `ms_deform_attn_core_pytorch`, which is what the official
    code runs on CPU, and the masked-attention decoder with nn.MultiheadAttention);
  - mask matching: `MySelfAlignLayer.spatial_pool`, `conv_{0,1,2}`, `addmask` (the positional
    encoding recomputed per shot), `CrossAT` per level (2 x (CrossAttentionLayer + FFNLayer), the
    same layers for query->support and support->original-query, K/V resized to short side 15),
    `get_sup_propotype`, `get_que_propotype` (the 100 soft proposals resized to each level, then
    the (B, 256, 1, h, w) x (B, 1, 100, h, w) broadcast product, a (B, 256, 100, h, w) tensor,
    summed over space: ~368 MB at the 60x60 level of a 480 input), shot average, cosine against
    the support prototype `.repeat(1, 100, 1)`, `fc2(relu(fc1(.)))`, proposals upsampled to the
    input and `einsum("bq,bqhw->bhw")`, then `cat([1 - out, out])`.

K shots, as the official code does them (spec §3.5): the query backbone and POS run once; the K
support backbones run one image at a time, all before the matching; the query's self-alignment,
conv and positional encodings are computed once; then for EACH shot the support goes through
self-alignment, conv and addmask, EACH level's CrossAT runs on (query, this support) -- so the
query is cross-aligned K times -- and both prototype sets are pooled from that shot's aligned
maps: the proposal resize and the (B, 256, 100, h, w) query pooling run K times per level. The
query and support prototypes are summed over shots and divided by K, then one cosine.

Parameter names are the official state-dict names (spec §6.2): `backbone.*`, `sem_seg_head.*`,
`conv_{0,1,2}`, `crossat_{0,1,2}`, `fc1`, `fc2`, so a dump of our weights loads strictly. The
official module also holds `crossat_3` (FFN 256, 2 heads) and, in the checkpoints, legacy
`sem_seg_head.pixel_decoder.crossat_*`; neither takes part in the forward, our model does not
carry them, and they are left out here.

Inputs are normalised (B, 3, H, W) tensors (the official `(x - pixel_mean) / pixel_std` and
`ImageList.from_tensors(.., 32)` padding are outside the timed model, as in ours; sizes here are
multiples of 32) and (B, H, W) support labels with 1 = object, 255 = ignore.
"""

import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pos_torch  # noqa: E402

# The stages of one episode, in the order of `crates/mmformer/src/bench.rs` EPISODE_STAGES.
STAGES = ["backbone (query)", "pos", "backbone (supports)", "mm", "total"]

# ---- detectron2 R-50 with FrozenBatchNorm2d ---------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: four buffers, and without autograd one `F.batch_norm` in
    eval mode (its own pass over the map after the conv, not folded into the conv weights)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class Conv2d(nn.Conv2d):
    """detectron2.layers.Conv2d: conv, then `norm`, then `activation` (names `weight`,
    `norm.*`)."""

    def __init__(self, cin, cout, k, stride=1, padding=0, norm=None, activation=None):
        super().__init__(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class BasicStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, norm=FrozenBatchNorm2d(64))

    def forward(self, x):
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """`STRIDE_IN_1X1 False`: the stride sits on conv2 (3x3); projection shortcut when the
    channel count changes (the first block of each stage)."""

    def __init__(self, cin, cout, width, stride):
        super().__init__()
        self.shortcut = (Conv2d(cin, cout, 1, stride=stride, norm=FrozenBatchNorm2d(cout))
                         if cin != cout else None)
        self.conv1 = Conv2d(cin, width, 1, stride=1, norm=FrozenBatchNorm2d(width))
        self.conv2 = Conv2d(width, width, 3, stride=stride, padding=1, norm=FrozenBatchNorm2d(width))
        self.conv3 = Conv2d(width, cout, 1, norm=FrozenBatchNorm2d(cout))

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out += shortcut
        return F.relu_(out)


class ResNet50(nn.Module):
    """`build_resnet_backbone` at DEPTH 50, out_features res2..res5 (names `stem.*`, `res{n}.{b}.*`)."""

    def __init__(self):
        super().__init__()
        self.stem = BasicStem()
        cin = 64
        self.stage_names = []
        for n, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512])):
            cout = width * 4
            stage = []
            for b in range(blocks):
                stride = 2 if (b == 0 and n > 0) else 1
                stage.append(BottleneckBlock(cin, cout, width, stride))
                cin = cout
            name = f"res{n + 2}"
            self.add_module(name, nn.Sequential(*stage))
            self.stage_names.append(name)

    def forward(self, x):
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs


# ---- mask matching (official MMFormer minus the POS) ------------------------------------------


class MySelfAlignLayer(nn.Module):
    """`spatial_pool`: channel mean -> softmax over positions -> attention-pooled channel vector
    -> sigmoid gate per channel."""

    def forward(self, x):
        batch, channel, height, width = x.size()
        flat = x.view(batch, channel, height * width)
        context_mask = torch.mean(flat, dim=1).unsqueeze(1).view(batch, 1, height * width)
        context_mask = F.softmax(context_mask, dim=2)
        context = torch.matmul(flat, context_mask.transpose(1, 2)).unsqueeze(-1)
        return x * torch.sigmoid(context)


class CrossAT(nn.Module):
    """One level's cross-alignment block (`crossat_{i}`), as the official `CrossAT.forward`."""

    def __init__(self, dim_feedforward, hidden_dim=256, nhead=4, num_layer=2):
        super().__init__()
        self.num_layer = num_layer
        self.transformer_cross_attention_layers = nn.ModuleList(
            pos_torch.CrossAttentionLayer(hidden_dim, nhead) for _ in range(num_layer))
        self.transformer_ffn_layers = nn.ModuleList(
            pos_torch.FFNLayer(hidden_dim, dim_feedforward) for _ in range(num_layer))

    @staticmethod
    def _kv_size(h, w, minsize):
        if h > w:
            return int(1.0 * h * minsize / w), minsize
        return minsize, int(1.0 * w * minsize / h)

    def forward(self, out_que, out_sup, pos_que, pos_sup, minsize=15):
        bs, c, h, w = out_que.shape
        sh, sw = out_sup.shape[-2:]
        tok = lambda t: t.flatten(2).permute(2, 0, 1)  # (B, C, h, w) -> (h*w, B, C)
        if not (h == minsize or w == minsize):
            qs, ss = self._kv_size(h, w, minsize), self._kv_size(sh, sw, minsize)
            kv_que = tok(F.interpolate(out_que, size=qs, mode="bilinear"))
            kv_sup = tok(F.interpolate(out_sup, size=ss, mode="bilinear"))
            kv_pos_que = tok(F.interpolate(pos_que, size=qs, mode="bilinear"))
            kv_pos_sup = tok(F.interpolate(pos_sup, size=ss, mode="bilinear"))
            out_que, out_sup, pos_sup, pos_que = tok(out_que), tok(out_sup), tok(pos_sup), tok(pos_que)
        else:
            out_que, out_sup, pos_sup, pos_que = tok(out_que), tok(out_sup), tok(pos_sup), tok(pos_que)
            kv_que, kv_sup, kv_pos_que, kv_pos_sup = out_que, out_sup, pos_que, pos_sup
        for i in range(self.num_layer):
            out_que = self.transformer_cross_attention_layers[i](out_que, kv_sup, None, kv_pos_sup, pos_que)
            out_que = self.transformer_ffn_layers[i](out_que)
        for i in range(self.num_layer):
            out_sup = self.transformer_cross_attention_layers[i](out_sup, kv_que, None, kv_pos_que, pos_sup)
            out_sup = self.transformer_ffn_layers[i](out_sup)
        return out_que.permute(1, 2, 0).view(bs, c, h, w), out_sup.permute(1, 2, 0).view(bs, c, sh, sw)


class MMFormerV1(nn.Module):
    """The whole V1 model at inference: backbone, `sem_seg_head` (the POS) and the mask matching
    at the top level, under the official names."""

    def __init__(self, num_queries=100, conv_dim=256):
        super().__init__()
        self.backbone = ResNet50()
        self.sem_seg_head = pos_torch.Pos("paper")
        self.num_queries = num_queries
        for i, inc in enumerate([2048, 1024, 512]):
            self.add_module(f"crossat_{i}", CrossAT(512, nhead=4, num_layer=2))
            self.add_module(f"conv_{i}", nn.Conv2d(inc, 256, kernel_size=1, stride=1, padding=0, bias=False))
        self.fc1 = nn.Linear(num_queries, num_queries * 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(num_queries * 5, num_queries)
        self.pe_layer = pos_torch.PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.myat = MySelfAlignLayer()

    # -- the official helpers --

    def channel_change(self, feats):
        for i in range(len(feats)):
            feats[i] = getattr(self, f"conv_{i}")(feats[i])
        return feats

    def addmask(self, out_sup, sup_label):
        suplabels = sup_label.clone().unsqueeze(1).float()
        pos_sup = []
        for i in range(len(out_sup)):
            suplabel = F.interpolate(suplabels, size=out_sup[i].shape[-2:], mode="bilinear")
            pos_i = self.pe_layer(out_sup[i])
            out_sup[i] = out_sup[i] * suplabel
            pos_sup.append(pos_i * suplabel)
        return out_sup, pos_sup

    @staticmethod
    def get_sup_propotype(feats, label):
        label = F.interpolate(label.unsqueeze(1), size=feats.shape[-2:], mode="bilinear", align_corners=True)
        weight = torch.sum(label, dim=(2, 3))
        proto = torch.sum(feats * label, dim=(2, 3)) / (weight + 0.0000001)
        return proto.unsqueeze(-1)  # (B, C, 1)

    @staticmethod
    def get_que_propotype(feats, masks):
        label = F.interpolate(masks, size=feats.shape[-2:], mode="bilinear", align_corners=True)
        weight = torch.sum(label, dim=(2, 3))  # (B, N)
        # The official broadcast product: (B, C, 1, h, w) * (B, 1, N, h, w) -> (B, C, N, h, w).
        proto = feats.unsqueeze(2) * label.unsqueeze(1)
        return torch.sum(proto, dim=(3, 4)) / weight.unsqueeze(1)  # (B, C, N)

    # -- the episode --

    def forward(self, query, supports, labels, marks=None, trace=None):
        """`query`: (B, 3, H, W) normalised; `supports`: K of them; `labels`: K (B, Hs, Ws) labels.

        `marks`, when a list, receives (wall, cpu) clock readings at the four stage boundaries
        (start, after the query backbone, after the POS, after the support backbones, end).
        `trace`, when a dict, receives the intermediates check_episode_torch.py compares.
        Returns the official `few_shot_result` (B, 2, H, W) = cat([1 - out, out])."""
        mark = (lambda: marks.append((time.perf_counter(), time.process_time()))) if marks is not None else (lambda: None)
        mark()
        features = self.backbone(query)
        mark()
        outputs = self.sem_seg_head([features["res2"], features["res3"], features["res4"], features["res5"]])
        mask_features = outputs["pred_masks"].sigmoid()
        mark()
        shot = len(supports)
        # Official: the labels are stacked shot-first and 255 (ignore) set to 0 in place.
        sup_label = torch.stack(labels, 0).clone()
        sup_label[sup_label == 255] = 0
        supfeatures = [self.backbone(x) for x in supports]
        mark()

        out_que = [features["res5"].float(), features["res4"].float(), features["res3"].float()]
        for i in range(len(out_que)):
            out_que[i] = self.myat(out_que[i])
        out_que = self.channel_change(out_que)
        pos_que = [self.pe_layer(x) for x in out_que]

        que_embeds, sup_embeds = None, None
        for i in range(shot):
            out_sup = [supfeatures[i]["res5"].float(), supfeatures[i]["res4"].float(), supfeatures[i]["res3"].float()]
            for ii in range(3):
                out_sup[ii] = self.myat(out_sup[ii])
            out_sup = self.channel_change(out_sup)
            out_sup, pos_sup = self.addmask(out_sup, sup_label[i])
            out_que_i = []
            for ii in range(3):
                q_aligned, out_sup[ii] = getattr(self, f"crossat_{ii}")(out_que[ii], out_sup[ii], pos_que[ii], pos_sup[ii])
                out_que_i.append(q_aligned)
            sup_i = [self.get_sup_propotype(out_sup[ii], sup_label[i]) for ii in range(3)]
            que_i = [self.get_que_propotype(out_que_i[ii], mask_features) for ii in range(3)]
            q = torch.cat(que_i, dim=1).transpose(1, 2)  # (B, N, 768)
            s = torch.cat(sup_i, dim=1).transpose(1, 2)  # (B, 1, 768)
            que_embeds = q if que_embeds is None else que_embeds + q
            sup_embeds = s if sup_embeds is None else sup_embeds + s
        que_embeds = que_embeds / shot
        sup_embeds = sup_embeds / shot

        embeding = F.cosine_similarity(que_embeds, sup_embeds.repeat(1, self.num_queries, 1), dim=2).unsqueeze(1)
        all_similar = self.fc2(self.relu(self.fc1(embeding))).squeeze(1)
        up = F.interpolate(mask_features, size=(query.shape[-2], query.shape[-1]), mode="bilinear", align_corners=False)
        out = torch.einsum("bq,bqhw->bhw", all_similar, up).unsqueeze(1)
        out_all = torch.cat([1 - out, out], 1)
        mark()
        if trace is not None:
            trace.update({f"query.{k}": v for k, v in features.items()})
            for s_i, f in enumerate(supfeatures):
                trace.update({f"support{s_i}.{k}": f[k] for k in ("res3", "res4", "res5")})
            trace["pred_masks"] = outputs["pred_masks"]
            trace["query_prototypes"] = que_embeds
            trace["support_prototype"] = sup_embeds
            trace["cosine"] = embeding.squeeze(1)
            trace["coefficients"] = all_similar
            trace["out"] = out
        return out_all


# ---- weights and inputs -----------------------------------------------------------------------

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U32": np.uint32, "U8": np.uint8}


def load_safetensors(path):
    """Every tensor of a safetensors file (numpy only, no `safetensors` package needed)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def load_model(tensors):
    """An eval-mode model with `tensors` (official names; other keys ignored) loaded strictly:
    every parameter and buffer of the model must be given and every given model-like name used.
    Returns the model; raises with the lists otherwise."""
    model = MMFormerV1().eval()
    expected = set(model.state_dict().keys())
    given = {k: v for k, v in tensors.items() if not (k.startswith("input.") or k.startswith("output."))}
    missing = sorted(expected - set(given))
    unexpected = sorted(set(given) - expected)
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: {len(missing)} missing {missing[:10]}, "
                         f"{len(unexpected)} unexpected {unexpected[:10]}")
    model.load_state_dict(given, strict=True)
    return model


def random_inputs(size, shots, gen=None):
    """Bench inputs when no file gives them: N(0, 1) images and a centred square label covering
    a quarter of the image (the formula of `bench_episode`)."""
    query = torch.randn(1, 3, size, size, generator=gen)
    supports = [torch.randn(1, 3, size, size, generator=gen) for _ in range(shots)]
    label = torch.zeros(1, size, size)
    label[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1.0
    return query, supports, [label.clone() for _ in range(shots)]


class EpisodeBench:
    """Timing of whole episodes (bench_torch.py's `episode_paper` request)."""

    def __init__(self, size, path=None):
        self.size = size
        if path:
            t = load_safetensors(path)
            self.model = load_model(t)
            self.query = t["input.query"]
            self.supports = [t[f"input.support.{s}"] for s in range(5) if f"input.support.{s}" in t]
            self.labels = [t[f"input.support_label.{s}"] for s in range(len(self.supports))]
            if tuple(self.query.shape[-2:]) != (size, size):
                raise ValueError(f"{path}: query is {tuple(self.query.shape)}, request size {size}")
        else:
            torch.manual_seed(0)
            self.model = MMFormerV1().eval()
            self.query, self.supports, self.labels = random_inputs(size, 5, torch.Generator().manual_seed(0))

    def run(self, shots):
        """One episode; returns ([wall ms per stage], [cpu ms per stage]) in STAGES order."""
        if shots > len(self.supports):
            raise ValueError(f"{shots} shots asked, {len(self.supports)} supports available")
        marks = []
        with torch.no_grad():
            self.model(self.query, self.supports[:shots], self.labels[:shots], marks=marks)
        wall = [(marks[i + 1][0] - marks[i][0]) * 1e3 for i in range(4)] + [(marks[4][0] - marks[0][0]) * 1e3]
        cpu = [(marks[i + 1][1] - marks[i][1]) * 1e3 for i in range(4)] + [(marks[4][1] - marks[0][1]) * 1e3]
        return wall, cpu


if __name__ == "__main__":  # a quick standalone timing: python episode_torch.py [size] [shots] [reps]
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 480
    shots = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    bench = EpisodeBench(size)
    bench.run(shots)
    for _ in range(reps):
        w, c = bench.run(shots)
        print("  ".join(f"{n} {x:.0f} (cpu {y:.0f})" for n, x, y in zip(STAGES, w, c)))
