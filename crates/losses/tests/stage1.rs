mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{rand_tensor, rect_masks, rng, scalar, to_vec_f64};
use losses::{Stage1Config, Stage1Criterion, Stage1Losses};

const B: usize = 2;
const Q: usize = 7;
const H: usize = 6;
const W: usize = 8;
const L: usize = 3;

fn small_config() -> Stage1Config {
    Stage1Config { num_points: 40, ..Default::default() }
}

struct Batch {
    preds: Vec<Var>,
    targets: Vec<Tensor>,
    label: Tensor,
}

fn batch(seed: u64) -> Batch {
    let mut g = rng(seed);
    let preds = (0..L).map(|_| Var::from_tensor(&rand_tensor(&mut g, &[B, Q, H, W], -4.0, 4.0, DType::F32)).unwrap()).collect();
    // Image 0 has 3 GT masks, image 1 has 2.
    let targets = vec![rect_masks(&mut g, 3, 4 * H, 4 * W), rect_masks(&mut g, 2, 4 * H, 4 * W)];
    // Binary label: foreground = mask 1 of each image, with an ignore border.
    let mut lab = Vec::new();
    for t in &targets {
        let fg = to_vec_f64(&t.get(1).unwrap());
        for (i, v) in fg.iter().enumerate() {
            let (y, x) = (i / (4 * W), i % (4 * W));
            lab.push(if y == 0 || x == 0 { 255f32 } else { *v as f32 });
        }
    }
    let label = Tensor::from_vec(lab, (B, 4 * H, 4 * W), &Device::Cpu).unwrap();
    Batch { preds, targets, label }
}

fn run(b: &Batch, seed: u64) -> Stage1Losses {
    let preds: Vec<Tensor> = b.preds.iter().map(|v| v.as_tensor().clone()).collect();
    Stage1Criterion::new(small_config()).forward_with_rng(&preds, &b.targets, &b.label, &mut rng(seed)).unwrap()
}

#[test]
fn terms_total_and_names_follow_the_official_dict() {
    let b = batch(1);
    let out = run(&b, 42);
    let names: Vec<&str> = out.terms.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0", "loss_mask_1", "loss_dice_1", "fewshot_loss"]
    );
    assert_eq!(out.num_masks, 5.0);
    let mut sum = 0.0;
    for t in &out.terms {
        let w = if t.name == "fewshot_loss" { 10.0 } else { 5.0 };
        assert_eq!(t.weight, w);
        let (raw, weighted) = (scalar(&t.raw), scalar(&t.weighted));
        assert!(raw.is_finite() && raw > 0.0, "{}: {raw}", t.name);
        assert!((weighted - w * raw).abs() < 1e-5 * weighted.abs());
        sum += weighted;
    }
    assert!((scalar(&out.total) - sum).abs() < 1e-4, "total {} vs Σ {sum}", scalar(&out.total));
    // The final prediction's terms come from the last decoder prediction.
    assert!(out.predictions[L - 1].is_final);
    assert_eq!(scalar(&out.term("loss_mask").unwrap().raw), scalar(&out.predictions[L - 1].loss_mask));
    assert_eq!(scalar(&out.term("loss_dice_1").unwrap().raw), scalar(&out.predictions[1].loss_dice));
    // Every GT mask is matched once per prediction; 40 loss points per matched mask.
    for p in &out.predictions {
        assert_eq!(p.matches[0].src.len(), 3);
        assert_eq!(p.matches[1].src.len(), 2);
        assert_eq!(p.point_coords.dims(), &[5, 40, 2]);
    }
    let scalars = out.scalars().unwrap();
    assert_eq!(scalars.len(), out.terms.len());
    // Oracle: the chosen index is the argmax of the IoUs, and `out` is that mask upsampled.
    assert_eq!(out.oracle.ious.dims(), &[B, Q]);
    assert_eq!(out.oracle.out.dims(), &[B, 1, 4 * H, 4 * W]);
    for (i, &k) in out.oracle.index.iter().enumerate() {
        let row = to_vec_f64(&out.oracle.ious.get(i).unwrap());
        assert!(row.iter().all(|&v| v <= row[k]));
    }
}

#[test]
fn same_seed_same_loss_other_seed_other_points() {
    let b = batch(2);
    let a1 = run(&b, 7);
    let a2 = run(&b, 7);
    let c = run(&b, 8);
    assert_eq!(scalar(&a1.total), scalar(&a2.total));
    assert_eq!(to_vec_f64(&a1.predictions[0].point_coords), to_vec_f64(&a2.predictions[0].point_coords));
    assert_ne!(to_vec_f64(&a1.predictions[0].point_coords), to_vec_f64(&c.predictions[0].point_coords));
    assert_ne!(scalar(&a1.total), scalar(&c.total));
}

