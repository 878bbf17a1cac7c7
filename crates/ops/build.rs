//! With the `cuda` feature, compiles the CUDA kernels to PTX (`nvcc` from PATH; see
//! tools/setup-cuda.sh). PTX for compute_75 is JIT-compiled by the driver for any newer card.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/deform/kernel.cu");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("deform.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-arch=compute_75", "-O3", "-std=c++17", "src/deform/kernel.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("ops: cannot run {nvcc} for the cuda feature ({e}); run tools/setup-cuda.sh and source target/cuda/env.sh")
        });
    assert!(status.success(), "ops: {nvcc} failed on src/deform/kernel.cu");
}
