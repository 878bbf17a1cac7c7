//! Test support for parity with the official PyTorch code: the formula weight generator of the
//! parity fixtures (`shared/fixtures/parity/README.md` §1), fixture discovery and tolerance checks.
//!
//! Every parity test in the workspace reads its fixture folder through [`fixture_dir`], so the
//! same tests can run on another fixture set of the same layout (`MMFORMER_PARITY_DIR`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("fixture {file}: no tensor named `{name}`")]
    MissingTensor { file: String, name: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The parity fixture folder: `$MMFORMER_PARITY_DIR` when set, else `shared/fixtures/parity`
/// beside the repository checkout.
pub fn fixture_dir() -> PathBuf {
    match std::env::var_os("MMFORMER_PARITY_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/parity"),
    }
}

/// The weight-file fixture folder (`shared/fixtures/weights`), overridable with `MMFORMER_WEIGHTS_FIXTURE_DIR`.
pub fn weights_fixture_dir() -> PathBuf {
    match std::env::var_os("MMFORMER_WEIGHTS_FIXTURE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/weights"),
    }
}

/// All tensors of one safetensors file of the fixture folder (e.g. `forward.safetensors`).
pub fn load_fixture(file: &str) -> Result<Fixture, ParityError> {
    let path = fixture_dir().join(file);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| ParityError::File {
        path: path.clone(),
        msg: format!("cannot read parity fixture ({e}); set MMFORMER_PARITY_DIR to the fixture folder"),
    })?;
    Ok(Fixture { file: file.to_string(), tensors })
}

/// The tensors of one fixture file, looked up by name with a clear error.
pub struct Fixture {
    file: String,
    pub tensors: HashMap<String, Tensor>,
}

impl Fixture {
    pub fn get(&self, name: &str) -> Result<Tensor, ParityError> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ParityError::MissingTensor { file: self.file.clone(), name: name.to_string() })
    }
}

/// FNV-1a-32 of the UTF-8 bytes of a tensor name: the per-tensor seed of the formula.
pub fn fnv1a32(name: &str) -> u32 {
    name.bytes().fold(0x811C_9DC5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// `n` values in (-1, 1): murmur3 fmix32 of `(seed + i * 0x9E3779B9) mod 2^32`.
pub fn unit(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a32(name);
    (0..n)
        .map(|i| {
            let mut x = seed.wrapping_add((i as u32).wrapping_mul(0x9E37_79B9));
            x ^= x >> 16;
            x = x.wrapping_mul(0x85EB_CA6B);
            x ^= x >> 13;
            x = x.wrapping_mul(0xC2B2_AE35);
            x ^= x >> 16;
            (x as f64 + 0.5) / 2_147_483_648.0 - 1.0
        })
        .collect()
}

const EMBED_SUFFIXES: [&str; 4] = ["query_feat.weight", "query_embed.weight", "level_embed.weight", "level_embed"];

fn zero_mean_rows(name: &str) -> bool {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(
            r"(linear2\.weight|mask_embed\.layers\.[12]\.weight|fc2\.weight|input_proj\.\d\.0\.weight|adapter_1\.weight|mask_features\.weight|^conv_\d\.weight)$",
        )
        .expect("static regex")
    })
    .is_match(name)
}

fn gain(name: &str) -> f64 {
    if name.ends_with("in_proj_weight") {
        2.0
    } else if name.ends_with("out_proj.weight") {
        0.25
    } else if name.ends_with("output_proj.weight") || name.ends_with("linear2.weight") {
        0.5
    } else {
        1.0
    }
}

