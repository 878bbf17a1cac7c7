//! Trainability and input checking of the POS built from scratch with a `VarMap`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use pos::{scratch_init_overrides, Pos, PosConfig};

/// CPU preset at a small input: res2..res5 of a 64×64 image.
fn small_features(cfg: &PosConfig, b: usize, dev: &Device) -> Vec<Tensor> {
    [16usize, 8, 4, 2]
        .iter()
        .zip(cfg.in_channels)
        // Backbone features are post-ReLU, hence non-negative.
        .map(|(&s, c)| Tensor::randn(0f32, 1.0, (b, c, s, s), dev).unwrap().relu().unwrap())
        .collect()
}

fn scratch_pos(cfg: &PosConfig) -> (Pos, VarMap) {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let pos = Pos::new(cfg, vb).unwrap();
    let mut varmap = varmap;
    for (name, value) in scratch_init_overrides(cfg, &dev).unwrap() {
        varmap.set_one(name, value).unwrap();
    }
    (pos, varmap)
}

/// Forward on `features` and backward of a fixed random weighting of the sigmoid masks of all
/// predictions (every output pixel and every prediction contributes, with both signs); means
/// keep the gradients, and so the SGD step below, small.
fn backward(pos: &Pos, features: &[Tensor], weights: &[Tensor]) -> candle_core::backprop::GradStore {
    let out = pos.forward(features).unwrap();
    let preds = out.all_predictions();
    assert_eq!(preds.len(), weights.len());
    let mut loss = Tensor::new(0f32, features[0].device()).unwrap();
    for (p, w) in preds.iter().zip(weights) {
        let term = (candle_nn::ops::sigmoid(p).unwrap() * w).unwrap().mean_all().unwrap();
        loss = (loss + term).unwrap();
    }
    loss.backward().unwrap()
}

/// Names of the variables whose gradient is missing, zero or not finite.
fn without_gradient(varmap: &VarMap, grads: &candle_core::backprop::GradStore) -> Vec<String> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    assert!(names.len() > 50, "only {} variables were created", names.len());
    names
        .into_iter()
        .filter(|name| match grads.get(data[name].as_tensor()) {
            None => true,
            Some(g) => {
                let m = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                !(m > 0.0 && m.is_finite())
            }
        })
        .collect()
}

#[test]
fn every_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let cfg = PosConfig::cpu();
    let (pos, varmap) = scratch_pos(&cfg);
    let features = small_features(&cfg, 2, &dev);
    let out = pos.forward(&features).unwrap();
    assert_eq!(out.pred_masks.dims(), [2, cfg.num_queries, 16, 16]);
    assert_eq!(out.aux.len(), cfg.dec_layers);
    let weights: Vec<Tensor> = out
        .all_predictions()
        .iter()
        .map(|p| Tensor::randn(0f32, 1.0, p.dims(), &dev).unwrap())
        .collect();

    // Deformable-DETR initialises sampling_offsets.weight and attention_weights.weight to zero,
    // so at step 0 nothing flows back into the encoder query, and the encoder level_embed (which
    // only enters through the query) gets exactly zero gradient, as in the official code.
    let grads = backward(&pos, &features, &weights);
    let missing = without_gradient(&varmap, &grads);
    assert_eq!(missing, ["sem_seg_head.pixel_decoder.transformer.level_embed"], "step 0");

    // After one optimizer step those weights are non-zero and every parameter trains.
    use candle_nn::Optimizer;
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 1e-2).unwrap();
    sgd.step(&grads).unwrap();
    let grads = backward(&pos, &features, &weights);
    let missing = without_gradient(&varmap, &grads);
    assert!(missing.is_empty(), "parameters without a usable gradient after one step:\n{}", missing.join("\n"));
}

