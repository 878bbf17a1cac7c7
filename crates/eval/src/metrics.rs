//! CyCTR-style accumulation: per episode the 2-class intersection and union over non-ignored
//! pixels; mIoU = mean over the fold's classes of Σ I_fg / Σ U_fg over that class's episodes;
//! FB-IoU = mean over {bg, fg} of Σ I / Σ U over all episodes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

const IGNORE: u8 = 255;

/// One episode's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpisodeIou {
    /// [background, foreground] intersections and unions.
    pub inter: [u64; 2],
    pub union: [u64; 2],
    /// Foreground label pixels (for accuracy).
    pub target_fg: u64,
    pub correct: u64,
    pub valid: u64,
}

impl EpisodeIou {
    /// `pred` is 0/1, `label` 0/1/255 (255 excluded), same length.
    pub fn compute(pred: &[u8], label: &[u8]) -> Self {
        let mut e = Self::default();
        for (&p, &l) in pred.iter().zip(label) {
            if l == IGNORE {
                continue;
            }
            let p = (p != 0) as usize;
            let l = (l != 0) as usize;
            e.valid += 1;
            if p == l {
                e.inter[p] += 1;
                e.correct += 1;
                e.union[p] += 1;
            } else {
                e.union[0] += 1;
                e.union[1] += 1;
            }
            e.target_fg += l as u64;
        }
        e
    }

    pub fn fg_iou(&self) -> f64 {
        self.inter[1] as f64 / (self.union[1] as f64 + 1e-10)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsSummary {
    /// Percentages.
    pub miou: f64,
    pub fb_iou: f64,
    pub all_acc: f64,
    pub episodes: usize,
    /// (class id, IoU %, episodes of that class).
    pub per_class: Vec<(u32, f64, usize)>,
}

/// Accumulates episodes of one fold.
#[derive(Clone, Debug)]
pub struct FewShotMetrics {
    classes: Vec<u32>,
    per_class: BTreeMap<u32, (u64, u64, usize)>,
    inter: [u64; 2],
    union: [u64; 2],
    correct: u64,
    valid: u64,
    episodes: usize,
}

impl FewShotMetrics {
    /// `classes`: the fold's test classes; the mean runs over all of them, as the official
    /// evaluator does (a class without episodes counts as 0).
    pub fn new(classes: &[u32]) -> Self {
        Self {
            classes: classes.to_vec(),
            per_class: classes.iter().map(|&c| (c, (0, 0, 0))).collect(),
            inter: [0; 2],
            union: [0; 2],
            correct: 0,
            valid: 0,
            episodes: 0,
        }
    }

    pub fn add(&mut self, class: u32, pred: &[u8], label: &[u8]) -> Result<EpisodeIou> {
        if pred.len() != label.len() {
            return Err(EvalError::SizeMismatch { episode: self.episodes, pred: pred.len(), label: label.len() });
        }
        let e = EpisodeIou::compute(pred, label);
        self.add_counts(class, &e)?;
        Ok(e)
    }

    /// Adds an episode whose counts were computed already (e.g. memoised for an episode that
    /// occurs twice); the same as [`add`](Self::add) on the masks they came from.
    pub fn add_counts(&mut self, class: u32, e: &EpisodeIou) -> Result<()> {
        let Some(acc) = self.per_class.get_mut(&class) else {
            return Err(EvalError::UnknownClass { episode: self.episodes, class, classes: self.classes.clone() });
        };
        acc.0 += e.inter[1];
        acc.1 += e.union[1];
        acc.2 += 1;
        for k in 0..2 {
            self.inter[k] += e.inter[k];
            self.union[k] += e.union[k];
        }
        self.correct += e.correct;
        self.valid += e.valid;
        self.episodes += 1;
        Ok(())
    }

    /// The fold's classes this accumulator averages over.
    pub fn classes(&self) -> &[u32] {
        &self.classes
    }

    pub fn summary(&self) -> MetricsSummary {
        let per_class: Vec<(u32, f64, usize)> = self
            .per_class
            .iter()
            .map(|(&c, &(i, u, n))| (c, 100.0 * i as f64 / (u as f64 + 1e-10), n))
            .collect();
        let miou = per_class.iter().map(|p| p.1).sum::<f64>() / per_class.len().max(1) as f64;
        let fb = (0..2).map(|k| self.inter[k] as f64 / (self.union[k] as f64 + 1e-10)).sum::<f64>() / 2.0;
        MetricsSummary {
            miou,
            fb_iou: 100.0 * fb,
            all_acc: 100.0 * self.correct as f64 / (self.valid as f64 + 1e-10),
            episodes: self.episodes,
            per_class,
        }
    }
}
