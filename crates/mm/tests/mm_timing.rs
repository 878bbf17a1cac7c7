//! Wall-clock cost of one 480×480 ResNet-50 episode through the mask-matching module, forward
//! and forward + backward of the stage-2 loss. Ignored by default (timing, not behaviour):
//! `cargo test --release -p mm --test mm_timing -- --ignored --nocapture`.

mod common;

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use losses::fewshot::{stage2_loss, Stage2Weights};
use mm::{MaskMatching, MmConfig};

#[test]
#[ignore]
fn mm_timing_480_resnet50() {
    let cfg = MmConfig::resnet50();
    let varmap = VarMap::new();
    let model = MaskMatching::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    let (h, w) = (480, 480);
    let query = common::features("q", &cfg, 1, h, w);
    let logits = common::proposal_logits("p", &cfg, 1, h, w);
    let label = common::label(1, h, w);
    for shots in [1usize, 5] {
        let supports: Vec<_> = (0..shots).map(|s| common::features(&format!("s{s}"), &cfg, 1, h, w)).collect();
        let labels: Vec<_> = (0..shots).map(|_| common::label(1, h, w)).collect();
        let t = Instant::now();
        let out = model.forward(&query, &supports, &labels, &logits, (h, w)).unwrap();
        let fwd = t.elapsed();
        let loss = stage2_loss(&out.two_channel().unwrap(), &label, &out.cosine, &out.proposals().unwrap(), Stage2Weights::default()).unwrap();
        let t = Instant::now();
        let _ = loss.total.backward().unwrap();
        println!("{shots}-shot 480x480: forward {fwd:.2?}, loss backward {:.2?}", t.elapsed());
    }
}
