use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use train::*;

fn var(name: &str, v: &[f32]) -> NamedVar {
    NamedVar { name: name.into(), var: Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap() }
}

#[test]
fn no_decay_rule_matches_the_official_groups() {
    for n in [
        "sem_seg_head.predictor.transformer_ffn_layers.0.norm.weight",
        "sem_seg_head.predictor.decoder_norm.bias",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.3.norm2.weight",
        "sem_seg_head.pixel_decoder.input_proj.2.1.weight",
        "sem_seg_head.pixel_decoder.adapter_1.norm.bias",
        "sem_seg_head.predictor.query_feat.weight",
        "sem_seg_head.predictor.level_embed.weight",
        "crossat_0.transformer_ffn_layers.1.norm.weight",
    ] {
        assert!(default_no_decay(n), "{n} must not decay");
    }
    for n in [
        "sem_seg_head.pixel_decoder.input_proj.2.0.weight",
        "sem_seg_head.pixel_decoder.input_proj.2.0.bias",
        "fc1.bias",
        // An nn.Parameter in the official pixel decoder, not an nn.Embedding: it decays.
        "sem_seg_head.pixel_decoder.transformer.level_embed",
        "sem_seg_head.predictor.transformer_ffn_layers.0.linear1.weight",
        "crossat_0.transformer_cross_attention_layers.0.multihead_attn.in_proj_weight",
    ] {
        assert!(!default_no_decay(n), "{n} must decay");
    }
}

