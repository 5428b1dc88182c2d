//! Tasks, readers, tokenization and batching. It knows a tokenizer and a max length, not models.
//!
//! # Brief overview
//! - [`load`] reads one file of a [`Task`] (GLUE TSV, WinoGrande/ARC/OBQA/BoolQ JSONL, or users'
//!   JSONL) into a [`Dataset`] of [`Example`]s: text (or text pair) plus a [`Label`]. With
//!   [`Format::Prompt`] the text is a decoder prompt that ends right before the answer and the
//!   dataset carries one label word per class (ivon-lora / Laplace-LoRA protocol).
//! - [`TextEncoder`] wraps a `tokenizers::Tokenizer` (its shipped truncation and padding are reset:
//!   we pad dynamically) and turns a dataset into an [`EncodedDataset`], resolving label words to
//!   token ids for decoders.
//! - [`Batcher`] yields [`Batch`]es: dynamic right padding, optional length bucketing,
//!   deterministic per-epoch shuffling from a seed, and a [`Cursor`] that can be saved and
//!   restored for a bit-exact resume. [`Batch::to_tensors`] makes candle tensors.
//!
//! # Example
//! ```no_run
//! use bayeslora::data::{self, BatchConfig, Batcher, DataSpec, Split, Task, TextEncoder};
//! # fn main() -> bayeslora::Result<()> {
//! let spec = DataSpec::standard(Task::Rte, Split::Train, "data".as_ref())?;
//! let dataset = data::load(&spec)?;
//! let encoder = TextEncoder::from_file("tokenizer.json".as_ref(), 128)?;
//! let encoded = encoder.encode_dataset(&dataset)?;
//! let mut batcher = Batcher::new(encoded.into(), BatchConfig { batch_size: 32, ..Default::default() })?;
//! let batch = batcher.next_batch();
//! let tensors = batch.to_tensors(&candle_core::Device::Cpu)?;
//! # let _ = tensors; Ok(()) }
//! ```
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod batch;
mod tasks;
mod tokenize;

pub use batch::{Batch, BatchConfig, BatchLabels, BatchTensors, Batcher, Cursor};
pub use tasks::{Format, Split, Task};
pub use tokenize::{Encoded, EncodedDataset, TextEncoder};

/// What to do with a row that cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRow {
    /// Stop with [`Error::DataRow`] naming the file and line (the default: data errors are loud).
    #[default]
    Fail,
    /// Skip the row; [`Dataset::skipped`] lists the skipped lines and reasons.
    Skip,
}

/// Which multiple-choice rows to keep (ARC has 3-, 4- and 5-choice items).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChoiceFilter {
    /// Keep all rows; the class set is padded to the task's maximum (ARC: 5) and absent choices
    /// are masked ([`Batch::class_mask`]).
    #[default]
    All,
    /// Keep only rows with exactly n choices; `Exactly(4)` is ivon-lora's protocol for ARC/OBQA.
    Exactly(usize),
}

/// Where and how to read one split of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    pub task: Task,
    /// The data file (TSV for GLUE tasks, JSONL otherwise).
    pub path: PathBuf,
    /// `None`: the task's default ([`Task::default_format`]).
    pub format: Option<Format>,
    pub on_bad_row: OnBadRow,
    pub choices: ChoiceFilter,
    /// Read at most this many usable rows (for smoke tests).
    pub limit: Option<usize>,
    /// Class names of string labels in `jsonl_text` (class index = position).
    pub label_names: Vec<String>,
    /// The class count of a `jsonl_text` task with integer labels when the caller knows it (a
    /// run's `num_labels`; for an eval set, the train set's count). `None`: inferred from the
    /// labels as 0..=k with none missing, so a stray label (7 among 0s and 1s) is reported, not
    /// turned into an 8-class head. Ignored where the task fixes the count.
    pub num_classes: Option<usize>,
    /// Label words per class for `Format::Prompt`; empty: the task's own (" A".., " False"/" True").
    pub label_words: Vec<String>,
    /// Prompt template for `jsonl_text` with `Format::Prompt`; `{text}` and `{text_pair}` are
    /// replaced. It must end right before the answer word.
    pub template: Option<String>,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            task: Task::JsonlText,
            path: PathBuf::new(),
            format: None,
            on_bad_row: OnBadRow::Fail,
            choices: ChoiceFilter::All,
            limit: None,
            label_names: Vec::new(),
            num_classes: None,
            label_words: Vec::new(),
            template: None,
        }
    }
}

