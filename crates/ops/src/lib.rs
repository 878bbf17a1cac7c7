//! Shared tensor primitives for MM-Former.
//!
//! candle 0.11.1 lacks some operations the model needs, and several of its fused kernels
//! (`candle_nn::ops::softmax_last_dim`, `candle_nn::ops::layer_norm`, `candle_nn::LayerNorm`)
//! silently return no gradient. Everything here is composed from candle primitives that do carry
//! gradients (matmul, broadcast arithmetic, reductions, `index_select`, `where_cond`), so
//! `Tensor::backward` works through all of it.
//!
//! - [`conv`]: fast CPU convolution (NCHW, f32).
//! - [`nn`]: gradient-carrying [`nn::softmax`], [`nn::LayerNorm`] (also `LN(x + r)`),
//!   [`nn::GroupNorm`], [`nn::linear`], the map ↔ token transpositions,
//!   [`nn::pointwise_conv_tokens`], MM-Former's self-alignment gate and the Mask2Former
//!   [`nn::Mlp`].
//! - [`resize`]: bilinear resize with torch `F.interpolate` semantics (differentiable; of maps or
//!   of tokens) and torch `nearest` resize for labels.
//! - [`sample`]: torch `F.grid_sample` (bilinear, zero padding, `align_corners=False`) with
//!   gradients for input and grid, and Mask2Former's `point_sample`.
//! - [`deform`]: multi-scale deformable attention (Deformable-DETR `MSDeformAttn`).
//! - [`position`]: DETR/Mask2Former sine positional encoding.
//! - [`attention`]: `nn.MultiheadAttention` (batch-first) with boolean masks.
//!
//! On CPU, attention, softmax (last dimension) and `LayerNorm` run fused kernels with analytic
//! backwards (see [`fused_kernels_enabled`]); the composed versions remain as the reference and
//! the path on other devices.
//!
//! All float operations accept f32 (the model's dtype) and f64 (used by the gradient checks).

pub mod attention;
pub mod conv;
pub mod deform;
pub mod nn;
pub mod position;
pub mod resize;
pub mod sample;

pub(crate) mod fastmath;
pub use fastmath::{fused_kernels_enabled, gemm_flops, set_fused_kernels};

/// Makes candle run its element-wise CPU ops on the calling thread (`CANDLE_NUM_THREADS=1`)
/// unless the environment already sets `CANDLE_NUM_THREADS`; returns the value in effect.
///
/// candle's "barrier pool" (used for element-wise ops of 64k+ elements) spin-waits between
/// ops; on a 2-core machine it competes with rayon's workers (which run the matmuls and the
/// fused kernels here) and with any other process, which made CrossAt forward+backward 2-3x
/// slower under load, for at most ~10% gain on an idle machine. Matmuls keep using rayon.
///
/// Call it first thing in `main`, before any candle op and before other threads start (it
/// sets a process environment variable; candle reads it once, when the pool is first used).
pub fn init_cpu_threads() -> String {
    match std::env::var("CANDLE_NUM_THREADS") {
        Ok(v) => v,
        Err(_) => {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
            "1".into()
        }
    }
}
pub(crate) mod util;

/// Builds rayon's global pool (which runs every parallel kernel here) with `threads` threads
/// (`None`: rayon's default, `RAYON_NUM_THREADS` or one per core), the calling thread being
/// one of them when there are two or more; returns the number of threads.
///
/// A parallel call from a thread outside the pool hands its work to the workers and sleeps
/// until they finish; between such calls, while the caller runs the single-threaded candle ops,
/// both workers spin and then sleep, three threads on two cores. With the caller in the pool
/// a parallel call runs on it directly and only one other worker waits: a cpu-preset stage-2
/// step from shards took 146 ms from outside the pool and 130 ms inside it (README).
///
/// Call it first thing in `main`, on the thread that will run the model, before any rayon or
/// candle use (the global pool can be built once; an error says it already was). That thread
/// then counts as a worker: while it blocks (on a channel, on I/O) the pool has one thread
/// fewer, so with a single thread it stays outside the pool, where a job that another thread
/// hands to the pool cannot wait on it.
pub fn init_cpu_pool(threads: Option<usize>) -> std::result::Result<usize, rayon::ThreadPoolBuildError> {
    let threads = match threads {
        Some(n) => n.max(1),
        None => std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    let builder = rayon::ThreadPoolBuilder::new().num_threads(threads);
    let builder = if threads >= 2 { builder.use_current_thread() } else { builder };
    builder.build_global()?;
    Ok(threads)
}

/// Makes glibc's allocator keep freed blocks for reuse instead of handing them back to the
/// kernel; returns whether the setting took (false on other allocators and platforms).
///
/// By default glibc serves blocks above 32 MiB (less before its threshold adapts) with a fresh
/// `mmap` and unmaps them on free, so every forward pass paid page faults and kernel page
/// clearing for its large activations: evaluating 300 stage-2 episodes at the cpu preset spent
/// 7.0 s of 20 s CPU time in the kernel (`eval-shards`, 14.2 s wall), 0.9 s with the heap kept
/// (8.5 s wall), at the same peak resident memory; a paper-preset stage-1 iteration went from 45
/// to 27 s for 3% more peak memory (the kept heap fragments a little). Call it once at the start
/// of `main`, before other threads allocate.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters.
        unsafe {
            // glibc may cap the threshold (at 32 MiB on some builds): fall back to the cap.
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1 || libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1;
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20) == 1;
            mmap && trim
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Runs f32 matrix products on CUDA in TF32 (10-bit mantissa, the tensor cores) when `on`:
/// cuBLAS matmuls and candle's im2col convolutions. PyTorch's default for cuDNN convolutions;
/// off by default here, so results match the CPU to float32 rounding. No effect on CPU.
pub fn set_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    let _ = on;
}

/// Whether [`set_tf32`] is on (always false without CUDA).
pub fn tf32() -> bool {
    #[cfg(feature = "cuda")]
    return candle_core::cuda::gemm_reduced_precision_f32();
    #[allow(unreachable_code)]
    false
}

/// Device memory in use on `device` as the driver reports it (total − free, in MiB): the CUDA
/// context, every allocation and what the stream-ordered pool keeps. None on the CPU or when
/// the build has no CUDA.
pub fn device_memory_mb(device: &candle_core::Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some(total.saturating_sub(free) as f64 / (1024.0 * 1024.0));
    }
    let _ = device;
    None
}