/// Unmatched queries get no supervision: in an auxiliary prediction (no oracle term) only the
/// matched queries receive gradient; in the final one, the oracle mask does too.
#[test]
fn gradient_reaches_exactly_the_matched_and_oracle_queries() {
    let b = batch(3);
    let out = run(&b, 11);
    let grads = out.total.backward().unwrap();
    for (li, var) in b.preds.iter().enumerate() {
        let g = grads.get(var.as_tensor()).expect("every prediction gets a gradient");
        let p = &out.predictions[li];
        for img in 0..B {
            let mut supervised: Vec<usize> = p.matches[img].src.clone();
            if p.is_final {
                supervised.push(out.oracle.index[img]);
            }
            for q in 0..Q {
                let gq = to_vec_f64(&g.get(img).unwrap().get(q).unwrap());
                let norm: f64 = gq.iter().map(|v| v.abs()).sum();
                assert!(norm.is_finite());
                if supervised.contains(&q) {
                    assert!(norm > 0.0, "prediction {li} image {img} query {q} should get gradient");
                } else {
                    assert_eq!(norm, 0.0, "prediction {li} image {img} query {q} is unmatched");
                }
            }
        }
    }
}

#[test]
fn oracle_dice_equals_the_weighted_dice_of_the_chosen_mask() {
    let b = batch(4);
    let out = run(&b, 5);
    let p = &out.oracle.out;
    let pred2 = Tensor::cat(&[&p.affine(-1.0, 1.0).unwrap(), p], 1).unwrap();
    let want = losses::fewshot::weighted_dice_loss(&pred2, &b.label).unwrap();
    assert!((scalar(&want) - scalar(&out.oracle.dice)).abs() < 1e-6);
    // And `out` is the bilinear upsampling of that query's sigmoid.
    let last = b.preds[L - 1].as_tensor();
    for img in 0..B {
        let k = out.oracle.index[img];
        let s = candle_nn::ops::sigmoid(&last.get(img).unwrap().narrow(0, k, 1).unwrap().unsqueeze(0).unwrap()).unwrap();
        let up = ops::resize::resize_bilinear(&s, (4 * H, 4 * W), false).unwrap();
        let d: f64 = to_vec_f64(&up)
            .iter()
            .zip(to_vec_f64(&out.oracle.out.get(img).unwrap()))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-6);
    }
}

#[test]
fn image_without_masks_contributes_nothing_but_is_allowed() {
    let mut b = batch(5);
    b.targets[1] = Tensor::zeros((0, 4 * H, 4 * W), DType::F32, &Device::Cpu).unwrap();
    let out = run(&b, 3);
    assert_eq!(out.num_masks, 3.0);
    assert!(out.predictions.iter().all(|p| p.matches[1].src.is_empty() && p.point_coords.dim(0).unwrap() == 3));
    assert!(scalar(&out.total).is_finite());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let b = batch(6);
    let preds: Vec<Tensor> = b.preds.iter().map(|v| v.as_tensor().clone()).collect();
    let crit = Stage1Criterion::new(small_config());
    let mut r = rng(1);
    let err = |res: candle_core::Result<Stage1Losses>| res.unwrap_err().to_string();

    let e = err(crit.forward_with_rng(&[], &b.targets, &b.label, &mut r));
    assert!(e.contains("no predictions"), "{e}");
    let e = err(crit.forward_with_rng(&preds, &b.targets[..1], &b.label, &mut r));
    assert!(e.contains("target sets"), "{e}");
    let small = vec![b.targets[0].clone(), rect_masks(&mut rng(1), 2, 8, 8)];
    let e = err(crit.forward_with_rng(&preds, &small, &b.label, &mut r));
    assert!(e.contains("label size"), "{e}");
    let bad_label = (b.label.clone() * 0.0).unwrap().affine(1.0, 2.0).unwrap();
    let e = err(crit.forward_with_rng(&preds, &b.targets, &bad_label, &mut r));
    assert!(e.contains("0, 1 or 255"), "{e}");
    let mut mixed = preds.clone();
    mixed[1] = mixed[1].narrow(1, 0, Q - 1).unwrap();
    let e = err(crit.forward_with_rng(&mixed, &b.targets, &b.label, &mut r));
    assert!(e.contains("prediction 1"), "{e}");
    let ints = preds.iter().map(|p| p.to_dtype(DType::U32).unwrap()).collect::<Vec<_>>();
    assert!(crit.forward_with_rng(&ints, &b.targets, &b.label, &mut r).is_err());
    let nan = vec![(preds[0].clone() * f64::NAN).unwrap(); L];
    assert!(crit.forward_with_rng(&nan, &b.targets, &b.label, &mut r).is_err());
}
