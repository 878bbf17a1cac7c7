//! Helpers shared by the ops integration tests: a deterministic RNG, tensor comparison and a
//! central-difference gradient checker.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};

/// Small deterministic generator (SplitMix64) so tests need no extra dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }

    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    pub fn tensor(&mut self, shape: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.vec(n, lo, hi), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    pub fn var(&mut self, shape: &[usize], lo: f64, hi: f64) -> Var {
        Var::from_tensor(&self.tensor(shape, lo, hi, DType::F64)).unwrap()
    }
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Asserts elementwise `|a - b| <= tol`, reporting the worst element.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (va, vb) = (to_vec(a), to_vec(b));
    let (i, d) = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold(
            (0, 0.0f64),
            |m, (i, d)| if d > m.1 || d.is_nan() { (i, d) } else { m },
        );
    assert!(
        d <= tol,
        "{what}: max |diff| {d:e} at flat index {i} ({} vs {}), tol {tol:e}",
        va[i],
        vb[i]
    );
}

pub fn assert_values(a: &Tensor, expected: &[f64], tol: f64, what: &str) {
    let va = to_vec(a);
    assert_eq!(va.len(), expected.len(), "{what}: element count");
    for (i, (x, y)) in va.iter().zip(expected).enumerate() {
        assert!(
            (x - y).abs() <= tol,
            "{what}: element {i} is {x}, expected {y}"
        );
    }
}

/// Central-difference check of the gradients of `loss = Σ f() ⊙ R` (R fixed random, so the
/// check cannot pass through cancellation, e.g. Σ softmax = const) w.r.t. every var.
///
/// Every var must receive a gradient from `backward`. Up to `max_elems` elements of each var
/// (all, if it is smaller) are perturbed by ±`eps`; the analytic and numeric derivatives must
/// agree within `tol · max(1, |numeric|)`. Returns the largest relative error seen.
pub fn check_grads(
    what: &str,
    vars: &[(&str, &Var)],
    f: impl Fn() -> Result<Tensor>,
    max_elems: usize,
    eps: f64,
    tol: f64,
) -> f64 {
    let out = f().unwrap();
    assert_eq!(
        out.dtype(),
        DType::F64,
        "{what}: gradient checks run in f64"
    );
    let mut rng = Rng::new(0xC0FFEE);
    let proj = rng.tensor(out.dims(), -1.0, 1.0, DType::F64);
    let loss_of = |t: Tensor| -> f64 {
        t.mul(&proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let loss = out.mul(&proj).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut worst = 0f64;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient reached `{name}`"));
        assert_eq!(g.dims(), var.dims(), "{what}: gradient shape of `{name}`");
        let g = to_vec(g);
        let base = to_vec(var.as_tensor());
        let n = base.len();
        let picks: Vec<usize> = if n <= max_elems {
            (0..n).collect()
        } else {
            (0..max_elems)
                .map(|_| (rng.next_u64() % n as u64) as usize)
                .collect()
        };
        let mut nonzero = false;
        for &i in &picks {
            let mut v = base.clone();
            v[i] = base[i] + eps;
            var.set(&Tensor::from_vec(v.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let lp = loss_of(f().unwrap());
            v[i] = base[i] - eps;
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let lm = loss_of(f().unwrap());
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * eps);
            let err = (g[i] - numeric).abs() / numeric.abs().max(1.0);
            worst = worst.max(err);
            nonzero |= numeric.abs() > 1e-9;
            assert!(
                err <= tol,
                "{what}: d loss / d {name}[{i}] analytic {} vs numeric {numeric} (rel err {err:e})",
                g[i]
            );
        }
        assert!(
            nonzero,
            "{what}: every checked derivative w.r.t. `{name}` is zero; the check is vacuous"
        );
    }
    worst
}
