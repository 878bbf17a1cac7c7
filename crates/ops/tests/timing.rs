//! Wall-clock timings of the ops at MM-Former's real sizes (480² input, batch 1), forward and
//! forward+backward. Ignored by default; run with
//! `cargo test --release -p ops --test timing -- --ignored --nocapture`.

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::Rng;
use ops::attention::MultiheadAttention;
use ops::deform::{ms_deform_attn_core, ms_deform_attn_core_composed, MSDeformAttn};
use ops::resize::resize_bilinear;
use ops::sample::point_sample;

fn time<T>(what: &str, f: impl Fn() -> T) -> T {
    let _ = f();
    let t = Instant::now();
    let out = f();
    println!("{what}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    out
}

fn fwd_bwd(what: &str, inputs: &[&Var], f: impl Fn() -> Tensor) {
    time(&format!("{what} forward"), &f);
    time(&format!("{what} forward+backward"), || {
        let g = f().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in inputs {
            assert!(g.get(v.as_tensor()).is_some());
        }
    });
}

#[test]
#[ignore]
fn timings_at_model_sizes() {
    let mut rng = Rng::new(1);
    let dev = Device::Cpu;
    // Pixel-decoder deformable attention: 3 levels 15², 30², 60², d 256.
    let shapes = [(15usize, 15usize), (30, 30), (60, 60)];
    let s: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let vm = VarMap::new();
    let da =
        MSDeformAttn::new(256, 3, 8, 4, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    vm.data().lock().unwrap()["sampling_offsets.weight"]
        .set(&rng.tensor(&[192, 256], -0.05, 0.05, DType::F32))
        .unwrap();
    let src = Var::from_tensor(&rng.tensor(&[1, s, 256], -1.0, 1.0, DType::F32)).unwrap();
    let mut refp = Vec::new();
    for &(h, w) in &shapes {
        for i in 0..h {
            for j in 0..w {
                refp.extend([(j as f32 + 0.5) / w as f32, (i as f32 + 0.5) / h as f32]);
            }
        }
    }
    let refp = Tensor::from_vec(refp, (1, s, 1, 2), &dev)
        .unwrap()
        .repeat((1, 1, 3, 1))
        .unwrap();
    fwd_bwd("MSDeformAttn S=Lq=4725", &[&src], || {
        da.forward(&src, &refp, &src, &shapes).unwrap()
    });

    // The core alone: CPU kernel vs the composed (gather) version.
    let value = Var::from_tensor(&rng.tensor(&[1, s, 8, 32], -1.0, 1.0, DType::F32)).unwrap();
    let loc = Var::from_tensor(&rng.tensor(&[1, s, 8, 3, 4, 2], 0.0, 1.0, DType::F32)).unwrap();
    let attn = Var::from_tensor(&rng.tensor(&[1, s, 8, 3, 4], 0.0, 0.1, DType::F32)).unwrap();
    let vars = [&value, &loc, &attn];
    fwd_bwd("ms_deform_attn_core kernel", &vars, || {
        ms_deform_attn_core(&value, &shapes, &loc, &attn).unwrap()
    });
    fwd_bwd("ms_deform_attn_core composed", &vars, || {
        ms_deform_attn_core_composed(&value, &shapes, &loc, &attn).unwrap()
    });

    // Cross-alignment attention: 60² queries against 15² keys, 4 heads.
    let vm = VarMap::new();
    let mha =
        MultiheadAttention::new(256, 4, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let q = Var::from_tensor(&rng.tensor(&[1, 3600, 256], -1.0, 1.0, DType::F32)).unwrap();
    let kv = Var::from_tensor(&rng.tensor(&[1, 225, 256], -1.0, 1.0, DType::F32)).unwrap();
    fwd_bwd("MHA 3600x225", &[&q, &kv], || {
        mha.forward(&q, &kv, &kv, None).unwrap()
    });

    // Final proposals upsampled to the input size.
    let m = Var::from_tensor(&rng.tensor(&[1, 100, 120, 120], -1.0, 1.0, DType::F32)).unwrap();
    fwd_bwd("resize_bilinear 100x120²->480²", &[&m], || {
        resize_bilinear(&m, (480, 480), false).unwrap()
    });

    // Stage-1 point losses: 20 matched masks, 12544 points each.
    let masks = Var::from_tensor(&rng.tensor(&[20, 1, 120, 120], -1.0, 1.0, DType::F32)).unwrap();
    let coords = rng.tensor(&[20, 12544, 2], 0.0, 1.0, DType::F32);
    fwd_bwd("point_sample 20x12544", &[&masks], || {
        point_sample(&masks, &coords).unwrap()
    });
}
