//! A one-line progress bar on stderr, drawn only when stderr is a terminal (so logs and
//! pipes stay clean).

use std::io::{IsTerminal, Write};
use std::time::Instant;

const BAR_WIDTH: usize = 24;

pub struct Progress {
    enabled: bool,
    start: Instant,
}

impl Progress {
    pub fn new() -> Self {
        Self { enabled: std::io::stderr().is_terminal(), start: Instant::now() }
    }

    /// Redraws the bar: `done` of `total` finished, `what` under way.
    pub fn show(&self, done: usize, total: usize, what: &str) {
        if !self.enabled {
            return;
        }
        let filled = BAR_WIDTH * done / total.max(1);
        let bar = "#".repeat(filled) + &"-".repeat(BAR_WIDTH - filled);
        let elapsed = self.start.elapsed().as_secs();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K[{bar}] {done}/{total} {elapsed} s  {what}");
        let _ = err.flush();
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
