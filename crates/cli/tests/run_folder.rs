//! Issue 19 end to end on all-MiniLM-L6-v2 (skipped with a note when the asset is absent): a run
//! folder is not trained over by accident, metrics.jsonl survives kill -9 and holds each step
//! once after `--resume`, `eval RUN` works inside RUN from any folder, and a label out of range
//! is reported at load time.
mod common;
use common::{minilm, stderr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bayeslora"))
}

/// `train` flags of a tiny SST-2 run into `out`.
fn train_args(model: &Path, out: &Path, steps: usize) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--task", "sst2", "--train-limit", "48", "--eval-limit", "16"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(["--batch-size", "8", "--samples", "0", "--max-len", "32", "--optimizer", "adamw"].map(String::from));
    v.extend(["--max-steps".into(), steps.to_string(), "--model".into(), model.display().to_string()]);
    v.extend(["-o".into(), out.display().to_string()]);
    v
}

/// The `step` of every step row of metrics.jsonl, in order.
/// The steps logged in metrics.jsonl. A last line without its newline is skipped: a reader
/// polling the file while the run appends (or after a kill -9 mid-write) can see half a line.
fn steps(out: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every complete line is JSON"))
        .filter(|r| r.get("loss").is_some())
        .filter_map(|r| r["step"].as_u64())
        .collect()
}

#[test]
fn issue_19_existing_run_folder_needs_resume_or_overwrite() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = bin().args(train_args(&model, &out, 2)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps(&out), [1, 2]);
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();

    let o = bin().args(train_args(&model, &out, 3)).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("already holds a run") && err.contains("--resume") && err.contains("--overwrite"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before, "refused runs touch nothing");

    let mut args = train_args(&model, &out, 3);
    args.push("--overwrite".into());
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps(&out), [1, 2, 3], "a fresh history");
    let ckpts: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts, ["checkpoint-0000003"], "the old run's checkpoints are gone");
    args.push("--resume".into());
    let o = bin().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pass one of them"), "{}", stderr(&o));
}

#[test]
fn issue_19_metrics_survive_kill_9_and_resume_writes_each_step_once() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "[train]\ncheckpoint_every = 4\n").unwrap();
    let total = 150;
    let mut args = train_args(&model, &out, total);
    args.extend(["--config".into(), cfg.display().to_string()]);
    let mut child = bin().args(&args).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill -9 once at least 6 steps are logged: they are on disk before the process ends.
    let t0 = Instant::now();
    while steps(&out).len() < 6 {
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress in metrics.jsonl");
        if child.try_wait().unwrap().is_some() {
            panic!("the run ended before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let logged = steps(&out);
    assert!(logged.len() >= 6 && logged.len() < total, "{logged:?}");
    assert_eq!(logged, (1..=logged.len() as u64).collect::<Vec<_>>());
    // A torn last line, as a kill in the middle of a write leaves it.
    let mut f = std::fs::OpenOptions::new().append(true).open(out.join("metrics.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"run\":\"adamw\",\"step\":99,\"lo").unwrap();
    drop(f);

    args.push("--resume".into());
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps(&out), (1..=total as u64).collect::<Vec<_>>(), "each step exactly once");
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(text.ends_with('\n') && !text.contains("\"lo{"), "the torn line was cut: {text}");
}

#[test]
fn issue_19_eval_reads_and_writes_inside_the_run_folder() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Trained from `dir` with a relative -o, evaluated from another folder.
    let o = bin().current_dir(dir.path()).args(train_args(&model, Path::new("run1"), 2)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let run = dir.path().join("run1");
    let config_before = std::fs::read(run.join("config.toml")).unwrap();
    let o = bin().current_dir(&elsewhere).args(["eval", "../run1", "--samples", "0"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "no stray files in the current folder");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config_before, "eval leaves config.toml alone");
    assert!(run.join("results.json").is_file());

    // A folder without checkpoints says so, instead of "start without --resume".
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let o = bin().current_dir(&elsewhere).args(["eval", "../run1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("no checkpoint to evaluate") && !err.contains("--resume"), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn issue_19_label_out_of_range_is_reported_at_load_time() {
    let Some(model) = minilm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let good = "{\"text\": \"fine\", \"label\": 0}\n{\"text\": \"great\", \"label\": 1}\n";
    let bad = format!("{good}{{\"text\": \"odd\", \"label\": 7}}\n");
    let (g, b) = (dir.path().join("good.jsonl"), dir.path().join("bad.jsonl"));
    std::fs::write(&g, good).unwrap();
    std::fs::write(&b, bad).unwrap();
    for (train, eval) in [(&b, &g), (&g, &b), (&b, &b)] {
        let out = dir.path().join("out");
        let mut args = train_args(&model, &out, 1);
        args[2] = "jsonl_text".into(); // --task
        args.extend(["--train-file".into(), train.display().to_string()]);
        args.extend(["--eval-file".into(), eval.display().to_string()]);
        let o = bin().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        let err = stderr(&o);
        let want = format!("{}:3: label 7 out of range for jsonl_text (2 classes)", b.display());
        assert!(err.contains(&want), "{err}");
        assert!(!out.exists(), "nothing written for a run that cannot start");
    }
}
