mod common;

use candle_core::{DType, Device, Tensor};
use common::{rand_tensor, rng, scalar, to_vec_f64};
use losses::mask::{dice_loss, pairwise_bce_cost, pairwise_costs, pairwise_dice_cost, sigmoid_bce_loss};

#[test]
fn hand_values() {
    let dev = Device::Cpu;
    // p = 0.5 at 4 points, targets [1, 1, 0, 0]: dice = 1 − (2·1 + 1)/(2 + 2 + 1) = 0.4.
    let x = Tensor::zeros((1, 4), DType::F64, &dev).unwrap();
    let t = Tensor::new(&[[1f64, 1.0, 0.0, 0.0]], &dev).unwrap();
    assert!((scalar(&dice_loss(&x, &t, 1.0).unwrap()) - 0.4).abs() < 1e-12);
    // BCE at logit 0 is ln 2 whatever the target; divided by num_masks.
    assert!((scalar(&sigmoid_bce_loss(&x, &t, 2.0).unwrap()) - std::f64::consts::LN_2 / 2.0).abs() < 1e-12);
    assert!(sigmoid_bce_loss(&x, &t, 0.0).is_err());
    assert!(dice_loss(&x, &t.narrow(1, 0, 3).unwrap(), 1.0).is_err());
}

/// The matcher's one-pass f32 costs equal the two composed functions (and f64 goes through them),
/// with logits far out in both tails and fractional targets.
#[test]
fn the_fused_pairwise_costs_equal_the_composed_ones() {
    let mut g = rng(7);
    let (q, m, p) = (100usize, 4usize, 3584usize);
    for dt in [DType::F32, DType::F64] {
        let x = rand_tensor(&mut g, &[q, p], -30.0, 30.0, dt);
        let t = rand_tensor(&mut g, &[m, p], 0.0, 1.0, dt);
        let (bce, dice) = pairwise_costs(&x, &t).unwrap();
        assert_eq!(bce.dims(), &[q, m]);
        let (bce, dice) = (to_vec_f64(&bce), to_vec_f64(&dice));
        let (wb, wd) = (to_vec_f64(&pairwise_bce_cost(&x, &t).unwrap()), to_vec_f64(&pairwise_dice_cost(&x, &t).unwrap()));
        for k in 0..q * m {
            assert!((bce[k] - wb[k]).abs() <= 1e-5 * wb[k].abs().max(1.0), "{dt:?} bce[{k}]: {} vs {}", bce[k], wb[k]);
            assert!((dice[k] - wd[k]).abs() <= 1e-5, "{dt:?} dice[{k}]: {} vs {}", dice[k], wd[k]);
        }
    }
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(pairwise_costs(&x, &Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap()).is_err());
}

/// Entry (i, j) of the pairwise costs is the single-pair loss of prediction i and target j.
#[test]
fn pairwise_costs_equal_per_pair_losses() {
    let mut g = rng(3);
    let (q, m, p) = (5usize, 3usize, 50usize);
    let x = rand_tensor(&mut g, &[q, p], -5.0, 5.0, DType::F64);
    let t = rand_tensor(&mut g, &[m, p], 0.0, 1.0, DType::F64);
    let bce = to_vec_f64(&pairwise_bce_cost(&x, &t).unwrap());
    let dice = to_vec_f64(&pairwise_dice_cost(&x, &t).unwrap());
    for i in 0..q {
        for j in 0..m {
            let xi = x.narrow(0, i, 1).unwrap();
            let tj = t.narrow(0, j, 1).unwrap();
            let b = scalar(&sigmoid_bce_loss(&xi, &tj, 1.0).unwrap());
            let d = scalar(&dice_loss(&xi, &tj, 1.0).unwrap());
            assert!((bce[i * m + j] - b).abs() < 1e-12, "bce [{i},{j}]");
            assert!((dice[i * m + j] - d).abs() < 1e-12, "dice [{i},{j}]");
        }
    }
}
