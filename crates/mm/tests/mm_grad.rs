//! Every trainable variable of the mask-matching module receives a gradient from the stage-2
//! loss.

mod common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use losses::fewshot::{stage2_loss, Stage2Weights};
use mm::MaskMatching;

#[test]
fn mm_stage2_loss_reaches_every_variable() {
    let cfg = common::small_config();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = MaskMatching::new(&cfg, vb).unwrap();
    let (b, qh, qw, sh, sw) = (2, 64, 96, 96, 64);
    let query = common::features("q", &cfg, b, qh, qw);
    let support = common::features("s", &cfg, b, sh, sw);
    let logits = common::proposal_logits("p", &cfg, b, qh, qw);
    let out = model.forward(&query, &[support], &[common::label(b, sh, sw)], &logits, (qh, qw)).unwrap();
    let loss = stage2_loss(&out.two_channel().unwrap(), &common::label(b, qh, qw), &out.cosine, &out.proposals().unwrap(), Stage2Weights::default()).unwrap();
    let total = loss.total.to_scalar::<f32>().unwrap();
    assert!(total.is_finite() && total > 0.0, "loss {total}");
    let grads = loss.total.backward().unwrap();

    let vars = varmap.data().lock().unwrap();
    // 3 convs, 3 levels × 2 layers × (attention 4 + norm 2 + FFN 4 + norm 2), fc1 and fc2.
    assert_eq!(vars.len(), 3 + 3 * 2 * 12 + 4, "variables: {:?}", vars.keys().collect::<Vec<_>>());
    for name in ["conv_2.weight", "crossat_1.transformer_cross_attention_layers.1.multihead_attn.in_proj_weight", "crossat_0.transformer_ffn_layers.0.norm.bias", "fc2.bias"] {
        assert!(vars.contains_key(name), "missing variable {name}");
    }
    let mut names: Vec<_> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let v = g.abs().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
        let m = v.iter().cloned().fold(0f32, f32::max);
        assert!(m > 0.0, "{name}: gradient is all zero");
    }
}
