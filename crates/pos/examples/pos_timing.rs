//! POS speed on CPU: forward of the paper preset at a 480² input and forward + backward of the
//! CPU preset, with a per-stage split.
//!
//! `cargo run --release -p pos --example pos_timing [-- [--cpu-only] [<cpu-preset input side, default 480>]]`

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use pos::{scratch_init_overrides, MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder, Pos, PosConfig};

fn features(cfg: &PosConfig, side: usize, dev: &Device) -> Result<Vec<Tensor>> {
    [4usize, 8, 16, 32]
        .iter()
        .zip(cfg.in_channels)
        .map(|(&stride, c)| Tensor::randn(0f32, 1.0, (1, c, side / stride, side / stride), dev)?.relu())
        .collect()
}

fn build(cfg: &PosConfig, dev: &Device) -> Result<(VarMap, VarBuilder<'static>)> {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    // Create the variables once so the overrides have something to replace.
    Pos::new(cfg, vb.clone())?;
    for (name, value) in scratch_init_overrides(cfg, dev)? {
        varmap.set_one(name, value)?;
    }
    Ok((varmap, vb))
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn main() -> Result<()> {
    // As the binaries run: the caller in rayon's pool, freed memory kept.
    ops::init_cpu_threads();
    ops::init_cpu_pool(None).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    ops::keep_freed_memory();
    let dev = Device::Cpu;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cpu_only = args.iter().any(|a| a == "--cpu-only");
    let cpu_side: usize = match args.iter().find(|a| *a != "--cpu-only") {
        Some(s) => s
            .parse()
            .map_err(|_| candle_core::Error::Msg(format!("input side must be a positive integer, got `{s}`")))?,
        None => 480,
    };
    if cpu_side < 32 || cpu_side % 32 != 0 {
        candle_core::bail!("input side must be a positive multiple of 32, got {cpu_side}");
    }

    // Paper preset, 480² input, forward only, with the split between the two halves.
    let cfg = PosConfig::paper();
    let (vm, _) = build(&cfg, &dev)?;
    // Plain (non-variable) tensors, as when weights are loaded from a checkpoint for inference.
    let weights = vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned VarMap lock".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let vbh = VarBuilder::from_tensors(weights, DType::F32, &dev).pp("sem_seg_head");
    let pd = MSDeformAttnPixelDecoder::new(&cfg, vbh.pp("pixel_decoder"))?;
    let dec = MultiScaleMaskedTransformerDecoder::new(&cfg, vbh.pp("predictor"))?;
    let feats = if cpu_only { Vec::new() } else { features(&cfg, 480, &dev)? };
    for run in 0..if cpu_only { 0 } else { 3 } {
        let (t, f0) = (Instant::now(), ops::gemm_flops());
        let p = pd.forward(&feats)?;
        let (t_pd, f_pd) = (secs(t), (ops::gemm_flops() - f0) as f64 / 1e9);
        // What inference runs: the final prediction only (the earlier ones at the levels' sizes).
        let (t, f0) = (Instant::now(), ops::gemm_flops());
        let o = dec.forward_final(&p.multi_scale, &p.mask_features)?;
        let _ = o.sum_all()?.to_scalar::<f32>()?;
        let (t_dec, f_dec) = (secs(t), (ops::gemm_flops() - f0) as f64 / 1e9);
        // Every layer's prediction at full size, as training's deep supervision needs.
        let t = Instant::now();
        let o = dec.forward(&p.multi_scale, &p.mask_features, None)?;
        let _ = o.decoder_output_final.sum_all()?.to_scalar::<f32>()?;
        let t_all = secs(t);
        println!(
            "paper preset 480² forward (run {run}): pixel decoder {t_pd:.3}s ({f_pd:.1} GFLOP of products) + transformer decoder {t_dec:.3}s ({f_dec:.1}) = {:.3}s (decoder with every prediction at full size {t_all:.3}s)",
            t_pd + t_dec
        );
    }

    // CPU preset, forward + backward of a deep-supervision-like loss.
    let cfg = PosConfig::cpu();
    let (_vm, vb) = build(&cfg, &dev)?;
    let pos = Pos::new(&cfg, vb)?;
    let feats = features(&cfg, cpu_side, &dev)?;
    for run in 0..3 {
        let t = Instant::now();
        let out = pos.forward(&feats)?;
        let t_fwd = secs(t);
        let t = Instant::now();
        let mut loss = Tensor::new(0f32, &dev)?;
        for p in out.all_predictions() {
            loss = (loss + candle_nn::ops::sigmoid(&p)?.mean_all()?)?;
        }
        let grads = loss.backward()?;
        let t_bwd = secs(t);
        drop(grads);
        println!(
            "cpu preset {cpu_side}² forward {t_fwd:.3}s + backward {t_bwd:.3}s = {:.3}s (run {run})",
            t_fwd + t_bwd
        );
    }
    // The same with the loss on the pixel decoder outputs only (encoder + FPN backward) and on
    // the encoder outputs only, to split the backward time.
    for run in 0..3 {
        let out = pos.forward(&feats)?;
        let mut enc_loss = Tensor::new(0f32, &dev)?;
        for m in &out.multi_scale {
            enc_loss = (enc_loss + m.mean_all()?)?;
        }
        let t = Instant::now();
        drop(enc_loss.backward()?);
        let t_enc = secs(t);
        let t = Instant::now();
        drop((enc_loss + out.mask_features.mean_all()?)?.backward()?);
        let t_pd = secs(t);
        println!(
            "cpu preset {cpu_side}² backward from the encoder outputs {t_enc:.3}s, from all pixel decoder outputs {t_pd:.3}s (run {run})"
        );
    }
    Ok(())
}
