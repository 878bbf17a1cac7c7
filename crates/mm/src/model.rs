//! The mask-matching module (`MMFormer` minus the frozen POS, spec §3).

use std::collections::BTreeMap;

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::{Init, Linear, Module, VarBuilder};
use ops::nn::tokens_to_map;

use crate::config::MmConfig;
use crate::cross_align::CrossAt;
use crate::prototype::{cosine_similarity, support_prototype_tokens, ProposalMasks, SupportMask};
use crate::self_align::self_align;

/// Backbone features of one image at the three matching levels, low to high resolution:
/// `[l0, l1, l2]` = `[res5, res4, res3]`, each (B, C_i, h_i, w_i).
pub type LevelFeatures = [Tensor; 3];

/// What the matching needs from query images, whatever the number of shots: their backbone
/// features and their proposals. Computed once per query (backbone + POS) and reused.
#[derive(Clone, Debug)]
pub struct QueryPass {
    /// `[res5, res4, res3]`, each (B, C, h, w).
    pub features: LevelFeatures,
    /// (B, N, H/4, W/4) POS mask logits.
    pub proposal_logits: Tensor,
}

/// A 1×1 convolution without bias (`conv_{i}`), applied as a matmul over channels.
#[derive(Debug, Clone)]
pub struct Conv1x1 {
    /// (C_out, C_in)
    weight: Tensor,
}

impl Conv1x1 {
    /// Loads `weight` [C_out, C_in, 1, 1]; missing weights get torch's default conv init
    /// U(±1/√C_in).
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (in_channels as f64).sqrt();
        let weight = vb
            .get_with_hints((out_channels, in_channels, 1, 1), "weight", Init::Uniform { lo: -bound, up: bound })?
            .reshape((out_channels, in_channels))?;
        Ok(Self { weight })
    }

    /// `x`: (B, C_in, H, W) -> (B, C_out, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c_out, c_in) = self.weight.dims2()?;
        let (b, c, h, w) = x.dims4()?;
        if c != c_in {
            bail!("conv 1x1: input has {c} channels, layer expects {c_in}");
        }
        if self.weight.track_op() || x.track_op() {
            // Training: the gemm-backed op, whose backward skips the (frozen) features and
            // sums the weight gradient over the batch inside its gemm, where a broadcast
            // matmul's backward computes both and reduces through strided sums.
            let weight = self.weight.reshape((c_out, c_in, 1, 1))?;
            return ops::conv::conv2d_trainable(x, &weight, None, [0; 4]);
        }
        ops::nn::weight_matmul(&self.weight, &x.reshape((b, c, h * w))?)?.reshape((b, c_out, h, w))
    }

    /// [`Self::forward`] as tokens: `x` (B, C_in, H, W) -> (B, H·W, C_out), row-major over
    /// positions, what the cross-alignment reads, without transposing the map.
    pub fn forward_tokens(&self, x: &Tensor) -> Result<Tensor> {
        ops::nn::pointwise_conv_tokens(x, &self.weight)
    }
}

/// The matching MLP `fc2(ReLU(fc1(s)))` over the whole similarity vector (`fc1`, `fc2` at the
/// model root): each coefficient depends on every similarity and on the slot order.
#[derive(Debug, Clone)]
pub struct MatchingMlp {
    fc1: Linear,
    fc2: Linear,
}

/// `torch.nn.Linear` with torch's default init for missing weights (U(±1/√fan_in) for both).
fn torch_linear(fan_in: usize, fan_out: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let init = Init::Uniform { lo: -bound, up: bound };
    let w = vb.get_with_hints((fan_out, fan_in), "weight", init)?;
    let b = vb.get_with_hints(fan_out, "bias", init)?;
    Ok(Linear::new(w, Some(b)))
}

impl MatchingMlp {
    pub fn new(cfg: &MmConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: torch_linear(cfg.num_queries, cfg.mlp_hidden(), vb.pp("fc1"))?,
            fc2: torch_linear(cfg.mlp_hidden(), cfg.num_queries, vb.pp("fc2"))?,
        })
    }

    /// `cosine`: (B, N) -> (`fc1` output before the ReLU (B, 5N), coefficients (B, N)).
    pub fn forward(&self, cosine: &Tensor) -> Result<(Tensor, Tensor)> {
        let hidden = self.fc1.forward(cosine)?;
        let coefficients = self.fc2.forward(&hidden.relu()?)?;
        Ok((hidden, coefficients))
    }
}

