//! The smaller kernels against the composed paths they replace, at the shapes the paper-preset
//! model runs them (480² input, 2 threads):
//!
//! - `resize/{kernel,matmul}`: the POS decoder's mask features (256 × 120²) to the stride-8 level
//!   (60²), the FPN's top-down upsampling (256 × 60² → 120²), and the query proposals
//!   (100 × 120² → 60², align_corners) — the two-tap kernel vs two dense-matrix gemms.
//! - `sdpa/{fused,composed}`: the POS decoder's masked cross-attention (100 queries, 3600 keys,
//!   8 heads of 32) and the mask matching's cross-alignment (3600 queries, 225 keys, 4 heads of 64),
//!   forward only (inference).
//! - `deform_locations/{kernel,broadcast}`: the deformable encoder's sampling locations
//!   (4725 tokens × 8 heads × 3 levels × 4 points).
//!
//! `cargo bench -p ops --bench kernels` (about two minutes).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ops::attention::{scaled_dot_product_attention, scaled_dot_product_attention_composed};
use ops::resize::{resize_bilinear, resize_bilinear_matmul};

fn rand(shape: &[usize]) -> Tensor {
    Tensor::rand(-1f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn resize(c: &mut Criterion) {
    // As the binaries run: candle's element-wise pool single-threaded, the heap kept.
    ops::init_cpu_threads();
    ops::keep_freed_memory();
    let mut g = c.benchmark_group("resize");
    for (name, shape, out, ac) in [
        ("mask_features_to_60", [1usize, 256, 120, 120], (60usize, 60usize), false),
        ("fpn_top_down_60_to_120", [1, 256, 60, 60], (120, 120), false),
        ("proposals_to_60_aligned", [1, 100, 120, 120], (60, 60), true),
    ] {
        let x = rand(&shape);
        g.bench_function(format!("{name}/kernel"), |b| b.iter(|| resize_bilinear(&x, out, ac).unwrap()));
        g.bench_function(format!("{name}/matmul"), |b| b.iter(|| resize_bilinear_matmul(&x, out, ac).unwrap()));
    }
    g.finish();
}

fn sdpa(c: &mut Criterion) {
    let mut g = c.benchmark_group("sdpa");
    let mask: Vec<u8> = (0..100 * 3600).map(|i| (i % 7 == 0) as u8).collect();
    let mask = Tensor::from_vec(mask, (1, 100, 3600), &Device::Cpu).unwrap();
    for (name, lq, lk, heads, mask) in [("pos_decoder_100x3600", 100usize, 3600usize, 8usize, Some(&mask)), ("mm_cross_3600x225", 3600, 225, 4, None)] {
        let (q, k, v) = (rand(&[1, lq, 256]), rand(&[1, lk, 256]), rand(&[1, lk, 256]));
        g.bench_function(format!("{name}/fused"), |b| b.iter(|| scaled_dot_product_attention(&q, &k, &v, heads, mask).unwrap()));
        g.bench_function(format!("{name}/composed"), |b| {
            b.iter(|| scaled_dot_product_attention_composed(&q, &k, &v, heads, mask).unwrap())
        });
    }
    g.finish();
}

fn deform_locations(c: &mut Criterion) {
    let shapes = [(15usize, 15usize), (30, 30), (60, 60)];
    let lq: usize = shapes.iter().map(|(h, w)| h * w).sum();
    let refs = Tensor::rand(0f32, 1f32, (1, lq, 3, 2), &Device::Cpu).unwrap();
    let off = rand(&[1, lq, 8, 3, 4, 2]);
    let norm: Vec<f32> = shapes.iter().flat_map(|&(h, w)| [w as f32, h as f32]).collect();
    let norm = Tensor::from_vec(norm, (1, 1, 1, 3, 1, 2), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let mut g = c.benchmark_group("deform_locations");
    g.bench_function("kernel", |b| b.iter(|| ops::deform::sampling_locations(&refs, &off, &shapes).unwrap()));
    g.bench_function("broadcast", |b| {
        b.iter(|| refs.reshape((1, lq, 1, 3, 1, 2)).unwrap().broadcast_add(&off.broadcast_div(&norm).unwrap()).unwrap())
    });
    g.finish();
}

criterion_group!(kernel_benches, resize, sdpa, deform_locations);
criterion_main!(kernel_benches);
