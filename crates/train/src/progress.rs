//! How long jobs report progress without drawing anything themselves: library code calls a
//! [`Progress`]; a command line draws bars from it, a program may log or ignore it.

/// Progress of one job at a time (a training run, a cache split, an evaluation).
pub trait Progress: Sync {
    /// A job of `total` steps starts, `done` of them already finished (a resumed run).
    fn start(&self, _label: &str, _total: u64, _done: u64) {}
    /// `done` steps are finished; `message` describes the latest (e.g. the loss).
    fn advance(&self, _done: u64, _message: &str) {}
    /// A line worth showing a person (an evaluation result, a resume), not a step.
    fn note(&self, _line: &str) {}
    /// The job ended.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Progress for Silent {}

/// Prints notes to standard error and nothing else (tests, scripts).
#[derive(Clone, Copy, Debug, Default)]
pub struct NotesToStderr;

impl Progress for NotesToStderr {
    fn note(&self, line: &str) {
        eprintln!("{line}");
    }
}
