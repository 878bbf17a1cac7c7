// CUDA kernels of the multi-scale deformable-attention core (the CPU kernel's twin, kernel.rs).
//
// Layouts (all contiguous): value (B, S, M, D), loc (B, Lq, M, L, P, 2) holding normalised
// (x, y), attn (B, Lq, M, L, P), out/grad (B, Lq, M, D). levels[3l..3l+3] = (h, w, first row).
// Sampling is grid_sample's (align_corners=False, zero padding): pixel = loc * size - 0.5.
// A NaN location makes its whole tap NaN (output and location/weight gradients) instead of
// indexing out of bounds; the CPU kernel, which drops out-of-range corners one axis at a time,
// gives NaN only when the other coordinate has an in-range corner. The value gradient is summed
// with atomics, so GPU gradients are not bit-for-bit reproducible from run to run.

template <typename T>
struct Taps {
    int n;
    long long row[4];
    T w[4];
    T dx[4];
    T dy[4];
};

template <typename T>
__device__ __forceinline__ bool corners(T lx, T ly, const unsigned int *level, Taps<T> &t) {
    const unsigned int h = level[0], w = level[1], start = level[2];
    const T x = lx * (T)w - (T)0.5;
    const T y = ly * (T)h - (T)0.5;
    t.n = 0;
    if (x != x || y != y) return false;
    const T x0 = floor(x), y0 = floor(y);
    const T fx = x - x0, fy = y - y0;
    const T xs[2] = {x0, x0 + (T)1};
    const T wxs[2] = {(T)1 - fx, fx};
    const T dwxs[2] = {(T)-1, (T)1};
    const T ys[2] = {y0, y0 + (T)1};
    const T wys[2] = {(T)1 - fy, fy};
    const T dwys[2] = {(T)-1, (T)1};
#pragma unroll
    for (int a = 0; a < 2; ++a) {
        if (!(ys[a] >= (T)0 && ys[a] <= (T)(h - 1))) continue;
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            if (!(xs[b] >= (T)0 && xs[b] <= (T)(w - 1))) continue;
            t.row[t.n] = (long long)start + (long long)ys[a] * w + (long long)xs[b];
            t.w[t.n] = wys[a] * wxs[b];
            t.dx[t.n] = wys[a] * dwxs[b] * (T)w;
            t.dy[t.n] = wxs[b] * dwys[a] * (T)h;
            t.n += 1;
        }
    }
    return true;
}

// One thread per output element (b, q, m, d): neighbouring threads read neighbouring channels.
template <typename T>
__device__ void forward(const T *value, const T *loc, const T *attn, const unsigned int *levels,
                        T *out, long long n_out, int s, int lq, int heads, int dh, int n_levels,
                        int points) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_out) return;
    const int c = idx % dh;
    const long long bqm = idx / dh;
    const int m = bqm % heads;
    const long long bq = bqm / heads;
    const long long b = bq / lq;
    const int nlp = n_levels * points;
    const T *vb = value + b * (long long)s * heads * dh;
    T acc = 0;
    Taps<T> t;
    for (int lp = 0; lp < nlp; ++lp) {
        const long long i = bqm * nlp + lp;
        const T a = attn[i];
        if (!corners<T>(loc[2 * i], loc[2 * i + 1], levels + 3 * (lp / points), t)) {
            acc += a * (loc[2 * i] + loc[2 * i + 1]);  // NaN
            continue;
        }
        for (int k = 0; k < t.n; ++k) {
            acc += a * t.w[k] * vb[(t.row[k] * heads + m) * dh + c];
        }
    }
    out[idx] = acc;
}

// The backward, one sampling point (b, q, m, l, p) per thread (WARP = false) or per warp with the
// lanes over channels (WARP = true: coalesced value reads and atomics, warp reductions). The
// location and weight gradients reduce over channels; the value gradient is scattered with
// atomics (grad_value must be zeroed). The warp form needs blockDim.x to be a multiple of 32.
template <typename T, bool WARP>
__device__ void backward(const T *value, const T *loc, const T *attn, const T *grad,
                         const unsigned int *levels, T *grad_value, T *grad_loc, T *grad_attn,
                         long long n_points, int s, int lq, int heads, int dh, int n_levels,
                         int points) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long idx = WARP ? thread / 32 : thread;
    const int lane = WARP ? threadIdx.x % 32 : 0;
    const int stride = WARP ? 32 : 1;
    if (idx >= n_points) return;
    const int nlp = n_levels * points;
    const int lp = idx % nlp;
    const long long bqm = idx / nlp;
    const int m = bqm % heads;
    const long long b = bqm / heads / lq;
    const long long vbase = b * (long long)s * heads * dh;
    const T a = attn[idx];
    const T *g = grad + bqm * dh;
    Taps<T> t;
    if (!corners<T>(loc[2 * idx], loc[2 * idx + 1], levels + 3 * (lp / points), t)) {
        if (lane == 0) {
            const T nan = loc[2 * idx] + loc[2 * idx + 1];
            grad_attn[idx] = nan;
            grad_loc[2 * idx] = nan;
            grad_loc[2 * idx + 1] = nan;
        }
        return;
    }
    T sa = 0, sx = 0, sy = 0;
    for (int k = 0; k < t.n; ++k) {
        const long long base = vbase + (t.row[k] * heads + m) * dh;
        T vg = 0;
        for (int c = lane; c < dh; c += stride) {
            const T gc = g[c];
            vg += value[base + c] * gc;
            atomicAdd(grad_value + base + c, a * t.w[k] * gc);
        }
        sa += t.w[k] * vg;
        sx += t.dx[k] * vg;
        sy += t.dy[k] * vg;
    }
    if (WARP) {
#pragma unroll
        for (int off = 16; off > 0; off /= 2) {
            sa += __shfl_down_sync(0xffffffff, sa, off);
            sx += __shfl_down_sync(0xffffffff, sx, off);
            sy += __shfl_down_sync(0xffffffff, sy, off);
        }
    }
    if (lane == 0) {
        grad_attn[idx] = sa;
        grad_loc[2 * idx] = a * sx;
        grad_loc[2 * idx + 1] = a * sy;
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                  \
    extern "C" __global__ void ms_deform_fwd_##SUFFIX(                                          \
        const T *value, const T *loc, const T *attn, const unsigned int *levels, T *out,        \
        long long n_out, int s, int lq, int heads, int dh, int n_levels, int points) {          \
        forward<T>(value, loc, attn, levels, out, n_out, s, lq, heads, dh, n_levels, points);   \
    }                                                                                           \
    extern "C" __global__ void ms_deform_bwd_##SUFFIX(                                          \
        const T *value, const T *loc, const T *attn, const T *grad,                             \
        const unsigned int *levels, T *grad_value, T *grad_loc, T *grad_attn,                   \
        long long n_points, int s, int lq, int heads, int dh, int n_levels, int points) {       \
        backward<T, false>(value, loc, attn, grad, levels, grad_value, grad_loc, grad_attn,     \
                           n_points, s, lq, heads, dh, n_levels, points);                                        \
    }                                                                                           \
    extern "C" __global__ void ms_deform_bwd_warp_##SUFFIX(                                     \
        const T *value, const T *loc, const T *attn, const T *grad,                             \
        const unsigned int *levels, T *grad_value, T *grad_loc, T *grad_attn,                   \
        long long n_points, int s, int lq, int heads, int dh, int n_levels, int points) {       \
        backward<T, true>(value, loc, attn, grad, levels, grad_value, grad_loc, grad_attn,      \
                          n_points, s, lq, heads, dh, n_levels, points);                         \
    }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
