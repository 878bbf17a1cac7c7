use candle_core::{DType, Device, Tensor};
use losses::{mask_novel_classes, stage1_target_classes, stage1_targets};

fn label(rows: &[&[u8]]) -> Tensor {
    let h = rows.len();
    let w = rows[0].len();
    let v: Vec<u8> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(v, (h, w), &Device::Cpu).unwrap()
}

fn planes(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
    t.to_vec3().unwrap()
}

#[test]
fn one_mask_per_present_class_ascending_without_ignore() {
    let l = label(&[&[7, 0, 255, 3], &[3, 3, 0, 7], &[255, 0, 0, 0]]);
    assert_eq!(stage1_target_classes(&l, &[]).unwrap(), vec![0, 3, 7]);
    let t = stage1_targets(&l, &[]).unwrap();
    assert_eq!(t.dims(), &[3, 3, 4]);
    assert_eq!(t.dtype(), DType::F32);
    let p = planes(&t);
    assert_eq!(p[0], vec![vec![0., 1., 0., 0.], vec![0., 0., 1., 0.], vec![0., 1., 1., 1.]]);
    assert_eq!(p[1], vec![vec![0., 0., 0., 1.], vec![1., 1., 0., 0.], vec![0., 0., 0., 0.]]);
    assert_eq!(p[2], vec![vec![1., 0., 0., 0.], vec![0., 0., 0., 1.], vec![0., 0., 0., 0.]]);
    // Ignore pixels belong to no mask.
    let covered: f32 = p.iter().map(|m| m[0][2] + m[2][0]).sum();
    assert_eq!(covered, 0.0);
}

#[test]
fn novel_classes_are_dropped_and_set_to_ignore() {
    let l = label(&[&[7, 0, 5], &[3, 5, 0]]);
    assert_eq!(stage1_target_classes(&l, &[5, 7]).unwrap(), vec![0, 3]);
    let t = stage1_targets(&l, &[5, 7]).unwrap();
    assert_eq!(t.dims(), &[2, 2, 3]);
    // Novel pixels are in no mask, background does not absorb them.
    let p = planes(&t);
    assert_eq!(p[0], vec![vec![0., 1., 0.], vec![0., 0., 1.]]);
    let masked = mask_novel_classes(&l, &[5, 7]).unwrap();
    assert_eq!(masked.dtype(), DType::U8);
    assert_eq!(masked.to_vec2::<u8>().unwrap(), vec![vec![255, 0, 255], vec![3, 255, 0]]);
    // A novel id that is absent changes nothing.
    assert_eq!(stage1_target_classes(&l, &[12]).unwrap(), vec![0, 3, 5, 7]);
}

#[test]
fn float_and_integer_labels_agree() {
    let l = label(&[&[1, 2, 255], &[0, 2, 1]]);
    let lf = l.to_dtype(DType::F32).unwrap();
    let a = stage1_targets(&l, &[2]).unwrap();
    let b = stage1_targets(&lf, &[2]).unwrap();
    assert_eq!(planes(&a), planes(&b));
    assert_eq!(mask_novel_classes(&lf, &[2]).unwrap().dtype(), DType::F32);
}

#[test]
fn all_ignored_image_has_no_masks() {
    let l = label(&[&[255, 255], &[255, 9]]);
    let t = stage1_targets(&l, &[9]).unwrap();
    assert_eq!(t.dims(), &[0, 2, 2]);
}

#[test]
fn bad_labels_are_errors() {
    let dev = Device::Cpu;
    let frac = Tensor::new(&[[0f32, 1.5]], &dev).unwrap();
    let err = stage1_targets(&frac, &[]).unwrap_err().to_string();
    assert!(err.contains("integers in 0..=255"), "{err}");
    let big = Tensor::new(&[[0f32, 300.0]], &dev).unwrap();
    assert!(stage1_targets(&big, &[]).is_err());
    let neg = Tensor::new(&[[0f32, -1.0]], &dev).unwrap();
    assert!(stage1_target_classes(&neg, &[]).is_err());
    let nan = Tensor::new(&[[0f32, f32::NAN]], &dev).unwrap();
    assert!(stage1_targets(&nan, &[]).is_err());
    let rank3 = Tensor::zeros((1, 2, 2), DType::U8, &dev).unwrap();
    let err = stage1_targets(&rank3, &[]).unwrap_err().to_string();
    assert!(err.contains("(H, W)"), "{err}");
}
