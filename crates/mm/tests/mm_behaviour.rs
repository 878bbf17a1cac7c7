//! Behaviour of the mask-matching module beyond the fixture: K-shot averaging, batching,
//! ablations, ignore labels, self-alignment's definition and input validation.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mm::cross_align::kv_size;
use mm::self_align::self_align;
use mm::{MaskMatching, MmConfig, MmOutput, Trace};
use parity::{assert_close, FormulaWeights};

const QH: usize = 64;
const QW: usize = 96;
const SH: usize = 96;
const SW: usize = 64;

fn model(cfg: &MmConfig) -> MaskMatching {
    MaskMatching::new(cfg, FormulaWeights::formula_only().var_builder()).unwrap()
}

fn run(m: &MaskMatching, batch: usize, shots: &[&str]) -> MmOutput {
    let cfg = m.config();
    let query = common::features("q", cfg, batch, QH, QW);
    let supports: Vec<_> = shots.iter().map(|s| common::features(s, cfg, batch, SH, SW)).collect();
    let labels: Vec<_> = shots.iter().map(|_| common::label(batch, SH, SW)).collect();
    let logits = common::proposal_logits("p", cfg, batch, QH, QW);
    m.forward(&query, &supports, &labels, &logits, (QH, QW)).unwrap()
}

#[test]
fn kv_size_follows_the_official_int_truncation() {
    // README §2: query levels (4,5), (8,10), (16,20) → (15,18); supports (5,4)… → (18,15).
    for (hw, kv) in [((4, 5), (15, 18)), ((8, 10), (15, 18)), ((16, 20), (15, 18)), ((5, 4), (18, 15)), ((20, 16), (18, 15))] {
        assert_eq!(kv_size(hw.0, hw.1, 15), kv, "{hw:?}");
    }
    assert_eq!(kv_size(30, 30, 15), (15, 15));
    assert_eq!(kv_size(60, 45, 15), (20, 15));
}