/// One AdamW step against values computed by hand with PyTorch's formulas.
#[test]
fn adamw_step_matches_pytorch_formula() {
    let w = var("fc1.weight", &[1.0, -2.0]);
    let n = var("x.norm.weight", &[0.5]);
    let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let mut opt = AdamW::new(vec![w.clone(), n.clone()], cfg, default_no_decay).unwrap();
    let loss = ((w.var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
        + (n.var.as_tensor() * 3.0).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    opt.step(&grads, 0.1).unwrap();
    // First step: m̂ = g, v̂ = g², update = g/(|g|+eps) ≈ sign(g); p ← p(1 − lr·wd) − lr·sign(g).
    let got = w.var.as_tensor().to_vec1::<f32>().unwrap();
    let want = [1.0 * (1.0 - 0.1 * 0.05) - 0.1, -2.0 * (1.0 - 0.1 * 0.05) + 0.1];
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    let got = n.var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
    assert!((got - (0.5 - 0.1)).abs() < 1e-6, "norm weights take no decay: {got}");
}

#[test]
fn poly_schedule_and_clipping() {
    let s = PolyLr::new(1e-4, 100);
    assert_eq!(s.lr(0), 1e-4);
    assert!((s.lr(50) - 1e-4 * 0.5f64.powf(0.9)).abs() < 1e-15);
    assert_eq!(s.lr(100), 0.0);
    let a = var("a", &[3.0, 4.0]);
    let loss = (a.var.as_tensor() * Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
    let mut grads = loss.backward().unwrap();
    let norm = clip_grad_norm(&mut grads, &[a.clone()], 0.01).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    let g = grads.get(a.var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let gn = (g[0] * g[0] + g[1] * g[1]).sqrt();
    assert!((gn - 0.01).abs() < 1e-6, "clipped norm {gn}");
}

#[test]
fn checkpoint_round_trip_resume_and_corruption() {
    let dir = std::env::temp_dir().join(format!("mmformer-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = CheckpointStore::new(&dir, 2);
    let w = var("fc1.weight", &[1.0, 2.0, 3.0]);
    let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default(), default_no_decay).unwrap();
    let grads = w.var.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    opt.step(&grads, 1e-3).unwrap();
    let state = |iter| TrainState {
        format_version: 0,
        kind: "mm".into(),
        iter,
        optimizer_step: 0,
        best_metric: None,
        best_iter: None,
        config: serde_json::json!({"lr": 1e-3}),
        model_sha256: String::new(),
        optimizer_sha256: String::new(),
    };
    let model: HashMap<String, Tensor> = [("fc1.weight".to_string(), w.var.as_tensor().clone())].into();
    for it in [10, 20, 30] {
        store.save(&model, &opt, state(it)).unwrap();
    }
    // A killed save leaves only a temporary folder, which is never taken for a checkpoint.
    std::fs::create_dir_all(dir.join("iter_00000040.tmp-999")).unwrap();
    let latest = store.latest("mm").unwrap().unwrap();
    assert_eq!(latest.state.iter, 30);
    assert!(!dir.join("iter_00000010").exists(), "keeps only the last 2");
    let t = latest.model(&Device::Cpu).unwrap();
    assert_eq!(t["fc1.weight"].to_vec1::<f32>().unwrap(), w.var.as_tensor().to_vec1::<f32>().unwrap());
    let mut opt2 = AdamW::new(vec![var("fc1.weight", &[0.0, 0.0, 0.0])], AdamWConfig::default(), default_no_decay).unwrap();
    latest.restore_optimizer(&mut opt2, &Device::Cpu).unwrap();
    assert_eq!(opt2.step_count(), 1);
    // Wrong stage.
    let e = store.latest("pos").err().unwrap().to_string();
    assert!(e.contains("is a `mm` checkpoint, expected `pos`"), "{e}");
    // Corruption: flip a byte in the model file.
    let mp = latest.model_path();
    let mut bytes = std::fs::read(&mp).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&mp, bytes).unwrap();
    let e = latest.model(&Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("checksum mismatch") && e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The optimizer state must not keep a step's autograd graph alive: candle leaves a variable's
/// gradient attached to the activations it was computed from, and moments built from it would
/// chain every step's graph (stage 1 grew by ~150 MB per iteration until killed for memory).
#[test]
fn optimizer_state_holds_no_autograd_graph() {
    let w = var("w", &[0.5, -1.0, 2.0]);
    let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default(), |_| false).unwrap();
    let x = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
    for _ in 0..3 {
        // d/dw of Σ x·w² is 2·x·w: the gradient is computed from the variable itself.
        let loss = (w.var.as_tensor().sqr().unwrap() * &x).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(w.var.as_tensor()).unwrap().track_op(), "precondition: candle keeps this gradient attached");
        opt.step(&grads, 1e-2).unwrap();
    }
    let (state, step) = opt.state();
    assert_eq!(step, 3);
    for (name, t) in state {
        assert!(!t.track_op(), "optimizer state `{name}` still references the autograd graph");
    }
}

/// A non-finite loss or gradient norm leaves the weights and the optimizer as they were.
#[test]
fn non_finite_steps_are_skipped_and_name_the_parameter() {
    let w = var("fc1.weight", &[0.0, 1.0]);
    let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let mut opt = AdamW::new(vec![w.clone()], cfg, default_no_decay).unwrap();
    // sqrt at 0: a finite loss whose gradient is infinite.
    let loss = w.var.as_tensor().sqrt().unwrap().sum_all().unwrap();
    let step = apply_step(&loss, &[w.clone()], &mut opt, 0.01, 0.1).unwrap();
    match step {
        Step::Skipped { loss, grad_norm, parameter } => {
            assert_eq!(loss, 1.0);
            assert!(!grad_norm.is_finite());
            assert_eq!(parameter.as_deref(), Some("fc1.weight"));
        }
        other => panic!("expected a skipped step, got {other:?}"),
    }
    assert_eq!(w.var.as_tensor().to_vec1::<f32>().unwrap(), vec![0.0, 1.0]);
    assert_eq!(opt.step_count(), 0);
    let nan = (w.var.as_tensor().sum_all().unwrap() * f64::NAN).unwrap();
    assert!(matches!(apply_step(&nan, &[w.clone()], &mut opt, 0.01, 0.1).unwrap(), Step::Skipped { parameter: None, .. }));
    // A finite step is applied.
    let ok = w.var.as_tensor().sqr().unwrap().sum_all().unwrap();
    assert!(matches!(apply_step(&ok, &[w.clone()], &mut opt, 0.01, 0.1).unwrap(), Step::Applied { .. }));
    assert_eq!(opt.step_count(), 1);
}

/// A run whose steps are all non-finite stops after `max_skipped_steps` in a row with a clear
/// error, logging each skip, and writes no checkpoint of the poisoned weights.
#[test]
fn a_run_of_non_finite_steps_stops_with_a_clear_error() {
    struct Poisoned(Var);
    impl Stage for Poisoned {
        type Error = TrainError;
        fn loss(&mut self, _iter: u64) -> Result<StepLoss> {
            Ok(StepLoss { total: (self.0.as_tensor().sum_all()? * f64::NAN)?, parts: Vec::new() })
        }
        fn evaluate(&mut self) -> Result<Evaluation> {
            Ok(Evaluation { metric: 0.0, record: serde_json::json!({}), summary: "evaluated".into() })
        }
    }
    let dir = std::env::temp_dir().join(format!("train-poisoned-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vm = candle_nn::VarMap::new();
    let t = vm.get(2, "fc1.weight", candle_nn::Init::Const(1.0), candle_core::DType::F32, &Device::Cpu).unwrap();
    let v = vm.data().lock().unwrap().get("fc1.weight").unwrap().clone();
    drop(t);
    let mut opt = AdamW::new(named_vars(&vm), AdamWConfig::default(), default_no_decay).unwrap();
    let spec = RunSpec { kind: "test", config: serde_json::json!({}), out: &dir, device: &Device::Cpu };
    let cfg = LoopConfig { iters: 100, lr: 1e-3, clip: 0.01, eval_every: 50, log_every: 10, max_skipped_steps: 3 };
    let err = train(&mut Poisoned(v.clone()), &spec, &vm, &mut opt, &cfg, &Silent).unwrap_err().to_string();
    assert!(err.contains("3 non-finite steps in a row") && err.contains("iteration 3"), "{err}");
    let log = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
    assert_eq!(log.matches("\"event\":\"skipped_step\"").count(), 3, "{log}");
    assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 1.0], "weights untouched");
    assert!(!dir.join("checkpoints").exists() || std::fs::read_dir(dir.join("checkpoints")).unwrap().next().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
