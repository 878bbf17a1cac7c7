//! Where the time goes, piece by piece (timing only, no assertions; all `#[ignore]`): run one
//! with `cargo test --release -p mmformer --test profile <name> -- --ignored --nocapture`.

#[allow(unused_imports)]
mod prelude {
    pub use std::time::Instant;

    pub use candle_core::{DType, Device, Tensor};
    pub use mmformer::bench::*;
    pub use mmformer::{MmFormer, Preset};
    pub use mmformer::{backbone, losses, mm, pos, train};
}

mod profile {
    //! `cargo test --release -p mmformer --test profile profile_mm -- --ignored --nocapture`: where the
    //! mask-matching and POS time goes, piece by piece, on both presets (timing only, no
    //! assertions; `PROFILE_THREADS` sets the rayon pool, default 2).
    use super::prelude::*;
        use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    fn t(name: &str, reps: usize, f: &mut dyn FnMut() -> candle_core::Result<()>) {
        f().unwrap();
        let mut v = Vec::new();
        for _ in 0..reps {
            let s = Instant::now();
            f().unwrap();
            v.push(s.elapsed().as_secs_f64() * 1e3);
        }
        println!("  {name:<52} {:>9.2} ms", median(v));
    }

    #[test]
    #[ignore]
    fn profile_mm() {
        let n = std::env::var("PROFILE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let dev = Device::Cpu;
        for (preset, size) in [(Preset::Cpu, 256usize), (Preset::Paper, 480)] {
            let cfg = preset.mm_config();
            println!("{preset:?} {size}: hidden {} ffn {}", cfg.hidden_dim, cfg.dim_feedforward);
            let model = MmFormer::synthetic(preset, 0, &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev).unwrap();
            let f = model.backbone.forward(&x).unwrap();
            let feats = mmformer::model::mm_features(&f);
            let n = cfg.num_queries;
            let props = Tensor::rand(0f32, 1f32, (1, n, size / 4, size / 4), &dev).unwrap();
            let mask = Tensor::ones((1, 1, size, size), DType::F32, &dev).unwrap();
            // Layers on trainable Vars take their backward-carrying paths: build them on a
            // VarMap, then rebuild them on detached copies of the same tensors.
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let plain = |vm: &VarMap| {
                let t = mmformer::train::varmap_tensors(vm).into_iter().map(|(k, v)| (k, v.detach())).collect();
                VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)
            };
            let d = cfg.hidden_dim;
            for (i, fe) in feats.iter().enumerate() {
                let (_, c, h, w) = fe.dims4().unwrap();
                println!(" level {i}: {c} ch {h}x{w}");
                t("self_align", 5, &mut || mm::self_align::self_align(fe).map(|_| ()));
                let wgt = Tensor::randn(0f32, 0.02, (d, c), &dev).unwrap();
                t("conv 1x1 (broadcast_matmul)", 5, &mut || wgt.broadcast_matmul(&fe.reshape((1, c, h * w))?).map(|_| ()));
                t("sine position encoding", 5, &mut || ops::position::sine_position_encoding(1, h, w, d / 2, &dev).map(|_| ()));
                let q = Tensor::randn(0f32, 1f32, (1, d, h, w), &dev).unwrap();
                let p = ops::position::sine_position_encoding(1, h, w, d / 2, &dev).unwrap();
                t("resize mask to level (addmask)", 5, &mut || ops::resize::resize_bilinear(&mask, (h, w), false).map(|_| ()));
                let _ = mm::cross_align::CrossAt::new(&cfg, vb.pp(format!("crossat_{i}"))).unwrap();
                let cat = mm::cross_align::CrossAt::new(&cfg, plain(&vm).pp(format!("crossat_{i}"))).unwrap();
                t("CrossAt forward (both directions)", 3, &mut || cat.forward(&q, &q, &p, &p).map(|_| ()));
                let tok = q.flatten_from(2).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                let kv = Tensor::randn(0f32, 1f32, (1, 225, d), &dev).unwrap();
                let _ = ops::attention::MultiheadAttention::new(d, cfg.num_heads, vb.pp(format!("mha{i}"))).unwrap();
                let mha = ops::attention::MultiheadAttention::new(d, cfg.num_heads, plain(&vm).pp(format!("mha{i}"))).unwrap();
                t("  MHA (Lq tokens -> 225 keys)", 3, &mut || mha.forward(&tok, &kv, &kv, None).map(|_| ()));
                let _ = ops::nn::LayerNorm::new(d, 1e-5, vb.pp(format!("ln{i}"))).unwrap();
                let ln = ops::nn::LayerNorm::new(d, 1e-5, plain(&vm).pp(format!("ln{i}"))).unwrap();
                t("  LayerNorm (ops::nn)", 5, &mut || ln.forward(&tok).map(|_| ()));
                let _ = candle_nn::linear(d, cfg.dim_feedforward, vb.pp(format!("lin{i}"))).unwrap();
                let lin = candle_nn::linear(d, cfg.dim_feedforward, plain(&vm).pp(format!("lin{i}"))).unwrap();
                t("  Linear d->ffn (candle_nn)", 5, &mut || candle_nn::Module::forward(&lin, &tok).map(|_| ()));
                t("  add (x + pos)", 5, &mut || (&tok + &tok).map(|_| ()));
                let logits = Tensor::randn(0f32, 1f32, (1, cfg.num_heads, h * w, 225), &dev).unwrap();
                t("  softmax (ops::nn) over 225 keys", 5, &mut || ops::nn::softmax(&logits, 3).map(|_| ()));
                t("  resize kv to short side 15", 5, &mut || ops::resize::resize_bilinear(&q, (15, 15), false).map(|_| ()));
                t("query prototypes (resize proposals + pool)", 5, &mut || mm::prototype::query_prototypes(&q, &props).map(|_| ()));
                t("support prototype", 5, &mut || mm::prototype::support_prototype(&q, &mask).map(|_| ()));
            }
            t("final: resize proposals to input (align_corners=False)", 3, &mut || {
                ops::resize::resize_bilinear(&props, (size, size), false).map(|_| ())
            });
            let up = ops::resize::resize_bilinear(&props, (size, size), false).unwrap();
            let c = Tensor::randn(0f32, 1f32, (1, 1, n), &dev).unwrap();
            t("final: coefficients x proposals matmul", 3, &mut || c.matmul(&up.reshape((1, n, size * size))?).map(|_| ()));
            // The POS halves.
            let pcfg = preset.pos_config();
            pos::MSDeformAttnPixelDecoder::new(&pcfg, vb.pp("pd")).unwrap();
            pos::MultiScaleMaskedTransformerDecoder::new(&pcfg, vb.pp("dec")).unwrap();
            let pvb = plain(&vm);
            let pd = pos::MSDeformAttnPixelDecoder::new(&pcfg, pvb.pp("pd")).unwrap();
            let dec = pos::MultiScaleMaskedTransformerDecoder::new(&pcfg, pvb.pp("dec")).unwrap();
            let pf = mmformer::model::pos_features(&f);
            t("POS pixel decoder (6 MSDeformAttn layers + FPN)", 3, &mut || pd.forward(&pf).map(|_| ()));
            let pdo = pd.forward(&pf).unwrap();
            t("POS masked-attention decoder (9 layers + heads)", 3, &mut || dec.forward(&pdo.multi_scale, &pdo.mask_features, None).map(|_| ()));
            // One encoder layer's pieces at this size.
            let shapes: Vec<(usize, usize)> = [32usize, 16, 8].iter().map(|&st| (size / st, size / st)).collect();
            let tokens: usize = shapes.iter().map(|(h, w)| h * w).sum();
            let (dm, heads, pts) = (pcfg.hidden_dim, pcfg.enc_heads, pcfg.enc_points);
            let src = Tensor::randn(0f32, 1f32, (1, tokens, dm), &dev).unwrap();
            let value = Tensor::randn(0f32, 1f32, (1, tokens, heads, dm / heads), &dev).unwrap();
            let locs = Tensor::rand(0f32, 1f32, (1, tokens, heads, 3, pts, 2), &dev).unwrap();
            let aw = Tensor::rand(0f32, 1f32, (1, tokens, heads, 3, pts), &dev).unwrap();
            println!(" encoder layer pieces on {tokens} tokens:");
            t("  ms_deform_attn_core kernel", 3, &mut || ops::deform::ms_deform_attn_core(&value, &shapes, &locs, &aw).map(|_| ()));
            let _ = ops::deform::MSDeformAttn::new(dm, 3, heads, pts, vb.pp("msda")).unwrap();
            let msda = ops::deform::MSDeformAttn::new(dm, 3, heads, pts, plain(&vm).pp("msda")).unwrap();
            let refs = Tensor::rand(0f32, 1f32, (1, tokens, 3, 2), &dev).unwrap();
            t("  MSDeformAttn forward (projections + kernel)", 3, &mut || msda.forward(&src, &refs, &src, &shapes).map(|_| ()));
            let _ = candle_nn::linear(dm, pcfg.enc_ffn_dim, vb.pp("el1")).unwrap();
            let l1 = candle_nn::linear(dm, pcfg.enc_ffn_dim, plain(&vm).pp("el1")).unwrap();
            let _ = candle_nn::linear(pcfg.enc_ffn_dim, dm, vb.pp("el2")).unwrap();
            let l2 = candle_nn::linear(pcfg.enc_ffn_dim, dm, plain(&vm).pp("el2")).unwrap();
            t("  FFN linear1 + relu + linear2", 3, &mut || {
                use candle_nn::Module;
                l2.forward(&l1.forward(&src)?.relu()?).map(|_| ())
            });
            let _ = ops::nn::LayerNorm::new(dm, 1e-5, vb.pp("eln")).unwrap();
            let eln = ops::nn::LayerNorm::new(dm, 1e-5, plain(&vm).pp("eln")).unwrap();
            t("  LayerNorm", 3, &mut || eln.forward(&src).map(|_| ()));
            println!(" pixel-decoder convs:");
            for (name, tap) in [("res5", &f.res5), ("res4", &f.res4), ("res3", &f.res3), ("res2", &f.res2)] {
                let (_, c, h, w) = tap.dims4().unwrap();
                let _ = pos::ConvGn::new(c, dm, 1, pcfg.gn_groups, vb.pp(format!("ip{name}"))).unwrap();
                let cg = pos::ConvGn::new(c, dm, 1, pcfg.gn_groups, plain(&vm).pp(format!("ip{name}"))).unwrap();
                t(&format!("  1x1 conv + GN {name} {c}->{dm} at {h}x{w}"), 3, &mut || cg.forward(tap).map(|_| ()));
            }
            let (_, _, h2, w2) = f.res2.dims4().unwrap();
            let x2 = Tensor::randn(0f32, 1f32, (1, dm, h2, w2), &dev).unwrap();
            let c3 = pos::ConvGn::new(dm, dm, 3, pcfg.gn_groups, vb.pp("l1")).unwrap();
            t(&format!("  3x3 conv + GN {dm}->{dm} at {h2}x{w2}, trainable Var weight"), 3, &mut || c3.forward(&x2).map(|_| ()));
            let c3 = pos::ConvGn::new(dm, dm, 3, pcfg.gn_groups, plain(&vm).pp("l1")).unwrap();
            t(&format!("  3x3 conv + GN {dm}->{dm} at {h2}x{w2}, plain weight (inference)"), 3, &mut || c3.forward(&x2).map(|_| ()));
            let _ = ops::nn::GroupNorm::new(pcfg.gn_groups, dm, 1e-5, vb.pp("gn")).unwrap();
            let gn = ops::nn::GroupNorm::new(pcfg.gn_groups, dm, 1e-5, plain(&vm).pp("gn")).unwrap();
            t(&format!("  GroupNorm alone at {h2}x{w2}"), 3, &mut || gn.forward(&x2).map(|_| ()));
        }
    }
}

