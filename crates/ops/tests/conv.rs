//! The fast CPU convolution against candle's own conv2d (run on manually zero-padded input), for
//! every path: 1x1 direct, 1x1 strided, im2col kxk, dilation, TF-SAME asymmetric padding,
//! depthwise, general groups, batches, and every bias / residual / activation combination.

use candle_core::{DType, Device, Tensor};
use ops::conv::{conv2d, Activation, ConvSpec, FrozenConv2d};

/// Deterministic uniform(-1, 1) values (xorshift), so failures reproduce.
fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// candle conv2d with the padding applied by hand, then bias, residual, activation.
fn reference(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    spec: ConvSpec,
    act: Activation,
    res: Option<&Tensor>,
) -> Tensor {
    assert_eq!(
        spec.stride.0, spec.stride.1,
        "candle's reference needs equal strides"
    );
    assert_eq!(spec.dilation.0, spec.dilation.1);
    let [pt, pb, pl, pr] = spec.padding;
    let xp = x
        .pad_with_zeros(2, pt, pb)
        .unwrap()
        .pad_with_zeros(3, pl, pr)
        .unwrap();
    let mut y = xp
        .conv2d(w, 0, spec.stride.0, spec.dilation.0, spec.groups)
        .unwrap();
    if let Some(b) = b {
        y = y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
    }
    if let Some(r) = res {
        y = (y + r).unwrap();
    }
    match act {
        Activation::None => y,
        Activation::Relu => y.relu().unwrap(),
        Activation::Relu6 => y.clamp(0f32, 6f32).unwrap(),
    }
}

/// Largest |a - b| relative to max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

struct Case {
    n: usize,
    cin: usize,
    cout: usize,
    hw: (usize, usize),
    k: (usize, usize),
    spec: ConvSpec,
}

/// Runs a case with both entry points and every bias / residual / activation combination.
fn check(case: &Case, seed: u64) {
    let Case {
        n,
        cin,
        cout,
        hw,
        k,
        spec,
    } = *case;
    let x = seeded(&[n, cin, hw.0, hw.1], seed);
    let w = seeded(&[cout, cin / spec.groups, k.0, k.1], seed + 1);
    let b = seeded(&[cout], seed + 2);
    let probe = reference(&x, &w, None, spec, Activation::None, None);
    let res = (seeded(probe.dims(), seed + 3) * 2.0).unwrap();
    for act in [Activation::None, Activation::Relu, Activation::Relu6] {
        for with_bias in [false, true] {
            for with_res in [false, true] {
                let bias = with_bias.then_some(&b);
                let r = with_res.then_some(&res);
                let want = reference(&x, &w, bias, spec, act, r);
                let got = conv2d(&x, &w, bias, spec, act, r).unwrap();
                let e = rel_err(&got, &want);
                assert!(e < 1e-4, "conv2d {spec:?} k={k:?} act={act:?} bias={with_bias} res={with_res}: rel err {e}");
                let frozen = FrozenConv2d::new(w.clone(), bias.cloned(), spec).unwrap();
                let got = frozen.forward(&x, act, r).unwrap();
                let e = rel_err(&got, &want);
                assert!(e < 1e-4, "FrozenConv2d {spec:?} k={k:?} act={act:?} bias={with_bias} res={with_res}: rel err {e}");
            }
        }
    }
    // The activation must actually bite on this data, or the checks above prove little.
    let y = conv2d(&x, &w, Some(&b), spec, Activation::None, None).unwrap();
    let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().any(|&t| t < 0.0), "test data never negative");
}

#[test]
fn conv_1x1_stride1_direct_gemm() {
    check(
        &Case {
            n: 1,
            cin: 64,
            cout: 96,
            hw: (23, 17),
            k: (1, 1),
            spec: ConvSpec::same_as_torch(1, 0),
        },
        10,
    );
}

#[test]
fn conv_1x1_stride2_gather() {
    check(
        &Case {
            n: 1,
            cin: 48,
            cout: 40,
            hw: (21, 18),
            k: (1, 1),
            spec: ConvSpec::same_as_torch(2, 0),
        },
        20,
    );
}

