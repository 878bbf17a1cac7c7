//! Evaluation: few-shot metrics (mIoU, FB-IoU, oracle, heuristic baseline), reports and overlays.