#[test]
fn self_align_matches_its_definition() {
    let x = common::pseudo("sa", &[2, 3, 2, 3]).to_dtype(DType::F64).unwrap();
    let ours = self_align(&x).unwrap();
    let xs = x.flatten_from(2).unwrap().to_vec3::<f64>().unwrap();
    let mut expected = Vec::new();
    for sample in &xs {
        let n = sample[0].len();
        let mean: Vec<f64> = (0..n).map(|j| sample.iter().map(|ch| ch[j]).sum::<f64>() / sample.len() as f64).collect();
        let mx = mean.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = mean.iter().map(|m| (m - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        for ch in sample {
            let z: f64 = ch.iter().zip(&e).map(|(v, a)| v * a / s).sum();
            let gate = 1.0 / (1.0 + (-z).exp());
            expected.extend(ch.iter().map(|v| v * gate));
        }
    }
    let expected = Tensor::from_vec(expected, (2, 3, 2, 3), &Device::Cpu).unwrap();
    assert_close("self_align", &ours, &expected, 0.0, 1e-12);
    assert!(self_align(&x.flatten_from(2).unwrap()).is_err());
}

#[test]
fn repeated_shot_equals_one_shot() {
    // K-shot averages per-shot prototypes, so K copies of one support give the 1-shot result.
    let m = model(&common::small_config());
    let one = run(&m, 1, &["s"]);
    let three = run(&m, 1, &["s", "s", "s"]);
    assert_close("out", &three.out, &one.out, 1e-5, 1e-6);
    assert_close("cosine", &three.cosine, &one.cosine, 1e-5, 1e-6);
    // A different second shot changes the result.
    let mixed = run(&m, 1, &["s", "t"]);
    let (d, _) = parity::max_abs_diff(&mixed.cosine, &one.cosine).unwrap();
    assert!(d > 1e-4, "the second shot had no effect ({d})");
}

#[test]
fn shot_average_is_the_mean_of_per_shot_prototypes() {
    let m = model(&common::small_config());
    let cfg = m.config();
    let query = common::features("q", cfg, 1, QH, QW);
    let supports = [common::features("s", cfg, 1, SH, SW), common::features("t", cfg, 1, SH, SW)];
    let labels = [common::label(1, SH, SW), common::label(1, SH, SW)];
    let logits = common::proposal_logits("p", cfg, 1, QH, QW);
    let mut trace = Trace::new();
    let out = m.forward_traced(&query, &supports, &labels, &logits, (QH, QW), &mut trace).unwrap();
    for (name, avg) in [("query_prototypes", &out.query_prototypes), ("support_prototype", &out.support_prototype)] {
        let a = trace.get(&format!("shot0.{name}")).unwrap();
        let b = trace.get(&format!("shot1.{name}")).unwrap();
        let mean = ((a + b).unwrap() / 2.0).unwrap();
        assert_close(name, avg, &mean, 1e-6, 1e-7);
        assert_eq!(trace.get(name).unwrap().dims(), avg.dims());
    }
    assert_eq!(out.query_prototypes.dims(), &[1, 6, 48]);
    assert_eq!(out.support_prototype.dims(), &[1, 1, 48]);
    assert_eq!(out.proposals().unwrap().dims(), &[1, 6, QH, QW]);
}

#[test]
fn batch_elements_are_independent() {
    let m = model(&common::small_config());
    let cfg = m.config();
    let batched = run(&m, 2, &["s"]);
    // Element 1 alone: slice every input.
    let pick = |t: &Tensor| t.narrow(0, 1, 1).unwrap();
    let query = common::features("q", cfg, 2, QH, QW).map(|t| pick(&t));
    let support = common::features("s", cfg, 2, SH, SW).map(|t| pick(&t));
    let label = pick(&common::label(2, SH, SW));
    let logits = pick(&common::proposal_logits("p", cfg, 2, QH, QW));
    let single = m.forward(&query, &[support], &[label], &logits, (QH, QW)).unwrap();
    assert_close("out[1]", &pick(&batched.out), &single.out, 1e-5, 1e-6);
    assert_close("coefficients[1]", &pick(&batched.coefficients), &single.coefficients, 1e-5, 1e-6);
}

#[test]
fn ignore_pixels_in_the_support_label_count_as_background() {
    let m = model(&common::small_config());
    let cfg = m.config();
    let query = common::features("q", cfg, 1, QH, QW);
    let support = common::features("s", cfg, 1, SH, SW);
    let logits = common::proposal_logits("p", cfg, 1, QH, QW);
    let with_ignore = common::label(1, SH, SW);
    let zeroed = with_ignore.ne(255f64).unwrap().where_cond(&with_ignore, &with_ignore.zeros_like().unwrap()).unwrap();
    let a = m.forward(&query, std::slice::from_ref(&support), std::slice::from_ref(&with_ignore), &logits, (QH, QW)).unwrap();
    let b = m.forward(&query, std::slice::from_ref(&support), &[zeroed], &logits, (QH, QW)).unwrap();
    assert_close("out", &a.out, &b.out, 0.0, 0.0);
    // Integer labels are accepted too.
    let c = m.forward(&query, &[support], &[with_ignore.to_dtype(DType::U8).unwrap()], &logits, (QH, QW)).unwrap();
    assert_close("out (u8 label)", &c.out, &a.out, 0.0, 0.0);
}

#[test]
fn heuristic_matching_keeps_the_highest_cosine_proposal() {
    let cfg = MmConfig { learnable_matching: false, ..common::small_config() };
    let varmap = VarMap::new();
    let m = MaskMatching::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    assert!(varmap.data().lock().unwrap().keys().all(|k| !k.starts_with("fc")), "no matching MLP");
    let out = run(&m, 2, &["s"]);
    let best = out.cosine.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    for (b, &q) in best.iter().enumerate() {
        let c = out.coefficients.get(b).unwrap().to_vec1::<f32>().unwrap();
        let expected: Vec<f32> = (0..cfg.num_queries).map(|i| if i == q as usize { 1.0 } else { 0.0 }).collect();
        assert_eq!(c, expected);
        let chosen = out.proposals().unwrap().get(b).unwrap().get(q as usize).unwrap();
        assert_close("out = best proposal", &out.out.get(b).unwrap().get(0).unwrap(), &chosen, 0.0, 1e-6);
    }
}

#[test]
fn ablations_drop_their_modules() {
    let cfg = MmConfig { cross_alignment: false, self_alignment: false, ..common::small_config() };
    let varmap = VarMap::new();
    let m = MaskMatching::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    {
        let vars = varmap.data().lock().unwrap();
        assert!(vars.keys().all(|k| !k.starts_with("crossat")), "no cross-alignment weights");
        assert_eq!(vars.len(), 3 + 4, "convs and the matching MLP only");
    }
    let q = common::features("q", &cfg, 1, QH, QW);
    let s = common::features("s", &cfg, 1, SH, SW);
    let mut trace = Trace::new();
    let logits = common::proposal_logits("p", &cfg, 1, QH, QW);
    m.forward_traced(&q, &[s], &[common::label(1, SH, SW)], &logits, (QH, QW), &mut trace).unwrap();
    // Without self-alignment the conv sees the raw features; without cross-alignment the
    // prototypes pool the reduced (and, for the support, masked) features.
    assert_close("no self-align", trace.get("query.self_aligned.l0").unwrap(), &q[0], 0.0, 0.0);
    assert_close("no cross-align (query)", trace.get("shot0.cross_aligned.query.l2").unwrap(), trace.get("query.conv.l2").unwrap(), 0.0, 0.0);
    assert_close("no cross-align (support)", trace.get("shot0.cross_aligned.support.l1").unwrap(), trace.get("shot0.support.masked.l1").unwrap(), 0.0, 0.0);
    // The full model has them and gives a different answer.
    let full = run(&model(&common::small_config()), 1, &["s"]);
    let ablated = run(&model(&cfg), 1, &["s"]);
    assert!(parity::max_abs_diff(&full.cosine, &ablated.cosine).unwrap().0 > 1e-4);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let m = model(&common::small_config());
    let cfg = m.config().clone();
    let q = common::features("q", &cfg, 1, QH, QW);
    let s = common::features("s", &cfg, 1, SH, SW);
    let l = common::label(1, SH, SW);
    let p = common::proposal_logits("p", &cfg, 1, QH, QW);
    let err = |r: candle_core::Result<MmOutput>| r.unwrap_err().to_string();

    let swapped = [q[2].clone(), q[1].clone(), q[0].clone()];
    assert!(err(m.forward(&swapped, std::slice::from_ref(&s), std::slice::from_ref(&l), &p, (QH, QW))).contains("channels"));
    assert!(err(m.forward(&q, &[], &[], &p, (QH, QW))).contains("at least one support"));
    assert!(err(m.forward(&q, std::slice::from_ref(&s), &[], &p, (QH, QW))).contains("support labels"));
    let p7 = common::pseudo("p7", &[1, 7, QH / 4, QW / 4]);
    assert!(err(m.forward(&q, std::slice::from_ref(&s), std::slice::from_ref(&l), &p7, (QH, QW))).contains("N=6"));
    let l2 = common::label(2, SH, SW);
    assert!(err(m.forward(&q, std::slice::from_ref(&s), &[l2], &p, (QH, QW))).contains("batch"));
    let l4 = l.unsqueeze(0).unwrap();
    assert!(err(m.forward(&q, std::slice::from_ref(&s), &[l4], &p, (QH, QW))).contains("(B, H, W)"));
    let s2 = common::features("s", &cfg, 2, SH, SW);
    assert!(err(m.forward(&q, &[s2], std::slice::from_ref(&l), &p, (QH, QW))).contains("batch"));
    assert!(err(m.forward(&q, &[s], &[l], &p, (0, QW))).contains("input size"));

    for bad in [
        MmConfig { hidden_dim: 30, ..common::small_config() },
        MmConfig { num_heads: 3, ..common::small_config() },
        MmConfig { num_queries: 0, ..common::small_config() },
        MmConfig { in_channels: [24, 0, 8], ..common::small_config() },
    ] {
        let e = MaskMatching::new(&bad, FormulaWeights::formula_only().var_builder()).unwrap_err().to_string();
        assert!(e.contains("MmConfig"), "{e}");
    }
}

#[test]
fn presets_have_the_documented_channels() {
    assert_eq!(MmConfig::resnet50().in_channels, [2048, 1024, 512]);
    assert_eq!(MmConfig::efficientnet_lite0().in_channels, [320, 112, 40]);
    let c = MmConfig::default();
    assert_eq!((c.hidden_dim, c.num_heads, c.dim_feedforward, c.num_queries, c.mlp_hidden()), (256, 4, 512, 100, 500));
    assert!(c.validate().is_ok());
}

/// Proposals read back from u8 shards can be exactly zero everywhere; the official `Σ(Q·m)/Σm`
/// would be 0/0. The output, the cosines and every gradient must stay finite (a NaN there
/// stopped a stage-2 run at iteration 130).
#[test]
fn an_all_zero_proposal_keeps_everything_finite() {
    let vm = VarMap::new();
    let cfg = MmConfig { hidden_dim: 32, dim_feedforward: 64, num_queries: 4, ..MmConfig::with_in_channels([16, 8, 8]) };
    let m = MaskMatching::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let dev = Device::Cpu;
    let feats = |s: u64| -> [Tensor; 3] {
        let f = |c: usize, h: usize, k: u64| Tensor::rand(0f32, 1f32, (1, c, h, h), &dev).unwrap().affine(1.0, k as f64 * 0.01).unwrap();
        [f(16, 4, s), f(8, 8, s + 1), f(8, 16, s + 2)]
    };
    let label = Tensor::ones((1, 64, 64), DType::F32, &dev).unwrap();
    let mut probs = Tensor::rand(0f32, 1f32, (1, 4, 16, 16), &dev).unwrap();
    probs = Tensor::cat(&[probs.narrow(1, 0, 3).unwrap(), Tensor::zeros((1, 1, 16, 16), DType::F32, &dev).unwrap()], 1).unwrap();
    let out = m.forward_with_probabilities(&feats(0), &[feats(7)], &[label], &probs, (64, 64)).unwrap();
    let finite = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite());
    assert!(finite(&out.out) && finite(&out.cosine), "cosine {}", out.cosine);
    let grads = out.out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in vm.data().lock().unwrap().iter() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(finite(g), "gradient of {name} is not finite");
    }
}

