//! What the evaluation needs from a model, so that this crate evaluates any assembly of
//! backbone + POS + mask matching (the `mmformer` facade implements it).

use candle_core::{Device, Tensor};
use mm::{LevelFeatures, MmOutput, QueryPass};

use crate::error::BoxError;

/// A whole few-shot segmenter, as the evaluation drives it.
pub trait FewShotModel: Sync {
    /// Where its tensors live (inputs are built there).
    fn device(&self) -> &Device;

    /// Backbone + POS on a normalised (B, 3, S, S) batch: `[res5, res4, res3]` and the
    /// (B, N, S/4, S/4) proposal logits. Supports use the features only.
    fn encode(&self, x: &Tensor) -> std::result::Result<QueryPass, BoxError>;

    /// The matching of a query pass against K supports (features and (B, S, S) 0/1 labels).
    fn matching(
        &self,
        query: &QueryPass,
        supports: &[LevelFeatures],
        labels: &[Tensor],
        input_hw: (usize, usize),
    ) -> std::result::Result<MmOutput, BoxError>;

    /// Where the weights came from, for the report.
    fn checkpoint(&self) -> String;

    /// The model's preset name (`cpu`, `paper`), for the report.
    fn preset(&self) -> String;
}
