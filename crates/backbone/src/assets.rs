//! Where fetched assets (`cargo xtask fetch-assets`) live.

use std::path::{Path, PathBuf};

/// File name of the EfficientNet-Lite0 ImageNet weights (legacy torch pickle).
pub const EFFICIENTNET_LITE0_FILE: &str = "efficientnet-lite0-57934424.pth";

/// `$MMFORMER_ASSETS` when set, else `<workspace>/target/assets`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("MMFORMER_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/assets"),
    }
}

/// The EfficientNet-Lite0 weight file in [`assets_dir`] (which may not exist yet).
pub fn efficientnet_lite0_path() -> PathBuf {
    assets_dir().join(EFFICIENTNET_LITE0_FILE)
}
