//! Cost of the stage-1 loss at training size (ignored by default: run with `--ignored
//! --nocapture`). Checks only that the run is finite; the printout is for planning.

mod common;

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use common::{rand_tensor, rect_masks, rng, scalar};
use losses::Stage1Criterion;

#[test]
#[ignore]
fn timing_stage1_loss_at_training_size() {
    // PASCAL step 1: batch 8, 480x480 crops, 100 queries at 1/4 resolution, 10 predictions.
    let (b, q, s, l) = (8usize, 100usize, 480usize, 10usize);
    let mut g = rng(1);
    let preds: Vec<Var> =
        (0..l).map(|_| Var::from_tensor(&rand_tensor(&mut g, &[b, q, s / 4, s / 4], -6.0, 6.0, DType::F32)).unwrap()).collect();
    let targets: Vec<Tensor> = (0..b).map(|_| rect_masks(&mut g, 4, s, s)).collect();
    let label = Tensor::stack(&targets.iter().map(|t| t.get(1).unwrap()).collect::<Vec<_>>(), 0).unwrap();
    let inputs: Vec<Tensor> = preds.iter().map(|v| v.as_tensor().clone()).collect();
    let crit = Stage1Criterion::default();
    let t0 = Instant::now();
    let out = crit.forward_with_rng(&inputs, &targets, &label, &mut rng(2)).unwrap();
    let t1 = Instant::now();
    let grads = out.total.backward().unwrap();
    let t2 = Instant::now();
    assert!(scalar(&out.total).is_finite());
    assert!(grads.get(preds[0].as_tensor()).is_some());
    // Breakdown of one prediction's share and the oracle term.
    let mut r = rng(3);
    let mut pts = losses::RngPoints::new(&mut r);
    let t3 = Instant::now();
    let matches = crit.matcher().forward(&inputs[9], &targets, &mut pts).unwrap();
    let t4 = Instant::now();
    crit.matched_mask_losses(&inputs[9], &targets, &matches, 32.0, &mut pts).unwrap();
    let t5 = Instant::now();
    crit.oracle_loss(&inputs[9], &label, (s, s)).unwrap();
    let t6 = Instant::now();
    println!(
        "per prediction: matcher {:.3} s, mask losses {:.3} s; oracle {:.3} s",
        (t4 - t3).as_secs_f64(),
        (t5 - t4).as_secs_f64(),
        (t6 - t5).as_secs_f64()
    );
    println!(
        "stage-1 loss, batch {b}, {s}x{s}, {q} queries, {l} predictions: forward {:.2} s, backward {:.2} s",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64()
    );
}
