//! Progress of training work on stderr: a bar on a terminal; one plain line per step
//! otherwise (a log file, a pipe, a batch job), so that a long run is never silent.
use indicatif::{ProgressBar, ProgressStyle};
use rankstab_train::trainer::StepProgress;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Steps done out of a total, with the training throughput and the time left.
pub(crate) struct Progress {
    /// The bar, on a terminal.
    bar: Option<ProgressBar>,
    /// "train" or "sweep".
    label: &'static str,
    total: u64,
    done: u64,
    /// Steps counted as done without being run here (finished cells, a resumed run):
    /// they do not enter the rate.
    skipped: u64,
    tokens: u64,
    busy: Duration,
    start: Instant,
}

impl Progress {
    /// Progress over `total` steps.
    pub(crate) fn new(label: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let pb = ProgressBar::new(total);
            pb.set_style(
                ProgressStyle::with_template(&format!(
                    "{{spinner}} {label} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} steps (eta {{eta}}) {{msg}}"
                ))
                .expect("valid template"),
            );
            pb
        });
        Self {
            bar,
            label,
            total,
            done: 0,
            skipped: 0,
            tokens: 0,
            busy: Duration::ZERO,
            start: Instant::now(),
        }
    }

    /// A status message ("loading MODEL", ...): the bar's message, or a line.
    pub(crate) fn message(&self, msg: &str) {
        match &self.bar {
            Some(pb) => pb.set_message(msg.to_string()),
            None => eprintln!("{}: {msg}", self.label),
        }
    }

    /// A line of output (stdout) that does not tear the bar.
    pub(crate) fn println(&self, line: &str) {
        match &self.bar {
            Some(pb) => pb.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// Counts `n` steps as done without running them (a finished cell, a resumed run).
    pub(crate) fn skip(&mut self, n: u64) {
        self.done += n;
        self.skipped += n;
        if let Some(pb) = &self.bar {
            pb.set_position(self.done);
        }
    }

    /// Tokens per second over the steps run here.
    fn rate(&self) -> f64 {
        self.tokens as f64 / self.busy.as_secs_f64().max(1e-9)
    }

    /// Seconds left at the rate of the steps run here (None before the first one).
    fn eta(&self) -> Option<f64> {
        let run = self.done - self.skipped;
        (run > 0).then(|| {
            let per_step = self.start.elapsed().as_secs_f64() / run as f64;
            per_step * self.total.saturating_sub(self.done) as f64
        })
    }

    /// One step finished; `what` names the run (a sweep's cell) or is empty.
    pub(crate) fn step(&mut self, what: &str, p: &StepProgress<'_>) {
        if self.done == self.skipped {
            // The first step run here: time from now on, not from the model's loading.
            self.start = Instant::now()
                .checked_sub(Duration::from_secs_f64(p.seconds))
                .unwrap_or_else(Instant::now);
        }
        self.done += 1;
        self.tokens += p.tokens as u64;
        self.busy += Duration::from_secs_f64(p.seconds);
        let heldout = p.heldout.map_or(String::new(), |h| {
            format!(", held-out loss {h:.4} (perplexity {:.3})", h.exp())
        });
        let who = if what.is_empty() {
            String::new()
        } else {
            format!("{what} ")
        };
        match &self.bar {
            Some(pb) => {
                pb.set_position(self.done);
                pb.set_message(format!(
                    "{who}loss {:.4}, {:.0} tokens/s{heldout}",
                    p.loss,
                    self.rate()
                ));
            }
            None => eprintln!(
                "{}: {who}step {}/{} loss {:.4}, {:.0} tokens/s, {:.2} s/step{heldout}; {}/{} steps, eta {}",
                self.label,
                p.step + 1,
                p.steps,
                p.loss,
                p.tokens as f64 / p.seconds.max(1e-9),
                p.seconds,
                self.done,
                self.total,
                self.eta().map_or("?".to_string(), clock),
            ),
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}

/// Seconds as h:mm:ss or m:ss.
fn clock(s: f64) -> String {
    let s = s.round().max(0.0) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_as_a_clock() {
        assert_eq!(clock(5.4), "0:05");
        assert_eq!(clock(65.0), "1:05");
        assert_eq!(clock(3725.0), "1:02:05");
    }

    #[test]
    fn the_rate_counts_only_steps_run_here() {
        let mut p = Progress::new("train", 10);
        p.skip(4);
        let s = StepProgress {
            step: 4,
            steps: 10,
            loss: 1.0,
            tokens: 200,
            seconds: 0.5,
            heldout: None,
            metrics: &[],
            moments: &[],
            times: Default::default(),
        };
        p.step("", &s);
        p.step("", &s);
        assert!((p.rate() - 400.0).abs() < 1e-6, "{}", p.rate());
        assert_eq!(p.done, 6);
        let eta = p.eta().expect("two steps run");
        assert!(eta > 0.0 && eta.is_finite());
    }
}
