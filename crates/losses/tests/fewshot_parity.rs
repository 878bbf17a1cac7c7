//! Parity of the stage-2 losses with the official code (fixture `loss2.*`, README §3, §4).

use candle_core::{DType, Tensor};
use losses::fewshot::{co_loss, soft_iou, stage2_loss, weighted_dice_loss, Stage2Weights};
use parity::{assert_close, load_fixture};

/// README §4: losses to 3e-3 relative.
const LOSS_REL: f64 = 3e-3;

struct Episode {
    /// (1, 2, H, W) `[1 − out, out]` from the reference `out`.
    pred2: Tensor,
    /// (1, H, W) 0/1/255
    label: Tensor,
    /// (1, N) reference cosines
    cosine: Tensor,
    /// (1, N, H, W) upsampled sigmoid proposals
    proposals: Tensor,
}

fn episode(k: usize) -> Episode {
    let fwd = load_fixture("forward.safetensors").unwrap();
    let inputs = load_fixture("inputs.safetensors").unwrap();
    let out = fwd.get(&format!("mm.{k}shot.out")).unwrap();
    let pred2 = Tensor::cat(&[&out.affine(-1.0, 1.0).unwrap(), &out], 1).unwrap();
    let label = inputs.get("query.label").unwrap().unsqueeze(0).unwrap();
    let (_, _, h, w) = out.dims4().unwrap();
    let logits = fwd.get("decoder.pred_masks.9").unwrap();
    let probs = candle_nn::ops::sigmoid(&logits).unwrap();
    let proposals = ops::resize::resize_bilinear(&probs, (h, w), false).unwrap();
    Episode { pred2, label, cosine: fwd.get(&format!("mm.{k}shot.cosine")).unwrap(), proposals }
}

fn scalar(t: &Tensor) -> Tensor {
    t.reshape(1).unwrap()
}

fn index(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn check_episode(k: usize) {
    let fwd = load_fixture("forward.safetensors").unwrap();
    let ref_t = |n: &str| fwd.get(&format!("loss2.{k}shot.{n}")).unwrap();
    let ep = episode(k);

    let dice = weighted_dice_loss(&ep.pred2, &ep.label).unwrap();
    let e = assert_close(&format!("{k}shot dice"), &scalar(&dice), &ref_t("dice"), LOSS_REL, 0.0);
    println!("loss2.{k}shot.dice rel err {e:.2e}");

    let ious = soft_iou(&ep.proposals, &ep.label).unwrap();
    let e = assert_close(&format!("{k}shot ious"), &ious, &ref_t("ious"), parity::REL_TOL, parity::ABS_TOL);
    println!("loss2.{k}shot.ious rel err {e:.2e}");

    let co = co_loss(&ep.cosine, &ious).unwrap();
    assert_eq!(index(&co.argmax), index(&ref_t("argmax_iou")), "{k}shot argmax IoU");
    assert_eq!(index(&co.argmin), index(&ref_t("argmin_iou")), "{k}shot argmin IoU");
    let e = assert_close(&format!("{k}shot em"), &co.em, &ref_t("em"), parity::REL_TOL, parity::ABS_TOL);
    println!("loss2.{k}shot.em rel err {e:.2e}");
    let e = assert_close(&format!("{k}shot l_co"), &scalar(&co.loss), &ref_t("l_co"), LOSS_REL, 0.0);
    println!("loss2.{k}shot.l_co rel err {e:.2e}");

    // The official weighting: fewshot_loss = 10 · dice, co_loss = 10 · 0.6 · l_co.
    let s2 = stage2_loss(&ep.pred2, &ep.label, &ep.cosine, &ep.proposals, Stage2Weights::default()).unwrap();
    let weighted_dice = s2.dice.affine(10.0, 0.0).unwrap();
    let e = assert_close(&format!("{k}shot fewshot_loss"), &scalar(&weighted_dice), &ref_t("fewshot_loss_weighted"), LOSS_REL, 0.0);
    println!("loss2.{k}shot.fewshot_loss_weighted rel err {e:.2e}");
    let weighted_co = s2.co.as_ref().unwrap().loss.affine(6.0, 0.0).unwrap();
    let e = assert_close(&format!("{k}shot co_loss"), &scalar(&weighted_co), &ref_t("co_loss_weighted"), LOSS_REL, 0.0);
    println!("loss2.{k}shot.co_loss_weighted rel err {e:.2e}");
    let expected_total = (ref_t("fewshot_loss_weighted") + ref_t("co_loss_weighted")).unwrap();
    assert_close(&format!("{k}shot total"), &scalar(&s2.total), &expected_total, LOSS_REL, 0.0);
}

#[test]
fn fewshot_losses_1shot_parity() {
    check_episode(1);
}

#[test]
fn fewshot_losses_5shot_parity() {
    check_episode(5);
}
