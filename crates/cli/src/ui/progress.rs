//! An indicatif progress bar as a training [`Observer`]: loss, learning rate, tokens/s, ETA.
//! When stderr is not a terminal (a log file, CI, nohup, a cluster job) the bar draws nothing,
//! so a plain line with the same fields is printed every [`PLAIN_EVERY`] seconds instead.
//! Ctrl-C sets a flag that makes the next `step` return `Break`, so the loop checkpoints and
//! stops cleanly.
//!
//! With [`TrainProgress::with_metrics`] every row of the log is also appended to
//! `metrics.jsonl` and flushed at once, so a killed run keeps its history and the file can be
//! followed live; a resumed run first cuts the file back to the checkpoint's step, so no step
//! appears twice.
use bayeslora::run::Hooks;
use bayeslora::train::{Observer, StepInfo};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Set by the Ctrl-C handler; checked after every optimizer step.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let first = std::sync::OnceLock::<Instant>::new();
        // If a handler is already installed (tests), keep going without one.
        let _ = ctrlc::set_handler(move || {
            let since = first.get_or_init(Instant::now).elapsed();
            if !f.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)");
                return;
            }
            // The same interrupt delivered twice: Ctrl-C in a terminal signals the whole
            // foreground process group, and a wrapper such as `timeout` forwards it to its child
            // as well, 0.1 ms apart (measured). Only a later second Ctrl-C means "abort".
            if since <= DOUBLE_SIGNAL {
                return;
            }
            // `_exit`, not `exit`: exit's handlers tear the CUDA driver down while the main
            // thread may be inside a CUDA call, which then fails with CUDA_ERROR_DEINITIALIZED
            // and prints a spurious error. Nothing is lost: checkpoints and results are written
            // to a temporary file and renamed.
            eprintln!("\ninterrupt: aborted (the last checkpoint is kept)");
            // SAFETY: _exit ends the process at once; no Rust state is used afterwards.
            unsafe { libc::_exit(130) };
        });
        flag
    })
    .clone()
}

/// A second interrupt within this time of the first is the same interrupt delivered twice.
const DOUBLE_SIGNAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Seconds between two plain progress lines when stderr is not a terminal.
pub const PLAIN_EVERY: f64 = 10.0;

/// Renders training progress; keeps the per-step log for the metrics JSONL.
pub struct TrainProgress {
    bar: ProgressBar,
    /// Plain lines instead of the bar (stderr is not a terminal); time of the last line.
    plain: Option<Instant>,
    total_steps: usize,
    label: String,
    started: Instant,
    tokens: usize,
    loss_ema: Option<f32>,
    interrupt: Arc<AtomicBool>,
    /// One JSON object per step (step, loss, lr, tokens, seconds), for `metrics.jsonl`.
    pub log: Vec<serde_json::Value>,
    /// (step, accuracy, nll) of the periodic evaluations.
    pub evals: Vec<(usize, f64, f64)>,
    /// `metrics.jsonl` and whether the run resumes; opened at `begin`, rows before it wait.
    metrics: Option<(PathBuf, bool)>,
    file: Option<std::fs::File>,
}

impl TrainProgress {
    pub fn new(label: &str) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30.cyan/blue}] {pos}/{len} steps | {msg} | {elapsed_precise} < {eta_precise}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        let plain = (!std::io::IsTerminal::is_terminal(&std::io::stderr())).then(Instant::now);
        TrainProgress {
            bar,
            plain,
            total_steps: 0,
            label: label.into(),
            started: Instant::now(),
            tokens: 0,
            loss_ema: None,
            interrupt: interrupt_flag(),
            log: Vec::new(),
            evals: Vec::new(),
            metrics: None,
            file: None,
        }
    }

    /// Also appends every row to `path` (flushed per row). A fresh run (`resume` false) starts
    /// the file empty; a resumed one keeps the rows up to the step it resumes from.
    pub fn with_metrics(mut self, path: &Path, resume: bool) -> Self {
        self.metrics = Some((path.to_path_buf(), resume));
        self
    }

    /// Logs one row, and writes it through when the metrics file is open.
    fn record(&mut self, row: serde_json::Value) {
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = writeln!(f, "{row}").and_then(|()| f.flush()) {
                let path = self.metrics.as_ref().map(|(p, _)| p.display().to_string()).unwrap_or_default();
                eprintln!("warning: {path}: {e}; training goes on without writing metrics");
                self.file = None;
            }
        }
        self.log.push(row);
    }

    /// Opens the metrics file at the start of training (`start_step`: where it resumes) and
    /// writes the rows logged so far (notes before the first step).
    fn open_metrics(&mut self, start_step: usize) {
        let Some((path, resume)) = self.metrics.clone() else {
            return;
        };
        let opened = if resume {
            truncate_after_step(&path, start_step)
                .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(&path))
        } else {
            std::fs::File::create(&path)
        };
        match opened {
            Ok(mut f) => {
                let pending: String = self.log.iter().map(|r| format!("{r}\n")).collect();
                match f.write_all(pending.as_bytes()).and_then(|()| f.flush()) {
                    Ok(()) => self.file = Some(f),
                    Err(e) => eprintln!("warning: {}: {e}; training goes on without writing metrics", path.display()),
                }
            }
            Err(e) => eprintln!("warning: {}: {e}; training goes on without writing metrics", path.display()),
        }
    }
}

