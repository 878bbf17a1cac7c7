//! The generator must reproduce `weights_check.json` for every one of the 755 state-dict tensors.

use parity::{fixture_dir, fnv1a32, formula_value, FormulaWeights};

#[test]
fn parity_formula_matches_weights_check_for_every_tensor() {
    let path = fixture_dir().join("weights_check.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let check: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(check.len(), 755);
    let calibrated = parity::load_fixture("frozenbn_calibrated.safetensors").unwrap();
    let mut checked = 0;
    for (name, item) in &check {
        let shape: Vec<usize> = item["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let fnv = u32::from_str_radix(item["fnv1a32"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(fnv1a32(name), fnv, "{name}: FNV hash");
        // The 106 calibrated BN statistics are checked against the file, not the formula.
        if calibrated.tensors.contains_key(name) {
            continue;
        }
        let v = formula_value(name, &shape);
        for (i, want) in item["first4"].as_array().unwrap().iter().enumerate() {
            assert_eq!(v[i], want.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let want = item["sum_f64"].as_f64().unwrap();
        assert!((sum - want).abs() <= 1e-9 * want.abs().max(1.0) + 1e-9, "{name}: sum {sum} vs {want}");
        checked += 1;
    }
    assert!(checked >= 600, "only {checked} tensors checked");
}

#[test]
fn parity_calibrated_stats_override_the_formula() {
    let w = FormulaWeights::with_calibration().unwrap();
    let name = "backbone.stem.conv1.norm.running_var";
    let t = w.tensor(name, &[64]).unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(t, formula_value(name, &[64]));
    assert!(w.tensor(name, &[32]).is_err(), "a calibrated tensor with a wrong shape must be refused");
}