/// Named intermediate tensors of one forward pass, for parity checks and debugging.
///
/// Names follow the parity fixture without its `mm.` / `mm.{K}shot.` prefix:
/// `query.self_aligned.l{i}`, `query.conv.l{i}`, `query.pos.l{i}`,
/// `shot{s}.support.{self_aligned,conv,masked,pos_masked}.l{i}`,
/// `shot{s}.cross_aligned.{query,support}.l{i}`, `shot{s}.{query_prototypes,support_prototype}`,
/// `query_prototypes`, `support_prototype`, `cosine`, `fc1_out`, `coefficients`, `out`.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    tensors: BTreeMap<String, Tensor>,
}

impl Trace {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    fn record(trace: &mut Option<&mut Trace>, name: impl FnOnce() -> String, t: &Tensor) {
        if let Some(tr) = trace.as_deref_mut() {
            tr.tensors.insert(name(), t.clone());
        }
    }

    /// [`Self::record`] of tokens (B, h·w, C) as the (B, C, h, w) map the names refer to
    /// (transposed only when tracing).
    fn record_map(trace: &mut Option<&mut Trace>, name: impl FnOnce() -> String, tokens: &Tensor, hw: (usize, usize)) -> Result<()> {
        if let Some(tr) = trace.as_deref_mut() {
            tr.tensors.insert(name(), tokens_to_map(tokens, hw)?);
        }
        Ok(())
    }
}

/// The result of one episode.
#[derive(Debug, Clone)]
pub struct MmOutput {
    /// (B, 1, H, W) `Σ_q c_q · M_q` at the padded input size, unbounded; foreground ⇔ > 0.5.
    pub out: Tensor,
    /// (B, N) cosine similarity of each query prototype with the support prototype.
    pub cosine: Tensor,
    /// (B, N) matching coefficients (MLP output, or the one-hot argmax of the heuristic).
    pub coefficients: Tensor,
    /// (B, N, 3·hidden) query prototypes, averaged over shots.
    pub query_prototypes: Tensor,
    /// (B, 1, 3·hidden) support prototype, averaged over shots.
    pub support_prototype: Tensor,
    /// (B, N, h, w) sigmoid proposals at the POS's resolution (stride 4); see
    /// [`Self::proposals`] for them at the input size.
    pub proposal_probs: Tensor,
    /// The input size (H, W) of `out`.
    pub input_hw: (usize, usize),
}

impl MmOutput {
    /// (B, N, H, W) the sigmoid proposals upsampled to the input size (bilinear,
    /// align_corners=False), as the official code does before its matching (evaluation's
    /// baseline and oracle). Computed on each call: inference does not need them, and the
    /// stage-2 loss takes [`Self::proposal_probs`] (`losses::fewshot::soft_iou_upsampled`).
    pub fn proposals(&self) -> Result<Tensor> {
        ops::resize::resize_bilinear(&self.proposal_probs, self.input_hw, false)
    }

    /// (B, 2, H, W) the official `few_shot_result` `[1 − out, out]`.
    pub fn two_channel(&self) -> Result<Tensor> {
        ops::nn::complement_pair(&self.out)
    }

    /// (B, H, W) u8 foreground prediction: the argmax over `[1 − out, out]`, i.e. `out > 0.5`.
    pub fn foreground(&self) -> Result<Tensor> {
        self.out.squeeze(1)?.gt(0.5)
    }
}