/// Cuts `metrics.jsonl` before its first row of a step after `step`, and before a torn or
/// unreadable last line (a kill in the middle of a write). Rows without a step (notes) before
/// that point stay. A missing file is fine.
pub fn truncate_after_step(path: &Path, step: usize) -> std::io::Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut keep = 0;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        let Ok(row) = serde_json::from_slice::<serde_json::Value>(line) else {
            break;
        };
        if row.get("step").and_then(serde_json::Value::as_u64).is_some_and(|s| s > step as u64) {
            break;
        }
        keep += line.len();
    }
    if keep < bytes.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
        f.sync_all()?;
    }
    Ok(())
}

impl TrainProgress {
    /// A line above the bar, or on its own line when there is no bar.
    fn say(&self, line: String) {
        if self.plain.is_some() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Observer for TrainProgress {
    fn begin(&mut self, total_steps: usize, start_step: usize) {
        self.bar.set_length(total_steps as u64);
        self.total_steps = total_steps;
        if self.plain.is_some() {
            eprintln!("{}: training {total_steps} steps (from step {start_step})", self.label);
        }
        self.bar.set_position(start_step as u64);
        self.bar.reset_eta();
        self.started = Instant::now();
        self.open_metrics(start_step);
    }

    fn step(&mut self, info: &StepInfo) -> ControlFlow<()> {
        crate::oom::STEPS_DONE.store(info.step, std::sync::atomic::Ordering::Relaxed);
        self.tokens += info.tokens;
        let ema = match self.loss_ema {
            Some(e) => 0.9 * e + 0.1 * info.loss,
            None => info.loss,
        };
        self.loss_ema = Some(ema);
        let tok_s = self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_position(info.step as u64);
        self.bar.set_message(format!("loss {ema:.4} | lr {:.2e} | {tok_s:.0} tok/s", info.lr));
        if let Some(last) = self.plain.as_mut() {
            if last.elapsed().as_secs_f64() >= PLAIN_EVERY || info.step == self.total_steps {
                *last = Instant::now();
                let secs = self.started.elapsed().as_secs_f64();
                let done = info.step.max(1) as f64;
                let eta = secs / done * (self.total_steps as f64 - done).max(0.0);
                eprintln!(
                    "{}: step {}/{} loss {ema:.4} lr {:.2e} {tok_s:.0} tok/s elapsed {secs:.0} s eta {eta:.0} s",
                    self.label, info.step, self.total_steps, info.lr
                );
            }
        }
        self.record(serde_json::json!({
            "run": self.label, "step": info.step, "loss": info.loss, "lr": info.lr,
            "tokens": info.tokens, "seconds": info.seconds,
        }));
        if self.interrupt.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn eval(&mut self, step: usize, accuracy: f64, nll: f64) {
        self.evals.push((step, accuracy, nll));
        self.record(serde_json::json!({ "run": self.label, "step": step, "eval_acc": accuracy, "eval_nll": nll }));
        self.say(format!("{:>10} step {step}: eval acc {:.2}% nll {nll:.4}", self.label, 100.0 * accuracy));
    }

    fn note(&mut self, message: &str) {
        self.say(format!("note: {message}"));
        self.record(serde_json::json!({ "run": self.label, "note": message }));
    }

    fn checkpoint(&mut self, step: usize, dir: &std::path::Path) {
        tracing::debug!(step, dir = %dir.display(), "checkpoint written");
    }

    fn finish(&mut self) {
        self.bar.finish_with_message(format!(
            "loss {:.4} | {:.0} tok/s",
            self.loss_ema.unwrap_or(f32::NAN),
            self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
        ));
    }
}

/// A bar for evaluation passes (examples/s).
pub fn eval_bar(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:30.green/blue}] {pos}/{len} {msg} | {per_sec} | {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// The library run's [`Hooks`] on a terminal: notes on stderr, training as a [`TrainProgress`]
/// bar writing the run's `metrics.jsonl`, the final evaluation as an [`eval_bar`].
#[derive(Default)]
pub struct Terminal {
    eval: Option<ProgressBar>,
    /// A compare sweep's terminal: its evaluation bars carry no message (`commands/compare.rs`
    /// adds the sweep's hooks).
    sweep: bool,
}

impl Terminal {
    /// The hooks of a compare sweep.
    pub fn for_sweep() -> Self {
        Terminal { eval: None, sweep: true }
    }
}

impl Hooks for Terminal {
    fn note(&mut self, line: &str) {
        eprintln!("{line}");
    }

    fn observer(&mut self, label: &str, metrics: &Path, resume: bool) -> Box<dyn Observer> {
        Box::new(TrainProgress::new(label).with_metrics(metrics, resume))
    }

    fn eval_begin(&mut self, label: &str, passes: usize) {
        let bar = eval_bar(label, passes as u64);
        if !self.sweep {
            bar.set_message("evaluating (mean, then posterior samples)");
        }
        self.eval = Some(bar);
    }

    fn eval_end(&mut self) {
        if let Some(bar) = self.eval.take() {
            bar.finish_and_clear();
        }
    }
}
