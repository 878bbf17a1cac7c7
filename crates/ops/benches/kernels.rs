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
//! - `linear_few_rows/{fused,candle}`: the POS decoder's FFN on 100 queries (256→2048, 2048→256),
//!   whose fused forward transposes the weight and splits by output columns, against
//!   `candle_nn::Linear`.
//! - `softmax_short/{fused,composed}`: the deformable attention's weights, 4725 tokens × 8 heads
//!   × 12 (levels × points), softmaxed 16 rows at a time across vector lanes.
//! - `residual_layer_norm/{fused,add_then_norm}`: `LN(x + r)` over the MM's 3600 × 256 tokens,
//!   against the add followed by the fused norm.
//! - `self_align/{fused,composed}`: MM-Former's self-alignment gate on res3 (512 × 60²).
//! - `map_to_tokens/{fused,candle}`: a 256 × 60² map to (3600, 256) tokens.
//! - `point_sample/{kernel,deform_core}`: the stage-1 criterion's point losses at the cpu
//!   preset (12 matched 64² mask logits, 3,584 detached points each), forward and backward,
//!   and the matcher's shared points (20 query masks as the channels of one 64² map, 3,584
//!   points), forward: the point-sampling kernel against the deformable-attention core it
//!   replaced on CPU (still the CUDA route).
//!
//! `cargo bench -p ops --bench kernels` (about four minutes).

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
    // Ignored when a run of several groups built the pool already.
    let _ = ops::init_cpu_pool(None);
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

fn nn_kernels(c: &mut Criterion) {
    use candle_nn::Module;
    use ops::nn::{linear, map_to_tokens, softmax, softmax_composed, spatial_pool_gate, spatial_pool_gate_composed, LayerNorm};
    let mut g = c.benchmark_group("linear_few_rows");
    for (d_in, d_out) in [(256usize, 2048usize), (2048, 256)] {
        let (x, w, bias) = (rand(&[100, d_in]), rand(&[d_out, d_in]), rand(&[d_out]));
        let reference = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
        g.bench_function(format!("100x{d_in}_to_{d_out}/fused"), |b| b.iter(|| linear(&x, &w, Some(&bias)).unwrap()));
        g.bench_function(format!("100x{d_in}_to_{d_out}/candle"), |b| b.iter(|| reference.forward(&x).unwrap()));
    }
    g.finish();

    let mut g = c.benchmark_group("softmax_short");
    let x = rand(&[1, 4725, 8, 12]);
    g.bench_function("4725x8x12/fused", |b| b.iter(|| softmax(&x, 3).unwrap()));
    g.bench_function("4725x8x12/composed", |b| b.iter(|| softmax_composed(&x, 3).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("residual_layer_norm");
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let ln = LayerNorm::new(256, 1e-5, vb).unwrap();
    let (x, r) = (rand(&[1, 3600, 256]), rand(&[1, 3600, 256]));
    g.bench_function("3600x256/fused", |b| b.iter(|| ln.forward_residual(&x, &r).unwrap()));
    g.bench_function("3600x256/add_then_norm", |b| b.iter(|| ln.forward(&(&x + &r).unwrap()).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("self_align");
    let x = rand(&[1, 512, 60, 60]);
    g.bench_function("512x60x60/fused", |b| b.iter(|| spatial_pool_gate(&x).unwrap()));
    g.bench_function("512x60x60/composed", |b| b.iter(|| spatial_pool_gate_composed(&x).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("map_to_tokens");
    let x = rand(&[1, 256, 60, 60]);
    g.bench_function("256x60x60/fused", |b| b.iter(|| map_to_tokens(&x).unwrap()));
    g.bench_function("256x60x60/candle", |b| b.iter(|| x.flatten_from(2).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()));
    g.finish();
}

/// The deformable-attention core with one head, level and point of weight 1: point sampling as
/// it ran on CPU before the dedicated kernel, and as it runs on CUDA.
fn point_sample_via_core(input: &Tensor, coords: &Tensor) -> Tensor {
    let (b, c, h, w) = input.dims4().unwrap();
    let p = coords.dim(1).unwrap();
    let value = input.permute((0, 2, 3, 1)).unwrap().reshape((b, h * w, 1, c)).unwrap();
    let loc = coords.reshape((b, p, 1, 1, 1, 2)).unwrap();
    let ones = Tensor::ones((b, p, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    ops::deform::ms_deform_attn_core(&value, &[(h, w)], &loc, &ones).unwrap().transpose(1, 2).unwrap()
}

fn point_sample(c: &mut Criterion) {
    use ops::sample::point_sample;
    let mut g = c.benchmark_group("point_sample");
    let logits = candle_core::Var::from_tensor(&rand(&[12, 1, 64, 64])).unwrap();
    let coords = Tensor::rand(0f32, 1f32, (12, 3584, 2), &Device::Cpu).unwrap();
    let loss = |out: Tensor| out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    g.bench_function("loss_points_12x3584_fwd_bwd/kernel", |b| b.iter(|| loss(point_sample(&logits, &coords).unwrap())));
    g.bench_function("loss_points_12x3584_fwd_bwd/deform_core", |b| b.iter(|| loss(point_sample_via_core(&logits, &coords))));
    let queries = rand(&[1, 20, 64, 64]);
    let shared = Tensor::rand(0f32, 1f32, (1, 3584, 2), &Device::Cpu).unwrap();
    g.bench_function("matcher_20x3584_fwd/kernel", |b| b.iter(|| point_sample(&queries, &shared).unwrap()));
    g.bench_function("matcher_20x3584_fwd/deform_core", |b| b.iter(|| point_sample_via_core(&queries, &shared)));
    g.finish();
}

criterion_group!(kernel_benches, resize, sdpa, deform_locations, nn_kernels, point_sample);
criterion_main!(kernel_benches);
