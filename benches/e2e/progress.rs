//! The progress display: one line per step with its result and time, and on a terminal a live
//! line with what the running step is doing.
//!
//! Written here rather than with indicatif: the lines per step are what a CI log keeps, and
//! indicatif writes nothing when stderr is not a terminal (its `println` is a no-op on a hidden
//! bar), so they would be written by hand anyway; what is left is one redrawn line.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    tty: bool,
    total: usize,
    state: Mutex<State>,
    started: Instant,
}

struct State {
    step: usize,
    label: String,
    step_started: Instant,
    last_update: Instant,
}

impl Progress {
    /// A display for `total` steps.
    pub fn new(total: usize) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            total,
            state: Mutex::new(State {
                step: 0,
                label: String::new(),
                step_started: Instant::now(),
                last_update: Instant::now(),
            }),
            started: Instant::now(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the next step.
    pub fn step(&self, label: &str) {
        let mut s = self.state();
        s.step += 1;
        s.label = label.to_owned();
        s.step_started = Instant::now();
        let line = format!("[{:>2}/{}] {label} ...", s.step, self.total);
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    }

    /// What the running step is doing now (shown on a terminal, at most ten times a second).
    pub fn update(&self, detail: &str) {
        let mut s = self.state();
        if !self.tty || s.last_update.elapsed() < Duration::from_millis(100) {
            return;
        }
        s.last_update = Instant::now();
        eprint!(
            "\r\x1b[2K[{:>2}/{}] {}: {detail} ({:.0} s)",
            s.step,
            self.total,
            s.label,
            s.step_started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
    }

    /// Runs `f` as the next step, ending it with what `result` says of its value.
    pub fn timed<T>(
        &self,
        label: &str,
        f: impl FnOnce() -> T,
        result: impl FnOnce(&T) -> String,
    ) -> T {
        self.step(label);
        let value = f();
        self.done(&result(&value));
        value
    }

    /// Ends the running step with its result.
    pub fn done(&self, result: &str) {
        let s = self.state();
        let line = format!(
            "[{:>2}/{}] {}: {result} ({:.1} s; {:.0} s in all)",
            s.step,
            self.total,
            s.label,
            s.step_started.elapsed().as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        );
        if self.tty {
            eprintln!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}