#[test]
fn parameter_names_follow_the_official_state_dict() {
    let cfg = PosConfig::cpu();
    let (_pos, varmap) = scratch_pos(&cfg);
    let data = varmap.data().lock().unwrap();
    let d = cfg.hidden_dim;
    let shape = |n: &str| data.get(n).unwrap_or_else(|| panic!("missing `{n}`")).as_tensor().dims().to_vec();
    let pd = "sem_seg_head.pixel_decoder";
    let pr = "sem_seg_head.predictor";
    assert_eq!(shape(&format!("{pd}.input_proj.0.0.weight")), [d, 320, 1, 1]);
    assert_eq!(shape(&format!("{pd}.input_proj.2.0.weight")), [d, 40, 1, 1]);
    assert_eq!(shape(&format!("{pd}.input_proj.1.1.weight")), [d]);
    assert_eq!(shape(&format!("{pd}.transformer.level_embed")), [3, d]);
    assert_eq!(
        shape(&format!("{pd}.transformer.encoder.layers.1.self_attn.sampling_offsets.weight")),
        [cfg.enc_heads * 3 * cfg.enc_points * 2, d]
    );
    assert_eq!(shape(&format!("{pd}.transformer.encoder.layers.0.linear1.weight")), [cfg.enc_ffn_dim, d]);
    assert_eq!(shape(&format!("{pd}.adapter_1.weight")), [d, 24, 1, 1]);
    assert_eq!(shape(&format!("{pd}.adapter_1.norm.bias")), [d]);
    assert_eq!(shape(&format!("{pd}.layer_1.weight")), [d, d, 3, 3]);
    assert_eq!(shape(&format!("{pd}.mask_features.bias")), [d]);
    assert_eq!(
        shape(&format!("{pr}.transformer_cross_attention_layers.5.multihead_attn.in_proj_weight")),
        [3 * d, d]
    );
    assert_eq!(shape(&format!("{pr}.transformer_self_attention_layers.0.self_attn.out_proj.weight")), [d, d]);
    assert_eq!(shape(&format!("{pr}.transformer_ffn_layers.2.linear2.weight")), [d, cfg.dec_ffn_dim]);
    assert_eq!(shape(&format!("{pr}.query_feat.weight")), [cfg.num_queries, d]);
    assert_eq!(shape(&format!("{pr}.query_embed.weight")), [cfg.num_queries, d]);
    assert_eq!(shape(&format!("{pr}.level_embed.weight")), [3, d]);
    assert_eq!(shape(&format!("{pr}.mask_embed.layers.2.weight")), [d, d]);
    // No bias where the official convs have none, no classifier, no layer beyond dec_layers.
    assert!(!data.contains_key(&format!("{pd}.adapter_1.bias")));
    assert!(!data.contains_key(&format!("{pd}.layer_1.bias")));
    assert!(!data.keys().any(|k| k.contains("class_embed")));
    assert!(!data.contains_key(&format!("{pr}.transformer_ffn_layers.{}.linear1.weight", cfg.dec_layers)));
    // The scratch init really replaced the zero sampling_offsets bias.
    let bias = data[&format!("{pd}.transformer.encoder.layers.0.self_attn.sampling_offsets.bias")].as_tensor();
    assert!(bias.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dev = Device::Cpu;
    let cfg = PosConfig::cpu();
    let (pos, _varmap) = scratch_pos(&cfg);
    let good = small_features(&cfg, 1, &dev);

    let err = |r: candle_core::Result<pos::PosOutput>| r.expect_err("expected an error").to_string();
    assert!(err(pos.forward(&good[..3])).contains("4 feature maps"));

    let mut wrong_channels = good.clone();
    wrong_channels[2] = Tensor::zeros((1, 7, 4, 4), DType::F32, &dev).unwrap();
    assert!(err(pos.forward(&wrong_channels)).contains("res4"));

    let mut wrong_batch = good.clone();
    wrong_batch[1] = Tensor::zeros((2, 40, 8, 8), DType::F32, &dev).unwrap();
    assert!(err(pos.forward(&wrong_batch)).contains("res3"));

    let mut wrong_dtype = good.clone();
    wrong_dtype[0] = wrong_dtype[0].to_dtype(DType::U8).unwrap();
    assert!(err(pos.forward(&wrong_dtype)).contains("f32"));

    let n = cfg.num_queries;
    let ok_masks: Vec<Tensor> = (0..cfg.dec_layers)
        .map(|i| {
            let hw = [4usize, 16, 64][i % 3];
            Tensor::zeros((1, n, hw), DType::U8, &dev).unwrap()
        })
        .collect();
    assert!(pos.forward_with_attn_masks(&good, &ok_masks).is_ok());
    assert!(err(pos.forward_with_attn_masks(&good, &ok_masks[1..])).contains("injected"));
    let mut bad = ok_masks.clone();
    bad[1] = Tensor::zeros((1, n, 4), DType::U8, &dev).unwrap();
    assert!(err(pos.forward_with_attn_masks(&good, &bad)).contains("mask 1"));

    let mut cfg_bad = PosConfig::cpu();
    cfg_bad.hidden_dim = 48; // not divisible by 32 GroupNorm groups
    let vb = VarBuilder::zeros(DType::F32, &dev);
    assert!(Pos::new(&cfg_bad, vb).err().unwrap().to_string().contains("gn_groups"));
}

/// Fully masked rows are un-masked (not NaN): an all-blocking mask for every layer must give
/// the same result as an all-open one, since every row is full.
#[test]
fn fully_masked_rows_attend_everywhere() {
    let dev = Device::Cpu;
    let cfg = PosConfig::cpu();
    let (pos, _varmap) = scratch_pos(&cfg);
    let feats = small_features(&cfg, 1, &dev);
    let n = cfg.num_queries;
    let masks = |v: u8| -> Vec<Tensor> {
        (0..cfg.dec_layers)
            .map(|i| {
                let hw = [4usize, 16, 64][i % 3];
                Tensor::full(v, (1, n, hw), &dev).unwrap()
            })
            .collect()
    };
    let blocked = pos.forward_with_attn_masks(&feats, &masks(1)).unwrap();
    let open = pos.forward_with_attn_masks(&feats, &masks(0)).unwrap();
    let (d, m) = parity::max_abs_diff(&blocked.pred_masks, &open.pred_masks).unwrap();
    assert!(m.is_finite() && m > 0.0);
    assert_eq!(d, 0.0);
}

/// Gradient VALUES through the whole POS (conv, GroupNorm, deformable attention, resizes,
/// masked attention, einsum) against central finite differences, in f64 on a tiny config. The
/// attention masks are injected (fixed, random) so the loss is smooth in the parameters.
#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let cfg = PosConfig {
        in_channels: [6, 8, 10, 12],
        hidden_dim: 16,
        gn_groups: 4,
        enc_heads: 2,
        enc_points: 2,
        enc_ffn_dim: 24,
        enc_layers: 1,
        dec_heads: 2,
        dec_ffn_dim: 24,
        dec_layers: 3,
        num_queries: 4,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let pos = Pos::new(&cfg, vb).unwrap();
    // Deterministic values (the parity formula) rather than candle's unseedable CPU RNG, so no
    // run can land a finite-difference step on a ReLU or bilinear kink by chance. They also make
    // the zero-initialised deformable projections non-zero, so gradients reach the query.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let v: Vec<f64> = parity::formula_value(name, var.as_tensor().dims()).into_iter().map(f64::from).collect();
        var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &dev).unwrap()).unwrap();
    }
    let det = |name: &str, shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(parity::unit(name, n), shape, &dev).unwrap()
    };
    let features: Vec<Tensor> = [8usize, 4, 2, 1]
        .iter()
        .zip(cfg.in_channels)
        .enumerate()
        .map(|(i, (&s, c))| det(&format!("res{}", i + 2), &[1, c, 2 * s, 2 * s]).relu().unwrap())
        .collect();
    let masks: Vec<Tensor> = (0..cfg.dec_layers)
        .map(|i| {
            let hw = [1usize, 4, 16][i % 3] * 4;
            det(&format!("mask{i}"), &[1, cfg.num_queries, hw]).lt(-0.2).unwrap()
        })
        .collect();
    let n_preds = cfg.num_predictions();
    let weights: Vec<Tensor> =
        (0..n_preds).map(|k| det(&format!("w{k}"), &[1, cfg.num_queries, 16, 16])).collect();
    let loss = || -> Tensor {
        let out = pos.forward_with_attn_masks(&features, &masks).unwrap();
        let mut l = Tensor::new(0f64, &dev).unwrap();
        for (p, w) in out.all_predictions().iter().zip(&weights) {
            l = (l + (candle_nn::ops::sigmoid(p).unwrap() * w).unwrap().sum_all().unwrap()).unwrap();
        }
        l
    };
    let grads = loss().backward().unwrap();

    let pd = "sem_seg_head.pixel_decoder";
    let pr = "sem_seg_head.predictor";
    let checked = [
        format!("{pd}.input_proj.0.0.weight"),
        format!("{pd}.input_proj.2.1.bias"),
        format!("{pd}.transformer.level_embed"),
        format!("{pd}.transformer.encoder.layers.0.self_attn.sampling_offsets.weight"),
        format!("{pd}.transformer.encoder.layers.0.self_attn.value_proj.weight"),
        format!("{pd}.transformer.encoder.layers.0.linear1.weight"),
        format!("{pd}.adapter_1.weight"),
        format!("{pd}.layer_1.weight"),
        format!("{pd}.layer_1.norm.weight"),
        format!("{pd}.mask_features.bias"),
        format!("{pr}.query_feat.weight"),
        format!("{pr}.query_embed.weight"),
        format!("{pr}.level_embed.weight"),
        format!("{pr}.transformer_cross_attention_layers.1.multihead_attn.in_proj_weight"),
        format!("{pr}.transformer_self_attention_layers.2.self_attn.out_proj.weight"),
        format!("{pr}.transformer_ffn_layers.0.linear2.weight"),
        format!("{pr}.decoder_norm.weight"),
        format!("{pr}.mask_embed.layers.0.weight"),
    ];
    let eps = 1e-5;
    let mut worst = 0f64;
    for name in &checked {
        let var = varmap.data().lock().unwrap()[name].clone();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // A spread of entries: first, middle, last.
        for &i in &[0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &dev).unwrap()).unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.as_tensor().shape(), &dev).unwrap()).unwrap();
            let err = (numeric - g[i]).abs() / numeric.abs().max(g[i].abs()).max(1e-3);
            worst = worst.max(err);
            assert!(err < 1e-4, "{name}[{i}]: analytic {} vs numeric {numeric} (rel err {err:.1e})", g[i]);
        }
    }
    eprintln!("finite differences: worst relative error {worst:.1e}");
}

