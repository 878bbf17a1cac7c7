//! Weight-file readers and the ResNet name table, on real torch-saved files
//! (`shared/fixtures/weights`), a hand-written legacy file, the real EfficientNet-Lite0 file,
//! and broken files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use backbone::names::{
    official_to_torchvision, resnet50_official_names, resnet50_state_dict, torchvision_to_official,
};
use backbone::{BackboneError, EfficientNetLite0, ResNet50, StateDict};
use candle_core::{DType, Device, Tensor};

mod common;
use common::{fixture, lite0_or_skip, write_legacy_fixture};

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors")
}

/// Bit-exact equality of two tensors (shape, dtype and every value).
fn assert_exact(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    assert_eq!(ours.dtype(), reference.dtype(), "{what}: dtype");
    let a = ours
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = reference
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(a == b, "{what}: values differ");
}

/// Every floating-point tensor of a fixture file, raw, against `expected.safetensors`.
fn check_raw_file(file: &str, prefix: &str) -> StateDict {
    let sd = StateDict::read(fixture(file), &Device::Cpu).unwrap();
    let exp = expected();
    let mut checked = 0;
    for (name, reference) in exp.iter().filter(|(k, _)| k.starts_with(prefix)) {
        let key = &name[prefix.len()..];
        let ours = sd
            .get(key)
            .unwrap_or_else(|| panic!("{file}: `{key}` not read"));
        assert_exact(&format!("{file}:{key}"), ours, reference);
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} tensors compared");
    sd
}

#[test]
fn torchvision_zip_loads_every_tensor_exactly() {
    let sd = check_raw_file("torchvision_resnet50_partial.pth", "torchvision/");
    // 31 tensors: 26 float ones plus 5 int64 num_batches_tracked, which keep their dtype.
    assert_eq!(sd.len(), 31, "{:?}", sd.names());
    let nbt = sd.get("bn1.num_batches_tracked").unwrap();
    assert_eq!((nbt.dtype(), nbt.dims()), (DType::I64, &[][..]));
}

#[test]
fn official_checkpoint_reads_the_model_dict_exactly() {
    let sd = check_raw_file("official_checkpoint_partial.pth", "official/");
    // The `model` entry only: 25 backbone tensors and 3 head tensors, no optimizer / scheduler.
    assert_eq!(sd.len(), 28, "{:?}", sd.names());
    assert!(sd.names().iter().all(|k| k.starts_with("backbone.")
        || k.starts_with("fc1.")
        || k.starts_with("sem_seg_head.")));
}

#[test]
fn both_layouts_map_to_the_same_official_tensors() {
    let exp = expected();
    for file in [
        "torchvision_resnet50_partial.pth",
        "official_checkpoint_partial.pth",
    ] {
        let sd = resnet50_state_dict(StateDict::read(fixture(file), &Device::Cpu).unwrap()).unwrap();
        // stem + res2.0: 5 modules with a norm each = 25 tensors; fc, heads and counters dropped.
        assert_eq!(sd.len(), 25, "{file}: {:?}", sd.names());
        for name in sd.names() {
            assert!(
                resnet50_official_names().iter().any(|n| n == name),
                "{file}: unexpected `{name}`"
            );
            let reference = &exp[&format!("official/backbone.{name}")];
            assert_exact(&format!("{file}:{name}"), sd.get(name).unwrap(), reference);
            let tv = official_to_torchvision(name).unwrap();
            assert_exact(
                &format!("{file}:{tv}"),
                sd.get(name).unwrap(),
                &exp[&format!("torchvision/{tv}")],
            );
        }
    }
}

