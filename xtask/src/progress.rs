//! Progress bars for the library's [`mmformer::Progress`] reports.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// One bar per job (a training run, a cache split, an evaluation); notes print above it.
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    /// Remove a finished bar (cache, eval) or leave it as the job's last line (training).
    clear_when_done: bool,
}

impl Bars {
    pub fn new(clear_when_done: bool) -> Self {
        Self { bar: Mutex::new(None), clear_when_done }
    }
}

impl mmformer::Progress for Bars {
    fn start(&self, label: &str, total: u64, done: u64) {
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ({per_sec}, ETA {eta})")
                .expect("static template"),
        );
        pb.set_prefix(label.to_string());
        pb.set_position(done);
        *self.bar.lock().expect("bar lock") = Some(pb);
    }

    fn advance(&self, done: u64, message: &str) {
        if let Some(pb) = self.bar.lock().expect("bar lock").as_ref() {
            pb.set_position(done);
            pb.set_message(message.to_string());
        }
    }

    fn note(&self, line: &str) {
        match self.bar.lock().expect("bar lock").as_ref() {
            Some(pb) => pb.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(pb) = self.bar.lock().expect("bar lock").take() {
            if self.clear_when_done {
                pb.finish_and_clear();
            } else {
                pb.finish();
            }
        }
    }
}
