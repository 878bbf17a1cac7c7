//! The trainable variables of a model held in a candle `VarMap`, by name.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;

use crate::{NamedVar, Result, TrainError};

/// Named trainable variables of a VarMap, sorted by name (a stable order for the optimizer).
pub fn named_vars(vm: &VarMap) -> Vec<NamedVar> {
    let data = vm.data().lock().expect("varmap lock");
    let mut v: Vec<NamedVar> = data.iter().map(|(n, v)| NamedVar { name: n.clone(), var: v.clone() }).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The current values of every variable, by name.
pub fn varmap_tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    vm.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
}

/// Sets every variable of `vm` from `tensors` (cast to f32), all of which must be present with
/// the variable's shape; `what` names the source in errors.
pub fn load_into(vm: &VarMap, tensors: &HashMap<String, Tensor>, what: &Path) -> Result<()> {
    let data = vm.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| TrainError::File { path: what.to_path_buf(), msg: format!("no tensor `{name}`") })?;
        if t.dims() != var.dims() {
            return Err(TrainError::File {
                path: what.to_path_buf(),
                msg: format!("`{name}` has shape {:?}, the model needs {:?}", t.dims(), var.dims()),
            });
        }
        var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
    }
    Ok(())
}