mod profile_episode {
    use super::prelude::*;
    
    /// `PROFILE_PRESET=cpu|paper PROFILE_SHOTS=k PROFILE_THREADS=n`: per-stage medians of a few
    /// episodes, to compare thread/allocator settings from the environment.
    #[test]
    #[ignore]
    fn profile_episode() {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let n: usize = env("PROFILE_THREADS", "2").parse().unwrap();
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let preset = if env("PROFILE_PRESET", "cpu") == "paper" { Preset::Paper } else { Preset::Cpu };
        let k: usize = env("PROFILE_SHOTS", "1").parse().unwrap();
        let reps: usize = env("PROFILE_REPS", "5").parse().unwrap();
        let size = preset.input_size() as usize;
        let model = MmFormer::synthetic(preset, 0, &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev).unwrap();
        let s: Vec<Tensor> = (0..k).map(|_| Tensor::randn(0f32, 1f32, (1, 3, size, size), &dev).unwrap()).collect();
        let l: Vec<Tensor> = (0..k).map(|_| Tensor::ones((1, size, size), candle_core::DType::F32, &dev).unwrap()).collect();
        time_episode(&model, &q, &s, &l).unwrap();
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); 10];
        for _ in 0..reps {
            let t = time_episode(&model, &q, &s, &l).unwrap();
            for (v, x) in per.iter_mut().zip(t.wall.into_iter().chain(t.cpu)) {
                v.push(x);
            }
        }
        let med: Vec<f64> = per.into_iter().map(median).collect();
        let m: Vec<String> =
            EPISODE_STAGES.iter().enumerate().map(|(i, n)| format!("{n} {:.0} (cpu {:.0})", med[i], med[i + 5])).collect();
        println!("RESULT {}", m.join(" | "));
    }
}

