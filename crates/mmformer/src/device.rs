//! Choosing where tensors live: `cpu` or `cuda:N`, parsed once at the door.

use candle_core::Device;

use crate::error::{Error, Result};

/// Whether this build can run on an NVIDIA GPU (the `cuda` cargo feature).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. In a build without the `cuda` feature a CUDA device is
/// refused at once with the command that builds one, before any work is done.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.to_ascii_lowercase().as_str() {
        "cuda" | "gpu" => Some(0),
        other => other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = ordinal else {
        return Err(Error::Invalid(format!("unknown device `{s}`: use cpu, cuda or cuda:N")));
    };
    if !CUDA_BUILD {
        return Err(Error::Invalid(format!(
            "device `{s}`: this build has no CUDA support; rebuild with the `cuda` feature (`cargo run --release -p xtask --features cuda -- ...`, see the README) or use --device cpu"
        )));
    }
    // candle appends a backtrace to driver errors: the first line says what happened.
    Device::new_cuda(ordinal).map_err(|e| {
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or_default().to_string();
        Error::Invalid(format!("device `{s}`: cannot open CUDA device {ordinal}: {first} (is an NVIDIA driver >= 580 installed and the GPU visible?)"))
    })
}

/// How a device is written on the command line and in logs.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => format!("cuda:{}", cuda_ordinal(d)),
        Device::Metal(_) => "metal".into(),
    }
}

fn cuda_ordinal(d: &Device) -> usize {
    match d.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_unknown_devices_are_refused_by_name() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert!(matches!(parse_device(" CPU ").unwrap(), Device::Cpu));
        let e = parse_device("tpu:0").unwrap_err().to_string();
        assert!(e.contains("tpu:0") && e.contains("cuda:N"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:x"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_says_how_to_build_with_cuda() {
        for s in ["cuda", "cuda:0", "cuda:3"] {
            let e = parse_device(s).unwrap_err().to_string();
            assert!(e.contains(s) && e.contains("no CUDA support") && e.contains("cuda"), "{e}");
        }
    }
}