#[test]
fn conv_3x3_stride1_pad1() {
    check(
        &Case {
            n: 1,
            cin: 24,
            cout: 32,
            hw: (19, 22),
            k: (3, 3),
            spec: ConvSpec::same_as_torch(1, 1),
        },
        30,
    );
}

#[test]
fn conv_3x3_stride2_pad1() {
    check(
        &Case {
            n: 1,
            cin: 24,
            cout: 32,
            hw: (19, 22),
            k: (3, 3),
            spec: ConvSpec::same_as_torch(2, 1),
        },
        40,
    );
}

#[test]
fn conv_7x7_stride2_pad3_stem() {
    check(
        &Case {
            n: 1,
            cin: 3,
            cout: 64,
            hw: (37, 30),
            k: (7, 7),
            spec: ConvSpec::same_as_torch(2, 3),
        },
        50,
    );
}

#[test]
fn conv_3x3_dilation2() {
    let spec = ConvSpec::same_as_torch(1, 2).with_dilation(2);
    check(
        &Case {
            n: 1,
            cin: 16,
            cout: 24,
            hw: (17, 15),
            k: (3, 3),
            spec,
        },
        60,
    );
    let spec = ConvSpec::same_as_torch(2, 1).with_dilation(2);
    check(
        &Case {
            n: 1,
            cin: 16,
            cout: 24,
            hw: (17, 15),
            k: (3, 3),
            spec,
        },
        61,
    );
}

#[test]
fn conv_tf_same_asymmetric_odd_sizes() {
    // 3x3 stride 2 on 15x13: total padding 2 / 2 (even); on 16x14: 1 / 1 (odd: extra on bottom/right).
    for (hw, seed) in [((15, 13), 70), ((16, 14), 71)] {
        let spec = ConvSpec::tf_same(hw, (3, 3), 2, 1);
        check(
            &Case {
                n: 1,
                cin: 8,
                cout: 12,
                hw,
                k: (3, 3),
                spec,
            },
            seed,
        );
    }
    let spec = ConvSpec::tf_same((16, 14), (3, 3), 2, 1);
    assert_eq!(spec.padding, [0, 1, 0, 1]);
}

#[test]
fn conv_tf_same_padding_values() {
    // TF: out = ceil(in / s), pad_total = max((out - 1) * s + (k - 1) * d + 1 - in, 0).
    assert_eq!(
        ConvSpec::tf_same((480, 480), (3, 3), 2, 1).padding,
        [0, 1, 0, 1]
    );
    assert_eq!(
        ConvSpec::tf_same((481, 481), (3, 3), 2, 1).padding,
        [1, 1, 1, 1]
    );
    assert_eq!(
        ConvSpec::tf_same((240, 240), (5, 5), 2, 1).padding,
        [1, 2, 1, 2]
    );
    assert_eq!(
        ConvSpec::tf_same((60, 60), (5, 5), 1, 1).padding,
        [2, 2, 2, 2]
    );
    assert_eq!(
        ConvSpec::tf_same((10, 7), (3, 5), 1, 2).padding,
        [2, 2, 4, 4]
    );
    assert_eq!(
        ConvSpec::tf_same((1, 1), (3, 3), 2, 1).padding,
        [1, 1, 1, 1]
    );
    assert_eq!(
        ConvSpec::same_as_torch(2, 3),
        ConvSpec {
            stride: (2, 2),
            padding: [3; 4],
            dilation: (1, 1),
            groups: 1
        }
    );
}

#[test]
fn conv_depthwise_3x3_and_5x5_stride1_stride2_tf_same() {
    let mut seed = 80;
    for k in [3, 5] {
        for stride in [1, 2] {
            for hw in [(15, 15), (16, 13)] {
                let spec = ConvSpec::tf_same(hw, (k, k), stride, 1).with_groups(24);
                check(
                    &Case {
                        n: 1,
                        cin: 24,
                        cout: 24,
                        hw,
                        k: (k, k),
                        spec,
                    },
                    seed,
                );
                seed += 1;
            }
        }
    }
}

