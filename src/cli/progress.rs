//! Progress bars on stderr for the commands that can run long (sweep points, a step's kernel
//! runs), drawn with `indicatif`.
//!
//! A bar stays hidden for its first second and is never drawn when stderr is not a terminal, so
//! quick runs, pipes, files and tests see nothing of it; stdout (tables, reports) never does.
//!
//! Key design decision: the bar is created hidden and a watcher thread shows it after
//! [`DELAY`] unless the work finished first; the work itself only counts (`inc`, `set_message`),
//! whatever the bar's state.

use std::io::IsTerminal;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long work runs before its bar appears.
pub const DELAY: Duration = Duration::from_secs(1);

/// A progress bar on stderr (see the module doc). Finished when dropped.
pub struct Progress {
    bar: ProgressBar,
    done: Arc<(Mutex<bool>, Condvar)>,
    watcher: Option<JoinHandle<()>>,
}

impl Progress {
    /// A bar counting to `len` (`None`: a counter with no end) of `what` (e.g. "sparsities").
    pub fn new(len: Option<u64>, what: &str) -> Self {
        let template = match len {
            Some(_) => format!("{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed}}] {{msg}}"),
            None => format!("{{spinner}} {{pos}} {what} [{{elapsed}}] {{msg}}"),
        };
        let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let watcher = std::io::stderr()
            .is_terminal()
            .then(|| show_later(bar.clone(), Arc::clone(&done)));
        Progress { bar, done, watcher }
    }

    /// One more item done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// What is running now.
    pub fn set_message(&self, message: String) {
        self.bar.set_message(message);
    }

    fn finish(&mut self) {
        let (lock, wake) = &*self.done;
        if let Ok(mut done) = lock.lock() {
            *done = true;
        }
        wake.notify_all();
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Shows `bar` on stderr after [`DELAY`] unless `done` is set first.
fn show_later(bar: ProgressBar, done: Arc<(Mutex<bool>, Condvar)>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (lock, wake) = &*done;
        let Ok(guard) = lock.lock() else {
            return;
        };
        let Ok((guard, _)) = wake.wait_timeout_while(guard, DELAY, |done| !*done) else {
            return;
        };
        if !*guard {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quick_bar_counts_and_finishes_hidden() {
        let bar = Progress::new(Some(3), "points");
        bar.inc();
        bar.inc();
        bar.set_message("s = 0.5".into());
        assert_eq!(bar.bar.position(), 2);
        // Not a terminal under the test harness (or finished within the delay): never drawn.
        assert!(bar.bar.is_hidden());
        drop(bar);
    }
}
