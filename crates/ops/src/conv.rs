//! Fast CPU convolution (NCHW, f32).