#[test]
fn conv_depthwise_wide_rows_all_block_widths() {
    // Output widths 70 / 35 / 20 exercise the 64-, 32- and 16-column register blocks, with
    // partial last blocks, TF-SAME borders and both strides.
    let cases = [
        ((9, 70), 5, 1),
        ((8, 70), 3, 2),
        ((7, 40), 5, 2),
        ((6, 20), 3, 1),
        ((10, 129), 3, 2),
    ];
    for (seed, (hw, k, stride)) in (95..).zip(cases) {
        let spec = ConvSpec::tf_same(hw, (k, k), stride, 1).with_groups(4);
        check(
            &Case {
                n: 1,
                cin: 4,
                cout: 4,
                hw,
                k: (k, k),
                spec,
            },
            seed,
        );
    }
    let spec = ConvSpec {
        stride: (2, 1),
        padding: [1, 0, 3, 2],
        dilation: (1, 2),
        groups: 3,
    };
    let x = seeded(&[1, 3, 11, 66], 99);
    let w = seeded(&[3, 1, 3, 3], 98);
    // Unequal stride / dilation (candle cannot run these): each channel must equal the same conv
    // run as a dense 1-channel conv, which takes the im2col + gemm path instead.
    let got = conv2d(&x, &w, None, spec, Activation::None, None).unwrap();
    for ch in 0..3 {
        let xc = x.narrow(1, ch, 1).unwrap();
        let wc = w.narrow(0, ch, 1).unwrap();
        let want = conv2d(
            &xc,
            &wc,
            None,
            ConvSpec { groups: 1, ..spec },
            Activation::None,
            None,
        )
        .unwrap();
        let e = rel_err(&got.narrow(1, ch, 1).unwrap(), &want);
        assert!(e < 1e-5, "channel {ch}: rel err {e}");
    }
}

#[test]
fn conv_depthwise_symmetric_pad_dilation_and_batch() {
    let spec = ConvSpec::same_as_torch(1, 2)
        .with_dilation(2)
        .with_groups(10);
    check(
        &Case {
            n: 2,
            cin: 10,
            cout: 10,
            hw: (12, 9),
            k: (3, 3),
            spec,
        },
        90,
    );
    let spec = ConvSpec::same_as_torch(3, 1).with_groups(6);
    check(
        &Case {
            n: 3,
            cin: 6,
            cout: 6,
            hw: (14, 11),
            k: (3, 3),
            spec,
        },
        91,
    );
}

#[test]
fn conv_general_groups() {
    let spec = ConvSpec::same_as_torch(1, 1).with_groups(4);
    check(
        &Case {
            n: 1,
            cin: 16,
            cout: 24,
            hw: (11, 13),
            k: (3, 3),
            spec,
        },
        100,
    );
    let spec = ConvSpec::same_as_torch(2, 0).with_groups(2);
    check(
        &Case {
            n: 2,
            cin: 8,
            cout: 6,
            hw: (10, 9),
            k: (1, 1),
            spec,
        },
        101,
    );
    let spec = ConvSpec::same_as_torch(1, 0).with_groups(3);
    check(
        &Case {
            n: 1,
            cin: 12,
            cout: 9,
            hw: (7, 8),
            k: (1, 1),
            spec,
        },
        104,
    );
    // Depthwise with a channel multiplier (Cout = 2 Cin) goes through the grouped gemm.
    let spec = ConvSpec::same_as_torch(1, 1).with_groups(5);
    check(
        &Case {
            n: 1,
            cin: 5,
            cout: 10,
            hw: (9, 9),
            k: (3, 3),
            spec,
        },
        102,
    );
}

#[test]
fn conv_batch_greater_than_one() {
    check(
        &Case {
            n: 3,
            cin: 32,
            cout: 16,
            hw: (9, 11),
            k: (1, 1),
            spec: ConvSpec::same_as_torch(1, 0),
        },
        110,
    );
    check(
        &Case {
            n: 2,
            cin: 8,
            cout: 16,
            hw: (13, 12),
            k: (3, 3),
            spec: ConvSpec::same_as_torch(2, 1),
        },
        111,
    );
}

