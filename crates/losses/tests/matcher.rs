mod common;

use candle_core::{DType, Device, Tensor};
use common::{rand_tensor, rect_masks, rng, to_vec_f64};
use losses::{linear_sum_assignment, FixedPoints, HungarianMatcher, RngPoints};

/// Minimum assignment cost by enumerating every injective map of the smaller side.
fn brute_force(cost: &[f64], r: usize, c: usize) -> f64 {
    #[allow(clippy::too_many_arguments)]
    fn rec(cost: &[f64], r: usize, c: usize, row: usize, used: &mut Vec<bool>, left: usize, acc: f64, best: &mut f64) {
        if left == 0 {
            *best = best.min(acc);
            return;
        }
        if row == r || r - row < left {
            return;
        }
        // Leave this row unassigned.
        rec(cost, r, c, row + 1, used, left, acc, best);
        for j in 0..c {
            if !used[j] {
                used[j] = true;
                rec(cost, r, c, row + 1, used, left - 1, acc + cost[row * c + j], best);
                used[j] = false;
            }
        }
    }
    let mut best = f64::INFINITY;
    rec(cost, r, c, 0, &mut vec![false; c], r.min(c), 0.0, &mut best);
    best
}

#[test]
fn solver_finds_the_optimum_of_random_rectangular_matrices() {
    let mut g = rng(11);
    for &(r, c) in &[(7usize, 3usize), (3, 6), (5, 5), (9, 1), (1, 4)] {
        for _ in 0..20 {
            let cost = rand_tensor(&mut g, &[r, c], -2.0, 5.0, DType::F32);
            let (rows, cols) = linear_sum_assignment(&cost).unwrap();
            assert_eq!(rows.len(), r.min(c));
            assert!(rows.windows(2).all(|w| w[0] < w[1]), "rows ascending: {rows:?}");
            let mut cs = cols.clone();
            cs.sort_unstable();
            cs.dedup();
            assert_eq!(cs.len(), cols.len(), "columns distinct");
            let flat = to_vec_f64(&cost);
            let ours: f64 = rows.iter().zip(&cols).map(|(&i, &j)| flat[i * c + j]).sum();
            let best = brute_force(&flat, r, c);
            assert!((ours - best).abs() < 1e-9, "{r}x{c}: {ours} vs optimum {best}");
        }
    }
}

#[test]
fn solver_rejects_bad_matrices() {
    let dev = Device::Cpu;
    let nan = Tensor::new(&[[1f32, f32::NAN], [0.0, 2.0]], &dev).unwrap();
    let err = linear_sum_assignment(&nan).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    let inf = Tensor::new(&[[1f32, f32::INFINITY]], &dev).unwrap();
    assert!(linear_sum_assignment(&inf).is_err());
    let v = Tensor::new(&[1f32, 2.0], &dev).unwrap();
    assert!(linear_sum_assignment(&v).is_err());
}

/// Bilinear sample of one (H, W) map at (x, y) in [0, 1], align_corners=False, zeros outside:
/// written out independently of `ops` so the matcher's use of the sampler is checked too.
fn sample(map: &[f64], h: usize, w: usize, x: f64, y: f64) -> f64 {
    let px = x * w as f64 - 0.5;
    let py = y * h as f64 - 0.5;
    let (x0, y0) = (px.floor(), py.floor());
    let (fx, fy) = (px - x0, py - y0);
    let at = |yy: f64, xx: f64| {
        if yy < 0.0 || xx < 0.0 || yy > (h - 1) as f64 || xx > (w - 1) as f64 {
            0.0
        } else {
            map[yy as usize * w + xx as usize]
        }
    };
    at(y0, x0) * (1.0 - fy) * (1.0 - fx) + at(y0, x0 + 1.0) * (1.0 - fy) * fx + at(y0 + 1.0, x0) * fy * (1.0 - fx)
        + at(y0 + 1.0, x0 + 1.0) * fy * fx
}

#[test]
fn cost_matrix_matches_the_formula() {
    let mut g = rng(5);
    let (q, m, h, w, hh, ww, p) = (4, 3, 5, 6, 10, 12, 200);
    let pred = rand_tensor(&mut g, &[q, h, w], -6.0, 6.0, DType::F32);
    let tgt = rect_masks(&mut g, m, hh, ww);
    let pts = rand_tensor(&mut g, &[1, p, 2], 0.0, 1.0, DType::F32);
    let matcher = HungarianMatcher { cost_mask: 5.0, cost_dice: 5.0, num_points: p };
    let cost = matcher.cost_matrix(&pred, &tgt, &pts).unwrap();
    assert_eq!(cost.dims(), &[q, m]);

    let pv = to_vec_f64(&pred);
    let tv = to_vec_f64(&tgt);
    let xy = to_vec_f64(&pts);
    let got = to_vec_f64(&cost);
    for i in 0..q {
        for j in 0..m {
            let (mut bce, mut spt, mut sp, mut st) = (0.0, 0.0, 0.0, 0.0);
            for k in 0..p {
                let (x, y) = (xy[2 * k], xy[2 * k + 1]);
                let l = sample(&pv[i * h * w..(i + 1) * h * w], h, w, x, y);
                let t = sample(&tv[j * hh * ww..(j + 1) * hh * ww], hh, ww, x, y);
                let s = 1.0 / (1.0 + (-l).exp());
                bce += -(t * s.ln() + (1.0 - t) * (1.0 - s).ln());
                spt += s * t;
                sp += s;
                st += t;
            }
            let want = 5.0 * bce / p as f64 + 5.0 * (1.0 - (2.0 * spt + 1.0) / (sp + st + 1.0));
            let ours = got[i * m + j];
            assert!((ours - want).abs() < 1e-4 * want.abs().max(1.0), "cost[{i},{j}] = {ours}, formula {want}");
        }
    }
}

