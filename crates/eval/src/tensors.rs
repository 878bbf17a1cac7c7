//! Data to tensors and proposal masks back to binary masks: what every evaluation (and the
//! training loops' validations) does between the dataset and the model.

use candle_core::{DType, Device, Tensor};
use data::{Label, NormalizedImage};

use crate::error::bail;
use crate::Result;

/// (B, 3, H, W) f32 on `device` from normalised images of one size.
pub fn images_to_tensor(images: &[&NormalizedImage], device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else { bail!("images_to_tensor: no image") };
    let (h, w) = (first.height, first.width);
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for im in images {
        if (im.height, im.width) != (h, w) {
            bail!("images of one batch must share a size: {}x{} vs {h}x{w}", im.height, im.width);
        }
        data.extend_from_slice(&im.data);
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
}

/// (B, H, W) f32 label values (0/1/255 or class ids) on `device`.
pub fn labels_to_tensor(labels: &[&Label], device: &Device) -> Result<Tensor> {
    let Some(first) = labels.first() else { bail!("labels_to_tensor: no label") };
    let (h, w) = (first.height() as usize, first.width() as usize);
    let mut data = Vec::with_capacity(labels.len() * h * w);
    for l in labels {
        if (l.height() as usize, l.width() as usize) != (h, w) {
            bail!("labels of one batch must share a size: {}x{} vs {w}x{h}", l.width(), l.height());
        }
        data.extend(l.data().iter().map(|&v| v as f32));
    }
    Ok(Tensor::from_vec(data, (labels.len(), h, w), device)?)
}

/// (N, H, W) proposal probabilities at the label size: sigmoid, then bilinear
/// (align_corners=False), as the official few-shot head upsamples them.
pub fn upsampled_proposals(pred_masks: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(pred_masks)?;
    Ok(ops::resize::resize_bilinear(&p, hw, false)?)
}

/// The oracle proposal (best soft IoU with the label, 255 → 0) and its binary mask.
/// `probs`: (N, H, W); `label`: H·W values.
pub fn oracle_mask(probs: &Tensor, label: &[u8]) -> Result<(usize, Vec<u8>)> {
    let (_, h, w) = probs.dims3()?;
    if label.len() != h * w {
        bail!("label has {} pixels, proposals are {h}x{w}", label.len());
    }
    let t = Tensor::from_vec(label.iter().map(|&v| f32::from(v == 1)).collect::<Vec<_>>(), (1, h, w), probs.device())?;
    let iou = losses::fewshot::soft_iou(&probs.unsqueeze(0)?, &t)?.squeeze(0)?;
    let best = iou.argmax(0)?.to_scalar::<u32>()? as usize;
    Ok((best, binary(&probs.get(best)?)?))
}

/// Threshold probabilities at 0.5 into a row-major 0/1 mask.
pub fn binary(probs: &Tensor) -> Result<Vec<u8>> {
    Ok(probs.ge(0.5)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?)
}
