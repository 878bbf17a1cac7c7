//! Model input (spec §1.1): RGB on the 0–255 scale → (x − mean) / std per channel, then zero
//! padding (after normalisation) at the bottom and right up to a multiple of 32.

use candle_core::{DType, Device, Tensor};

use crate::error::{BackboneError, Result};

/// detectron2 `PIXEL_MEAN` (RGB, 0–255 scale); the ImageNet mean.
pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// detectron2 `PIXEL_STD` (RGB, 0–255 scale); the ImageNet std.
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];
/// `MASK_FORMER.SIZE_DIVISIBILITY`: the backbone's largest stride.
pub const SIZE_DIVISIBILITY: usize = 32;

/// (3, H, W) or (B, 3, H, W) RGB on the 0–255 scale (uint8 or float) → (B, 3, H, W) f32
/// `(x − mean) / std`, computed in f32 in that order as the official model does.
pub fn normalize(image: &Tensor) -> Result<Tensor> {
    let x = match image.dims() {
        [3, _, _] => image.unsqueeze(0)?,
        [_, 3, _, _] => image.clone(),
        d => {
            return Err(BackboneError::Input(format!(
                "expected an RGB image (3, H, W) or (B, 3, H, W), got shape {d:?}"
            )))
        }
    };
    let dev = x.device();
    let mean = Tensor::new(&PIXEL_MEAN, dev)?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&PIXEL_STD, dev)?.reshape((1, 3, 1, 1))?;
    Ok(x.to_dtype(DType::F32)?
        .broadcast_sub(&mean)?
        .broadcast_div(&std)?)
}

/// Zero padding at the bottom and right of a (B, C, H, W) tensor up to multiples of `multiple`.
pub fn pad_to_multiple(x: &Tensor, multiple: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ph, pw) = (
        h.next_multiple_of(multiple) - h,
        w.next_multiple_of(multiple) - w,
    );
    let x = if ph > 0 {
        x.pad_with_zeros(2, 0, ph)?
    } else {
        x.clone()
    };
    Ok(if pw > 0 {
        x.pad_with_zeros(3, 0, pw)?
    } else {
        x
    })
}

/// (3, H, W) or (B, 3, H, W) uint8 RGB → (B, 3, H', W') f32 backbone input: normalised, then
/// zero-padded bottom / right to multiples of 32 (`ImageList.from_tensors(images, 32)`).
pub fn preprocess(image: &Tensor) -> Result<Tensor> {
    pad_to_multiple(&normalize(image)?, SIZE_DIVISIBILITY)
}

/// Interleaved RGB bytes (H, W, 3), as image decoders give them → (1, 3, H', W') as
/// [`preprocess`], on `device`.
pub fn preprocess_hwc(data: &[u8], height: usize, width: usize, device: &Device) -> Result<Tensor> {
    if data.len() != height * width * 3 {
        return Err(BackboneError::Input(format!(
            "{} bytes for a {height}x{width} RGB image, expected {}",
            data.len(),
            height * width * 3
        )));
    }
    let chw = Tensor::from_slice(data, (height, width, 3), device)?.permute((2, 0, 1))?;
    preprocess(&chw)
}
