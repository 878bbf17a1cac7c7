//! Tensor-by-tensor parity of the mask-matching module with the official V1 code
//! (`shared/fixtures/parity`, README §3 and §4), on the formula weights.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use mm::{LevelFeatures, MaskMatching, MmConfig, Trace};
use parity::{assert_close, load_fixture, Fixture, FormulaWeights, ABS_TOL, REL_TOL};

struct Fixtures {
    fwd: Fixture,
    inputs: Fixture,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures {
        fwd: load_fixture("forward.safetensors").unwrap(),
        inputs: load_fixture("inputs.safetensors").unwrap(),
    })
}

fn model() -> &'static MaskMatching {
    static M: OnceLock<MaskMatching> = OnceLock::new();
    M.get_or_init(|| {
        let vb = FormulaWeights::with_calibration().unwrap().var_builder();
        MaskMatching::new(&MmConfig::resnet50(), vb).unwrap()
    })
}

fn levels(prefix: &str) -> LevelFeatures {
    let f = &fixtures().fwd;
    ["res5", "res4", "res3"].map(|r| f.get(&format!("{prefix}.{r}")).unwrap())
}

/// (1, H, W) support label `s` (0/1/255; the model maps 255 to 0).
fn support_label(s: usize) -> Tensor {
    fixtures().inputs.get("support.labels").unwrap().narrow(0, s, 1).unwrap()
}

fn query_hw() -> (usize, usize) {
    let img = fixtures().inputs.get("query.image").unwrap();
    (img.dim(1).unwrap(), img.dim(2).unwrap())
}

/// The 1-shot episode on the fixture's backbone features and proposals, traced.
fn one_shot() -> &'static Trace {
    static T: OnceLock<Trace> = OnceLock::new();
    T.get_or_init(|| {
        let mut trace = Trace::new();
        let logits = fixtures().fwd.get("decoder.pred_masks.9").unwrap();
        model()
            .forward_traced(&levels("backbone.query"), &[levels("backbone.support0")], &[support_label(0)], &logits, query_hw(), &mut trace)
            .unwrap();
        trace
    })
}

/// Compares traced tensors with the fixture; `pairs` are (trace name, fixture name).
fn compare(trace: &Trace, pairs: &[(String, String)]) {
    for (ours, theirs) in pairs {
        let a = trace.get(ours).unwrap_or_else(|| panic!("trace has no `{ours}`"));
        let b = fixtures().fwd.get(theirs).unwrap();
        let e = assert_close(theirs, a, &b, REL_TOL, ABS_TOL);
        println!("{theirs}: max|diff|/max|ref| = {e:.2e}");
    }
}

fn per_level(ours: &str, theirs: &str, levels: &[usize]) -> Vec<(String, String)> {
    levels.iter().map(|i| (format!("{ours}.l{i}"), format!("{theirs}.l{i}"))).collect()
}

#[test]
fn mm_query_side_parity() {
    let mut pairs = per_level("query.self_aligned", "mm.query.self_aligned", &[0, 1, 2]);
    pairs.extend(per_level("query.conv", "mm.query.conv", &[0, 1, 2]));
    pairs.extend(per_level("query.pos", "mm.1shot.shot0.query.pos", &[0, 1]));
    compare(one_shot(), &pairs);
}

#[test]
fn mm_1shot_support_side_parity() {
    let mut pairs = Vec::new();
    for part in ["self_aligned", "conv", "masked"] {
        pairs.extend(per_level(&format!("shot0.support.{part}"), &format!("mm.1shot.shot0.support.{part}"), &[0, 1, 2]));
    }
    pairs.extend(per_level("shot0.support.pos_masked", "mm.1shot.shot0.support.pos_masked", &[0]));
    compare(one_shot(), &pairs);
}

#[test]
fn mm_1shot_cross_aligned_parity() {
    let mut pairs = per_level("shot0.cross_aligned.query", "mm.1shot.shot0.cross_aligned.query", &[0, 1, 2]);
    pairs.extend(per_level("shot0.cross_aligned.support", "mm.1shot.shot0.cross_aligned.support", &[0, 1, 2]));
    compare(one_shot(), &pairs);
}

#[test]
fn mm_1shot_prototypes_and_matching_parity() {
    let names = ["query_prototypes", "support_prototype", "cosine", "fc1_out", "coefficients", "out"];
    let pairs: Vec<_> = names.iter().map(|n| (n.to_string(), format!("mm.1shot.{n}"))).collect();
    compare(one_shot(), &pairs);
    // The best-matching proposal is a discrete decision: it must agree exactly.
    let ours = one_shot().get("cosine").unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let theirs = fixtures().fwd.get("mm.1shot.cosine").unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(ours, theirs, "argmax of the cosine");
}

/// Shot 0 of the 5-shot episode uses the same support as the 1-shot episode; the fixture holds
/// only support 0's backbone features, so shots 1–4 are checked from their stored prototypes
/// (see `mm_5shot_matching_head_parity`).
#[test]
fn mm_5shot_shot0_parity() {
    let pairs = vec![
        ("shot0.cross_aligned.query.l0".to_string(), "mm.5shot.shot0.cross_aligned.query.l0".to_string()),
        ("shot0.cross_aligned.support.l0".to_string(), "mm.5shot.shot0.cross_aligned.support.l0".to_string()),
        ("shot0.query_prototypes".to_string(), "mm.5shot.shot0.query_prototypes".to_string()),
        ("shot0.support_prototype".to_string(), "mm.5shot.shot0.support_prototype".to_string()),
    ];
    compare(one_shot(), &pairs);
}