/// How the proposals are given to [`MaskMatching`].
#[derive(Clone, Copy)]
enum Proposals<'a> {
    /// POS `pred_masks` logits.
    Logits(&'a Tensor),
    /// `sigmoid(pred_masks)`.
    Probabilities(&'a Tensor),
}

/// The query's per-level features after self-alignment and channel reduction, with their
/// positional encodings, as tokens. Computed once per episode whatever the shot count.
struct QuerySide {
    /// (B, h·w, C) per level.
    feats: Vec<Tensor>,
    /// Each level's map size (h, w).
    hw: Vec<(usize, usize)>,
    /// (B, h·w, C) sine encodings per level.
    pos: Vec<Tensor>,
    /// The proposals resized to each level, for the query prototypes of every shot.
    masks: Vec<ProposalMasks>,
}

impl QuerySide {
    /// The query side repeated `k` times along the batch, for `k` stacked shots.
    fn repeat(&self, k: usize) -> Result<Self> {
        let rep = |ts: &[Tensor]| ts.iter().map(|t| t.repeat((k, 1, 1))).collect::<Result<Vec<_>>>();
        Ok(Self {
            feats: rep(&self.feats)?,
            hw: self.hw.clone(),
            pos: rep(&self.pos)?,
            masks: self.masks.iter().map(|m| m.repeat(k)).collect::<Result<Vec<_>>>()?,
        })
    }
}

/// Finest-level tokens (batch × positions) up to which shots are stacked into one pass. Past it
/// the stacked activations outgrow the caches and the allocator's reuse, and stacking stops
/// paying (measured: the cpu preset's 5-shot MM at 256², 1024 tokens a shot, 149 → 103–118 ms
/// stacked; the paper preset's at 480², 3600 a shot, no faster in groups of 2 or 5).
const STACK_TOKENS: usize = 6144;

/// How many shots to stack per pass (1 = one by one).
fn shot_group(feats: &[LevelFeatures], b: usize) -> usize {
    let finest = feats[0][2].dims().iter().skip(2).product::<usize>().max(1);
    (STACK_TOKENS / (b * finest).max(1)).clamp(1, feats.len())
}

/// Whether the shots can run as one stacked batch: every level and label of one size across
/// shots, each label of batch `b` (otherwise the per-shot path runs and names the bad shot).
fn stackable(feats: &[LevelFeatures], labels: &[Tensor], b: usize) -> bool {
    let same_levels = feats.iter().all(|f| (0..3).all(|i| f[i].dims() == feats[0][i].dims()));
    let same_labels = labels.iter().all(|l| l.dims() == labels[0].dims() && l.dims().first() == Some(&b) && l.dtype() == labels[0].dtype());
    same_levels && same_labels
}

/// The mask-matching module: `conv_{0,1,2}`, `crossat_{0,1,2}`, `fc1`, `fc2` (official names,
/// top level of the state dict).
#[derive(Debug, Clone)]
pub struct MaskMatching {
    conv: Vec<Conv1x1>,
    /// Empty when cross-alignment is ablated.
    crossat: Vec<CrossAt>,
    /// `None` for the heuristic (highest-cosine) matching ablation.
    matcher: Option<MatchingMlp>,
    cfg: MmConfig,
}

impl MaskMatching {
    /// `vb` at the model root (names `conv_0.weight`, `crossat_0.…`, `fc1.weight`, …).
    pub fn new(cfg: &MmConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let conv = (0..3)
            .map(|i| Conv1x1::new(cfg.in_channels[i], cfg.hidden_dim, vb.pp(format!("conv_{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let crossat = if cfg.cross_alignment {
            (0..3).map(|i| CrossAt::new(cfg, vb.pp(format!("crossat_{i}")))).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let matcher = if cfg.learnable_matching { Some(MatchingMlp::new(cfg, vb.clone())?) } else { None };
        Ok(Self { conv, crossat, matcher, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &MmConfig {
        &self.cfg
    }

    /// One episode.
    ///
    /// - `query_feats`: the query's backbone features `[res5, res4, res3]`, (B, C_i, h_i, w_i).
    /// - `support_feats`: one `[res5, res4, res3]` per shot (K ≥ 1), batch B.
    /// - `support_labels`: one (B, H_s, W_s) label per shot, 1 = foreground; 255 (ignore) is
    ///   treated as background. Any numeric dtype. It is resized onto each feature map as is:
    ///   like the official code, an unpadded label is stretched over a padded image's features.
    /// - `proposal_logits`: (B, N, h, w) POS mask logits (`pred_masks`), N = `num_queries`.
    /// - `input_hw`: the padded input size (H, W) at which `out` is produced.
    pub fn forward(
        &self,
        query_feats: &LevelFeatures,
        support_feats: &[LevelFeatures],
        support_labels: &[Tensor],
        proposal_logits: &Tensor,
        input_hw: (usize, usize),
    ) -> Result<MmOutput> {
        self.run(query_feats, support_feats, support_labels, Proposals::Logits(proposal_logits), input_hw, None)
    }

    /// [`Self::forward`] on proposal probabilities (`sigmoid(pred_masks)`, (B, N, h, w)) instead
    /// of logits: what stage 2 reads from the proposal shards, where the masks are stored as
    /// probabilities (a u8-quantised 0 or 1 has no finite logit).
    pub fn forward_with_probabilities(
        &self,
        query_feats: &LevelFeatures,
        support_feats: &[LevelFeatures],
        support_labels: &[Tensor],
        proposal_probs: &Tensor,
        input_hw: (usize, usize),
    ) -> Result<MmOutput> {
        self.run(query_feats, support_feats, support_labels, Proposals::Probabilities(proposal_probs), input_hw, None)
    }

    /// [`Self::forward`], also recording the intermediates listed at [`Trace`].
    pub fn forward_traced(
        &self,
        query_feats: &LevelFeatures,
        support_feats: &[LevelFeatures],
        support_labels: &[Tensor],
        proposal_logits: &Tensor,
        input_hw: (usize, usize),
        trace: &mut Trace,
    ) -> Result<MmOutput> {
        self.run(query_feats, support_feats, support_labels, Proposals::Logits(proposal_logits), input_hw, Some(trace))
    }

    fn run(
        &self,
        query_feats: &LevelFeatures,
        support_feats: &[LevelFeatures],
        support_labels: &[Tensor],
        proposals_in: Proposals,
        input_hw: (usize, usize),
        mut trace: Option<&mut Trace>,
    ) -> Result<MmOutput> {
        let proposal_logits = match proposals_in {
            Proposals::Logits(t) | Proposals::Probabilities(t) => t,
        };
        let b = self.check_levels(query_feats, "query", None)?;
        if support_feats.is_empty() {
            bail!("MaskMatching: at least one support shot is needed");
        }
        if support_labels.len() != support_feats.len() {
            bail!(
                "MaskMatching: {} support feature sets but {} support labels",
                support_feats.len(),
                support_labels.len()
            );
        }
        let (pb, n, _, _) = match proposal_logits.dims() {
            &[pb, n, h, w] => (pb, n, h, w),
            _ => bail!("MaskMatching: proposal logits must be (B, N, h, w), got {:?}", proposal_logits.shape()),
        };
        if pb != b || n != self.cfg.num_queries {
            bail!(
                "MaskMatching: proposal logits {:?} must be (B={b}, N={}, h, w)",
                proposal_logits.shape(),
                self.cfg.num_queries
            );
        }
        if input_hw.0 == 0 || input_hw.1 == 0 {
            bail!("MaskMatching: input size {input_hw:?} must be positive");
        }
        let dtype = query_feats[0].dtype();
        let proposals = match proposals_in {
            Proposals::Logits(t) => candle_nn::ops::sigmoid(&t.to_dtype(dtype)?)?,
            Proposals::Probabilities(t) => t.to_dtype(dtype)?,
        };

        let query = self.query_side(query_feats, &proposals, &mut trace)?;
        for (s, feats) in support_feats.iter().enumerate() {
            self.check_levels(feats, &format!("support shot {s}"), Some(b))?;
        }
        let shots = support_feats.len();
        // Shots in groups, each stacked along the batch (shot-major) against the query side
        // repeated: the same per-element math with larger matrix products. Traced runs record
        // per-shot tensors and go one by one.
        let group = if trace.is_none() && stackable(support_feats, support_labels, b) { shot_group(support_feats, b) } else { 1 };
        let mut sum: Option<(Tensor, Tensor)> = None;
        for (g, (feats, labels)) in support_feats.chunks(group).zip(support_labels.chunks(group)).enumerate() {
            let (qp, sp) = match feats.len() {
                1 => self.shot_prototypes(g * group, &query, &feats[0], &labels[0], &mut trace)?,
                k => {
                    let level = |i: usize| Tensor::cat(&feats.iter().map(|f| &f[i]).collect::<Vec<_>>(), 0);
                    let stacked: LevelFeatures = [level(0)?, level(1)?, level(2)?];
                    let labels = Tensor::cat(labels, 0)?;
                    let (qp, sp) = self.shot_prototypes(g * group, &query.repeat(k)?, &stacked, &labels, &mut trace)?;
                    let per_shot = |t: Tensor| -> Result<Tensor> {
                        let (_, r, d) = t.dims3()?;
                        t.reshape((k, b, r, d))?.sum(0)
                    };
                    (per_shot(qp)?, per_shot(sp)?)
                }
            };
            sum = Some(match sum {
                None => (qp, sp),
                Some((aq, asup)) => ((aq + qp)?, (asup + sp)?),
            });
        }
        let (qsum, ssum) = sum.expect("at least one shot was checked above");
        let k = shots as f64;
        let query_prototypes = (qsum / k)?;
        let support_prototype = (ssum / k)?;
        Trace::record(&mut trace, || "query_prototypes".into(), &query_prototypes);
        Trace::record(&mut trace, || "support_prototype".into(), &support_prototype);

        let head = self.match_prototypes(&query_prototypes, &support_prototype, &proposals, input_hw)?;
        if let Some(h) = &head.fc1_out {
            Trace::record(&mut trace, || "fc1_out".into(), h);
        }
        Trace::record(&mut trace, || "cosine".into(), &head.cosine);
        Trace::record(&mut trace, || "coefficients".into(), &head.coefficients);
        Trace::record(&mut trace, || "out".into(), &head.out);
        Ok(MmOutput {
            out: head.out,
            cosine: head.cosine,
            coefficients: head.coefficients,
            query_prototypes,
            support_prototype,
            proposal_probs: proposals,
            input_hw,
        })
    }

    /// The matching head on given (shot-averaged) prototypes: cosine, coefficients and the
    /// final mask (spec §3.6).
    ///
    /// `query_prototypes`: (B, N, D); `support_prototype`: (B, 1, D); `proposals`: (B, N, h, w)
    /// sigmoid probabilities; `input_hw`: output size.
    pub fn match_prototypes(
        &self,
        query_prototypes: &Tensor,
        support_prototype: &Tensor,
        proposals: &Tensor,
        input_hw: (usize, usize),
    ) -> Result<MatchOutput> {
        let (b, n, d) = query_prototypes.dims3()?;
        if support_prototype.dims() != [b, 1, d] {
            bail!(
                "match_prototypes: support prototype {:?} must be (B={b}, 1, D={d})",
                support_prototype.shape()
            );
        }
        if n != self.cfg.num_queries || proposals.dims().len() != 4 || proposals.dims()[..2] != [b, n] {
            bail!(
                "match_prototypes: prototypes {:?} and proposals {:?} must share (B, N={})",
                query_prototypes.shape(),
                proposals.shape(),
                self.cfg.num_queries
            );
        }
        let cosine = cosine_similarity(query_prototypes, support_prototype)?;
        let (fc1_out, coefficients) = match &self.matcher {
            Some(mlp) => {
                let (h, c) = mlp.forward(&cosine)?;
                (Some(h), c)
            }
            None => (None, one_hot_argmax(&cosine)?),
        };
        // The official `Σ_q c_q · upsample(M_q)` taken as `upsample(Σ_q c_q · M_q)`: bilinear
        // resizing is linear with the same weights for every channel, so the two are equal
        // (to float rounding), and the N-channel upsampling to the input size is avoided.
        let (_, _, ph, pw) = proposals.dims4()?;
        let low = ops::nn::matmul(&coefficients.unsqueeze(1)?, &proposals.reshape((b, n, ph * pw))?)?.reshape((b, 1, ph, pw))?;
        let out = ops::resize::resize_bilinear(&low, input_hw, false)?;
        Ok(MatchOutput { cosine, fc1_out, coefficients, out })
    }

    /// Batch size of a level triple, checking ranks, channels and (if given) the batch.
    fn check_levels(&self, feats: &LevelFeatures, what: &str, batch: Option<usize>) -> Result<usize> {
        let mut b0 = batch;
        for (i, f) in feats.iter().enumerate() {
            let (b, c) = match f.dims() {
                &[b, c, h, w] if h > 0 && w > 0 => (b, c),
                _ => bail!("MaskMatching: {what} level l{i} must be a non-empty (B, C, h, w) map, got {:?}", f.shape()),
            };
            if c != self.cfg.in_channels[i] {
                bail!(
                    "MaskMatching: {what} level l{i} has {c} channels, config expects {} (levels are [res5, res4, res3])",
                    self.cfg.in_channels[i]
                );
            }
            match b0 {
                Some(b0) if b0 != b => bail!("MaskMatching: {what} level l{i} has batch {b}, expected {b0}"),
                _ => b0 = Some(b),
            }
            if !matches!(f.dtype(), DType::F32 | DType::F64) {
                bail!("MaskMatching: {what} level l{i} must be f32 or f64, got {:?}", f.dtype());
            }
        }
        Ok(b0.expect("three levels"))
    }

    fn query_side(&self, feats: &LevelFeatures, proposals: &Tensor, trace: &mut Option<&mut Trace>) -> Result<QuerySide> {
        let mut out = QuerySide { feats: Vec::with_capacity(3), hw: Vec::with_capacity(3), pos: Vec::with_capacity(3), masks: Vec::with_capacity(3) };
        for (i, f) in feats.iter().enumerate() {
            let (x, hw) = self.reduce(f, i, trace, "query")?;
            let pos = self.position(x.dim(0)?, hw, &x)?;
            Trace::record_map(trace, || format!("query.pos.l{i}"), &pos, hw)?;
            out.masks.push(ProposalMasks::new(proposals, hw)?);
            out.feats.push(x);
            out.hw.push(hw);
            out.pos.push(pos);
        }
        Ok(out)
    }

    /// Self-alignment (unless ablated) and `conv_{i}`, recording both under `prefix`: the
    /// reduced map as tokens (B, h·w, C), and its size.
    fn reduce(&self, f: &Tensor, i: usize, trace: &mut Option<&mut Trace>, prefix: &str) -> Result<(Tensor, (usize, usize))> {
        let x = if self.cfg.self_alignment { self_align(f)? } else { f.clone() };
        Trace::record(trace, || format!("{prefix}.self_aligned.l{i}"), &x);
        let (_, _, h, w) = x.dims4()?;
        let t = self.conv[i].forward_tokens(&x)?;
        Trace::record_map(trace, || format!("{prefix}.conv.l{i}"), &t, (h, w))?;
        Ok((t, (h, w)))
    }

    /// The sine encoding of an (h, w) map as tokens (B, h·w, hidden), in `like`'s dtype.
    fn position(&self, b: usize, (h, w): (usize, usize), like: &Tensor) -> Result<Tensor> {
        ops::position::sine_position_tokens(b, h, w, self.cfg.hidden_dim / 2, like.device())?.to_dtype(like.dtype())
    }

    /// One shot: support features through self-alignment, reduction, masking (`addmask`),
    /// cross-alignment with the query, then both prototype sets concatenated over levels.
    /// Returns (query prototypes (B, N, 3C), support prototype (B, 1, 3C)).
    fn shot_prototypes(
        &self,
        s: usize,
        query: &QuerySide,
        feats: &LevelFeatures,
        label: &Tensor,
        trace: &mut Option<&mut Trace>,
    ) -> Result<(Tensor, Tensor)> {
        let b = query.feats[0].dim(0)?;
        let mask = binary_mask(label, b, query.feats[0].dtype())
            .map_err(|e| candle_core::Error::Msg(format!("MaskMatching: support label of shot {s}: {e}")))?;
        let (mut qps, mut sps) = (Vec::with_capacity(3), Vec::with_capacity(3));
        for (i, f) in feats.iter().enumerate() {
            let (x, (h, w)) = self.reduce(f, i, trace, &format!("shot{s}.support"))?;
            // addmask: features and positions times the label resized with align_corners=False
            // (per token: one weight per row).
            let m = ops::resize::resize_bilinear(&mask, (h, w), false)?.reshape((b, h * w, 1))?;
            let x = x.broadcast_mul(&m)?;
            // The sine encoding depends only on the size: reuse the query's when they agree.
            let pos = if query.hw[i] == (h, w) { query.pos[i].clone() } else { self.position(b, (h, w), &x)? };
            let pos = pos.broadcast_mul(&m)?;
            Trace::record_map(trace, || format!("shot{s}.support.masked.l{i}"), &x, (h, w))?;
            Trace::record_map(trace, || format!("shot{s}.support.pos_masked.l{i}"), &pos, (h, w))?;
            let qhw = query.hw[i];
            match self.crossat.get(i) {
                Some(cat) => {
                    // Pooled straight from the aligned tokens; maps only for a trace. Untraced,
                    // the support is aligned only where its prototype reads it.
                    let pooling = SupportMask::new(&mask, (h, w), trace.is_none())?;
                    let (qa, sa) = cat.forward_tokens(&query.feats[i], qhw, &x, (h, w), &query.pos[i], &pos, pooling.rows())?;
                    Trace::record_map(trace, || format!("shot{s}.cross_aligned.query.l{i}"), &qa, qhw)?;
                    Trace::record_map(trace, || format!("shot{s}.cross_aligned.support.l{i}"), &sa, (h, w))?;
                    sps.push(pooling.pool(&sa)?);
                    qps.push(query.masks[i].pool_tokens(&qa)?);
                }
                None => {
                    Trace::record_map(trace, || format!("shot{s}.cross_aligned.query.l{i}"), &query.feats[i], qhw)?;
                    Trace::record_map(trace, || format!("shot{s}.cross_aligned.support.l{i}"), &x, (h, w))?;
                    sps.push(support_prototype_tokens(&x, (h, w), &mask)?);
                    qps.push(query.masks[i].pool_tokens(&query.feats[i])?);
                }
            }
        }
        let qp = Tensor::cat(&qps, 2)?;
        let sp = Tensor::cat(&sps, 1)?.unsqueeze(1)?;
        Trace::record(trace, || format!("shot{s}.query_prototypes"), &qp);
        Trace::record(trace, || format!("shot{s}.support_prototype"), &sp);
        Ok((qp, sp))
    }
}

/// The matching head's outputs (see [`MaskMatching::match_prototypes`]).
#[derive(Debug, Clone)]
pub struct MatchOutput {
    /// (B, N)
    pub cosine: Tensor,
    /// (B, 5N) `fc1` output before the ReLU; `None` for the heuristic matching.
    pub fc1_out: Option<Tensor>,
    /// (B, N)
    pub coefficients: Tensor,
    /// (B, 1, H, W)
    pub out: Tensor,
}

/// (B, N) one-hot of the row argmax: the heuristic baseline keeps the best-matching proposal.
fn one_hot_argmax(scores: &Tensor) -> Result<Tensor> {
    let (_, n) = scores.dims2()?;
    let best = scores.argmax_keepdim(1)?; // (B, 1) u32
    let slots = Tensor::arange(0u32, n as u32, scores.device())?.unsqueeze(0)?;
    slots.broadcast_eq(&best)?.to_dtype(scores.dtype())
}

/// A (B, H, W) support label as a (B, 1, H, W) float 0/1 mask, 255 (ignore) → 0.
fn binary_mask(label: &Tensor, batch: usize, dtype: DType) -> Result<Tensor> {
    let (b, h, w) = match label.dims() {
        &[b, h, w] if h > 0 && w > 0 => (b, h, w),
        _ => bail!("expected a non-empty (B, H, W) label, got {:?}", label.shape()),
    };
    if b != batch {
        bail!("label batch {b} differs from the query batch {batch}");
    }
    let l = label.to_dtype(dtype)?;
    let keep = l.ne(255f64)?;
    keep.where_cond(&l, &l.zeros_like()?)?.reshape((b, 1, h, w))
}