/// A batch of two images gives each image's single-image result (masks, reference points and
/// embeddings are per image; nothing mixes across the batch).
#[test]
fn batch_items_are_independent() {
    let dev = Device::Cpu;
    let cfg = PosConfig::cpu();
    let (pos, _varmap) = scratch_pos(&cfg);
    let batch = small_features(&cfg, 2, &dev);
    let both = pos.forward(&batch).unwrap();
    for i in 0..2 {
        let single: Vec<Tensor> = batch.iter().map(|f| f.narrow(0, i, 1).unwrap()).collect();
        // The batch's own masks are injected so that a float-noise flip at a near-zero logit
        // cannot cascade; the single run's own masks are compared with them below.
        let masks: Vec<Tensor> = both.attn_masks.iter().map(|m| m.narrow(0, i, 1).unwrap()).collect();
        let one = pos.forward_with_attn_masks(&single, &masks).unwrap();
        let pairs = one.all_predictions().into_iter().zip(both.all_predictions());
        for (k, (a, b)) in pairs.enumerate() {
            let b = b.narrow(0, i, 1).unwrap();
            let (d, m) = parity::max_abs_diff(&a, &b).unwrap();
            assert!(d <= 1e-4 * m + 1e-5, "image {i}, prediction {k}: max diff {d} (max {m})");
        }
        for (k, (a, b)) in one.attn_masks.iter().zip(&both.attn_masks).enumerate() {
            let b = b.narrow(0, i, 1).unwrap();
            let differ = a.ne(&b).unwrap().to_dtype(DType::U32).unwrap().sum_all().unwrap().to_scalar::<u32>().unwrap();
            assert!(differ <= 2, "image {i}, attn_mask {k}: {differ} bits differ");
        }
    }
}