/// `out` is computed as `upsample(Σ_q c_q·M_q)`; the official order, `Σ_q c_q·upsample(M_q)`,
/// gives the same map (bilinear resizing is linear), here at a non-integer scale too.
#[test]
fn output_equals_the_official_sum_of_upsampled_proposals() {
    let m = model(&common::small_config());
    let cfg = m.config();
    let query = common::features("q", cfg, 2, QH, QW);
    let supports = [common::features("s", cfg, 2, SH, SW)];
    let labels = [common::label(2, SH, SW)];
    let logits = common::proposal_logits("p", cfg, 2, QH, QW);
    for hw in [(QH, QW), (QH * 4 + 3, QW * 4 - 1)] {
        let out = m.forward(&query, &supports, &labels, &logits, hw).unwrap();
        let up = out.proposals().unwrap();
        let (b, n, h, w) = up.dims4().unwrap();
        assert_eq!((h, w), hw);
        let official = out.coefficients.unsqueeze(1).unwrap().matmul(&up.reshape((b, n, h * w)).unwrap()).unwrap().reshape((b, 1, h, w)).unwrap();
        assert_close("out", &out.out, &official, 1e-5, 1e-6);
    }
}

/// Several shots run stacked along the batch (untraced forward, small maps) and one by one
/// (traced forward): the same outputs.
#[test]
fn stacked_shots_equal_shots_one_by_one() {
    let m = model(&common::small_config());
    let cfg = m.config();
    let query = common::features("q", cfg, 2, QH, QW);
    let supports = [common::features("s", cfg, 2, SH, SW), common::features("t", cfg, 2, SH, SW), common::features("u", cfg, 2, SH, SW)];
    let labels = [common::label(2, SH, SW), common::label(2, SH, SW).affine(0.0, 1.0).unwrap(), common::label(2, SH, SW)];
    let logits = common::proposal_logits("p", cfg, 2, QH, QW);
    let stacked = m.forward(&query, &supports, &labels, &logits, (QH, QW)).unwrap();
    let mut trace = Trace::new();
    let looped = m.forward_traced(&query, &supports, &labels, &logits, (QH, QW), &mut trace).unwrap();
    for (name, a, b) in [
        ("query_prototypes", &stacked.query_prototypes, &looped.query_prototypes),
        ("support_prototype", &stacked.support_prototype, &looped.support_prototype),
        ("cosine", &stacked.cosine, &looped.cosine),
        ("out", &stacked.out, &looped.out),
    ] {
        assert_eq!(a.dims(), b.dims(), "{name}");
        assert_close(name, a, b, 1e-5, 1e-6);
    }
}