#[test]
fn name_table_covers_r50_and_round_trips() {
    let names = resnet50_official_names();
    // 53 convs (1 stem + 16 blocks × 3 + 4 shortcuts), each with a 4-tensor norm.
    assert_eq!(names.len(), 53 * 5);
    for n in names {
        let tv = official_to_torchvision(n).unwrap();
        assert_eq!(torchvision_to_official(&tv).as_deref(), Some(n.as_str()));
    }
    assert_eq!(
        official_to_torchvision("res5.0.shortcut.norm.running_var").unwrap(),
        "layer4.0.downsample.1.running_var"
    );
    assert_eq!(
        official_to_torchvision("res3.2.conv2.norm.weight").unwrap(),
        "layer2.2.bn2.weight"
    );
    assert_eq!(
        official_to_torchvision("stem.conv1.norm.bias").unwrap(),
        "bn1.bias"
    );
    assert_eq!(torchvision_to_official("fc.weight"), None);
    assert_eq!(
        torchvision_to_official("layer1.0.bn1.num_batches_tracked"),
        None
    );
}

#[test]
fn own_safetensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let sd =
        resnet50_state_dict(StateDict::read(fixture("torchvision_resnet50_partial.pth"), &Device::Cpu).unwrap())
            .unwrap();
    for prefix in ["backbone.", ""] {
        let path = dir.path().join(format!("ours{}.safetensors", prefix.len()));
        sd.save_safetensors(&path, prefix).unwrap();
        let back = resnet50_state_dict(StateDict::read(&path, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(back.names(), sd.names());
        for name in sd.names() {
            assert_exact(name, back.get(name).unwrap(), sd.get(name).unwrap());
        }
    }
}

#[test]
fn partial_file_names_the_first_missing_key() {
    // The stem and res2.0 are present, so the first missing tensor is res2.1's conv1, named as
    // each file spells it.
    for (file, key) in [
        ("torchvision_resnet50_partial.pth", "layer1.1.conv1.weight"),
        (
            "official_checkpoint_partial.pth",
            "backbone.res2.1.conv1.weight",
        ),
    ] {
        let err = ResNet50::from_file(fixture(file), &Device::Cpu).unwrap_err();
        match &err {
            BackboneError::MissingKey {
                file: f,
                key: k,
                expected,
            } => {
                assert_eq!(k, key);
                assert_eq!(expected, &[64, 256, 1, 1]);
                assert!(f.ends_with(file));
            }
            other => panic!("{file}: expected MissingKey, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(file) && msg.contains(key) && msg.contains("[64, 256, 1, 1]"),
            "{msg}"
        );
    }
}

#[test]
fn wrong_shape_names_key_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let raw = StateDict::read(fixture("torchvision_resnet50_partial.pth"), &Device::Cpu).unwrap();
    let mut tensors = raw.into_tensors();
    tensors.insert(
        "conv1.weight".into(),
        Tensor::zeros((64, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("bad_shape.safetensors");
    StateDict::from_tensors("x", tensors)
        .save_safetensors(&path, "")
        .unwrap();
    let err = ResNet50::from_file(&path, &Device::Cpu).unwrap_err();
    match &err {
        BackboneError::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, "conv1.weight");
            assert_eq!(expected, &[64, 3, 7, 7]);
            assert_eq!(found, &[64, 3, 3, 3]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("bad_shape.safetensors")
            && msg.contains("conv1.weight")
            && msg.contains("[64, 3, 7, 7]")
            && msg.contains("[64, 3, 3, 3]"),
        "{msg}"
    );
}

fn truncated_copy(src: &Path, dir: &Path, keep: f64) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let dst = dir.join(format!(
        "truncated_{}",
        src.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&dst, &bytes[..(bytes.len() as f64 * keep) as usize]).unwrap();
    dst
}

#[test]
fn truncated_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = write_legacy_fixture(dir.path());
    let own = dir.path().join("own.safetensors");
    resnet50_state_dict(StateDict::read(fixture("torchvision_resnet50_partial.pth"), &Device::Cpu).unwrap())
        .unwrap()
        .save_safetensors(&own, "")
        .unwrap();
    for src in [
        fixture("torchvision_resnet50_partial.pth"),
        fixture("official_checkpoint_partial.pth"),
        legacy,
        own,
    ] {
        for keep in [0.5, 0.999] {
            let path = truncated_copy(&src, dir.path(), keep);
            let err = StateDict::read(&path, &Device::Cpu).unwrap_err();
            assert!(
                matches!(err, BackboneError::Corrupt { .. }),
                "{}: {err}",
                path.display()
            );
            assert!(
                err.to_string()
                    .contains(&*path.file_name().unwrap().to_string_lossy()),
                "{err}"
            );
        }
    }
}

#[test]
fn non_weight_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // A PNG renamed .pth: a real photo when the assets are there, else a PNG signature.
    let png = dir.path().join("image.pth");
    let photo = backbone::assets::assets_dir().join("skimage/chelsea.png");
    let bytes =
        std::fs::read(photo).unwrap_or_else(|_| [&b"\x89PNG\r\n\x1a\n"[..], &[0u8; 64]].concat());
    std::fs::write(&png, &bytes).unwrap();
    let err = ResNet50::from_file(&png, &Device::Cpu).unwrap_err();
    assert!(matches!(err, BackboneError::NotAWeightFile { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("image.pth") && msg.contains("PNG"), "{msg}");

    for (name, content) in [
        ("empty.pth", &b""[..]),
        ("text.pth", &b"just some text, no weights"[..]),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let err = StateDict::read(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(err, BackboneError::NotAWeightFile { .. }), "{err}");
        assert!(err.to_string().contains(name));
    }
    let err = StateDict::read(dir.path().join("absent.pth"), &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, BackboneError::Io { .. }) && err.to_string().contains("absent.pth"),
        "{err}"
    );
}


#[test]
fn legacy_format_hand_written_file() {
    let dir = tempfile::tempdir().unwrap();
    let sd = StateDict::read(write_legacy_fixture(dir.path()), &Device::Cpu).unwrap();
    assert_eq!(sd.names(), ["a", "a_t", "count", "d", "tail"]);
    assert_eq!(
        sd.get("a").unwrap().to_vec2::<f32>().unwrap(),
        [[1., 2., 3.], [4., 5., 6.]]
    );
    assert_eq!(
        sd.get("a_t").unwrap().to_vec2::<f32>().unwrap(),
        [[1., 4.], [2., 5.], [3., 6.]]
    );
    assert_eq!(
        sd.get("tail").unwrap().to_vec1::<f32>().unwrap(),
        [12., 13., 14.]
    );
    let count = sd.get("count").unwrap();
    assert_eq!(
        (count.dtype(), count.to_scalar::<i64>().unwrap()),
        (DType::I64, 1234)
    );
    assert_eq!(
        sd.get("d").unwrap().to_vec1::<f64>().unwrap(),
        [0.25, -1e300]
    );
}

#[test]
fn legacy_view_outside_its_storage_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(write_legacy_fixture(dir.path())).unwrap();
    // Rewrite `tail`'s offset from 2 to 4 (3 elements from 4 overflow a 5-element storage):
    // the offset is the first BININT after the persistent id of storage "1".
    let needle = b"X\x01\x00\x00\x001X\x03\x00\x00\x00cpuJ\x05\x00\x00\x00NtQJ\x02";
    let at = good
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len()
        - 1;
    let mut bad = good.clone();
    bad[at] = 4;
    let path = dir.path().join("bad_view.pth");
    std::fs::write(&path, bad).unwrap();
    let err = StateDict::read(&path, &Device::Cpu).unwrap_err();
    match &err {
        BackboneError::BadTensor { key, .. } => assert_eq!(key, "tail"),
        other => panic!("expected BadTensor, got {other}"),
    }
}

#[test]
fn legacy_format_real_efficientnet_file() {
    let Some(path) = lite0_or_skip("legacy_format_real_efficientnet_file") else {
        return;
    };
    let sd = StateDict::read(&path, &Device::Cpu).unwrap();
    assert_eq!(sd.len(), 296);
    // Reference values read independently with Python's pickle module (no torch), following
    // each tensor's strides: 50 of the conv / fc weights are stored transposed.
    #[allow(clippy::excessive_precision)]
    let cases: [(&str, &[usize], [f64; 4]); 4] = [
        (
            "_conv_stem.weight",
            &[32, 3, 3, 3],
            [
                -1.1103360652923584,
                -1.3087704181671143,
                -0.010156914591789246,
                0.9208119511604309,
            ],
        ),
        (
            "_blocks.11._depthwise_conv.weight",
            &[672, 1, 5, 5],
            [
                0.055299848318099976,
                0.14793077111244202,
                0.1465422362089157,
                0.047802478075027466,
            ],
        ),
        (
            "_blocks.15._project_conv.weight",
            &[320, 1152, 1, 1],
            [
                0.03738270327448845,
                0.029342927038669586,
                -0.028256788849830627,
                -0.13034167885780334,
            ],
        ),
        (
            "_fc.weight",
            &[1000, 1280],
            [
                -0.04561043530702591,
                -0.09470871090888977,
                -0.05684146657586098,
                0.06823880970478058,
            ],
        ),
    ];
    for (name, shape, first) in cases {
        let t = sd.get(name).unwrap();
        assert_eq!(t.dims(), shape, "{name}");
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The references are the f32 values printed exactly as f64.
        assert_eq!(
            v[..4].iter().map(|&x| x as f64).collect::<Vec<_>>(),
            first,
            "{name}"
        );
    }
    let sum = |name: &str| {
        sd.get(name)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!((sum("_fc.weight") - -470.632_567_301_287).abs() < 1e-6);
    assert!((sum("_bn1.running_var") - 13_721.746_045_589_447).abs() < 1e-6);
    assert_eq!(
        sd.get("_bn0.num_batches_tracked").unwrap().dtype(),
        DType::I64
    );
}

#[test]
fn efficientnet_full_load_and_missing_key() {
    let Some(path) = lite0_or_skip("efficientnet_full_load_and_missing_key") else {
        return;
    };
    let model = EfficientNetLite0::from_file(&path, &Device::Cpu).unwrap();
    assert_eq!(backbone::Backbone::channels(&model), [24, 40, 112, 320]);
    // Without one block tensor the load fails naming it.
    let mut tensors = StateDict::read(&path, &Device::Cpu).unwrap().into_tensors();
    tensors.remove("_blocks.7._bn1.running_var");
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("lite0_cut.safetensors");
    StateDict::from_tensors("x", tensors)
        .save_safetensors(&cut, "")
        .unwrap();
    let err = EfficientNetLite0::from_file(&cut, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, BackboneError::MissingKey { key, expected, .. } if key == "_blocks.7._bn1.running_var" && expected == &[480]),
        "{err}"
    );
}

// --- Full-model loads in every layout, checked against the VarBuilder path.

/// (name, shape) pairs in the order a model asked for them.
type Asked = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>;

/// A candle backend serving the parity formula weights and recording every (name, shape) asked.
#[derive(Clone)]
struct Recording {
    inner: std::sync::Arc<parity::FormulaWeights>,
    asked: Asked,
}

impl candle_nn::var_builder::SimpleBackend for Recording {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.asked
            .lock()
            .unwrap()
            .push((name.to_string(), s.dims().to_vec()));
        self.inner
            .tensor(name, s.dims())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)?
            .to_device(dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn full_resnet50_in_every_layout_matches_the_var_builder_model() {
    use backbone::{Backbone, ResNetConfig, Weights};
    let rec = Recording {
        inner: std::sync::Arc::new(parity::FormulaWeights::with_calibration().unwrap()),
        asked: Default::default(),
    };
    let vb = candle_nn::VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    let reference_model =
        ResNet50::new(&ResNetConfig::r50(), Weights::from_var_builder(vb)).unwrap();
    let asked = rec.asked.lock().unwrap().clone();
    // The model asks for exactly the tensors of the name table, in forward order.
    let asked_names: Vec<&str> = asked.iter().map(|(n, _)| n.as_str()).collect();
    let table: Vec<&str> = resnet50_official_names()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(asked_names, table);

    let x = Tensor::randn(0f32, 1f32, (1, 3, 64, 96), &Device::Cpu).unwrap();
    let reference = reference_model.forward(&x).unwrap();
    let dir = tempfile::tempdir().unwrap();
    type Rename = fn(&str) -> String;
    let layouts: [(&str, Rename); 3] = [
        ("torchvision", |n| official_to_torchvision(n).unwrap()),
        ("official_checkpoint", |n| format!("backbone.{n}")),
        ("own", |n| n.to_string()),
    ];
    for (layout, rename) in layouts {
        let mut tensors: HashMap<String, Tensor> = asked
            .iter()
            .map(|(n, s)| (rename(n), rec.inner.tensor(n, s).unwrap()))
            .collect();
        // Extras every real file of that layout has, which the loader must skip.
        let extra = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        tensors.insert(
            if layout == "torchvision" {
                "fc.bias".into()
            } else {
                "sem_seg_head.x".into()
            },
            extra,
        );
        let path = dir.path().join(format!("{layout}.safetensors"));
        StateDict::from_tensors("x", tensors)
            .save_safetensors(&path, "")
            .unwrap();
        let model = ResNet50::from_file(&path, &Device::Cpu).unwrap();
        let f = model.forward(&x).unwrap();
        for (ours, r) in f.as_array().iter().zip(reference.as_array()) {
            assert_eq!(parity::max_abs_diff(ours, r).unwrap().0, 0.0, "{layout}");
        }
    }
}

#[test]
fn var_builder_errors_name_the_key() {
    use backbone::{ResNetConfig, Weights};
    let vb = candle_nn::VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
    let err = ResNet50::new(
        &ResNetConfig::r50(),
        Weights::from_var_builder(vb.pp("backbone")),
    )
    .unwrap_err();
    match &err {
        BackboneError::VarBuilder { key, expected, .. } => {
            assert_eq!(key, "backbone.stem.conv1.weight");
            assert_eq!(expected, &[64, 3, 7, 7]);
        }
        other => panic!("expected a VarBuilder error, got {other}"),
    }
}

#[test]
fn synthetic_models_give_finite_features() {
    use backbone::Backbone;
    let x = Tensor::randn(0f32, 1f32, (1, 3, 96, 64), &Device::Cpu).unwrap();
    let models: [Box<dyn Backbone>; 2] = [
        Box::new(ResNet50::synthetic(3, &Device::Cpu).unwrap()),
        Box::new(EfficientNetLite0::synthetic(3, &Device::Cpu).unwrap()),
    ];
    for m in models {
        for t in m.forward(&x).unwrap().as_array() {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0),
                "{:?}",
                m.feature_names()
            );
        }
    }
}

/// `ResNet50::save_synthetic` writes a file that loads as the same model (the same res5 on an
/// input), leaves no temporary file behind, and names the file when it cannot write.
#[test]
fn the_synthetic_resnet_file_loads_as_the_synthetic_model() {
    use backbone::Backbone;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet50-seeded.safetensors");
    ResNet50::save_synthetic(3, &path).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("resnet50-seeded.safetensors")]);
    let x = (Tensor::arange(0f32, (3 * 64 * 64) as f32, &Device::Cpu).unwrap() * 0.01).unwrap().sin().unwrap().reshape((1, 3, 64, 64)).unwrap();
    let loaded = ResNet50::from_file(&path, &Device::Cpu).unwrap().forward(&x).unwrap();
    let drawn = ResNet50::synthetic(3, &Device::Cpu).unwrap().forward(&x).unwrap();
    assert_exact("res5", &loaded.res5, &drawn.res5);
    let e = ResNet50::save_synthetic(3, &dir.path().join("missing/sub/r50.safetensors")).unwrap_err().to_string();
    assert!(e.contains("missing/sub/r50"), "{e}");
}