/// The formula value of one state-dict tensor, row-major, rounded to f32 (README §1.1).
pub fn formula_value(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut r = unit(name, n);
    let v: Vec<f64> = if name.ends_with("running_var") {
        r.iter().map(|r| 1.0 + 0.5 * r).collect()
    } else if name.ends_with("running_mean") {
        r.iter().map(|r| 0.1 * r).collect()
    } else if shape.len() == 1 {
        if name.ends_with("weight") {
            r.iter().map(|r| 1.0 + 0.1 * r).collect()
        } else {
            r.iter().map(|r| 0.05 * r).collect()
        }
    } else if EMBED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        r.iter().map(|r| 3f64.sqrt() * r).collect()
    } else {
        let f = n / shape[0];
        if zero_mean_rows(name) {
            for row in r.chunks_mut(f) {
                // Sequential sum, as numpy's cumsum does: the fixture depends on this order.
                let mut s = 0.0f64;
                for x in row.iter() {
                    s += x;
                }
                let mean = s / f as f64;
                for x in row.iter_mut() {
                    *x -= mean;
                }
            }
        }
        let scale = (3f64.sqrt() * gain(name)) / (f as f64).sqrt();
        r.iter().map(|r| r * scale).collect()
    };
    v.into_iter().map(|x| x as f32).collect()
}

/// A candle weight backend that serves the parity formula for any name and shape, with the
/// calibrated backbone BN statistics (`frozenbn_calibrated.safetensors`) taking precedence.
pub struct FormulaWeights {
    overrides: HashMap<String, Tensor>,
}

impl FormulaWeights {
    /// The formula plus the calibration file of the fixture folder.
    pub fn with_calibration() -> Result<Self, ParityError> {
        let fx = load_fixture("frozenbn_calibrated.safetensors")?;
        Ok(Self { overrides: fx.tensors })
    }

    /// The bare formula (no calibration overrides).
    pub fn formula_only() -> Self {
        Self { overrides: HashMap::new() }
    }

    /// A `VarBuilder` over these weights (f32, CPU).
    pub fn var_builder(self) -> VarBuilder<'static> {
        self.var_builder_on(&Device::Cpu)
    }

    /// A `VarBuilder` over these weights (f32) on `device`.
    pub fn var_builder_on(self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), DType::F32, device.clone())
    }

    /// Name → tensor for an explicit list of (name, shape) pairs, e.g. to feed a loader that
    /// takes a state dict.
    pub fn state_dict(&self, entries: &[(String, Vec<usize>)]) -> Result<HashMap<String, Tensor>, ParityError> {
        entries
            .iter()
            .map(|(name, shape)| Ok((name.clone(), self.tensor(name, shape)?)))
            .collect()
    }

    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, ParityError> {
        if let Some(t) = self.overrides.get(name) {
            if t.dims() != shape {
                return Err(ParityError::File {
                    path: fixture_dir().join("frozenbn_calibrated.safetensors"),
                    msg: format!("`{name}` has shape {:?}, expected {:?}", t.dims(), shape),
                });
            }
            return Ok(t.clone());
        }
        Ok(Tensor::from_vec(formula_value(name, shape), shape, &Device::Cpu)?)
    }
}

impl SimpleBackend for FormulaWeights {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name, s.dims())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("formula weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Max |a − b| and max |ref| of two tensors of the same shape (computed in f64).
pub fn max_abs_diff(ours: &Tensor, reference: &Tensor) -> Result<(f64, f64), ParityError> {
    if ours.dims() != reference.dims() {
        return Err(ParityError::Candle(candle_core::Error::Msg(format!(
            "shape mismatch: ours {:?} vs reference {:?}",
            ours.dims(),
            reference.dims()
        ))));
    }
    let a = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = reference.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut d = 0f64;
    let mut m = 0f64;
    for (x, y) in a.iter().zip(&b) {
        d = d.max((x - y).abs());
        m = m.max(y.abs());
    }
    if a.iter().any(|x| !x.is_finite()) {
        d = f64::INFINITY;
    }
    Ok((d, m))
}

/// The fixture README's check: `max|a−b| <= rel * max|ref| + abs`. Panics with the figures
/// otherwise (this is for tests); returns the relative error for reporting.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, rel: f64, abs: f64) -> f64 {
    let (d, m) = max_abs_diff(ours, reference).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(d <= rel * m + abs, "{what}: max|diff| = {d:.3e} exceeds {rel:.1e} * max|ref| ({m:.3e}) + {abs:.1e}");
    d / m.max(1e-30)
}

/// Default tolerance of the fixture README for features, prototypes, cosines and outputs.
pub const REL_TOL: f64 = 3e-3;
pub const ABS_TOL: f64 = 1e-5;