#[test]
fn conv_large_enough_for_many_tiles() {
    // 1x1 and 3x3 on 70x70: several pixel tiles per image, tiles straddling output rows.
    check(
        &Case {
            n: 1,
            cin: 64,
            cout: 32,
            hw: (70, 70),
            k: (1, 1),
            spec: ConvSpec::same_as_torch(1, 0),
        },
        120,
    );
    check(
        &Case {
            n: 1,
            cin: 64,
            cout: 32,
            hw: (70, 70),
            k: (3, 3),
            spec: ConvSpec::same_as_torch(1, 1),
        },
        121,
    );
}

#[test]
fn conv_shifted_gemm_wide_rows() {
    // kxk convs with Cin/groups >= 16 on rows much wider than the padding take the shifted-gemm
    // path (no im2col); cover dilation, groups, asymmetric padding, kernels 3/5/7, strides 1-3
    // and batches there.
    let same = ConvSpec::same_as_torch;
    let cases = [
        (1, 16, 12, (9, 64), (3, 3), same(1, 2).with_dilation(2)),
        (1, 64, 24, (8, 40), (3, 3), same(1, 1).with_groups(4)),
        (
            1,
            16,
            6,
            (8, 60),
            (3, 5),
            ConvSpec {
                stride: (1, 1),
                padding: [0, 2, 3, 1],
                dilation: (1, 1),
                groups: 1,
            },
        ),
        (2, 16, 10, (6, 30), (3, 3), same(1, 1)),
        (1, 16, 8, (6, 80), (7, 7), same(1, 3)),
        (
            1,
            20,
            7,
            (7, 50),
            (5, 5),
            ConvSpec::tf_same((7, 50), (5, 5), 1, 1),
        ),
        (1, 16, 4, (5, 33), (3, 3), same(1, 0)),
        (1, 16, 8, (9, 64), (3, 3), same(2, 1)),
        (
            2,
            32,
            8,
            (10, 61),
            (3, 3),
            ConvSpec::tf_same((10, 61), (3, 3), 2, 1),
        ),
        (
            1,
            16,
            8,
            (11, 70),
            (5, 5),
            ConvSpec::tf_same((11, 70), (5, 5), 2, 1),
        ),
        (
            1,
            32,
            8,
            (8, 66),
            (3, 3),
            same(2, 2).with_dilation(2).with_groups(2),
        ),
        (1, 16, 8, (9, 100), (7, 7), same(3, 3)),
    ];
    for (seed, (n, cin, cout, hw, k, spec)) in (200..).zip(cases) {
        check(
            &Case {
                n,
                cin,
                cout,
                hw,
                k,
                spec,
            },
            seed,
        );
    }
    // Unequal strides there too: (2, 1) is the stride-1 result on every other row.
    let x = seeded(&[1, 16, 9, 40], 230);
    let w = seeded(&[8, 16, 3, 3], 231);
    let spec = ConvSpec {
        stride: (2, 1),
        ..same(1, 1)
    };
    let got = conv2d(&x, &w, None, spec, Activation::None, None).unwrap();
    let full = reference(&x, &w, None, same(1, 1), Activation::None, None);
    let rows = Tensor::new(&[0u32, 2, 4, 6, 8], &Device::Cpu).unwrap();
    assert!(rel_err(&got, &full.index_select(&rows, 2).unwrap()) < 1e-4);
}

#[test]
fn conv_asymmetric_kernel_and_padding() {
    let spec = ConvSpec {
        stride: (1, 1),
        padding: [0, 2, 3, 1],
        dilation: (1, 1),
        groups: 1,
    };
    check(
        &Case {
            n: 1,
            cin: 4,
            cout: 6,
            hw: (8, 10),
            k: (3, 5),
            spec,
        },
        130,
    );
}

