//! Synthetic few-shot dataset generator (VOC layout).
