//! Figures over several seeds (several independent sets of test episodes): mean ± standard
//! deviation, per method and per class, and the Markdown table that shows them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::MetricsSummary;

/// One figure over seeds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SeedStats {
    /// Mean over seeds.
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator) over seeds; `None` for one seed.
    pub std: Option<f64>,
    /// The per-seed values, in seed order.
    pub values: Vec<f64>,
}

impl SeedStats {
    /// Mean and sample standard deviation of `values` (empty → mean NaN, no std).
    pub fn new(values: &[f64]) -> Self {
        let n = values.len();
        let mean = if n == 0 { f64::NAN } else { values.iter().sum::<f64>() / n as f64 };
        let std = (n > 1).then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Self { mean, std, values: values.to_vec() }
    }

    /// `62.3` for one seed, `62.3 ± 0.4` for several (`digits` after the point).
    pub fn display(&self, digits: usize) -> String {
        match self.std {
            Some(s) => format!("{:.*} ± {:.*}", digits, self.mean, digits, s),
            None => format!("{:.*}", digits, self.mean),
        }
    }
}

/// One class's IoU over seeds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassOverSeeds {
    pub class_id: u32,
    /// IoU (%) over the seeds whose episodes include the class.
    pub iou: SeedStats,
    /// Episodes of the class, summed over seeds.
    pub episodes: usize,
}

/// One method's metrics over seeds (each seed's figures come from its own accumulation).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MethodOverSeeds {
    pub miou: SeedStats,
    pub fb_iou: SeedStats,
    pub all_acc: SeedStats,
    /// Ascending class id.
    pub per_class: Vec<ClassOverSeeds>,
}

impl MethodOverSeeds {
    /// Aggregates one [`MetricsSummary`] per seed. A class that only some seeds have (e.g. it
    /// was never drawn under one seed) is averaged over the seeds that have it.
    pub fn from_seeds(per_seed: &[MetricsSummary]) -> Self {
        let pick = |f: fn(&MetricsSummary) -> f64| SeedStats::new(&per_seed.iter().map(f).collect::<Vec<_>>());
        let mut classes: BTreeMap<u32, (Vec<f64>, usize)> = BTreeMap::new();
        for s in per_seed {
            for &(c, iou, n) in &s.per_class {
                let e = classes.entry(c).or_default();
                e.0.push(iou);
                e.1 += n;
            }
        }
        Self {
            miou: pick(|s| s.miou),
            fb_iou: pick(|s| s.fb_iou),
            all_acc: pick(|s| s.all_acc),
            per_class: classes
                .into_iter()
                .map(|(class_id, (v, episodes))| ClassOverSeeds { class_id, iou: SeedStats::new(&v), episodes })
                .collect(),
        }
    }
}

/// One row of [`markdown_summary`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SummaryRow {
    pub benchmark: String,
    /// A fold number or `all`.
    pub fold: String,
    pub shot: usize,
    /// `official` or `original`.
    pub protocol: String,
    /// Episodes per seed.
    pub episodes: usize,
    pub seeds: usize,
    /// mIoU (%) of the heuristic baseline, ours and the oracle; our FB-IoU (%).
    pub baseline: SeedStats,
    pub ours: SeedStats,
    pub oracle: SeedStats,
    pub ours_fb_iou: SeedStats,
}

/// A Markdown table with baseline / ours / oracle side by side, one row per (benchmark, fold,
/// shot, protocol); figures are `mean` or `mean ± std` over seeds.
pub fn markdown_summary(rows: &[SummaryRow]) -> String {
    let mut s = String::from(
        "| benchmark | fold | shot | protocol | episodes × seeds | baseline mIoU | **ours mIoU** | oracle mIoU | ours FB-IoU |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} × {} | {} | **{}** | {} | {} |\n",
            r.benchmark,
            r.fold,
            r.shot,
            r.protocol,
            r.episodes,
            r.seeds,
            r.baseline.display(1),
            r.ours.display(1),
            r.oracle.display(1),
            r.ours_fb_iou.display(1)
        ));
    }
    s
}