/// The prototypes pooled from cross-alignment tokens equal those pooled from the maps, and a
/// token count that does not match the map is refused with a message.
#[test]
fn pooling_tokens_equals_pooling_maps() {
    use ops::nn::tokens_to_map;
    use mm::prototype::{support_prototype, support_prototype_tokens, ProposalMasks};
    let dev = Device::Cpu;
    let (b, c, h, w, n) = (2usize, 5usize, 6usize, 7usize, 3usize);
    let tokens = Tensor::rand(-1f64, 1f64, (b, h * w, c), &dev).unwrap();
    let map = tokens_to_map(&tokens, (h, w)).unwrap();
    assert_eq!(map.dims(), [b, c, h, w]);
    // Token t = y·w + x holds the map's column (y, x).
    let (t, y, x) = (3 * w + 4, 3, 4);
    assert_close("token layout", &map.narrow(2, y, 1).unwrap().narrow(3, x, 1).unwrap().flatten_all().unwrap(), &tokens.narrow(1, t, 1).unwrap().flatten_all().unwrap(), 0.0, 0.0);
    let proposals = Tensor::rand(0f64, 1f64, (b, n, 12, 14), &dev).unwrap();
    let masks = ProposalMasks::new(&proposals, (h, w)).unwrap();
    assert_close("query prototypes", &masks.pool_tokens(&tokens).unwrap(), &masks.pool(&map).unwrap(), 0.0, 1e-12);
    let label = Tensor::rand(0f64, 1f64, (b, 1, 24, 28), &dev).unwrap().ge(0.5).unwrap().to_dtype(DType::F64).unwrap();
    assert_close(
        "support prototype",
        &support_prototype_tokens(&tokens, (h, w), &label).unwrap(),
        &support_prototype(&map, &label).unwrap(),
        0.0,
        1e-12,
    );
    let short = tokens.narrow(1, 0, h * w - 1).unwrap();
    assert!(masks.pool_tokens(&short).unwrap_err().to_string().contains("tokens"));
    assert!(support_prototype_tokens(&short, (h, w), &label).unwrap_err().to_string().contains("6x7"));
}

