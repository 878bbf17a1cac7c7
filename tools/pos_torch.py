"""PyTorch side of `cargo xtask bench pos`: the POS (Mask2Former pixel decoder + masked-attention
decoder, no classifier) and its stage-1 criterion, re-implemented from the official Mask2Former /
MM-Former V1 code with OUR configurations (crates/pos/src/config.rs), so the Rust crate can be
timed against the same computation in PyTorch on the same machine.

What is copied from the official code (structure and op sequence, not just shapes):
  - `MSDeformAttn` with the pure-PyTorch `ms_deform_attn_core_pytorch` (F.grid_sample per level),
    which is what the official code runs on CPU;
  - `MSDeformAttnTransformerEncoderOnly` (post-norm layers, ReLU FFN, padding masks of zeros,
    valid ratios, reference points), `PositionEmbeddingSine(normalize=True)`;
  - `MSDeformAttnPixelDecoder.forward_features` (input_proj = Conv1x1 + GN, one FPN level:
    lateral 1x1 conv + GN, bilinear top-down add, 3x3 conv + GN + ReLU, `mask_features` 1x1);
  - `MultiScaleMaskedTransformerDecoder` without `class_embed` (nn.MultiheadAttention cross- and
    self-attention, FFN, decoder_norm, mask_embed MLP, einsum, attention masks from bilinear
    resized logits);
  - the stage-1 criterion: `HungarianMatcher.memory_efficient_forward` without class cost
    (point-sampled BCE + dice costs, scipy `linear_sum_assignment`), `SetCriterion.loss_masks`
    with `get_uncertain_point_coords_with_randomness`, `sigmoid_ce_loss`, `dice_loss`, deep
    supervision on every prediction, and MM-Former's oracle few-shot loss (upsampled sigmoid
    masks, soft IoU argmax, `WeightedDiceLoss` on [1 - p, p]);
  - AdamW (betas 0.9/0.999, eps 1e-8, wd 0.05, wd 0 on norms and embeddings, one parameter group
    per parameter as detectron2 builds them), full-model `clip_grad_norm_(0.01)`.

Weights are random (timing only); `init_like_official` gives the Deformable-DETR zero init of
sampling offsets / attention weights like ours at step 0.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the official matcher's solver
    from scipy.optimize import linear_sum_assignment as _scipy_lsa
except ImportError:  # pragma: no cover - the bench reports which one ran
    _scipy_lsa = None

# ---- configs (crates/pos/src/config.rs) -------------------------------------------------------

CONFIGS = {
    "paper": dict(in_channels=[256, 512, 1024, 2048], hidden_dim=256, gn_groups=32, enc_heads=8,
                  enc_points=4, enc_ffn_dim=1024, enc_layers=6, dec_heads=8, dec_ffn_dim=2048,
                  dec_layers=9, num_queries=100),
    "cpu": dict(in_channels=[24, 40, 112, 320], hidden_dim=64, gn_groups=32, enc_heads=4,
                enc_points=4, enc_ffn_dim=256, enc_layers=2, dec_heads=4, dec_ffn_dim=256,
                dec_layers=6, num_queries=20),
}
# Points per mask for matching and losses (xtask Preset::num_points).
NUM_POINTS = {"paper": 12544, "cpu": 3584}
NUM_LEVELS = 3


def solver_name():
    return "scipy" if _scipy_lsa is not None else "greedy (scipy missing: NOT the official solver)"


# ---- MSDeformAttn (Deformable-DETR, pure PyTorch core) ----------------------------------------

def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(value_spatial_shapes):
        # N_, H_*W_, M_, D_ -> N_*M_, D_, H_, W_
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        # N_, Lq_, M_, P_, 2 -> N_*M_, Lq_, P_, 2
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_l_ = F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear",
                                          padding_mode="zeros", align_corners=False)
        sampling_value_list.append(sampling_value_l_)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(N_, M_ * D_, Lq_)
    return output.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.0)
        nn.init.constant_(self.attention_weights.bias.data, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
        shapes_t = torch.as_tensor(input_spatial_shapes, dtype=torch.long, device=query.device)
        offset_normalizer = torch.stack([shapes_t[..., 1], shapes_t[..., 0]], -1)
        sampling_locations = reference_points[:, :, None, :, None, :] \
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        output = ms_deform_attn_core_pytorch(value, input_spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + src2)
        src2 = self.linear2(F.relu(self.linear1(src)))
        return self.norm2(src + src2)


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, spatial_shapes, level_start_index, reference_points, pos, padding_mask):
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    def __init__(self, d_model, nhead, num_encoder_layers, dim_feedforward, num_feature_levels, enc_n_points):
        super().__init__()
        self.encoder = MSDeformAttnTransformerEncoder([
            MSDeformAttnTransformerEncoderLayer(d_model, dim_feedforward, num_feature_levels, nhead, enc_n_points)
            for _ in range(num_encoder_layers)])
        self.level_embed = nn.Parameter(torch.Tensor(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
        reference_points_list = []
        for lvl, (H_, W_) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H_ - 0.5, H_, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, W_ - 0.5, W_, dtype=torch.float32, device=device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H_)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W_)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    @staticmethod
    def get_valid_ratio(mask):
        _, H, W = mask.shape
        valid_H = torch.sum(~mask[:, :, 0], 1)
        valid_W = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)

    def forward(self, srcs, pos_embeds):
        masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in srcs]
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            bs, c, h, w = src.shape
            spatial_shapes.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        level_start_index = [0]
        for h, w in spatial_shapes[:-1]:
            level_start_index.append(level_start_index[-1] + h * w)
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, src_flatten.device)
        output = self.encoder(src_flatten, spatial_shapes, level_start_index, reference_points,
                              lvl_pos_embed_flatten, mask_flatten)
        return output, spatial_shapes, level_start_index


class PositionEmbeddingSine(nn.Module):
    def __init__(self, num_pos_feats, temperature=10000, normalize=True):
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize = num_pos_feats, temperature, normalize
        self.scale = 2 * math.pi

    def forward(self, x, mask=None):
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Conv2dNorm(nn.Conv2d):
    """detectron2 `Conv2d(..., norm=GroupNorm, activation=...)`: an nn.Conv2d whose forward is
    activation(norm(conv(x))); parameter names `weight`, `norm.weight`, `norm.bias` as officially."""

    def __init__(self, cin, cout, k, bias, groups_gn, activation=None):
        super().__init__(cin, cout, k, padding=k // 2, bias=bias)
        self.norm = nn.GroupNorm(groups_gn, cout)
        self.activation = activation
        # c2_xavier_fill
        nn.init.kaiming_uniform_(self.weight, a=1)
        if bias:
            nn.init.constant_(self.bias, 0)

    def forward(self, x):
        x = self.norm(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))
        return self.activation(x) if self.activation is not None else x


class MSDeformAttnPixelDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, g = cfg["hidden_dim"], cfg["gn_groups"]
        in_ch = cfg["in_channels"]
        # res5, res4, res3 (low to high resolution)
        self.input_proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_ch[3 - i], d, kernel_size=1), nn.GroupNorm(g, d)) for i in range(NUM_LEVELS)])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=d, nhead=cfg["enc_heads"], num_encoder_layers=cfg["enc_layers"],
            dim_feedforward=cfg["enc_ffn_dim"], num_feature_levels=NUM_LEVELS, enc_n_points=cfg["enc_points"])
        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.mask_features = nn.Conv2d(d, d, kernel_size=1, stride=1, padding=0)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.constant_(self.mask_features.bias, 0)
        # one FPN level (res2)
        self.adapter_1 = Conv2dNorm(in_ch[0], d, 1, bias=False, groups_gn=g)
        self.layer_1 = Conv2dNorm(d, d, 3, bias=False, groups_gn=g, activation=F.relu)

    def forward_features(self, features):
        # features: [res2, res3, res4, res5]
        srcs, pos = [], []
        for idx in range(NUM_LEVELS):
            x = features[3 - idx].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        y, spatial_shapes, level_start_index = self.transformer(srcs, pos)
        bs = y.shape[0]
        sections = [h * w for h, w in spatial_shapes]
        y = torch.split(y, sections, dim=1)
        out = [z.transpose(1, 2).view(bs, -1, spatial_shapes[i][0], spatial_shapes[i][1]) for i, z in enumerate(y)]
        x = features[0].float()
        cur_fpn = self.adapter_1(x)
        z = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
        z = self.layer_1(z)
        out.append(z)
        multi_scale_features = out[:NUM_LEVELS]
        return self.mask_features(out[-1]), out[0], multi_scale_features


# ---- MultiScaleMaskedTransformerDecoder (no classifier) ---------------------------------------

class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, query_pos):
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, value=tgt, attn_mask=None, key_padding_mask=None)[0]
        return self.norm(tgt + tgt2)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        tgt2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, attn_mask=memory_mask,
                                   key_padding_mask=None)[0]
        return self.norm(tgt + tgt2)


class FFNLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt):
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.num_layers = num_layers

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["hidden_dim"]
        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.num_heads = cfg["dec_heads"]
        self.num_layers = cfg["dec_layers"]
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg["dec_heads"]) for _ in range(self.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg["dec_heads"]) for _ in range(self.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, cfg["dec_ffn_dim"]) for _ in range(self.num_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.num_queries = cfg["num_queries"]
        self.query_feat = nn.Embedding(self.num_queries, d)
        self.query_embed = nn.Embedding(self.num_queries, d)
        self.num_feature_levels = NUM_LEVELS
        self.level_embed = nn.Embedding(NUM_LEVELS, d)
        self.input_proj = nn.ModuleList(nn.Sequential() for _ in range(NUM_LEVELS))  # identity
        self.mask_embed = MLP(d, d, d, 3)
        # Parity hooks (tools/check_episode_torch.py), off by default and not in the official code:
        # `inject_attn_masks`, a list of dec_layers (B, N, h*w) tensors (1 = not attended, before the
        # fully-masked-row fix), replaces the mask layer i derives from prediction i; a list in
        # `record_attn_masks` collects the masks this run derives, in the same layout.
        self.inject_attn_masks = None
        self.record_attn_masks = None

    def forward(self, x, mask_features):
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i], None).flatten(2))
            src.append(self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None])
            pos[-1] = pos[-1].permute(2, 0, 1)
            src[-1] = src[-1].permute(2, 0, 1)
        _, bs, _ = src[0].shape
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        predictions_mask = []
        outputs_mask, attn_mask = self.forward_prediction_heads(output, mask_features, size_list[0])
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            if self.record_attn_masks is not None:
                self.record_attn_masks.append(attn_mask[::self.num_heads].clone())
            if self.inject_attn_masks is not None:
                attn_mask = (self.inject_attn_masks[i].bool().unsqueeze(1)
                             .repeat(1, self.num_heads, 1, 1).flatten(0, 1))
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](output, src[level_index], attn_mask,
                                                                pos[level_index], query_embed)
            output = self.transformer_self_attention_layers[i](output, query_embed)
            output = self.transformer_ffn_layers[i](output)
            outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels])
            predictions_mask.append(outputs_mask)
        return {"pred_masks": predictions_mask[-1],
                "aux_outputs": [{"pred_masks": m} for m in predictions_mask[:-1]]}

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
                     < 0.5).bool()
        return outputs_mask, attn_mask.detach()


class Pos(nn.Module):
    """`sem_seg_head` of the POS: pixel decoder + predictor."""

    def __init__(self, preset):
        super().__init__()
        cfg = CONFIGS[preset]
        self.cfg = cfg
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg)
        self.predictor = MultiScaleMaskedTransformerDecoder(cfg)

    def forward(self, features):
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale, mask_features)


# ---- stage-1 criterion ------------------------------------------------------------------------

def point_sample(input, point_coords, **kwargs):
    add_dim = False
    if point_coords.dim() == 3:
        add_dim = True
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    if add_dim:
        output = output.squeeze(3)
    return output


def batch_dice_loss(inputs, targets):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_loss(inputs, targets):
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, (1 - targets))
    return loss / hw


def dice_loss(inputs, targets, num_masks):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs, targets, num_masks):
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits):
    return -(torch.abs(logits))


def get_uncertain_point_coords_with_randomness(coarse_logits, uncertainty_func, num_points, oversample_ratio,
                                               importance_sample_ratio):
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=coarse_logits.device)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=coarse_logits.device)
    idx += shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain_points, 2)
    if num_random_points > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_boxes, num_random_points, 2, device=coarse_logits.device)], dim=1)
    return point_coords


def _greedy_assignment(C):
    """Only when scipy is missing: a greedy stand-in, NOT the Hungarian solver."""
    C = C.clone()
    rows, cols = [], []
    for _ in range(min(C.shape)):
        k = int(torch.argmin(C))
        r, c = divmod(k, C.shape[1])
        rows.append(r)
        cols.append(c)
        C[r, :] = float("inf")
        C[:, c] = float("inf")
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    return [rows[i] for i in order], [cols[i] for i in order]


class HungarianMatcher(nn.Module):
    def __init__(self, cost_mask=5.0, cost_dice=5.0, num_points=12544):
        super().__init__()
        self.cost_mask, self.cost_dice, self.num_points = cost_mask, cost_dice, num_points

    @torch.no_grad()
    def forward(self, outputs, targets):
        bs, num_queries = outputs["pred_masks"].shape[:2]
        indices = []
        for b in range(bs):
            out_mask = outputs["pred_masks"][b]
            tgt_mask = targets[b]["masks"].to(out_mask)
            out_mask = out_mask[:, None]
            tgt_mask = tgt_mask[:, None]
            point_coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            tgt_mask = point_sample(tgt_mask, point_coords.repeat(tgt_mask.shape[0], 1, 1),
                                    align_corners=False).squeeze(1)
            out_mask = point_sample(out_mask, point_coords.repeat(out_mask.shape[0], 1, 1),
                                    align_corners=False).squeeze(1)
            out_mask = out_mask.float()
            tgt_mask = tgt_mask.float()
            cost_mask = batch_sigmoid_ce_loss(out_mask, tgt_mask)
            cost_dice = batch_dice_loss(out_mask, tgt_mask)
            C = self.cost_mask * cost_mask + self.cost_dice * cost_dice
            C = C.reshape(num_queries, -1).cpu()
            if _scipy_lsa is not None:
                i, j = _scipy_lsa(C)
            else:
                i, j = _greedy_assignment(C)
            indices.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices


class SetCriterion(nn.Module):
    def __init__(self, num_points, oversample_ratio=3.0, importance_sample_ratio=0.75, mask_weight=5.0,
                 dice_weight=5.0):
        super().__init__()
        self.matcher = HungarianMatcher(5.0, 5.0, num_points)
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_weight, self.dice_weight = mask_weight, dice_weight

    @staticmethod
    def _get_src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    @staticmethod
    def _get_tgt_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for (_, tgt) in indices])
        return batch_idx, tgt_idx

    def loss_masks(self, outputs, targets, indices, num_masks):
        src_idx = self._get_src_permutation_idx(indices)
        tgt_idx = self._get_tgt_permutation_idx(indices)
        src_masks = outputs["pred_masks"][src_idx]
        # nested_tensor_from_tensor_list: zero-pad to the largest mask count (all images share
        # the padded size here), then gather the matched ones.
        masks = [t["masks"] for t in targets]
        m = max(x.shape[0] for x in masks)
        target_masks = torch.stack([F.pad(x, (0, 0, 0, 0, 0, m - x.shape[0])) for x in masks])
        target_masks = target_masks.to(src_masks)[tgt_idx]
        src_masks = src_masks[:, None]
        target_masks = target_masks[:, None]
        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks, calculate_uncertainty, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio)
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {"loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
                "loss_dice": dice_loss(point_logits, point_labels, num_masks)}

    def forward(self, outputs, targets):
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets)
        num_masks = float(max(sum(len(t["masks"]) for t in targets), 1))
        losses = self.loss_masks(outputs, targets, indices, num_masks)
        for i, aux in enumerate(outputs["aux_outputs"]):
            indices = self.matcher(aux, targets)
            l_dict = self.loss_masks(aux, targets, indices, num_masks)
            losses.update({k + f"_{i}": v for k, v in l_dict.items()})
        for k in list(losses):
            losses[k] = losses[k] * (self.mask_weight if k.startswith("loss_mask") else self.dice_weight)
        return losses


def get_iou(pred, label):
    """Soft IoU of (B, N, H, W) probabilities with a (B, H, W) 0/1/255 label (255 -> 0)."""
    label = label.clone()
    label[label == 255] = 0
    t = label.unsqueeze(1).float()
    inter = (pred * t).sum((2, 3))
    union = t.sum((2, 3)) + pred.sum((2, 3)) - inter
    return inter / (union + 1e-7)


def weighted_dice_loss(pred2, label):
    """MM-Former's `WeightedDiceLoss` on [1 - p, p] (sigmoid applied), 255 -> background."""
    label = label.clone()
    label[label == 255] = 0
    b = pred2.shape[0]
    t = torch.stack([(label == 0), (label == 1)], 1).float().flatten(2)
    p = pred2.sigmoid().flatten(2)
    inter = (p * t).sum(-1)
    denom = torch.clamp((p * p).sum(-1) + (t * t).sum(-1), min=1e-8)
    return (1 - 2 * inter / denom).sum() / b


