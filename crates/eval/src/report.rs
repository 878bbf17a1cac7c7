//! The report of one benchmark run: heuristic baseline / ours / oracle side by side, per shot.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{EvalError, MetricsSummary, Result};

/// The three methods every report shows (spec: Table 3 of the paper).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MethodScores {
    /// The learned mask matching.
    pub ours: MetricsSummary,
    /// The proposal with the highest cosine similarity to the support prototype.
    pub baseline: MetricsSummary,
    /// The proposal with the best IoU against the ground truth (an upper bound).
    pub oracle: MetricsSummary,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchmarkReport {
    pub benchmark: String,
    pub fold: usize,
    pub shot: usize,
    pub seeds: Vec<u64>,
    pub episodes: usize,
    /// "official" (labels resized to the model size) or "original" (original-resolution labels).
    pub protocol: String,
    pub scores: MethodScores,
}

impl BenchmarkReport {
    /// The flat figures the demo's `report.json` promises (percentages).
    pub fn headline(&self) -> serde_json::Value {
        serde_json::json!({
            "miou": self.scores.ours.miou,
            "fb_iou": self.scores.ours.fb_iou,
            "baseline_miou": self.scores.baseline.miou,
            "oracle_miou": self.scores.oracle.miou,
            "baseline_fb_iou": self.scores.baseline.fb_iou,
            "oracle_fb_iou": self.scores.oracle.fb_iou,
            "episodes": self.episodes,
            "seeds": self.seeds,
            "fold": self.fold,
            "protocol": self.protocol,
        })
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("report serialises");
        std::fs::write(path, bytes).map_err(|e| EvalError::File { path: path.into(), msg: e.to_string() })
    }
}

/// A Markdown table of reports: one row per (benchmark, fold, shot, protocol).
pub fn markdown_table(reports: &[BenchmarkReport]) -> String {
    let mut s = String::from(
        "| benchmark | fold | shot | protocol | episodes | baseline mIoU | **ours mIoU** | oracle mIoU | ours FB-IoU |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} | **{:.1}** | {:.1} | {:.1} |\n",
            r.benchmark, r.fold, r.shot, r.protocol, r.episodes, r.scores.baseline.miou, r.scores.ours.miou, r.scores.oracle.miou, r.scores.ours.fb_iou
        ));
    }
    s
}