/// A support mask selects exactly its rows of non-zero weight, pads each batch element with a
/// zero-weight row of its own, and pooling the selected rows equals pooling them all.
#[test]
fn support_mask_selects_the_rows_its_prototype_reads() {
    use mm::prototype::{support_prototype_tokens, SupportMask};
    let dev = Device::Cpu;
    let (h, w, c) = (8usize, 10usize, 3usize);
    // Element 0: a 2×2 block of foreground at a 16×20 label; element 1: nothing.
    let mut v = vec![0f64; 2 * 16 * 20];
    for y in 6..8 {
        for x in 8..10 {
            v[y * 20 + x] = 1.0;
        }
    }
    let label = Tensor::from_vec(v, (2, 1, 16, 20), &dev).unwrap();
    let m = SupportMask::new(&label, (h, w), true).unwrap();
    let rows = m.rows().expect("a small mask selects rows").to_vec1::<u32>().unwrap();
    let full = ops::resize::resize_bilinear(&label, (h, w), true).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let nonzero: Vec<u32> = (0..h * w).filter(|&j| full[j] != 0.0).map(|j| j as u32).collect();
    assert!(!nonzero.is_empty() && nonzero.len() < h * w / 4, "{nonzero:?}");
    let l = nonzero.len();
    assert_eq!(rows.len(), 2 * l);
    assert_eq!(&rows[..l], &nonzero[..]);
    // The empty element is all padding: rows of its own, of zero weight.
    assert!(rows[l..].iter().all(|&r| (r as usize) >= h * w && full[r as usize] == 0.0), "{rows:?}");
    let tokens = Tensor::rand(-1f64, 1f64, (2, h * w, c), &dev).unwrap();
    let picked = tokens.reshape((2 * h * w, c)).unwrap().index_select(m.rows().unwrap(), 0).unwrap().reshape((2, l, c)).unwrap();
    assert_close("selected pooling", &m.pool(&picked).unwrap(), &support_prototype_tokens(&tokens, (h, w), &label).unwrap(), 0.0, 1e-12);
    assert!(m.pool(&tokens).unwrap_err().to_string().contains("rows"));
    // A mask covering most of the map selects nothing: all rows are read.
    let most = Tensor::ones((1, 1, 16, 20), DType::F64, &dev).unwrap();
    assert!(SupportMask::new(&most, (h, w), true).unwrap().rows().is_none());
    assert!(SupportMask::new(&label, (h, w), false).unwrap().rows().is_none());
}

