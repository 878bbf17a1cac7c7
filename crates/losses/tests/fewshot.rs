//! Behaviour of the few-shot losses on hand-computed cases.


/// Wrapped so that `cargo test -p losses fewshot` selects these tests by name.
mod fewshot {
    use candle_core::{Device, Tensor, Var};
    use losses::fewshot::{co_loss, soft_iou, stage2_loss, weighted_dice_loss, weighted_dice_loss_composed, Stage2Weights};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn val(x: &Tensor) -> f64 {
        x.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn dice_of_a_flat_prediction_matches_hand_value() {
        // Logits 0 → p = 0.5 on 4 foreground pixels. Background channel: 1 − 0 / (4·0.25) = 1;
        // foreground channel: 1 − 2·2 / (1 + 4) = 0.2.
        let pred = Tensor::zeros((1, 2, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let label = t(&[1., 1., 1., 1.], &[1, 2, 2]);
        let d = val(&weighted_dice_loss(&pred, &label).unwrap());
        assert!((d - 1.2).abs() < 1e-6, "dice {d}");
    }

    #[test]
    fn dice_treats_ignore_as_background_and_averages_over_batch() {
        let pred = t(&[0.3, -1.0, 2.0, 0.5, 0.7, 2.0, -1.0, 0.5], &[1, 2, 2, 2]);
        let with_ignore = t(&[1., 255., 0., 1.], &[1, 2, 2]);
        let as_bg = t(&[1., 0., 0., 1.], &[1, 2, 2]);
        let a = val(&weighted_dice_loss(&pred, &with_ignore).unwrap());
        let b = val(&weighted_dice_loss(&pred, &as_bg).unwrap());
        assert_eq!(a, b);
        let other = t(&[0., 1., 1., 0.], &[1, 2, 2]);
        let c = val(&weighted_dice_loss(&pred, &other).unwrap());
        assert!((a - c).abs() > 1e-3, "the label must matter");
        // A batch of two copies has the same per-sample loss (sum over samples / B).
        let pred_b = Tensor::cat(&[&pred, &pred], 0).unwrap();
        let label_b = Tensor::cat(&[&as_bg, &as_bg], 0).unwrap();
        let d = val(&weighted_dice_loss(&pred_b, &label_b).unwrap());
        assert!((d - b).abs() < 1e-6, "{d} vs {b}");
    }

    #[test]
    fn dice_rejects_bad_shapes() {
        let pred = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let label = t(&[1., 1., 1., 1.], &[1, 2, 2]);
        let e = weighted_dice_loss(&pred, &label).unwrap_err().to_string();
        assert!(e.contains("(B, 2, H, W)"), "{e}");
        let pred = Tensor::zeros((1, 2, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = weighted_dice_loss(&pred, &t(&[1., 1.], &[1, 1, 2])).unwrap_err().to_string();
        assert!(e.contains("label"), "{e}");
    }

    #[test]
    fn soft_iou_matches_hand_values() {
        // p = [.5, .5, 0, 0] vs t = [1, 0, 1, 0]: I = .5, U = 2 + 1 − .5 = 2.5 → 0.2.
        // p = t gives ≈ 1; 255 pixels count as background.
        let probs = t(&[0.5, 0.5, 0., 0., 1., 0., 1., 0.], &[1, 2, 2, 2]);
        let label = t(&[1., 255., 1., 0.], &[1, 2, 2]);
        let iou = soft_iou(&probs, &label).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((iou[0] - 0.2).abs() < 1e-6, "{iou:?}");
        assert!((iou[1] - 1.0).abs() < 1e-6, "{iou:?}");
        let e = soft_iou(&probs, &t(&[1., 0.], &[1, 1, 2])).unwrap_err().to_string();
        assert!(e.contains("size"), "{e}");
    }

    /// The low-resolution IoU equals upsampling first, at an integer and a non-integer scale,
    /// with ignore pixels in the label.
    #[test]
    fn soft_iou_upsampled_equals_upsampling_first() {
        let dev = Device::Cpu;
        for ((h, w), (lh, lw)) in [((16, 16), (64, 64)), ((9, 13), (37, 50))] {
            let n = 2 * 5 * h * w;
            let probs = ((Tensor::arange(0u32, n as u32, &dev).unwrap().to_dtype(candle_core::DType::F32).unwrap() * 0.37)
                .unwrap()
                .sin()
                .unwrap()
                + 1.0)
                .unwrap()
                .affine(0.5, 0.0)
                .unwrap()
                .reshape((2, 5, h, w))
                .unwrap();
            let lab: Vec<f32> = (0..2 * lh * lw).map(|i| match (i * 7919) % 11 { 0 => 255.0, k if k < 5 => 1.0, _ => 0.0 }).collect();
            let label = Tensor::from_vec(lab, (2, lh, lw), &dev).unwrap();
            let up = ops::resize::resize_bilinear(&probs, (lh, lw), false).unwrap();
            let want = soft_iou(&up, &label).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = losses::fewshot::soft_iou_upsampled(&probs, &label).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "{h}x{w} -> {lh}x{lw}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn co_loss_is_zero_when_the_best_proposal_has_the_top_cosine() {
        let cosine = t(&[0.1, 0.5, 0.3], &[1, 3]);
        let ious = t(&[0.1, 0.9, 0.2], &[1, 3]);
        let co = co_loss(&cosine, &ious).unwrap();
        assert_eq!(co.argmax.to_vec1::<u32>().unwrap(), vec![1]);
        assert_eq!(co.argmin.to_vec1::<u32>().unwrap(), vec![0]);
        assert!(val(&co.loss) < 1e-6, "{}", val(&co.loss));
    }

    #[test]
    fn co_loss_clamps_logs_like_torch_and_keeps_gradients_finite() {
        // Reversed ranking: ŝ(i⁻) rounds to exactly 1 and ŝ(i⁺) is 0, so both logs are clamped at
        // −100 and the loss is exactly 100, as torch's BCELoss gives.
        let cosine = Var::from_tensor(&t(&[0.1, 0.5, 0.3], &[1, 3])).unwrap();
        let ious = t(&[0.9, 0.1, 0.2], &[1, 3]);
        let co = co_loss(cosine.as_tensor(), &ious).unwrap();
        assert_eq!(val(&co.loss), 100.0);
        let g = co.loss.backward().unwrap();
        let g = g.get(cosine.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{g:?}");
        assert!(g.iter().any(|x| *x != 0.0), "{g:?}");
    }

    #[test]
    fn co_loss_gradient_matches_finite_differences() {
        // i⁺ = 2 and i⁻ = 3 sit strictly inside the cosine range, away from the log clamp.
        let base = [0.1f64, 0.45, 0.3, 0.2];
        let ious = Tensor::new(&[[0.3f64, 0.5, 0.9, 0.1]], &Device::Cpu).unwrap();
        let loss_at = |c: &[f64]| {
            let ct = Tensor::new(c, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            co_loss(&ct, &ious).unwrap().loss.to_scalar::<f64>().unwrap()
        };
        let var = Var::from_tensor(&Tensor::new(&base, &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap();
        let co = co_loss(var.as_tensor(), &ious).unwrap();
        let grads = co.loss.backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in 0..base.len() {
            let h = 1e-6;
            let (mut up, mut dn) = (base, base);
            up[i] += h;
            dn[i] -= h;
            let fd = (loss_at(&up) - loss_at(&dn)) / (2.0 * h);
            assert!((fd - g[i]).abs() < 1e-5 * (1.0 + fd.abs()), "slot {i}: analytic {} vs numeric {fd}", g[i]);
        }
    }

    #[test]
    fn stage2_loss_weights_its_terms() {
        let pred = t(&[0.3, -1.0, 2.0, 0.5, 0.7, 2.0, -1.0, 0.5], &[1, 2, 2, 2]);
        let label = t(&[1., 255., 0., 1.], &[1, 2, 2]);
        let cosine = t(&[-0.1, 0.2], &[1, 2]);
        let proposals = t(&[0.9, 0.1, 0.2, 0.8, 0.1, 0.9, 0.8, 0.1], &[1, 2, 2, 2]);
        let full = stage2_loss(&pred, &label, &cosine, &proposals, Stage2Weights::default()).unwrap();
        let co = full.co.as_ref().unwrap();
        let expected = 10.0 * val(&full.dice) + 6.0 * val(&co.loss);
        assert!((val(&full.total) - expected).abs() < 1e-6 * expected.abs(), "{} vs {expected}", val(&full.total));
        assert!(val(&co.loss) > 0.1, "proposal 0 has the best IoU but the lower cosine");
        let no_co = stage2_loss(&pred, &label, &cosine, &proposals, Stage2Weights { dice: 10.0, co: None }).unwrap();
        assert!(no_co.co.is_none());
        assert!((val(&no_co.total) - 10.0 * val(&full.dice)).abs() < 1e-6);
    }

    #[test]
    fn co_loss_averages_over_the_batch() {
        // Mean over the 2B BCE terms: a batch of two samples is the mean of the two alone.
        let c = t(&[0.1, 0.5, 0.3, 0.2, -0.3, 0.4, 0.0, 0.1], &[2, 4]);
        let i = t(&[0.3, 0.5, 0.9, 0.1, 0.2, 0.6, 0.4, 0.8], &[2, 4]);
        let both = co_loss(&c, &i).unwrap();
        assert_eq!(both.argmax.to_vec1::<u32>().unwrap(), vec![2, 3]);
        assert_eq!(both.argmin.to_vec1::<u32>().unwrap(), vec![3, 0]);
        let single = |r: usize| val(&co_loss(&c.narrow(0, r, 1).unwrap(), &i.narrow(0, r, 1).unwrap()).unwrap().loss);
        let expected = (single(0) + single(1)) / 2.0;
        assert!((val(&both.loss) - expected).abs() < 1e-6, "{} vs {expected}", val(&both.loss));
        assert_eq!(both.em.dims(), &[2, 2]);
        let e = co_loss(&c, &i.narrow(1, 0, 3).unwrap()).unwrap_err().to_string();
        assert!(e.contains("ious"), "{e}");
    }

    /// The CPU path (targets built once, fused sums) gives the composed loss and gradient, with
    /// labels of 0, 1, 255 (background) and another value (neither target), a sample without
    /// foreground, both dtypes.
    #[test]
    fn dice_cpu_path_matches_composed() {
        let (b, h, w) = (3usize, 37usize, 41usize);
        let n = h * w;
        let labels: Vec<f32> = (0..b * n)
            .map(|i| if i < n { [0., 255., 2.][i % 3] } else { [0., 1., 1., 255., 2., 0., 1.][(i * 31 + i / 7) % 7] })
            .collect();
        let label = t(&labels, &[b, h, w]).to_dtype(candle_core::DType::U8).unwrap();
        for (dtype, tol) in [(candle_core::DType::F64, 1e-12), (candle_core::DType::F32, 2e-5)] {
            let xs: Vec<f32> = (0..b * 2 * n).map(|i| ((i as f32 * 0.37).sin() * 6.0)).collect();
            let pred = Var::from_tensor(&t(&xs, &[b, 2, h, w]).to_dtype(dtype).unwrap()).unwrap();
            let fused = weighted_dice_loss(&pred, &label).unwrap();
            let composed = weighted_dice_loss_composed(&pred, &label).unwrap();
            assert!((val(&fused) - val(&composed)).abs() <= tol, "{dtype:?}: {} vs {}", val(&fused), val(&composed));
            let gf = fused.backward().unwrap().get(&pred).unwrap().to_dtype(candle_core::DType::F64).unwrap();
            let gc = composed.backward().unwrap().get(&pred).unwrap().to_dtype(candle_core::DType::F64).unwrap();
            let diff = (gf - gc).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= tol, "{dtype:?}: gradients differ by {diff:e}");
        }
    }
}