/// The K-shot average and the matching head on the reference per-shot prototypes of the
/// 5-shot episode: shot average, cosine, fc1, coefficients and out.
#[test]
fn mm_5shot_matching_head_parity() {
    let f = &fixtures().fwd;
    let shot = |s: usize, n: &str| f.get(&format!("mm.5shot.shot{s}.{n}")).unwrap();
    let mean = |n: &str| {
        let sum = (1..5).fold(shot(0, n), |acc, s| (acc + shot(s, n)).unwrap());
        (sum / 5.0).unwrap()
    };
    let (qp, sp) = (mean("query_prototypes"), mean("support_prototype"));
    for (ours, name) in [(&qp, "mm.5shot.query_prototypes"), (&sp, "mm.5shot.support_prototype")] {
        let e = assert_close(name, ours, &f.get(name).unwrap(), REL_TOL, ABS_TOL);
        println!("{name}: max|diff|/max|ref| = {e:.2e}");
    }
    let probs = candle_nn::ops::sigmoid(&f.get("decoder.pred_masks.9").unwrap()).unwrap();
    let head = model().match_prototypes(&qp, &sp, &probs, query_hw()).unwrap();
    let fc1 = head.fc1_out.clone().unwrap();
    for (ours, name) in [
        (&head.cosine, "mm.5shot.cosine"),
        (&fc1, "mm.5shot.fc1_out"),
        (&head.coefficients, "mm.5shot.coefficients"),
        (&head.out, "mm.5shot.out"),
    ] {
        let e = assert_close(name, ours, &f.get(name).unwrap(), REL_TOL, ABS_TOL);
        println!("{name}: max|diff|/max|ref| = {e:.2e}");
    }
    let ours = head.cosine.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let theirs = f.get("mm.5shot.cosine").unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(ours, theirs, "argmax of the 5-shot cosine");
}

/// The model's own output agrees with the stored `out` also through `MmOutput`, and the
/// two-channel prediction is `[1 − out, out]`.
#[test]
fn mm_1shot_output_parity() {
    let f = &fixtures().fwd;
    let logits = f.get("decoder.pred_masks.9").unwrap();
    let out = model()
        .forward(&levels("backbone.query"), &[levels("backbone.support0")], &[support_label(0)], &logits, query_hw())
        .unwrap();
    assert_close("mm.1shot.out", &out.out, &f.get("mm.1shot.out").unwrap(), REL_TOL, ABS_TOL);
    assert_close("mm.1shot.coefficients", &out.coefficients, &f.get("mm.1shot.coefficients").unwrap(), REL_TOL, ABS_TOL);
    let two = out.two_channel().unwrap();
    let (h, w) = query_hw();
    assert_eq!(two.dims(), &[1, 2, h, w]);
    let sum = two.sum(1).unwrap().to_dtype(DType::F64).unwrap();
    let ones = sum.ones_like().unwrap();
    assert_close("bg + fg", &sum, &ones, 0.0, 1e-6);
    // `foreground` is the argmax over [1 − out, out].
    let fg = out.foreground().unwrap().to_dtype(DType::F32).unwrap();
    let expected = out.out.squeeze(1).unwrap().gt(0.5).unwrap().to_dtype(DType::F32).unwrap();
    assert_close("foreground", &fg, &expected, 0.0, 0.0);
}

/// The full 5-shot episode: the formula-weight ResNet-50 computes the features of supports
/// 0–4 (the fixture stores only support 0's), then every stored 5-shot tensor is compared.
#[test]
fn mm_5shot_full_episode_parity() {
    use backbone::{preprocess, Backbone, ResNet50, ResNetConfig, Weights};
    let f = &fixtures().fwd;
    let vb = FormulaWeights::with_calibration().unwrap().var_builder();
    let resnet = ResNet50::new(&ResNetConfig::r50(), Weights::from_var_builder(vb).pp("backbone")).unwrap();
    let images = fixtures().inputs.get("support.images").unwrap();
    let supports: Vec<LevelFeatures> = (0..5)
        .map(|s| {
            let x = preprocess(&images.get(s).unwrap()).unwrap();
            let feats = resnet.forward(&x).unwrap();
            [feats.res5, feats.res4, feats.res3]
        })
        .collect();
    // The backbone's support 0 is the fixture's support 0 (its own parity test holds it to
    // the same tolerance); this guards the wiring.
    for (i, r) in ["res5", "res4", "res3"].iter().enumerate() {
        let name = format!("backbone.support0.{r}");
        assert_close(&name, &supports[0][i], &f.get(&name).unwrap(), REL_TOL, ABS_TOL);
    }
    let labels: Vec<Tensor> = (0..5).map(support_label).collect();
    let logits = f.get("decoder.pred_masks.9").unwrap();
    let mut trace = Trace::new();
    model().forward_traced(&levels("backbone.query"), &supports, &labels, &logits, query_hw(), &mut trace).unwrap();
    let mut pairs = Vec::new();
    for s in 0..5 {
        for n in ["cross_aligned.query.l0", "cross_aligned.support.l0", "query_prototypes", "support_prototype"] {
            pairs.push((format!("shot{s}.{n}"), format!("mm.5shot.shot{s}.{n}")));
        }
    }
    for n in ["query_prototypes", "support_prototype", "cosine", "fc1_out", "coefficients", "out"] {
        pairs.push((n.to_string(), format!("mm.5shot.{n}")));
    }
    compare(&trace, &pairs);
    let ours = trace.get("cosine").unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let theirs = f.get("mm.5shot.cosine").unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(ours, theirs, "argmax of the 5-shot cosine");
}
