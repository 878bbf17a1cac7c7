//! `--config FILE` for every command: a JSON object of option values, expanded in front of the
//! command line so that options given on the command line override the file.
//!
//! ```json
//! { "data": "VOC2012", "fold": 1, "preset": "paper", "iters": 20000, "no_co_loss": true }
//! ```
//!
//! Keys are the long option names (`backbone_weights` or `backbone-weights`); `true` turns a
//! switch on, `false` leaves it off; arrays repeat the option. Training commands write the
//! resolved configuration next to their outputs, so a run can be repeated with `--config`.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// `argv` with `--config FILE` (or `--config=FILE`) replaced by the file's options, placed right
/// after the subcommand name so the remaining command-line options win.
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut rest = Vec::with_capacity(argv.len());
    let mut file = None;
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        if s == "--config" {
            file = Some(it.next().context("--config needs a file")?);
        } else if let Some(f) = s.strip_prefix("--config=") {
            file = Some(OsString::from(f));
        } else {
            rest.push(a);
        }
    }
    let Some(file) = file else { return Ok(rest) };
    let options = options_from_file(Path::new(&file))?;
    // argv[0] is the program and argv[1] the subcommand.
    if rest.len() < 2 {
        bail!("--config needs a command before it, e.g. `cargo xtask train-pos --config run.json`");
    }
    let mut out: Vec<OsString> = rest.drain(..2).collect();
    out.extend(options);
    out.extend(rest);
    Ok(out)
}

fn options_from_file(path: &Path) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let obj = v.as_object().with_context(|| format!("{}: expected a JSON object of options", path.display()))?;
    let mut out = Vec::new();
    for (k, v) in obj {
        let flag = format!("--{}", k.replace('_', "-"));
        let mut push = |v: &serde_json::Value| -> Result<()> {
            match v {
                serde_json::Value::Bool(true) => out.push(OsString::from(&flag)),
                serde_json::Value::Bool(false) | serde_json::Value::Null => {}
                serde_json::Value::String(s) => out.extend([OsString::from(&flag), OsString::from(s)]),
                serde_json::Value::Number(n) => out.extend([OsString::from(&flag), OsString::from(n.to_string())]),
                other => bail!("{}: option `{k}` has an unsupported value {other}", path.display()),
            }
            Ok(())
        };
        match v {
            serde_json::Value::Array(items) => items.iter().try_for_each(&mut push)?,
            v => push(v)?,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_options_come_before_the_command_line_ones() {
        let dir = std::env::temp_dir().join(format!("xtask-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("run.json");
        std::fs::write(&f, r#"{"fold": 2, "backbone_weights": "r50.pth", "no_co_loss": true, "dry_run": false, "shots": [1, 5]}"#).unwrap();
        let got = expand(os(&["xtask", "train-mm", "--iters", "9", "--config", f.to_str().unwrap(), "--fold", "3"])).unwrap();
        let got: Vec<String> = got.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(&got[..2], ["xtask", "train-mm"]);
        let pos = |s: &str| got.iter().rposition(|g| g == s).unwrap();
        assert!(got.contains(&"--backbone-weights".to_string()) && got.contains(&"r50.pth".to_string()));
        assert!(got.contains(&"--no-co-loss".to_string()));
        assert!(!got.contains(&"--dry-run".to_string()));
        assert_eq!(got.iter().filter(|g| *g == "--shots").count(), 2);
        // The command line's --fold 3 comes last, so it wins with args_override_self.
        assert_eq!(got[pos("--fold") + 1], "3");
        let err = expand(os(&["xtask", "train-pos", "--config", "/nonexistent.json"])).unwrap_err().to_string();
        assert!(err.contains("/nonexistent.json"), "{err}");
        std::fs::write(&f, "[1]").unwrap();
        let err = expand(os(&["xtask", "train-pos", "--config", f.to_str().unwrap()])).unwrap_err().to_string();
        assert!(err.contains("JSON object"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_line_overrides_the_file_through_clap() {
        use clap::Parser;
        #[derive(clap::Parser)]
        #[command(args_override_self = true)]
        struct T {
            #[arg(long, default_value_t = 0)]
            fold: usize,
        }
        let t = T::try_parse_from(os(&["t", "--fold", "2", "--fold", "3"])).unwrap();
        assert_eq!(t.fold, 3);
    }
}