impl DataSpec {
    /// A spec for `task` reading `path`, with defaults otherwise.
    pub fn new(task: Task, path: impl Into<PathBuf>) -> Self {
        DataSpec { task, path: path.into(), ..Default::default() }
    }

    /// The spec for a named split of the files shipped in the repository's `data/` folder.
    pub fn standard(task: Task, split: Split, data_dir: &Path) -> Result<Self> {
        Ok(DataSpec::new(task, tasks::standard_path(task, split, data_dir)?))
    }

    /// Checks the values that do not need the file.
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            return Err(Error::config("path", "\"\"", "give the data file to read"));
        }
        if let ChoiceFilter::Exactly(n) = self.choices {
            if n < 2 {
                return Err(Error::config("choices", n, "a multiple-choice row needs at least 2 choices"));
            }
        }
        if self.limit == Some(0) {
            return Err(Error::config("limit", 0, "read at least one row, or leave limit unset"));
        }
        Ok(())
    }
}

/// A label: a class index, or a real target for regression (STS-B).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    Class(usize),
    Score(f32),
}

/// One example, ready to tokenize.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based line in the source file (for messages and per-example outputs).
    pub line: usize,
    /// The text, or with [`Format::Prompt`] the whole prompt (ending right before the answer).
    pub text: String,
    /// The second text of a pair (encoders only).
    pub text_pair: Option<String>,
    pub label: Label,
    /// Number of valid classes for this row: choices 0..num_choices are real, the rest up to
    /// [`Dataset::num_classes`] are padding (ARC's 3- and 4-choice items); for other tasks it
    /// equals `num_classes`.
    pub num_choices: usize,
}

/// A row that was skipped under [`OnBadRow::Skip`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRow {
    pub line: usize,
    pub reason: String,
}

/// The rows of one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub task: Task,
    pub format: Format,
    pub file: PathBuf,
    pub examples: Vec<Example>,
    /// Class count (0 for regression). For prompt tasks it equals `label_words.len()`.
    pub num_classes: usize,
    /// Label word of each class (prompt format only), e.g. `[" A", " B", " C", " D"]`.
    pub label_words: Vec<String>,
    /// Rows skipped as malformed (only with [`OnBadRow::Skip`]).
    pub skipped: Vec<SkippedRow>,
    /// Rows removed by [`ChoiceFilter::Exactly`].
    pub filtered: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
    /// Class labels in row order, or `None` for regression.
    pub fn class_labels(&self) -> Option<Vec<usize>> {
        self.examples.iter().map(|e| if let Label::Class(c) = e.label { Some(c) } else { None }).collect()
    }
}

