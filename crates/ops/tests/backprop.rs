//! The patched candle backward (vendor/README.md) stores the first gradient to reach a tensor
//! as it is and adds the later ones, in place when it alone holds the sum: gradients through
//! strided views, fan-in and shared gradients must come out as the plain sums.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, Rng};

#[test]
fn first_gradients_are_stored_and_fan_in_adds() {
    let mut rng = Rng::new(90);
    let x = Var::from_tensor(&rng.tensor(&[3, 4], -1.0, 1.0, DType::F64)).unwrap();
    let y = Var::from_tensor(&rng.tensor(&[3, 4], -1.0, 1.0, DType::F64)).unwrap();
    // x reaches the loss four times: through a transpose (a strided first gradient), a
    // product with y, itself squared, and an add whose other side is y (one gradient shared
    // by both operands).
    let loss = ((x.t().unwrap() * 3.0).unwrap().sum_all().unwrap()
        + (&*x * &*y).unwrap().sum_all().unwrap()
        + x.sqr().unwrap().sum_all().unwrap()
        + (&*x + &*y).unwrap().sum_all().unwrap())
    .unwrap();
    let g = loss.backward().unwrap();
    // d/dx = 3 + y + 2x + 1; d/dy = x + 1.
    let want_x = ((y.as_tensor() + 4.0).unwrap() + (x.as_tensor() * 2.0).unwrap()).unwrap();
    let want_y = (x.as_tensor() + 1.0).unwrap();
    let gx = g.get(&x).unwrap();
    assert!(gx.is_contiguous());
    assert_close(gx, &want_x, 1e-12, "d x");
    assert_close(g.get(&y).unwrap(), &want_y, 1e-12, "d y");
}

#[test]
fn a_gradient_shared_by_two_variables_stays_theirs() {
    // Both operands of an add receive the same gradient tensor; rescaling one entry of the
    // store (as gradient clipping does) must leave the other's untouched.
    let a = Var::from_tensor(&Tensor::ones(5, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::ones(5, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut g = (&*a + &*b).unwrap().sum_all().unwrap().backward().unwrap();
    let scaled = (g.get(&a).unwrap() * 0.5).unwrap();
    g.insert(a.as_tensor(), scaled);
    assert_eq!(g.get(&a).unwrap().to_vec1::<f32>().unwrap(), vec![0.5; 5]);
    assert_eq!(g.get(&b).unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 5]);
}

/// Fan-in sums are added in place only into a buffer nothing else holds: with the gradient of
/// an add shared by both operands reaching `a` first or last, through a reshaped view, and on
/// sizes below and above the parallel split (2 · 32k elements), every variable gets its own sum.
#[test]
fn in_place_fan_in_sums_leave_shared_gradients_alone() {
    for n in [6usize, 3 * 65_536 + 6] {
        for dtype in [DType::F32, DType::F64] {
            for shared_first in [false, true] {
                let mut rng = Rng::new(91 + n as u64);
                let a = Var::from_tensor(&rng.tensor(&[n], -1.0, 1.0, dtype)).unwrap();
                let b = Var::from_tensor(&rng.tensor(&[n], -1.0, 1.0, dtype)).unwrap();
                let c = rng.tensor(&[n], -1.0, 1.0, dtype);
                let shared = (&*a + &*b).unwrap().mul(&c).unwrap().sum_all().unwrap();
                let own = ((a.reshape((n / 2, 2)).unwrap() * 3.0).unwrap().sum_all().unwrap()
                    + a.sqr().unwrap().sum_all().unwrap())
                .unwrap();
                let loss = if shared_first { (shared + own).unwrap() } else { (own + shared).unwrap() };
                let g = loss.backward().unwrap();
                // d/da = c + 3 + 2a; d/db = c.
                let want_a = ((&c + 3.0).unwrap() + (a.as_tensor() * 2.0).unwrap()).unwrap();
                let what = format!("n {n}, {dtype:?}, shared first {shared_first}");
                assert_close(g.get(&a).unwrap(), &want_a, 1e-6, &format!("d a, {what}"));
                assert_close(g.get(&b).unwrap(), &c, 0.0, &format!("d b, {what}"));
            }
        }
    }
}