/// The untraced forward aligns the support only at its mask's rows; the traced one aligns every
/// row. Both give the same outputs and the same gradient for every variable, with batch
/// elements of different mask sizes (one empty) in one batch.
#[test]
fn aligning_only_the_masked_support_rows_changes_nothing() {
    let cfg = common::small_config();
    let varmap = VarMap::new();
    let m = MaskMatching::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    let (b, h, w) = (3usize, 128usize, 96usize);
    let query = common::features("q", &cfg, b, QH, QW);
    let support = common::features("s", &cfg, b, h, w);
    let mut v = vec![0f32; b * h * w];
    for (bi, (y0, y1, x0, x1)) in [(10, 40, 20, 50), (0, 0, 0, 0), (60, 128, 0, 30)].into_iter().enumerate() {
        for y in y0..y1 {
            for x in x0..x1 {
                v[(bi * h + y) * w + x] = 1.0;
            }
        }
    }
    let label = Tensor::from_vec(v, (b, h, w), &Device::Cpu).unwrap();
    let finest = label.reshape((b, 1, h, w)).unwrap();
    assert!(mm::prototype::SupportMask::new(&finest, (h / 8, w / 8), true).unwrap().rows().is_some(), "the test must take the selecting path");
    let logits = common::proposal_logits("p", &cfg, b, QH, QW);
    let r = common::pseudo("r", &[b, 1, QH, QW]);
    let grads = |traced: bool| {
        let supports = [support.clone()];
        let labels = [label.clone()];
        let out = if traced {
            m.forward_traced(&query, &supports, &labels, &logits, (QH, QW), &mut Trace::new()).unwrap()
        } else {
            m.forward(&query, &supports, &labels, &logits, (QH, QW)).unwrap()
        };
        let loss = ((&out.out * &r).unwrap().sum_all().unwrap() + out.support_prototype.sqr().unwrap().sum_all().unwrap()).unwrap();
        (out, loss.backward().unwrap())
    };
    let (sel, gs) = grads(false);
    let (full, gf) = grads(true);
    assert_close("support_prototype", &sel.support_prototype, &full.support_prototype, 1e-5, 1e-6);
    assert_close("query_prototypes", &sel.query_prototypes, &full.query_prototypes, 1e-5, 1e-6);
    assert_close("out", &sel.out, &full.out, 1e-5, 1e-6);
    let vars = varmap.data().lock().unwrap();
    for (name, var) in vars.iter() {
        let (a, f) = (gs.get(var.as_tensor()).unwrap(), gf.get(var.as_tensor()).unwrap());
        assert_close(name, a, f, 1e-4, 1e-5);
    }
}
