//! Seeded parameter initialisation. candle's CPU random generator cannot be seeded, so a model
//! built on a plain `VarMap` starts from different weights on every run; this backend draws each
//! variable from its own ChaCha stream keyed by (seed, variable name), so the same seed gives the
//! same initial model whatever the construction order.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

struct SeededVarMap {
    vm: VarMap,
    seed: u64,
}

/// FNV-1a of the name: a stable per-variable stream id.
fn name_stream(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn draw(init: &Init, shape: &Shape, seed: u64, name: &str, device: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(name_stream(name));
    let values: Vec<f32> = match *init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => {
            let d = Normal::new(mean, stdev).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
            (0..n).map(|_| d.sample(&mut rng) as f32).collect()
        }
        Init::Uniform { lo, up } => {
            let d = Uniform::new(lo, up).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
            (0..n).map(|_| d.sample(&mut rng) as f32).collect()
        }
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    let d = Uniform::new(-b, b).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
                    (0..n).map(|_| d.sample(&mut rng) as f32).collect()
                }
                NormalOrUniform::Normal => {
                    let d = Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
                    (0..n).map(|_| d.sample(&mut rng) as f32).collect()
                }
            }
        }
    };
    Tensor::from_vec(values, shape.clone(), device)
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.vm.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let var = Var::from_tensor(&draw(&h, &s, self.seed, name, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded VarMap: `{name}` needs a shape and an init")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vm.data().lock().expect("varmap lock").contains_key(name)
    }
}

/// A standard-normal tensor drawn from the ChaCha stream keyed by (`seed`, `name`): the seeded
/// stand-in for `Tensor::randn` (whose CPU generator cannot be seeded) wherever an input must be
/// the same on every run, e.g. a benchmark's random features.
pub fn seeded_randn<S: Into<Shape>>(shape: S, seed: u64, name: &str, device: &Device) -> Result<Tensor> {
    draw(&Init::Randn { mean: 0.0, stdev: 1.0 }, &shape.into(), seed, name, device)
}

/// A `VarBuilder` that creates the variables of `vm` with seeded initial values (and returns
/// existing ones as they are).
pub fn seeded_var_builder(vm: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededVarMap { vm: vm.clone(), seed }), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> (VarMap, Tensor, Tensor) {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        let a = vb.get_with_hints((3, 4), "a.weight", candle_nn::init::DEFAULT_KAIMING_UNIFORM).unwrap();
        let b = vb.get_with_hints(5, "b", Init::Randn { mean: 1.0, stdev: 0.5 }).unwrap();
        (vm, a, b)
    }

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let (vm, a1, b1) = build(3);
        let (_, a2, b2) = build(3);
        let (_, a3, _) = build(4);
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a1), v(&a2));
        assert_eq!(v(&b1), v(&b2));
        assert_ne!(v(&a1), v(&a3));
        assert_ne!(v(&a1)[..4], v(&b1)[..4], "each name has its own stream");
        // Kaiming-uniform bound for fan_in 4, ReLU gain √2: √3·√2/2.
        let bound = (3f64).sqrt() * 2f64.sqrt() / 2.0;
        assert!(v(&a1).iter().all(|x| (x.abs() as f64) <= bound));
        assert_eq!(vm.all_vars().len(), 2, "variables land in the VarMap");
    }

    #[test]
    fn seeded_randn_repeats_per_seed_and_name() {
        let v = |seed, name| seeded_randn((2, 3), seed, name, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(1, "x"), v(1, "x"));
        assert_ne!(v(1, "x"), v(2, "x"));
        assert_ne!(v(1, "x"), v(1, "y"));
        let t = seeded_randn(4096, 7, "n", &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let mean = t.iter().sum::<f32>() / 4096.0;
        let var = t.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 4096.0;
        assert!(mean.abs() < 0.06 && (var - 1.0).abs() < 0.08, "mean {mean}, var {var}");
    }
}