/// Reads one split of one task: the module's entry point.
///
/// Errors: [`Error::Io`] if the file cannot be read, [`Error::DataRow`] (file:line: reason) for a
/// malformed row under [`OnBadRow::Fail`], [`Error::BadFile`] naming the file when no usable row
/// remains, [`Error::InvalidConfig`] for a format the task does not support.
pub fn load(spec: &DataSpec) -> Result<Dataset> {
    spec.validate()?;
    tasks::read(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(name: &str, body: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::File::create(&path).unwrap().write_all(body.as_bytes()).unwrap();
        (dir, path)
    }

    #[test]
    fn reads_rte_tsv_with_header() {
        let (_d, p) = file_with(
            "rte.tsv",
            "index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man is awake.\tnot_entailment\n1\tIt rains.\tIt is wet.\tentailment\n",
        );
        let ds = load(&DataSpec::new(Task::Rte, &p)).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.examples[0].label, Label::Class(1));
        assert_eq!(ds.examples[1].text_pair.as_deref(), Some("It is wet."));
        assert_eq!(ds.examples[1].line, 3);
        assert_eq!(ds.num_classes, 2);
    }

    #[test]
    fn malformed_row_names_file_and_line() {
        let (_d, p) = file_with("sst.tsv", "sentence\tlabel\ngood movie \t1\nbad movie\t7\nfine\t0\n");
        let err = load(&DataSpec::new(Task::Sst2, &p)).unwrap_err();
        match &err {
            Error::DataRow { file, line, reason } => {
                assert_eq!(file, &p);
                assert_eq!(*line, 3);
                assert_eq!(reason, "label 7 out of range for sst2 (2 classes)");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("sst.tsv:3:"), "{err}");
        let ds = load(&DataSpec { on_bad_row: OnBadRow::Skip, ..DataSpec::new(Task::Sst2, &p) }).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.skipped.len(), 1);
        assert_eq!(ds.skipped[0].line, 3);
    }

    #[test]
    fn wrong_column_count_is_a_row_error() {
        let (_d, p) = file_with("cola.tsv", "gj04\t1\t\tGood sentence.\ngj04\t0\tOnly three\n");
        let err = load(&DataSpec::new(Task::Cola, &p)).unwrap_err();
        assert!(err.to_string().contains("cola.tsv:2: expected 4 tab-separated columns"), "{err}");
    }

    #[test]
    fn empty_dataset_names_the_file() {
        let (_d, p) = file_with("empty.jsonl", "\n\n");
        let err = load(&DataSpec::new(Task::JsonlText, &p)).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }));
        assert!(err.to_string().contains("empty.jsonl"), "{err}");
        let (_d2, p2) = file_with("bad.jsonl", "{\"text\": 3}\nnot json\n");
        let spec = DataSpec { on_bad_row: OnBadRow::Skip, ..DataSpec::new(Task::JsonlText, &p2) };
        let err = load(&spec).unwrap_err();
        assert!(err.to_string().contains("bad.jsonl") && err.to_string().contains("2 skipped"), "{err}");
    }

    #[test]
    fn missing_file_is_io_error_with_path() {
        let err = load(&DataSpec::new(Task::Sst2, "/nonexistent/x.tsv")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("/nonexistent/x.tsv"));
    }

    #[test]
    fn arc_pads_to_five_and_maps_numeric_labels() {
        let body = concat!(
            r#"{"id":"a","question":"Q1?","choices":{"text":["x","y","z"],"label":["1","2","3"]},"answerKey":"2"}"#,
            "\n",
            r#"{"id":"b","question":"Q2?","choices":{"text":["p","q","r","s"],"label":["A","B","C","D"]},"answerKey":"D"}"#,
            "\n"
        );
        let (_d, p) = file_with("arc.jsonl", body);
        let ds = load(&DataSpec::new(Task::ArcChallenge, &p)).unwrap();
        assert_eq!(ds.num_classes, 5);
        assert_eq!(ds.label_words, vec![" A", " B", " C", " D", " E"]);
        assert_eq!(ds.examples[0].label, Label::Class(1));
        assert_eq!(ds.examples[0].num_choices, 3);
        assert!(ds.examples[0].text.ends_with("Choices: A. X. B. Y. C. Z. Answer:"), "{}", ds.examples[0].text);
        let four =
            load(&DataSpec { choices: ChoiceFilter::Exactly(4), ..DataSpec::new(Task::ArcChallenge, &p) }).unwrap();
        assert_eq!((four.len(), four.filtered, four.num_classes), (1, 1, 4));
    }

    #[test]
    fn generic_jsonl_text_and_choice() {
        let (_d, p) = file_with(
            "mine.jsonl",
            "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"text_pair\": \"c\", \"label\": \"neg\"}\n",
        );
        let spec = DataSpec { label_names: vec!["neg".into(), "pos".into()], ..DataSpec::new(Task::JsonlText, &p) };
        let ds = load(&spec).unwrap();
        assert_eq!(ds.examples[0].label, Label::Class(1));
        assert_eq!(ds.num_classes, 2);
        let err = load(&DataSpec::new(Task::JsonlText, &p)).unwrap_err();
        assert!(err.to_string().contains("label_names"), "{err}");

        let (_d2, p2) = file_with(
            "mc.jsonl",
            "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\", \"5\"], \"answer\": \"B\"}\n{\"question\": \"1+1?\", \"choices\": [\"2\", \"3\"], \"answer\": \"2\"}\n{\"question\": \"0?\", \"choices\": [\"0\", \"1\"], \"answer\": 1}\n",
        );
        let ds = load(&DataSpec::new(Task::JsonlChoice, &p2)).unwrap();
        assert_eq!(ds.num_classes, 3);
        let labels: Vec<_> = ds.examples.iter().map(|e| (e.label, e.num_choices)).collect();
        assert_eq!(labels, vec![(Label::Class(1), 3), (Label::Class(0), 2), (Label::Class(1), 2)]);
    }

    #[test]
    fn prompt_format_for_glue_label_words() {
        let (_d, p) = file_with("sst.tsv", "sentence\tlabel\ngreat fun \t1\n");
        let ds = load(&DataSpec { format: Some(Format::Prompt), ..DataSpec::new(Task::Sst2, &p) }).unwrap();
        assert_eq!(ds.examples[0].text, "Review: great fun\nSentiment:");
        assert_eq!(ds.label_words, vec![" negative", " positive"]);
        let err = load(&DataSpec { format: Some(Format::Prompt), ..DataSpec::new(Task::Stsb, &p) }).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }));
    }

    #[test]
    fn boolq_and_winogrande_rows() {
        let (_d, p) = file_with(
            "boolq.jsonl",
            "{\"question\": \"is it\", \"title\": \"T\", \"answer\": true, \"passage\": \"It is.\"}\n",
        );
        let ds = load(&DataSpec::new(Task::Boolq, &p)).unwrap();
        assert_eq!(ds.examples[0].text, "Answer the question with only True or False: is it Context: It is.");
        assert_eq!(ds.examples[0].label, Label::Class(1));
        assert_eq!(ds.label_words, vec![" False", " True"]);
        let (_d2, p2) = file_with(
            "wg.jsonl",
            "{\"qID\": \"x\", \"sentence\": \"A beat B so _ won.\", \"option1\": \"A\", \"option2\": \"B\", \"answer\": \"1\"}\n{\"qID\": \"y\", \"sentence\": \"no blank\", \"option1\": \"A\", \"option2\": \"B\", \"answer\": \"2\"}\n",
        );
        let err = load(&DataSpec::new(Task::WinograndeS, &p2)).unwrap_err();
        assert!(err.to_string().contains("wg.jsonl:2: sentence has no `_` blank"), "{err}");
    }

    /// Issue 19: label 7 among 0s and 1s is reported at load time, naming file, line, task and
    /// class count, instead of building an 8-class head; an eval set is held to the train set's
    /// count; a declared count admits it.
    #[test]
    fn issue_19_label_out_of_range_is_named_at_load_time() {
        let rows =
            "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1}\n{\"text\": \"c\", \"label\": 7}\n";
        let (_d, p) = file_with("train.jsonl", rows);
        let err = load(&DataSpec::new(Task::JsonlText, &p)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("train.jsonl:3: label 7 out of range for jsonl_text (2 classes)"), "{msg}");
        assert!(msg.contains("num_labels") && msg.lines().count() == 1, "{msg}");
        // The count given by the caller (the train set's, for an eval file): 2 → refused, 8 → fine.
        let two = DataSpec { num_classes: Some(2), ..DataSpec::new(Task::JsonlText, &p) };
        let err = load(&two).unwrap_err().to_string();
        assert!(err.contains("train.jsonl:3: label 7 out of range for jsonl_text (2 classes)"), "{err}");
        let eight = DataSpec { num_classes: Some(8), ..DataSpec::new(Task::JsonlText, &p) };
        assert_eq!(load(&eight).unwrap().num_classes, 8);
        // Dense labels still infer their count.
        let (_d2, p2) = file_with(
            "ok.jsonl",
            "{\"text\": \"a\", \"label\": 2}\n{\"text\": \"b\", \"label\": 0}\n{\"text\": \"c\", \"label\": 1}\n",
        );
        assert_eq!(load(&DataSpec::new(Task::JsonlText, &p2)).unwrap().num_classes, 3);
        // Skipping bad rows drops the row instead.
        let skip = DataSpec { on_bad_row: OnBadRow::Skip, ..DataSpec::new(Task::JsonlText, &p) };
        let ds = load(&skip).unwrap();
        assert_eq!((ds.len(), ds.num_classes, ds.skipped.len()), (2, 2, 1));
    }
}