def stage1_loss(criterion, outputs, targets, query_label, fewshot_weight=10.0):
    losses = criterion(outputs, targets)
    # Oracle few-shot term (V1: argmax of the soft IoU of the upsampled sigmoid masks).
    h, w = query_label.shape[-2:]
    probs = F.interpolate(outputs["pred_masks"].sigmoid(), size=(h, w), mode="bilinear", align_corners=False)
    with torch.no_grad():
        idx = get_iou(probs, query_label).argmax(1)
    out = probs[torch.arange(probs.shape[0]), idx].unsqueeze(1)
    losses["fewshot_loss"] = weighted_dice_loss(torch.cat([1 - out, out], 1), query_label) * fewshot_weight
    return sum(losses.values()), losses


def no_weight_decay(name):
    """The official groups: no decay on norm layers and nn.Embedding (xtask's default_no_decay)."""
    parts = name.split(".")
    is_norm = any(p.startswith("norm") or p.endswith("_norm") for p in parts) \
        or ("input_proj." in name and len(parts) >= 2 and parts[-2] == "1")
    is_emb = any(name.endswith(s) for s in ["query_feat.weight", "query_embed.weight", "level_embed.weight",
                                            "level_embed"])
    return is_norm or is_emb


def make_optimizer(model, lr=1e-4, weight_decay=0.05):
    groups = [{"params": [p], "weight_decay": 0.0 if no_weight_decay(n) else weight_decay}
              for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


# ---- benchmark inputs (same formulas as xtask/src/bench.rs) -----------------------------------

def feature_shapes(preset, size, batch):
    cfg = CONFIGS[preset]
    return [(batch, c, size // s, size // s) for c, s in zip(cfg["in_channels"], [4, 8, 16, 32])]


def random_features(preset, size, batch, gen=None):
    return [torch.randn(s, generator=gen).relu() for s in feature_shapes(preset, size, batch)]


def synthetic_targets(size, batch):
    """Per image b: a semantic label with background 0 and two rectangles (classes 1, 2), so
    three GT masks; the episode label is class 1's rectangle. The same rectangles as ours."""
    targets, labels = [], []
    for b in range(batch):
        sem = torch.zeros(size, size, dtype=torch.int64)
        y0, x0 = size // 8 + 4 * b, size // 8 + 6 * b
        sem[y0:y0 + size // 3, x0:x0 + size // 3] = 1
        y1, x1 = size // 2 + 2 * b, size // 2 - 3 * b
        sem[y1:y1 + size // 4, x1:x1 + size // 3] = 2
        masks = torch.stack([(sem == c).float() for c in range(3)])
        targets.append({"masks": masks})
        labels.append((sem == 1).long())
    return targets, torch.stack(labels)


class TrainBench:
    """One stage-1 training iteration on fixed backbone features."""

    def __init__(self, preset, size, batch, device="cpu"):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = Pos(preset).train().to(self.device)
        self.criterion = SetCriterion(NUM_POINTS[preset])
        self.opt = make_optimizer(self.model)
        self.features = [f.to(self.device) for f in random_features(preset, size, batch)]
        targets, label = synthetic_targets(size, batch)
        self.targets = [{"masks": t["masks"].to(self.device)} for t in targets]
        self.label = label.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _now(self):
        import time
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self, phases=None):
        t0 = self._now()
        outputs = self.model(self.features)
        t1 = self._now()
        loss, _ = stage1_loss(self.criterion, outputs, self.targets, self.label)
        t2 = self._now()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = self._now()
        torch.nn.utils.clip_grad_norm_(self.params, 0.01)
        self.opt.step()
        t4 = self._now()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"non-finite loss {value}")
        if phases is not None:
            for k, v in zip(["forward", "criterion", "backward", "clip+step"], [t1 - t0, t2 - t1, t3 - t2, t4 - t3]):
                phases.setdefault(k, []).append(v * 1e3)
        return value
