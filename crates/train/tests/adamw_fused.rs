//! The one-pass CPU AdamW update against the candle-op update, and the in-place gradient norm
//! against its definition. Its own process: the test switches the fused kernels off and on.

use candle_core::{DType, Device, Tensor, Var};
use train::*;

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.731).sin() * (1.0 + (i % 7) as f32)).collect()
}

/// Three optimizers' worth of runs (weight decay and none, clipping scale and none, one chunk
/// and many) give the same parameters and moments to the bit with the fused kernels on and off.
#[test]
fn fused_adamw_equals_the_candle_ops_update() {
    for n in [5usize, 40_000] {
        for scale in [None, Some(0.37)] {
            let run = |fused: bool| {
                ops::set_fused_kernels(fused);
                let w = NamedVar { name: "fc1.weight".into(), var: Var::from_tensor(&Tensor::new(values(n, 0.0), &Device::Cpu).unwrap()).unwrap() };
                let nw = NamedVar { name: "x.norm.weight".into(), var: Var::from_tensor(&Tensor::new(values(n, 3.0), &Device::Cpu).unwrap()).unwrap() };
                let vars = vec![w.clone(), nw.clone()];
                let mut opt = AdamW::new(vars.clone(), AdamWConfig::default(), default_no_decay).unwrap();
                for step in 0..3 {
                    let c = Tensor::new(values(n, 7.0 + step as f32), &Device::Cpu).unwrap();
                    let loss = ((w.var.as_tensor() * &c).unwrap().sum_all().unwrap() + nw.var.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
                    let grads = loss.backward().unwrap();
                    opt.step_scaled(&grads, 1e-2, scale).unwrap();
                }
                let (state, _) = opt.state();
                let mut out: Vec<(String, Vec<f32>)> = vars.iter().map(|v| (v.name.clone(), v.var.as_tensor().to_vec1::<f32>().unwrap())).collect();
                let mut keys: Vec<_> = state.keys().cloned().collect();
                keys.sort();
                out.extend(keys.into_iter().map(|k| (k.clone(), state[&k].to_vec1::<f32>().unwrap())));
                out
            };
            let (composed, fused) = (run(false), run(true));
            ops::set_fused_kernels(true);
            for ((name, a), (_, b)) in composed.iter().zip(&fused) {
                let bad = a.iter().zip(b).position(|(x, y)| x != y);
                assert!(bad.is_none(), "n {n}, scale {scale:?}, {name}[{}]: {} vs {}", bad.unwrap(), a[bad.unwrap()], b[bad.unwrap()]);
            }
        }
    }
}

/// The norm of f32 CPU gradients (read in place) and of f64 ones (reduced by candle ops), mixed.
#[test]
fn grad_norm_is_the_global_l2_norm() {
    let a = NamedVar { name: "a".into(), var: Var::from_tensor(&Tensor::new(values(50_000, 1.0), &Device::Cpu).unwrap()).unwrap() };
    let b = NamedVar { name: "b".into(), var: Var::from_tensor(&Tensor::new(values(3, 2.0), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()).unwrap() };
    let ca = values(50_000, 5.0);
    let cb = [0.5f64, -2.0, 3.0];
    let loss = ((a.var.as_tensor() * Tensor::new(ca.as_slice(), &Device::Cpu).unwrap()).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap()
        + (b.var.as_tensor() * Tensor::new(&cb, &Device::Cpu).unwrap()).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let want = (ca.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() + cb.iter().map(|v| v * v).sum::<f64>()).sqrt();
    let got = grad_norm(&grads, &[a, b]).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    assert_eq!(clip_coefficient(got, 2.0 * got), None, "within the bound: unclipped");
    assert_eq!(clip_coefficient(f64::NAN, 0.01), None, "a non-finite norm is not clipped by");
    assert!((clip_coefficient(got, 0.01).unwrap() - 0.01 / (got + 1e-6)).abs() < 1e-18);
}
