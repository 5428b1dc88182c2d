//! Issue 19: checkpoints that heal. Each checkpoint carries a manifest (size + SHA-256 of every
//! file); a damaged newest one (truncated optimizer state, garbage `latest`, NaN bytes, a
//! damaged adapter file) falls back to the previous good one and the run still ends bit for bit
//! where an uninterrupted one does; with none good the error names the file and the fix.
//! Checkpoints without a manifest (older versions) still load; `keep_checkpoints` rotates.
mod common;
use common::{snapshot, StopAt};

use bayeslora::data::{BatchConfig, EncodedDataset};
use bayeslora::train::{self, Checkpoint, Observer, OptimizerKind, TrainConfig};
use bayeslora::Error;
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const STEPS: usize = 6;

fn data() -> Arc<EncodedDataset> {
    Arc::new(common::separable(40, 0))
}

fn config(kind: OptimizerKind, dir: &Path) -> TrainConfig {
    let mut cfg = TrainConfig {
        optimizer: kind,
        max_steps: Some(STEPS),
        batch: BatchConfig { batch_size: 8, seed: 3, shuffle: true, ..Default::default() },
        seed: 11,
        checkpoint_every: 1,
        checkpoint_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    cfg.adamw.lr = 1e-2;
    cfg.ivon.lr = 0.1;
    cfg.ivon.ess = 1e4;
    cfg.ivon.hess_init = 1e-2;
    cfg.ivon.rescale_lr = false;
    cfg.ivon.clip_radius = 0.2;
    cfg
}

/// Collects the notes of a run.
#[derive(Default)]
struct Notes(Vec<String>);
impl Observer for Notes {
    fn note(&mut self, message: &str) {
        self.0.push(message.to_string());
    }
}

/// The weights of an uninterrupted run.
fn straight(kind: OptimizerKind) -> Vec<Vec<u32>> {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert(5, 0.0);
    train::run(&model, data(), &config(kind, dir.path()), &Device::Cpu, &mut train::Silent, None, None).unwrap();
    snapshot(&model)
}

/// A run stopped after `stop` steps, with a checkpoint after every step (two kept).
fn interrupted(kind: OptimizerKind, stop: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert(5, 0.0);
    let (summary, _) =
        train::run(&model, data(), &config(kind, dir.path()), &Device::Cpu, &mut StopAt(stop), None, None).unwrap();
    assert!(summary.interrupted && summary.steps == stop);
    dir
}

/// Resumes in a fresh model; returns its weights, the notes and the result.
fn resume(kind: OptimizerKind, dir: &Path) -> (Vec<Vec<u32>>, Vec<String>, bayeslora::Result<usize>) {
    let model = common::tiny_bert(99, 0.0);
    let mut notes = Notes::default();
    let result =
        train::run(&model, data(), &config(kind, dir), &Device::Cpu, &mut notes, Some(dir), None).map(|(s, _)| s.steps);
    (snapshot(&model), notes.0, result)
}

fn ckpt(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("checkpoint-{step:07}"))
}

/// The byte offset of the tensor data in a safetensors file.
fn data_start(file: &Path) -> usize {
    let bytes = std::fs::read(file).unwrap();
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Overwrites the first f32 of the tensor data with NaN.
fn write_nan(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = data_start(file);
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn issue_19_checkpoints_carry_a_manifest_and_rotate() {
    let dir = interrupted(OptimizerKind::Adamw, 4);
    let kept: Vec<String> = {
        let mut v: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        v.sort();
        v
    };
    assert_eq!(kept, ["checkpoint-0000003", "checkpoint-0000004", "latest"], "two kept by default");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt(dir.path(), 4).join("manifest.json")).unwrap()).unwrap();
    for f in ["state.json", "trainable.safetensors", "optimizer.safetensors"] {
        let sha = manifest["files"][f]["sha256"].as_str().unwrap_or_default();
        assert_eq!(sha.len(), 64, "{f}: {manifest}");
        let size = std::fs::metadata(ckpt(dir.path(), 4).join(f)).unwrap().len();
        assert_eq!(manifest["files"][f]["bytes"].as_u64(), Some(size));
    }
    // keep_checkpoints = 3, and 0 keeps every one.
    for (keep, want) in [(3, 3), (0, 4)] {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(OptimizerKind::Adamw, d.path());
        cfg.keep_checkpoints = keep;
        train::run(&common::tiny_bert(5, 0.0), data(), &cfg, &Device::Cpu, &mut StopAt(4), None, None).unwrap();
        let n = std::fs::read_dir(d.path()).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
        assert_eq!(n, want, "keep_checkpoints = {keep}");
    }
}

