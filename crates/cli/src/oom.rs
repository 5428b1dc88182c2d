//! GPU out-of-memory errors, explained. candle reports a failed CUDA allocation as cudarc's
//! `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`, without the size or the step. The
//! binary turns that text into one message saying what was requested (when the text says),
//! what the device has, at which step, and what to try. [`explain`] is a pure function of the
//! error text and an [`OomContext`], so it is tested here without a GPU.
use std::sync::atomic::{AtomicUsize, Ordering};

/// Steps finished so far by the current run (set by the progress observer); the failing step is
/// the next one. 0: none yet (loading or the first step).
pub static STEPS_DONE: AtomicUsize = AtomicUsize::new(0);

/// What the binary knows when an error reaches `main`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OomContext {
    /// Steps finished before the failure (`None`: not training).
    pub steps_done: Option<usize>,
    /// Device memory `(total, used)` in bytes, when it could be read.
    pub device: Option<(u64, u64)>,
}

/// Whether an error chain's text is a GPU out-of-memory error.
pub fn is_oom(text: &str) -> bool {
    text.contains("CUDA_ERROR_OUT_OF_MEMORY")
        || text.contains("CUBLAS_STATUS_ALLOC_FAILED")
        || (text.to_ascii_lowercase().contains("out of memory") && text.to_ascii_lowercase().contains("cuda"))
}

/// The allocation size named in the text, if any (`… 123456 bytes …`).
pub fn requested_bytes(text: &str) -> Option<u64> {
    let words: Vec<&str> = text.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')').collect();
    words.windows(2).find(|w| w[1].starts_with("bytes")).and_then(|w| w[0].parse().ok())
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The message for an out-of-memory error, or `None` when `text` is another error.
pub fn explain(text: &str, ctx: &OomContext) -> Option<String> {
    if !is_oom(text) {
        return None;
    }
    let mut what = String::from("the GPU ran out of memory");
    if let Some(n) = requested_bytes(text) {
        what.push_str(&format!(" allocating {}", gib(n)));
    }
    match ctx.steps_done {
        Some(done) => what.push_str(&format!(" at step {}", done + 1)),
        None => what.push_str(" while loading"),
    }
    if let Some((total, used)) = ctx.device {
        what.push_str(&format!(" (device: {} total, {} in use)", gib(total), gib(used)));
    }
    what.push_str(
        "; try --gradient-checkpointing, a smaller --batch-size (with --grad-accum to keep the effective \
         batch) or a smaller --max-len, or --dtype bf16",
    );
    Some(what)
}

/// `(total, used)` bytes of the first GPU from `nvidia-smi --query-gpu=memory.total,memory.used
/// --format=csv,noheader,nounits` output (MiB).
pub fn parse_nvidia_smi(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().next()?;
    let mut it = line.split(',').map(|v| v.trim().parse::<u64>().ok());
    let (total, used) = (it.next()??, it.next()??);
    Some((total << 20, used << 20))
}

/// Device memory read through nvidia-smi, if it is installed.
pub fn device_memory() -> Option<(u64, u64)> {
    let o = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total,memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout))
}

/// The context of an error in `main`: the step count recorded by the observer (`None` before
/// any step started) and the device's memory.
pub fn context() -> OomContext {
    let done = STEPS_DONE.load(Ordering::Relaxed);
    OomContext { steps_done: (done > 0).then_some(done), device: device_memory() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What candle 0.11 printed for a failed allocation on an H200 (issue #19).
    const REAL: &str = r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#;

    #[test]
    fn issue_19_cuda_oom_names_step_device_and_fixes() {
        let ctx = OomContext { steps_done: Some(11), device: Some((80 << 30, 79 << 30)) };
        let msg = explain(&format!("training: {REAL}"), &ctx).unwrap();
        assert!(msg.contains("out of memory at step 12"), "{msg}");
        assert!(msg.contains("80.0 GiB total, 79.0 GiB in use"), "{msg}");
        for fix in ["--gradient-checkpointing", "--batch-size", "--max-len"] {
            assert!(msg.contains(fix), "{msg}");
        }
        assert!(!msg.contains("DriverError") && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn oom_while_loading_and_with_a_size() {
        let msg = explain(&format!("{REAL} when allocating 3221225472 bytes"), &OomContext::default()).unwrap();
        assert!(msg.contains("allocating 3.0 GiB while loading"), "{msg}");
        assert!(!msg.contains("device:"), "{msg}");
        let msg = explain("CUBLAS_STATUS_ALLOC_FAILED", &OomContext::default()).unwrap();
        assert!(msg.contains("ran out of memory"), "{msg}");
    }

    #[test]
    fn other_errors_are_left_alone() {
        for text in [
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")",
            "model/config.json: No such file or directory (os error 2)",
            "memory allocation of 8 bytes failed",
        ] {
            assert_eq!(explain(text, &OomContext::default()), None, "{text}");
        }
    }

    #[test]
    fn nvidia_smi_output_is_parsed() {
        assert_eq!(parse_nvidia_smi("81559, 1024\n"), Some((81559 << 20, 1024 << 20)));
        assert_eq!(parse_nvidia_smi("[N/A], 3\n"), None);
        assert_eq!(parse_nvidia_smi(""), None);
    }
}
