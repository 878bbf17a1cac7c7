//! Few-shot data: dataset readers (PASCAL-5i, COCO-20i, FSS-1000, user folders), the synthetic dataset, episode samplers, augmentation and the stage-1/stage-2 shard format.

pub mod synthetic;
