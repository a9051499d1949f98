//! Signs of life for long one-off runs: progress on standard error, on a terminal only.
//!
//! A one-off clean-up of a large backlog reads a million rows, lists a hundred thousand objects
//! and writes thousands of batches; on a terminal the operator sees each phase's counts and
//! rates (indicatif). Nothing is drawn when standard error is not a terminal (`kubectl logs`,
//! CI logs, `2> sweep.log`) or with `--output json`, so scripts and the summary stay clean.
//! The sweep reports through [`SweepProgress`]; this module is its only terminal rendering.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::snapshot::BackendKind;

/// What a sweep reports while it runs. Every method has an empty default.
pub trait SweepProgress: Send + Sync {
    /// Rows read from the database so far.
    fn rows_read(&self, _total: u64) {}
    /// Every row is read: `total` in all.
    fn rows_done(&self, total: u64) {
        self.rows_read(total);
    }
    /// One more page of a backend's listing, with the objects on it.
    fn page_listed(&self, _backend: BackendKind, _objects: u64) {}
    /// One more orphan's absence settled (confirmed or not), of `of`.
    fn confirmed(&self, _done: u64, _of: u64) {}
    /// One more batch written, with the rows it changed, of `of` rows planned.
    fn batch_applied(&self, _rows: u64, _of: u64) {}
    /// The run is over: clear the display.
    fn finish(&self) {}
}

/// Whether progress should be drawn: a text summary and a terminal on standard error.
pub fn wanted(json_output: bool, stderr_is_terminal: bool) -> bool {
    !json_output && stderr_is_terminal
}

/// Progress bars on standard error (drawn only when it is a terminal).
pub struct TerminalProgress {
    bars: MultiProgress,
    rows: ProgressBar,
    listings: Mutex<Vec<(BackendKind, ProgressBar)>>,
    confirm: ProgressBar,
    apply: ProgressBar,
}

fn spinner(bars: &MultiProgress, template: &str) -> ProgressBar {
    let bar = bars.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar
}

impl TerminalProgress {
    pub fn new() -> TerminalProgress {
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let rows = spinner(&bars, "{spinner} rows read: {pos} ({per_sec}) {elapsed}");
        rows.enable_steady_tick(Duration::from_millis(200));
        let confirm = spinner(
            &bars,
            "{spinner} orphans confirmed: {pos}/{len} ({per_sec})",
        );
        let apply = spinner(
            &bars,
            "{spinner} rows downgraded: {pos}/{len} ({per_sec}) {msg}",
        );
        TerminalProgress {
            bars,
            rows,
            listings: Mutex::new(Vec::new()),
            confirm,
            apply,
        }
    }

    /// A progress line that `undo` shows while its statement runs.
    pub fn undo() -> ProgressBar {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} restoring from the audit records… {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

impl Default for TerminalProgress {
    fn default() -> Self {
        TerminalProgress::new()
    }
}

impl SweepProgress for TerminalProgress {
    fn rows_read(&self, total: u64) {
        self.rows.set_position(total);
    }

    /// Drawn whatever the draw rate allows: a small table is read between two ticks, and its
    /// line would otherwise never show before the display is cleared.
    fn rows_done(&self, total: u64) {
        self.rows.set_position(total);
        self.rows.finish();
    }

    fn page_listed(&self, backend: BackendKind, objects: u64) {
        let Ok(mut listings) = self.listings.lock() else {
            return;
        };
        let bar = match listings.iter().find(|(k, _)| *k == backend) {
            Some((_, bar)) => bar.clone(),
            None => {
                let bar = spinner(
                    &self.bars,
                    &format!("{{spinner}} {backend} listed: {{pos}} objects, {{msg}} pages ({{per_sec}})"),
                );
                listings.push((backend, bar.clone()));
                bar
            }
        };
        bar.inc(objects);
        let pages = bar.message().parse::<u64>().unwrap_or(0) + 1;
        bar.set_message(pages.to_string());
    }

    fn confirmed(&self, done: u64, of: u64) {
        self.confirm.set_length(of);
        self.confirm.set_position(done);
    }

    fn batch_applied(&self, rows: u64, of: u64) {
        self.apply.set_length(of);
        self.apply.inc(rows);
        let batches = self
            .apply
            .message()
            .split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        self.apply
            .set_message(format!("{} batches", batches.unwrap_or(0) + 1));
    }

    fn finish(&self) {
        let _ = self.bars.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_only_for_text_on_a_terminal() {
        assert!(wanted(false, true));
        assert!(!wanted(true, true));
        assert!(!wanted(false, false));
    }
}