#[test]
fn conv_unequal_stride_matches_subsampled_stride1() {
    // candle cannot run unequal strides: a (2, 3) stride conv is the stride-1 conv sampled
    // every 2nd row and 3rd column.
    let x = seeded(&[1, 6, 17, 20], 140);
    let w = seeded(&[8, 6, 3, 3], 141);
    let spec = ConvSpec {
        stride: (2, 3),
        padding: [1; 4],
        dilation: (1, 1),
        groups: 1,
    };
    let got = conv2d(&x, &w, None, spec, Activation::None, None).unwrap();
    let full = reference(
        &x,
        &w,
        None,
        ConvSpec::same_as_torch(1, 1),
        Activation::None,
        None,
    );
    let rows = Tensor::new(&[0u32, 2, 4, 6, 8, 10, 12, 14, 16], &Device::Cpu).unwrap();
    let cols = Tensor::new(&[0u32, 3, 6, 9, 12, 15, 18], &Device::Cpu).unwrap();
    let want = full
        .index_select(&rows, 2)
        .unwrap()
        .index_select(&cols, 3)
        .unwrap();
    assert_eq!(got.dims(), &[1, 8, 9, 7]);
    assert!(rel_err(&got, &want) < 1e-4);
}

#[test]
fn conv_non_contiguous_input_and_weight() {
    // Transposed H/W views: the conv must read them as their logical layout.
    let x = seeded(&[1, 8, 12, 10], 150).transpose(2, 3).unwrap();
    let w = seeded(&[16, 8, 3, 3], 151).transpose(2, 3).unwrap();
    assert!(!x.is_contiguous() && !w.is_contiguous());
    let spec = ConvSpec::same_as_torch(1, 1);
    let want = reference(
        &x.contiguous().unwrap(),
        &w.contiguous().unwrap(),
        None,
        spec,
        Activation::Relu,
        None,
    );
    let got = conv2d(&x, &w, None, spec, Activation::Relu, None).unwrap();
    assert!(rel_err(&got, &want) < 1e-4);
    let got = FrozenConv2d::new(w.clone(), None, spec)
        .unwrap()
        .forward(&x, Activation::Relu, None)
        .unwrap();
    assert!(rel_err(&got, &want) < 1e-4);
    let x = seeded(&[1, 12, 10, 8], 152).permute((0, 3, 1, 2)).unwrap();
    let w = seeded(&[8, 8, 1, 1], 153);
    let want = reference(
        &x.contiguous().unwrap(),
        &w,
        None,
        ConvSpec::same_as_torch(1, 0),
        Activation::None,
        None,
    );
    let got = conv2d(
        &x,
        &w,
        None,
        ConvSpec::same_as_torch(1, 0),
        Activation::None,
        None,
    )
    .unwrap();
    assert!(rel_err(&got, &want) < 1e-4);
}

#[test]
fn conv_f64_falls_back_to_candle_with_same_result() {
    let x = seeded(&[2, 6, 11, 9], 160);
    let w = seeded(&[6, 1, 3, 3], 161);
    let b = seeded(&[6], 162);
    let spec = ConvSpec::tf_same((11, 9), (3, 3), 2, 1).with_groups(6);
    let want = conv2d(&x, &w, Some(&b), spec, Activation::Relu6, None).unwrap();
    let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let got = conv2d(
        &to64(&x),
        &to64(&w),
        Some(&to64(&b)),
        spec,
        Activation::Relu6,
        None,
    )
    .unwrap();
    assert_eq!(got.dtype(), DType::F64);
    assert!(rel_err(&got.to_dtype(DType::F32).unwrap(), &want) < 1e-5);
    let frozen = FrozenConv2d::new(to64(&w), Some(to64(&b)), spec).unwrap();
    let got = frozen.forward(&to64(&x), Activation::Relu6, None).unwrap();
    assert!(rel_err(&got.to_dtype(DType::F32).unwrap(), &want) < 1e-5);
}

