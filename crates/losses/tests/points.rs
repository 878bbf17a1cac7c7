mod common;

use candle_core::{DType, Device, Tensor};
use common::{rand_tensor, rng, to_vec_f64};
use losses::points::{select_points, top_k_indices, uncertain_point_coords, uniform_points};
use losses::{FixedPoints, PointDraw, PointSource, RngPoints};

#[test]
fn seeded_points_are_reproducible_and_uniform() {
    let dev = Device::Cpu;
    let a = uniform_points(&mut rng(7), 3, 5000, &dev).unwrap();
    let b = uniform_points(&mut rng(7), 3, 5000, &dev).unwrap();
    let c = uniform_points(&mut rng(8), 3, 5000, &dev).unwrap();
    assert_eq!(a.dims(), &[3, 5000, 2]);
    let (va, vb, vc) = (to_vec_f64(&a), to_vec_f64(&b), to_vec_f64(&c));
    assert_eq!(va, vb);
    assert_ne!(va, vc);
    assert!(va.iter().all(|&v| (0.0..1.0).contains(&v)));
    let mean = va.iter().sum::<f64>() / va.len() as f64;
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    // RngPoints is the same stream; the first values are pinned so that a change of the mapping
    // (which would change training runs) is noticed.
    let again = RngPoints::new(&mut rng(7)).draw(PointDraw::Match, 1, 2, &dev).unwrap();
    assert_eq!(to_vec_f64(&again), va[..4].to_vec());
    assert_eq!(va[..4], [0.14000338315963745, 0.15779608488082886, 0.1820550560951233, 0.1679893136024475]);
}

#[test]
fn top_k_is_descending_with_low_index_first_on_ties() {
    let u = Tensor::new(&[[0.1f32, 0.7, 0.3, 0.7, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]], &Device::Cpu).unwrap();
    let top = top_k_indices(&u, 3).unwrap();
    assert_eq!(top[0], vec![1, 3, 2]);
    assert_eq!(top[1], vec![0, 1, 2]);
    assert!(top_k_indices(&u, 6).is_err());
    let nan = Tensor::new(&[[0.1f32, f32::NAN]], &Device::Cpu).unwrap();
    assert!(top_k_indices(&nan, 1).is_err());
}

/// Candidates at pixel centres read the logit of that pixel exactly, so the expected selection
/// is known: the `k` pixels with the smallest |logit|.
#[test]
fn importance_sampling_keeps_the_most_uncertain_points() {
    let dev = Device::Cpu;
    let (n, h, w) = (2usize, 6usize, 8usize);
    let mut g = rng(4);
    let logits = rand_tensor(&mut g, &[n, h, w], -10.0, 10.0, DType::F32);
    let lv = to_vec_f64(&logits);
    // Every pixel centre once, in a scrambled order per mask: 48 candidates = 16 points x 3.
    let num_points = 16;
    let mut cand = Vec::new();
    for k in 0..n {
        let mut pix: Vec<usize> = (0..h * w).collect();
        pix.sort_by_key(|&i| (i * 29 + 7 * k) % (h * w));
        for &i in &pix {
            cand.push(((i % w) as f32 + 0.5) / w as f32);
            cand.push(((i / w) as f32 + 0.5) / h as f32);
        }
    }
    let oversample = Tensor::from_vec(cand, (n, h * w, 2), &dev).unwrap();
    let random = rand_tensor(&mut g, &[n, 4, 2], 0.0, 1.0, DType::F32);
    let mut src = FixedPoints {
        match_points: Tensor::zeros((1, num_points, 2), DType::F32, &dev).unwrap(),
        oversample,
        random: random.clone(),
    };
    let coords = uncertain_point_coords(&logits, num_points, 3.0, 0.75, &mut src).unwrap();
    assert_eq!(coords.dims(), &[n, num_points, 2]);
    let cv = to_vec_f64(&coords);
    for k in 0..n {
        let mut by_uncertainty: Vec<usize> = (0..h * w).collect();
        by_uncertainty.sort_by(|&a, &b| lv[k * h * w + a].abs().partial_cmp(&lv[k * h * w + b].abs()).unwrap());
        let want: Vec<usize> = by_uncertainty[..12].to_vec();
        let got: Vec<usize> = (0..12)
            .map(|p| {
                let x = cv[(k * num_points + p) * 2];
                let y = cv[(k * num_points + p) * 2 + 1];
                ((y * h as f64 - 0.5).round() as usize) * w + (x * w as f64 - 0.5).round() as usize
            })
            .collect();
        assert_eq!(got, want, "mask {k}: most uncertain pixels, most uncertain first");
        // The last quarter is the fresh random draw, unchanged.
        let rv = to_vec_f64(&random.get(k).unwrap());
        assert_eq!(&cv[(k * num_points + 12) * 2..(k + 1) * num_points * 2], &rv[..]);
    }
}

#[test]
fn select_points_gathers_rows_independently() {
    let dev = Device::Cpu;
    let cand = Tensor::new(
        &[[[0.1f32, 0.1], [0.2, 0.2], [0.3, 0.3]], [[0.4, 0.4], [0.5, 0.5], [0.6, 0.6]]],
        &dev,
    )
    .unwrap();
    let u = Tensor::new(&[[0f32, 2.0, 1.0], [3.0, -1.0, 2.0]], &dev).unwrap();
    let s = select_points(&cand, &u, 2).unwrap();
    assert_eq!(
        s.to_vec3::<f32>().unwrap(),
        vec![vec![vec![0.2, 0.2], vec![0.3, 0.3]], vec![vec![0.4, 0.4], vec![0.6, 0.6]]]
    );
    assert!(select_points(&cand, &u.narrow(1, 0, 2).unwrap(), 1).is_err());
}

#[test]
fn importance_sampling_rejects_bad_settings() {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((1, 4, 4), DType::F32, &dev).unwrap();
    let mut r = rng(1);
    let mut src = RngPoints::new(&mut r);
    assert!(uncertain_point_coords(&logits, 8, 0.5, 0.75, &mut src).is_err());
    assert!(uncertain_point_coords(&logits, 8, 3.0, 1.5, &mut src).is_err());
    assert!(uncertain_point_coords(&logits.flatten_all().unwrap(), 8, 3.0, 0.75, &mut src).is_err());
    // All-importance sampling draws no random points.
    let c = uncertain_point_coords(&logits, 8, 2.0, 1.0, &mut src).unwrap();
    assert_eq!(c.dims(), &[1, 8, 2]);
}

/// Partial selection must give exactly the first k of a full (value desc, index asc) sort, also
/// with many exact ties (quantised values) and at the edges k = 0, 1, P.
#[test]
fn top_k_equals_the_prefix_of_a_full_sort() {
    let mut g = rng(31);
    let (n, p) = (4usize, 257usize);
    let u = rand_tensor(&mut g, &[n, p], -3.0, 3.0, DType::F64).affine(4.0, 0.0).unwrap().round().unwrap();
    let rows: Vec<Vec<f64>> = u.to_vec2().unwrap();
    for &k in &[0usize, 1, 7, 128, 256, 257] {
        let top = top_k_indices(&u, k).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let mut all: Vec<usize> = (0..p).collect();
            all.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            assert_eq!(top[r], all[..k].to_vec(), "row {r}, k {k}");
        }
    }
}