#[test]
fn matcher_recovers_a_planted_assignment() {
    let mut g = rng(21);
    let (b, q, m, h, w) = (2, 6, 3, 16, 20);
    let mut preds = Vec::new();
    let mut targets = Vec::new();
    // Image 0: GT j is predicted by query plant[j]; other queries are noise.
    let plants = [[4usize, 1, 5], [0, 3, 2]];
    for plant in plants {
        let tgt = rect_masks(&mut g, m, 4 * h, 4 * w);
        // Low-resolution logits of each mask: ±8 at the 4x4-block majority.
        let small = tgt
            .reshape((m, h, 4, w, 4))
            .unwrap()
            .mean(4)
            .unwrap()
            .mean(2)
            .unwrap()
            .affine(16.0, -8.0)
            .unwrap();
        let mut rows: Vec<Tensor> = (0..q).map(|_| rand_tensor(&mut g, &[1, h, w], -1.0, 1.0, DType::F32)).collect();
        for (j, &qi) in plant.iter().enumerate() {
            rows[qi] = small.narrow(0, j, 1).unwrap();
        }
        preds.push(Tensor::cat(&rows, 0).unwrap());
        targets.push(tgt);
    }
    let pred = Tensor::stack(&preds, 0).unwrap();
    assert_eq!(pred.dims(), &[b, q, h, w]);
    let matcher = HungarianMatcher { num_points: 2000, ..Default::default() };
    let mut r = rng(3);
    let matches = matcher.forward(&pred, &targets, &mut RngPoints::new(&mut r)).unwrap();
    for (mt, plant) in matches.iter().zip(plants) {
        let mut want: Vec<(usize, usize)> = plant.iter().enumerate().map(|(j, &qi)| (qi, j)).collect();
        want.sort_unstable();
        let got: Vec<(usize, usize)> = mt.src.iter().copied().zip(mt.tgt.iter().copied()).collect();
        assert_eq!(got, want);
        assert_eq!(mt.cost.dims(), &[q, m]);
    }
}

#[test]
fn image_without_targets_gets_an_empty_match() {
    let mut g = rng(8);
    let pred = rand_tensor(&mut g, &[2, 5, 4, 4], -1.0, 1.0, DType::F32);
    let targets = vec![Tensor::zeros((0, 16, 16), DType::F32, &Device::Cpu).unwrap(), rect_masks(&mut g, 2, 16, 16)];
    let pts = rand_tensor(&mut g, &[1, 30, 2], 0.0, 1.0, DType::F32);
    let mut fixed = FixedPoints { match_points: pts.clone(), oversample: pts.clone(), random: pts };
    let matcher = HungarianMatcher { num_points: 30, ..Default::default() };
    let m = matcher.forward(&pred, &targets, &mut fixed).unwrap();
    assert!(m[0].src.is_empty() && m[0].tgt.is_empty());
    assert_eq!(m[0].cost.dims(), &[5, 0]);
    assert_eq!(m[1].src.len(), 2);
}

#[test]
fn matcher_input_errors() {
    let mut g = rng(9);
    let pred = rand_tensor(&mut g, &[1, 5, 4, 4], -1.0, 1.0, DType::F32);
    let matcher = HungarianMatcher { num_points: 10, ..Default::default() };
    let mut r = rng(1);
    // Wrong number of target sets.
    let err = matcher.forward(&pred, &[], &mut RngPoints::new(&mut r)).unwrap_err().to_string();
    assert!(err.contains("target sets"), "{err}");
    // Fixed points of the wrong size.
    let pts = rand_tensor(&mut g, &[1, 7, 2], 0.0, 1.0, DType::F32);
    let mut fixed = FixedPoints { match_points: pts.clone(), oversample: pts.clone(), random: pts };
    let err = matcher.forward(&pred, &[rect_masks(&mut g, 2, 8, 8)], &mut fixed).unwrap_err().to_string();
    assert!(err.contains("(1, 10, 2)"), "{err}");
}