mod profile_pos_train {
    use super::prelude::*;


    fn fb(name: &str, reps: usize, f: &mut dyn FnMut() -> candle_core::Result<Tensor>) {
        // forward, then backward of sum(y * r) for a fixed random r
        let y = f().unwrap();
        let r = Tensor::randn(0f32, 1f32, y.dims(), &Device::Cpu).unwrap();
        let mut fw = Vec::new();
        let mut bw = Vec::new();
        for _ in 0..reps + 1 {
            let t = Instant::now();
            let y = f().unwrap();
            let t1 = Instant::now();
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            drop(g);
            let t2 = Instant::now();
            fw.push((t1 - t).as_secs_f64() * 1e3);
            bw.push((t2 - t1).as_secs_f64() * 1e3);
        }
        fw.remove(0);
        bw.remove(0);
        println!("  {name:<56} fwd {:>8.2} ms  bwd {:>8.2} ms", median(fw), median(bw));
    }

    /// Forward and backward of the POS pieces on the cpu preset's training shapes (batch 4, 256²).
    #[test]
    #[ignore]
    fn profile_pos_parts() {
        use candle_core::DType;
        use candle_nn::{VarBuilder, VarMap};
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let n: usize = env("PROFILE_THREADS", "2").parse().unwrap();
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let reps: usize = env("PROFILE_REPS", "5").parse().unwrap();
        let dev = Device::Cpu;
        let cfg = Preset::Cpu.pos_config();
        let d = cfg.hidden_dim;
        let feats = pos_bench_features(Preset::Cpu, 256, 4, &Device::Cpu).unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let x64 = candle_core::Var::randn(0f32, 1f32, (4, d, 64, 64), &dev).unwrap();
        let c3 = pos::ConvGn::new(d, d, 3, cfg.gn_groups, vb.pp("l1")).unwrap();
        fb("ConvGn 3x3 64->64 at 4x64x64 (Var weight, Var input)", reps, &mut || c3.forward(x64.as_tensor()));
        let w3 = vm.data().lock().unwrap()["l1.weight"].clone();
        fb("  candle conv2d alone", reps, &mut || x64.as_tensor().conv2d(w3.as_tensor(), 1, 1, 1, 1));
        fb("  ops::conv::conv2d_trainable alone", reps, &mut || {
            ops::conv::conv2d_trainable(x64.as_tensor(), w3.as_tensor(), None, [1; 4])
        });
        fb("    harness overhead (y = x + 0)", reps, &mut || x64.as_tensor().affine(1.0, 0.0));
        let xc = x64.as_tensor().detach();
        fb("    dW only (constant input)", reps, &mut || ops::conv::conv2d_trainable(&xc, w3.as_tensor(), None, [1; 4]));
        let wc = w3.as_tensor().detach();
        fb("    dX only (constant weight)", reps, &mut || ops::conv::conv2d_trainable(x64.as_tensor(), &wc, None, [1; 4]));
        let gn = ops::nn::GroupNorm::new(cfg.gn_groups, d, 1e-5, vb.pp("gn")).unwrap();
        fb("  ops::nn::GroupNorm(32, 64) (composed) alone at 4x64x64", reps, &mut || gn.forward(x64.as_tensor()));
        let (gw, gb) = {
            let data = vm.data().lock().unwrap();
            (data["gn.weight"].clone(), data["gn.bias"].clone())
        };
        fb("  ops::conv::group_norm (fused) alone at 4x64x64", reps, &mut || {
            ops::conv::group_norm(x64.as_tensor(), gw.as_tensor(), gb.as_tensor(), cfg.gn_groups, 1e-5)
        });
        let a1 = pos::ConvGn::new(24, d, 1, cfg.gn_groups, vb.pp("a1")).unwrap();
        fb("ConvGn 1x1 24->64 at 4x64x64 (constant input)", reps, &mut || a1.forward(&feats[0]));
        let mf = pos::Conv1x1::new(d, d, true, candle_nn::Init::Const(0.01), vb.pp("mf")).unwrap();
        fb("Conv1x1 64->64 + bias at 4x64x64 (Var input)", reps, &mut || mf.forward(x64.as_tensor()));
        let bias = candle_core::Var::randn(0f32, 1f32, d, &dev).unwrap();
        fb("  bias broadcast_add alone at 4x64x64", reps, &mut || {
            x64.as_tensor().broadcast_add(&bias.as_tensor().reshape((1, d, 1, 1))?)
        });
        let x32 = candle_core::Var::randn(0f32, 1f32, (4, d, 32, 32), &dev).unwrap();
        fb("  resize_bilinear 32->64", reps, &mut || ops::resize::resize_bilinear(x32.as_tensor(), (64, 64), false));
        let gn32 = ops::nn::GroupNorm::new(cfg.gn_groups, d, 1e-5, vb.pp("gn32")).unwrap();
        fb("  input_proj.2 (Conv1x1 40->64 + nn::GroupNorm) at 4x32x32", reps, &mut || {
            let ip = pos::Conv1x1::new(40, d, true, candle_nn::Init::Const(0.01), vb.pp("ip2"))?;
            gn32.forward(&ip.forward(&feats[1])?)
        });
        let tokens: usize = 64 + 256 + 1024;
        let src = candle_core::Var::randn(0f32, 1f32, (4, tokens, d), &dev).unwrap();
        let refs = Tensor::rand(0f32, 1f32, (4, tokens, 3, 2), &dev).unwrap();
        let msda = ops::deform::MSDeformAttn::new(d, 3, cfg.enc_heads, cfg.enc_points, vb.pp("msda")).unwrap();
        let shapes = [(8usize, 8usize), (16, 16), (32, 32)];
        fb("  MSDeformAttn (4 x 1344 tokens)", reps, &mut || msda.forward(src.as_tensor(), &refs, src.as_tensor(), &shapes));
        let pd = pos::MSDeformAttnPixelDecoder::new(&cfg, vb.pp("pd")).unwrap();
        fb("pixel decoder (mask_features)", reps, &mut || Ok(pd.forward(&feats)?.mask_features));
        let pdo = pd.forward(&feats).unwrap();
        let ms: Vec<Tensor> = pdo.multi_scale.iter().map(|t| t.detach()).collect();
        let mfeat = candle_core::Var::from_tensor(&pdo.mask_features.detach()).unwrap();
        let dec = pos::MultiScaleMaskedTransformerDecoder::new(&cfg, vb.pp("dec")).unwrap();
        fb("decoder (all predictions stacked)", reps, &mut || {
            let o = dec.forward(&ms, mfeat.as_tensor(), None)?;
            Tensor::stack(&o.predictions, 0)
        });
        let emb = candle_core::Var::randn(0f32, 1f32, (4, cfg.num_queries, d), &dev).unwrap();
        fb("  one mask head einsum (4x20x64 . 4x64x4096)", reps, &mut || {
            emb.as_tensor().matmul(&mfeat.as_tensor().reshape((4, d, 4096))?)
        });
    }