#[test]
fn issue_19_damaged_newest_checkpoint_falls_back_and_still_resumes_bit_for_bit() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 4] = [
        (
            "truncated optimizer state",
            |c| {
                let f = c.join("optimizer.safetensors");
                let len = std::fs::metadata(&f).unwrap().len();
                std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
            },
            "optimizer.safetensors",
        ),
        ("NaN bytes in the optimizer state", |c| write_nan(&c.join("optimizer.safetensors")), "SHA-256"),
        (
            "damaged adapter file",
            |c| {
                let f = c.join("trainable.safetensors");
                let mut bytes = std::fs::read(&f).unwrap();
                let at = data_start(&f) + 5;
                bytes[at] ^= 0x5a;
                std::fs::write(&f, bytes).unwrap();
            },
            "trainable.safetensors",
        ),
        ("unparsable state.json", |c| std::fs::write(c.join("state.json"), b"{\"step\": ").unwrap(), "state.json"),
    ];
    for kind in [OptimizerKind::Ivon, OptimizerKind::Adamw] {
        let want = straight(kind);
        for (what, damage, names) in cases {
            let dir = interrupted(kind, 4);
            damage(&ckpt(dir.path(), 4));
            let (got, notes, steps) = resume(kind, dir.path());
            assert_eq!(steps.unwrap(), STEPS, "{kind:?}, {what}");
            assert_eq!(got, want, "{kind:?}, {what}: the run differs from an uninterrupted one");
            assert_eq!(notes.len(), 1, "{kind:?}, {what}: {notes:?}");
            let note = &notes[0];
            assert!(note.contains("checkpoint-0000004 is damaged") && note.contains(names), "{what}: {note}");
            assert!(note.contains("checkpoint-0000003 (step 3)"), "{what}: {note}");
        }
    }
}

#[test]
fn issue_19_garbage_latest_does_not_hide_good_checkpoints() {
    let kind = OptimizerKind::Ivon;
    let want = straight(kind);
    let dir = interrupted(kind, 4);
    std::fs::write(dir.path().join("latest"), b"\x00\xffgarbage/../..").unwrap();
    assert_eq!(Checkpoint::latest(dir.path()), Some(ckpt(dir.path(), 4)));
    let (got, notes, steps) = resume(kind, dir.path());
    assert_eq!(steps.unwrap(), STEPS);
    assert_eq!(got, want);
    assert!(notes.len() == 1 && notes[0].contains("latest names no checkpoint folder"), "{notes:?}");
}

#[test]
fn issue_19_checkpoints_without_a_manifest_still_load_and_are_checked_for_nan() {
    let kind = OptimizerKind::Adamw;
    let want = straight(kind);
    // An older version's checkpoints: no manifest.json.
    let dir = interrupted(kind, 4);
    for step in [3, 4] {
        std::fs::remove_file(ckpt(dir.path(), step).join("manifest.json")).unwrap();
    }
    let (got, notes, steps) = resume(kind, dir.path());
    assert_eq!((steps.unwrap(), notes.len()), (STEPS, 0), "{notes:?}");
    assert_eq!(got, want, "a checkpoint without manifest resumes bit for bit");
    // Without checksums, NaN bytes in the optimizer state are still caught on load.
    let dir = interrupted(kind, 4);
    for step in [3, 4] {
        std::fs::remove_file(ckpt(dir.path(), step).join("manifest.json")).unwrap();
    }
    write_nan(&ckpt(dir.path(), 4).join("optimizer.safetensors"));
    let (got, notes, steps) = resume(kind, dir.path());
    assert_eq!(steps.unwrap(), STEPS);
    assert_eq!(got, want);
    assert!(notes.len() == 1 && notes[0].contains("NaN or infinite"), "{notes:?}");
}

#[test]
fn issue_19_no_good_checkpoint_is_an_error_naming_each_file_and_the_fix() {
    let kind = OptimizerKind::Ivon;
    let dir = interrupted(kind, 4);
    let f4 = ckpt(dir.path(), 4).join("optimizer.safetensors");
    std::fs::OpenOptions::new().write(true).open(&f4).unwrap().set_len(10).unwrap();
    let f3 = ckpt(dir.path(), 3).join("trainable.safetensors");
    write_nan(&f3);
    let (_, _, result) = resume(kind, dir.path());
    let err = result.unwrap_err();
    assert!(matches!(err, Error::NoUsableCheckpoint { .. }), "{err:?}");
    let msg = err.to_string();
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines.len(), 4, "{msg}");
    assert!(lines[0].starts_with("no usable checkpoint in ") && lines[0].contains(&*dir.path().to_string_lossy()));
    assert!(lines[1].contains(&*f4.to_string_lossy()) && lines[1].contains("truncated"), "{msg}");
    assert!(lines[2].contains(&*f3.to_string_lossy()) && lines[2].contains("SHA-256"), "{msg}");
    assert!(lines[3].contains("--overwrite"), "{msg}");
    // No reason appears twice on a line.
    for l in &lines[1..3] {
        let reason = l.rsplit(": ").next().unwrap_or_default();
        assert_eq!(l.matches(reason).count(), 1, "{l}");
    }
}
