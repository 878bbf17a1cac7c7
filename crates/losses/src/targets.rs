//! Stage-1 ground truth: one binary mask per label value present (spec §2.3).

use candle_core::{bail, DType, Device, Result, Tensor};

/// The ignore value of semantic labels (augmentation padding, novel classes, VOC boundaries).
pub const IGNORE: u32 = 255;

/// Reads an (H, W) semantic label of any integer or float dtype as class ids, checking that every
/// value is an integer in 0..=255.
fn label_ids(label: &Tensor) -> Result<((usize, usize), Vec<u32>)> {
    let (h, w) = match label.dims() {
        &[h, w] => (h, w),
        _ => bail!("semantic label must be (H, W), got {:?}", label.shape()),
    };
    let vals: Vec<f64> = label.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let mut ids = Vec::with_capacity(vals.len());
    for v in vals {
        if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
            bail!("semantic label values must be integers in 0..=255, found {v}");
        }
        ids.push(v as u32);
    }
    Ok(((h, w), ids))
}

fn apply_novel(ids: &mut [u32], novel: &[u32]) {
    if novel.is_empty() {
        return;
    }
    for v in ids.iter_mut() {
        if novel.contains(v) {
            *v = IGNORE;
        }
    }
}

/// The semantic label with every pixel of a `novel` class set to 255, in the input's dtype.
/// This is what the stage-1 data pipeline does before building targets, so novel objects get
/// neither a mask nor a background label.
pub fn mask_novel_classes(semantic_label: &Tensor, novel: &[u32]) -> Result<Tensor> {
    let ((h, w), mut ids) = label_ids(semantic_label)?;
    apply_novel(&mut ids, novel);
    Tensor::from_vec(ids, (h, w), semantic_label.device())?.to_dtype(semantic_label.dtype())
}

/// The class ids that get a stage-1 mask, ascending: every distinct label value except 255 after
/// `novel` classes were set to 255 (background 0 included). Row `m` of [`stage1_targets`] is
/// the mask of entry `m`.
pub fn stage1_target_classes(semantic_label: &Tensor, novel: &[u32]) -> Result<Vec<u32>> {
    let (_, mut ids) = label_ids(semantic_label)?;
    apply_novel(&mut ids, novel);
    Ok(classes_present(&ids))
}

fn classes_present(ids: &[u32]) -> Vec<u32> {
    let mut seen = [false; 256];
    for &v in ids {
        seen[v as usize] = true;
    }
    (0..IGNORE).filter(|&c| seen[c as usize]).collect()
}

/// Class-agnostic stage-1 GT masks of one training image: an (M, H, W) f32 tensor of {0, 1} with
/// one mask per class of [`stage1_target_classes`] (ascending id order). An image whose pixels
/// are all ignored gives M = 0.
pub fn stage1_targets(semantic_label: &Tensor, novel: &[u32]) -> Result<Tensor> {
    let ((h, w), mut ids) = label_ids(semantic_label)?;
    apply_novel(&mut ids, novel);
    let classes = classes_present(&ids);
    let mut data = vec![0f32; classes.len() * h * w];
    for (m, &c) in classes.iter().enumerate() {
        let plane = &mut data[m * h * w..(m + 1) * h * w];
        for (dst, &v) in plane.iter_mut().zip(&ids) {
            if v == c {
                *dst = 1.0;
            }
        }
    }
    Tensor::from_vec(data, (classes.len(), h, w), semantic_label.device())
}

/// Maps a binary episode label (B, H, W) or (H, W) with values {0, 1, 255} to {0, 1} floats
/// (255 -> 0, as the official few-shot losses do), rejecting any other value.
pub(crate) fn binary_label_ignore_as_background(label: &Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    let vals: Vec<f64> = label.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let mut out = Vec::with_capacity(vals.len());
    for v in vals {
        out.push(if v == 1.0 {
            1.0
        } else if v == 0.0 || v == 255.0 {
            0.0
        } else {
            bail!("binary episode label values must be 0, 1 or 255, found {v}")
        });
    }
    Tensor::from_vec(out, label.shape(), device)?.to_dtype(dtype)
}