    /// Writes a cpu-preset POS (seeded init), random features of a 2×3×128² input and our
    /// forward outputs to `$POS_DUMP` (default /tmp/pos_dump.safetensors), for
    /// `tools/check_pos_torch.py`, which loads the same weights into the PyTorch side of
    /// `bench pos` and compares its outputs (the two sides compute the same function).
    #[test]
    #[ignore]
    fn dump_pos_for_torch() {
        use mmformer::stage1;
        let path = std::env::var("POS_DUMP").unwrap_or_else(|_| "/tmp/pos_dump.safetensors".into());
        let (vm, model) = stage1::new_pos_seeded(Preset::Cpu, 3, &Device::Cpu).unwrap();
        let feats = pos_bench_features(Preset::Cpu, 128, 2, &Device::Cpu).unwrap();
        let out = model.forward(&feats).unwrap();
        let mut t = mmformer::train::varmap_tensors(&vm);
        for (name, f) in ["res2", "res3", "res4", "res5"].iter().zip(&feats) {
            t.insert(format!("input.{name}"), f.clone());
        }
        for (i, p) in out.all_predictions().iter().enumerate() {
            t.insert(format!("output.pred_masks.{i}"), p.clone());
        }
        t.insert("output.mask_features".into(), out.mask_features.clone());
        for (i, m) in out.multi_scale.iter().enumerate() {
            t.insert(format!("output.multi_scale.{i}"), m.contiguous().unwrap());
        }
        candle_core::safetensors::save(&t, &path).unwrap();
        println!("wrote {path}");
    }

    /// `cargo test --release -p xtask profile_pos_train -- --ignored --nocapture`
    /// (`PROFILE_REPS`, `PROFILE_THREADS`): per-phase medians of the stage-1 training iteration
    /// of `bench pos`, ours only; a target for `perf record`.
    #[test]
    #[ignore]
    fn profile_pos_train() {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let n: usize = env("PROFILE_THREADS", "2").parse().unwrap();
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        let reps: usize = env("PROFILE_REPS", "5").parse().unwrap();
        let mut bench = PosTrainBench::new(Preset::Cpu, 256, 4, &Device::Cpu).unwrap();
        bench.step().unwrap();
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); 5];
        for _ in 0..reps {
            let (p, _) = bench.step().unwrap();
            for (v, x) in per.iter_mut().zip(p.iter().copied().chain([p.iter().sum::<f64>()])) {
                v.push(x);
            }
        }
        let names = TRAIN_PHASES.iter().copied().chain(["total"]);
        let m: Vec<String> = names.zip(per).map(|(n, v)| format!("{n} {:.1}", median(v))).collect();
        println!("RESULT {}", m.join(" | "));
    }
}