#[test]
fn conv_output_shape_and_known_values() {
    // A hand-computed case: 3x3 ones kernel over a 4x4 ramp with pad 1 gives neighbourhood sums.
    let x = Tensor::arange(0f32, 16., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 4, 4))
        .unwrap();
    let w = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let y = conv2d(
        &x,
        &w,
        None,
        ConvSpec::same_as_torch(2, 1),
        Activation::None,
        None,
    )
    .unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 2]);
    // centres (0,0), (0,2), (2,0), (2,2): 0+1+4+5, 1+2+3+5+6+7, 4+5+8+9+12+13, 5+6+7+9+10+11+13+14+15
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![10., 24., 51., 90.]
    );
    let b = Tensor::new(&[-50f32], &Device::Cpu).unwrap();
    let y = conv2d(
        &x,
        &w,
        Some(&b),
        ConvSpec::same_as_torch(2, 1),
        Activation::Relu6,
        None,
    )
    .unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0., 0., 1., 6.]
    );
}

fn msg(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn conv_errors_on_mismatched_shapes() {
    let x = seeded(&[1, 8, 10, 10], 170);
    let w = seeded(&[16, 8, 3, 3], 171);
    let s = ConvSpec::same_as_torch(1, 1);
    let none = Activation::None;

    let e = msg(conv2d(&x, &seeded(&[16, 4, 3, 3], 1), None, s, none, None));
    assert!(e.contains("input has 8 channels"), "{e}");
    let e = msg(conv2d(&x, &w, Some(&seeded(&[15], 1)), s, none, None));
    assert!(e.contains("bias must have shape [16]"), "{e}");
    let e = msg(conv2d(
        &x,
        &w,
        None,
        s,
        none,
        Some(&seeded(&[1, 16, 9, 10], 1)),
    ));
    assert!(
        e.contains("residual must have the output shape [1, 16, 10, 10]"),
        "{e}"
    );
    let e = msg(conv2d(&seeded(&[8, 10, 10], 1), &w, None, s, none, None));
    assert!(e.contains("input must be (N, Cin, H, W)"), "{e}");
    let e = msg(conv2d(&x, &seeded(&[16, 8, 3], 1), None, s, none, None));
    assert!(
        e.contains("weight must be (Cout, Cin/groups, kh, kw)"),
        "{e}"
    );
    let e = msg(conv2d(
        &seeded(&[1, 8, 2, 2], 1),
        &seeded(&[4, 8, 5, 5], 1),
        None,
        ConvSpec::same_as_torch(1, 0),
        none,
        None,
    ));
    assert!(e.contains("smaller than the dilated kernel"), "{e}");
    let e = msg(conv2d(
        &x,
        &w,
        None,
        ConvSpec {
            stride: (0, 1),
            ..s
        },
        none,
        None,
    ));
    assert!(e.contains("stride must be >= 1"), "{e}");
    let e = msg(conv2d(&x, &w, None, s.with_dilation(0), none, None));
    assert!(e.contains("dilation must be >= 1"), "{e}");
    let e = msg(conv2d(
        &x,
        &seeded(&[6, 2, 3, 3], 1),
        None,
        s.with_groups(4),
        none,
        None,
    ));
    assert!(e.contains("Cout = 6 is not divisible by groups = 4"), "{e}");
    let e = msg(conv2d(&x, &w, None, s.with_groups(0), none, None));
    assert!(e.contains("groups must be >= 1"), "{e}");
    let e = msg(conv2d(
        &x.to_dtype(DType::F64).unwrap(),
        &w,
        None,
        s,
        none,
        None,
    ));
    assert!(e.contains("dtype"), "{e}");

    let frozen = FrozenConv2d::new(w.clone(), None, s).unwrap();
    let e = msg(frozen.forward(&seeded(&[1, 7, 10, 10], 1), none, None));
    assert!(e.contains("input has 7 channels"), "{e}");
    let e = msg(frozen.forward(&x, none, Some(&seeded(&[1, 16, 10, 11], 1))));
    assert!(e.contains("residual must have the output shape"), "{e}");
    let e = FrozenConv2d::new(w.clone(), Some(seeded(&[8], 1)), s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias must have shape [16]"), "{e}");
    let e = FrozenConv2d::new(seeded(&[16, 8], 1), None, s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight must be"), "{e}");
}
