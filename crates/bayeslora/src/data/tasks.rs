//! Task definitions, file readers (TSV / JSONL) and prompt templates.
//!
//! Each task knows its file layout and turns one row into an [`Example`]. Two input formats exist:
//! [`Format::Encoder`] keeps the raw text (or text pair) for a BERT-style classifier head, and
//! [`Format::Prompt`] renders one prompt string that ends right before the answer, plus one label
//! word per class (" A".." E", " False"/" True", " negative"/" positive", …) whose next-token logits
//! at the last position are the class logits (ivon-lora / Laplace-LoRA protocol,
//! `reference/ivon.md` §2.3).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

use super::{ChoiceFilter, DataSpec, Dataset, Example, Label, OnBadRow, SkippedRow};

/// The tasks we can read. GLUE tasks read GLUE's TSV files; MCQA tasks read the JSONL files in
/// the repository's `data/` folder; `Jsonl*` read users' own data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// GLUE SST-2: `sentence<TAB>label` (header), 0 = negative, 1 = positive.
    Sst2,
    /// GLUE MRPC: `Quality, #1 ID, #2 ID, #1 String, #2 String` (header, UTF-8 BOM), 1 = paraphrase.
    Mrpc,
    /// GLUE RTE: `index, sentence1, sentence2, label`; 0 = entailment, 1 = not_entailment.
    Rte,
    /// GLUE CoLA: no header, `source, label, mark, sentence`; 1 = acceptable.
    Cola,
    /// GLUE STS-B (regression, score in 0–5): 10 columns, sentence1/2 in columns 8/9.
    Stsb,
    /// GLUE QNLI: `index, question, sentence, label`; 0 = entailment, 1 = not_entailment.
    Qnli,
    /// GLUE WNLI: `index, sentence1, sentence2, label`; 1 = entailment.
    Wnli,
    /// WinoGrande-S (train_s.jsonl for training); the reader is the same for every size.
    WinograndeS,
    /// WinoGrande-M (train_m.jsonl for training).
    WinograndeM,
    /// ARC-Easy (Hugging Face `allenai/ai2_arc` JSONL export).
    ArcEasy,
    /// ARC-Challenge.
    ArcChallenge,
    /// OpenBookQA (AI2 `Data/Main` JSONL).
    Obqa,
    /// BoolQ (Google's original JSONL: question, title, answer: bool, passage).
    Boolq,
    /// Users' classification data: `{"text": .., "text_pair"?: .., "label": int | string}`.
    JsonlText,
    /// Users' regression data: `{"text": .., "text_pair"?: .., "label": number}`.
    JsonlRegression,
    /// Users' multiple choice data: `{"question": .., "context"?: .., "choices": [..], "answer": ..}`
    /// where answer is an index, a letter ("A".."Z") or the text of a choice.
    JsonlChoice,
}

/// How the example text is presented to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Raw text or text pair, for an encoder with a classification or regression head.
    Encoder,
    /// One prompt that ends right before the answer, plus one label word per class, for a decoder.
    Prompt,
}

/// Named splits of the files in the repository's `data/` folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    /// The official validation split; for GLUE, WinoGrande and BoolQ it is the test set.
    Dev,
    /// Only ARC and OBQA ship labelled test files.
    Test,
}

impl Task {
    /// Every task, for help texts and error messages.
    pub const ALL: [Task; 16] = [
        Task::Sst2,
        Task::Mrpc,
        Task::Rte,
        Task::Cola,
        Task::Stsb,
        Task::Qnli,
        Task::Wnli,
        Task::WinograndeS,
        Task::WinograndeM,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Obqa,
        Task::Boolq,
        Task::JsonlText,
        Task::JsonlRegression,
        Task::JsonlChoice,
    ];

    /// The snake_case name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Task::Sst2 => "sst2",
            Task::Mrpc => "mrpc",
            Task::Rte => "rte",
            Task::Cola => "cola",
            Task::Stsb => "stsb",
            Task::Qnli => "qnli",
            Task::Wnli => "wnli",
            Task::WinograndeS => "winogrande_s",
            Task::WinograndeM => "winogrande_m",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Obqa => "obqa",
            Task::Boolq => "boolq",
            Task::JsonlText => "jsonl_text",
            Task::JsonlRegression => "jsonl_regression",
            Task::JsonlChoice => "jsonl_choice",
        }
    }

    /// Parses [`Task::name`].
    pub fn from_name(name: &str) -> Result<Task> {
        Task::ALL.iter().copied().find(|t| t.name() == name).ok_or_else(|| {
            let all: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
            Error::config("task", name, format!("supported: {}", all.join(", ")))
        })
    }

    /// The format used when the spec does not name one: encoders for GLUE, prompts for MCQA.
    pub fn default_format(self) -> Format {
        match self {
            Task::Sst2
            | Task::Mrpc
            | Task::Rte
            | Task::Cola
            | Task::Stsb
            | Task::Qnli
            | Task::Wnli
            | Task::JsonlText
            | Task::JsonlRegression => Format::Encoder,
            _ => Format::Prompt,
        }
    }

    /// True for the tasks whose label is a real number (STS-B and `jsonl_regression`).
    pub fn is_regression(self) -> bool {
        matches!(self, Task::Stsb | Task::JsonlRegression)
    }

    /// True for the multiple-choice tasks (WinoGrande, ARC, OBQA, `jsonl_choice`).
    pub fn is_multiple_choice(self) -> bool {
        matches!(
            self,
            Task::WinograndeS | Task::WinograndeM | Task::ArcEasy | Task::ArcChallenge | Task::Obqa | Task::JsonlChoice
        )
    }

    /// The file of `split` relative to the repository's `data/` folder (see `data/README.md`),
    /// or `None` where we have no labelled file (GLUE test, BoolQ/QNLI train, user tasks).
    pub fn standard_file(self, split: Split) -> Option<&'static str> {
        use Split::*;
        Some(match (self, split) {
            (Task::Sst2, Train) => "sst2/train.tsv",
            (Task::Sst2, Dev) => "sst2/dev.tsv",
            (Task::Mrpc, Train) => "mrpc/train.tsv",
            (Task::Mrpc, Dev) => "mrpc/dev.tsv",
            (Task::Rte, Train) => "rte/train.tsv",
            (Task::Rte, Dev) => "rte/dev.tsv",
            (Task::Cola, Train) => "cola/train.tsv",
            (Task::Cola, Dev) => "cola/dev.tsv",
            (Task::Stsb, Train) => "stsb/train.tsv",
            (Task::Stsb, Dev) => "stsb/dev.tsv",
            (Task::Qnli, Dev) => "qnli/dev.tsv",
            (Task::Wnli, Train) => "wnli/train.tsv",
            (Task::Wnli, Dev) => "wnli/dev.tsv",
            (Task::WinograndeS, Train) => "winogrande/train_s.jsonl",
            (Task::WinograndeM, Train) => "winogrande/train_m.jsonl",
            (Task::WinograndeS | Task::WinograndeM, Dev) => "winogrande/dev.jsonl",
            (Task::ArcEasy, Train) => "arc_easy/train.jsonl",
            (Task::ArcEasy, Dev) => "arc_easy/dev.jsonl",
            (Task::ArcEasy, Test) => "arc_easy/test.jsonl",
            (Task::ArcChallenge, Train) => "arc_challenge/train.jsonl",
            (Task::ArcChallenge, Dev) => "arc_challenge/dev.jsonl",
            (Task::ArcChallenge, Test) => "arc_challenge/test.jsonl",
            (Task::Obqa, Train) => "obqa/train.jsonl",
            (Task::Obqa, Dev) => "obqa/dev.jsonl",
            (Task::Obqa, Test) => "obqa/test.jsonl",
            // data/ has no BoolQ train split: a seeded, disjoint split of its dev set
            // (scripts/split_boolq.py, data/README.md).
            (Task::Boolq, Train) => "boolq/train_from_dev.jsonl",
            (Task::Boolq, Dev) => "boolq/dev_holdout.jsonl",
            _ => return None,
        })
    }

    /// Class count fixed by the task (`None` for user tasks, where it comes from the data, and
    /// for regression). ARC pads to 5 choices unless the filter keeps exactly n.
    fn fixed_num_classes(self, choices: ChoiceFilter) -> Option<usize> {
        match self {
            _ if self.is_glue_classification() => Some(2),
            Task::WinograndeS | Task::WinograndeM | Task::Boolq => Some(2),
            Task::ArcEasy | Task::ArcChallenge | Task::Obqa => match choices {
                ChoiceFilter::Exactly(n) => Some(n),
                ChoiceFilter::All => Some(if self == Task::Obqa { 4 } else { 5 }),
            },
            _ => None,
        }
    }
}

/// The first choice letters; ivon-lora maps ARC's "1".."4" labels to "A".."D" by position.
const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The MCQA prompt of ivon-lora (`data.py`, verbatim; `reference/ivon.md` §2.3).
fn mcqa_prompt(question: &str, choices: &[String]) -> String {
    let rendered: Vec<String> =
        choices.iter().zip(LETTERS.chars()).map(|(text, letter)| format!("{letter}. {}", tidy_choice(text))).collect();
    format!(
        "Select one of the choices that answers the following question: {question} Choices: {} Answer:",
        rendered.join(" ")
    )
}

/// ivon-lora upper-cases the first letter of each ARC/OBQA choice and ends it with a period.
fn tidy_choice(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// The WinoGrande prompt of ivon-lora, verbatim, including its typo ("B" with no period); we copy
/// it for parity with the published numbers (`reference/ivon.md` §2.3).
fn winogrande_prompt(sentence: &str, option1: &str, option2: &str) -> String {
    format!(
        "Select one of the choices that answers the following question: {sentence} Choices: A. {option1}. B {option2}. Answer:"
    )
}

/// The BoolQ prompt of ivon-lora, verbatim: it ends with the passage, not with "Answer:".
fn boolq_prompt(question: &str, passage: &str) -> String {
    format!("Answer the question with only True or False: {question} Context: {passage}")
}

/// Label-word prompts for GLUE classification with a decoder. These templates are ours (no peer
/// evaluates GLUE with decoders in the IVON-LoRA protocol); each ends right before the answer word.
fn glue_prompt(task: Task, a: &str, b: Option<&str>) -> String {
    let b = b.unwrap_or("");
    match task {
        Task::Sst2 => format!("Review: {}\nSentiment:", a.trim_end()),
        Task::Cola => format!("Sentence: {a}\nIs this sentence grammatical? Answer:"),
        Task::Mrpc => format!("Sentence 1: {a}\nSentence 2: {b}\nDo both sentences mean the same thing? Answer:"),
        Task::Qnli => {
            format!("Question: {a}\nSentence: {b}\nDoes the sentence answer the question? Answer:")
        }
        // RTE and WNLI
        _ => format!("Premise: {a}\nHypothesis: {b}\nDoes the premise entail the hypothesis? Answer:"),
    }
}

impl Task {
    /// The two-class GLUE tasks (all of GLUE here but STS-B's regression).
    fn is_glue_classification(self) -> bool {
        matches!(self, Task::Sst2 | Task::Mrpc | Task::Rte | Task::Cola | Task::Qnli | Task::Wnli)
    }

    /// A GLUE classification task's decoder prompt as a `template` for [`crate::data::DataSpec`]
    /// (`{text}`, `{text_pair}`) and its label words, so any text can be scored the way the task
    /// was trained (`predict` on a decoder); `None` for the other tasks.
    pub fn decoder_template(self) -> Option<(String, Vec<String>)> {
        self.is_glue_classification()
            .then(|| (glue_prompt(self, "{text}", Some("{text_pair}")), task_label_words(self, 2)))
    }

    /// Human-readable class names in class order (what `predict` prints): GLUE's label names,
    /// `false`/`true` for BoolQ, `option1`/`option2` for WinoGrande, choice letters for
    /// multiple choice and user JSONL tasks (`0`, `1`, … there unless the data names them).
    /// Empty for regression.
    pub fn class_names(self, num_classes: usize) -> Vec<String> {
        let names: &[&str] = match self {
            Task::Sst2 => &["negative", "positive"],
            Task::Cola => &["unacceptable", "acceptable"],
            Task::Mrpc => &["not_equivalent", "equivalent"],
            Task::Rte | Task::Qnli => &["entailment", "not_entailment"],
            Task::Wnli => &["not_entailment", "entailment"],
            Task::Boolq => &["false", "true"],
            Task::WinograndeS | Task::WinograndeM => &["option1", "option2"],
            Task::ArcEasy | Task::ArcChallenge | Task::Obqa | Task::JsonlChoice => {
                return LETTERS.chars().take(num_classes).map(String::from).collect()
            }
            _ if self.is_regression() => return Vec::new(),
            _ => return (0..num_classes).map(|i| i.to_string()).collect(),
        };
        names.iter().map(|n| n.to_string()).collect()
    }
}

/// Label words per class index for [`Format::Prompt`], in class order.
fn task_label_words(task: Task, num_classes: usize) -> Vec<String> {
    let words: &[&str] = match task {
        Task::Sst2 => &[" negative", " positive"],
        Task::Cola | Task::Mrpc | Task::Wnli => &[" no", " yes"],
        // label 0 = entailment
        Task::Rte | Task::Qnli => &[" yes", " no"],
        Task::Boolq => &[" False", " True"],
        _ => return LETTERS.chars().take(num_classes).map(|c| format!(" {c}")).collect(),
    };
    words.iter().map(|w| w.to_string()).collect()
}

/// A TSV layout: columns of text and label, and the first header field if the file has one.
struct TsvLayout {
    header: Option<&'static str>,
    columns: usize,
    text: usize,
    text_pair: Option<usize>,
    label: usize,
}

fn tsv_layout(task: Task) -> TsvLayout {
    let l = |header, columns, text, text_pair, label| TsvLayout { header, columns, text, text_pair, label };
    match task {
        Task::Sst2 => l(Some("sentence"), 2, 0, None, 1),
        Task::Mrpc => l(Some("Quality"), 5, 3, Some(4), 0),
        Task::Rte | Task::Qnli | Task::Wnli => l(Some("index"), 4, 1, Some(2), 3),
        Task::Cola => l(None, 4, 3, None, 1),
        // Task::Stsb
        _ => l(Some("index"), 10, 7, Some(8), 9),
    }
}

fn parse_tsv_label(task: Task, field: &str) -> std::result::Result<Label, String> {
    match task {
        Task::Rte | Task::Qnli => match field {
            "entailment" => Ok(Label::Class(0)),
            "not_entailment" => Ok(Label::Class(1)),
            _ => Err(format!("label `{field}` is not entailment/not_entailment")),
        },
        Task::Stsb => match field.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(Label::Score(v)),
            _ => Err(format!("score `{field}` is not a finite number")),
        },
        _ => match field {
            "0" => Ok(Label::Class(0)),
            "1" => Ok(Label::Class(1)),
            _ => match field.parse::<i64>() {
                Ok(n) => Err(out_of_range(n, task, 2)),
                Err(_) => Err(format!("label `{field}` is not 0 or 1")),
            },
        },
    }
}

/// `label 7 out of range for sst2 (2 classes)`.
fn out_of_range(label: impl std::fmt::Display, task: Task, num_classes: usize) -> String {
    format!("label {label} out of range for {} ({num_classes} classes)", task.name())
}

/// One parsed row before the task-wide post-processing (format, class count).
enum Row {
    Text { text: String, text_pair: Option<String>, label: Label },
    Choice { question: String, choices: Vec<String>, answer: usize, context: Option<String> },
}

/// Reads `spec.path` and builds the dataset (the body of [`super::load`]).
pub(super) fn read(spec: &DataSpec) -> Result<Dataset> {
    let task = spec.task;
    let format = spec.format.unwrap_or(task.default_format());
    check_format(spec, format)?;
    let path = &spec.path;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| Error::BadFile {
        file: path.clone(),
        reason: format!("not UTF-8 ({e}); save the file as UTF-8"),
    })?;
    // MRPC's files start with a UTF-8 byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let is_tsv =
        matches!(task, Task::Sst2 | Task::Mrpc | Task::Rte | Task::Cola | Task::Stsb | Task::Qnli | Task::Wnli);

    let mut rows: Vec<(usize, Row)> = Vec::new();
    let mut skipped = Vec::new();
    let mut filtered = 0usize;
    for (idx, raw) in text.split('\n').enumerate() {
        let line = idx + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let parsed = if is_tsv {
            let layout = tsv_layout(task);
            if line == 1 && layout.header.is_some_and(|h| raw.split('\t').next() == Some(h)) {
                continue;
            }
            parse_tsv_row(task, &layout, raw).map(Some)
        } else {
            parse_json_row(task, raw, spec)
        };
        match parsed {
            Ok(Some(row)) => {
                if let (Row::Choice { choices, .. }, ChoiceFilter::Exactly(n)) = (&row, spec.choices) {
                    if choices.len() != n {
                        filtered += 1;
                        continue;
                    }
                }
                rows.push((line, row));
            }
            Ok(None) => continue,
            Err(reason) => match spec.on_bad_row {
                OnBadRow::Fail => return Err(Error::DataRow { file: path.clone(), line, reason }),
                OnBadRow::Skip => skipped.push(SkippedRow { line, reason }),
            },
        }
        if spec.limit.is_some_and(|n| rows.len() >= n) {
            break;
        }
    }
    if rows.is_empty() {
        let why = match skipped.first() {
            Some(s) => format!("no usable rows ({} skipped; first at line {}: {})", skipped.len(), s.line, s.reason),
            None if filtered > 0 => {
                format!("no usable rows ({filtered} removed by the choice filter)")
            }
            None => "no data rows; is this the right file?".to_string(),
        };
        return Err(Error::BadFile { file: path.clone(), reason: why });
    }

    // Class count: fixed by the task, or from the data (user tasks).
    let num_classes = if task.is_regression() {
        0
    } else if let Some(n) = task.fixed_num_classes(spec.choices) {
        n
    } else if task == Task::JsonlChoice {
        rows.iter().map(|(_, r)| if let Row::Choice { choices, .. } = r { choices.len() } else { 0 }).max().unwrap_or(0)
    } else if !spec.label_names.is_empty() {
        spec.label_names.len()
    } else if let Some(n) = spec.num_classes {
        n
    } else {
        // Integer labels: the classes 0..k that all occur. A label past a gap (7 among 0s and
        // 1s) is far more often a typo than a class with no other example, so it is reported
        // below instead of silently widening the head.
        let present: std::collections::BTreeSet<usize> = rows
            .iter()
            .filter_map(|(_, r)| if let Row::Text { label: Label::Class(c), .. } = r { Some(*c) } else { None })
            .collect();
        (0..).find(|c| !present.contains(c)).unwrap_or(0)
    };
    let inferred = task == Task::JsonlText && spec.label_names.is_empty() && spec.num_classes.is_none();

    let mut examples = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let example = match row {
            Row::Text { text, text_pair, label } => {
                if let Label::Class(c) = label {
                    if c >= num_classes {
                        let mut reason = out_of_range(c, task, num_classes);
                        if inferred && num_classes == 0 {
                            reason.push_str("; integer labels count from 0 and no row has label 0; set num_labels in the run config if class 0 really has no example");
                        } else if inferred {
                            reason.push_str(&format!(
                                "; the classes are inferred from the labels present (0..={}, none missing); \
                                 set num_labels in the run config if the task really has more",
                                num_classes - 1
                            ));
                        }
                        match spec.on_bad_row {
                            OnBadRow::Fail => return Err(Error::DataRow { file: path.clone(), line, reason }),
                            OnBadRow::Skip => {
                                skipped.push(SkippedRow { line, reason });
                                continue;
                            }
                        }
                    }
                }
                match format {
                    Format::Encoder => Example { line, text, text_pair, label, num_choices: num_classes },
                    Format::Prompt => {
                        let prompt = match &spec.template {
                            Some(t) => {
                                t.replace("{text}", &text).replace("{text_pair}", text_pair.as_deref().unwrap_or(""))
                            }
                            None if task == Task::JsonlText => match &text_pair {
                                Some(b) => format!("{text}\n{b}\nAnswer:"),
                                None => format!("{text}\nAnswer:"),
                            },
                            None => glue_prompt(task, &text, text_pair.as_deref()),
                        };
                        Example { line, text: prompt, text_pair: None, label, num_choices: num_classes }
                    }
                }
            }
            Row::Choice { question, choices, answer, context } => {
                if choices.len() > num_classes {
                    let reason = format!("{} choices, more than the {num_classes} this task allows", choices.len());
                    match spec.on_bad_row {
                        OnBadRow::Fail => return Err(Error::DataRow { file: path.clone(), line, reason }),
                        OnBadRow::Skip => {
                            skipped.push(SkippedRow { line, reason });
                            continue;
                        }
                    }
                }
                let prompt = match task {
                    Task::WinograndeS | Task::WinograndeM => {
                        // invariant: the WinoGrande reader always yields 2 choices.
                        winogrande_prompt(&question, &choices[0], &choices[1])
                    }
                    Task::Boolq => boolq_prompt(&question, context.as_deref().unwrap_or("")),
                    _ => match &context {
                        Some(c) => format!("{c}\n{}", mcqa_prompt(&question, &choices)),
                        None => mcqa_prompt(&question, &choices),
                    },
                };
                let num_choices = if task == Task::Boolq { 2 } else { choices.len() };
                Example { line, text: prompt, text_pair: None, label: Label::Class(answer), num_choices }
            }
        };
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(Error::BadFile { file: path.clone(), reason: "no usable rows after validation".into() });
    }
    let label_words = match format {
        Format::Encoder => Vec::new(),
        Format::Prompt if !spec.label_words.is_empty() => spec.label_words.clone(),
        Format::Prompt => task_label_words(task, num_classes),
    };
    if format == Format::Prompt && label_words.len() != num_classes {
        return Err(Error::config(
            "label_words",
            format!("{:?}", label_words),
            format!("{} has {num_classes} classes; give one label word per class", path.display()),
        ));
    }
    Ok(Dataset { task, format, file: path.clone(), examples, num_classes, label_words, skipped, filtered })
}

fn check_format(spec: &DataSpec, format: Format) -> Result<()> {
    let task = spec.task;
    if format == Format::Prompt && task.is_regression() {
        return Err(Error::config(
            "format",
            "prompt",
            format!("{} is a regression task; use format = encoder", task.name()),
        ));
    }
    if format == Format::Encoder && (task.is_multiple_choice() || task == Task::Boolq) {
        return Err(Error::config(
            "format",
            "encoder",
            format!("{} is scored by a decoder; use format = prompt", task.name()),
        ));
    }
    if format == Format::Prompt && task == Task::JsonlText && spec.label_words.is_empty() {
        return Err(Error::config(
            "label_words",
            "[]",
            "jsonl_text with format = prompt needs one label word per class, e.g. [\" no\", \" yes\"]",
        ));
    }
    Ok(())
}

fn parse_tsv_row(task: Task, layout: &TsvLayout, raw: &str) -> std::result::Result<Row, String> {
    // GLUE files do not escape quotes: split on TAB only (data/README.md).
    let fields: Vec<&str> = raw.split('\t').collect();
    if fields.len() != layout.columns {
        return Err(format!(
            "expected {} tab-separated columns for {}, found {}",
            layout.columns,
            task.name(),
            fields.len()
        ));
    }
    // Indices below are < layout.columns == fields.len().
    let text = fields[layout.text].to_string();
    if text.trim().is_empty() {
        return Err("empty text".into());
    }
    let text_pair = layout.text_pair.map(|i| fields[i].to_string());
    let label = parse_tsv_label(task, fields[layout.label].trim())?;
    Ok(Row::Text { text, text_pair, label })
}

fn get_str<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("field `{key}` is not a string: {other}")),
        None => Err(format!("missing field `{key}`")),
    }
}

fn get_str_list(v: &Value, key: &str) -> std::result::Result<Vec<String>, String> {
    match v.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| format!("`{key}` holds a non-string: {x}")))
            .collect(),
        Some(other) => Err(format!("field `{key}` is not a list: {other}")),
        None => Err(format!("missing field `{key}`")),
    }
}

/// Finds the answer's index among choice labels ("A".."E", or "1".."4" in some ARC items).
fn answer_index(labels: &[String], key: &str) -> std::result::Result<usize, String> {
    labels
        .iter()
        .position(|l| l == key)
        .ok_or_else(|| format!("answerKey `{key}` is not among the choice labels {labels:?}"))
}

fn parse_json_row(task: Task, raw: &str, spec: &DataSpec) -> std::result::Result<Option<Row>, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    let row = match task {
        Task::WinograndeS | Task::WinograndeM => {
            let sentence = get_str(&v, "sentence")?;
            if !sentence.contains('_') {
                return Err("sentence has no `_` blank".into());
            }
            let answer = match get_str(&v, "answer")? {
                "1" => 0,
                "2" => 1,
                other => return Err(format!("answer `{other}` is not \"1\" or \"2\" (test files have no labels)")),
            };
            let choices = vec![get_str(&v, "option1")?.to_string(), get_str(&v, "option2")?.to_string()];
            Row::Choice { question: sentence.to_string(), choices, answer, context: None }
        }
        Task::ArcEasy | Task::ArcChallenge => {
            let question = get_str(&v, "question")?.to_string();
            let c = v.get("choices").ok_or("missing field `choices`")?;
            let choices = get_str_list(c, "text")?;
            let labels = get_str_list(c, "label")?;
            if choices.len() != labels.len() || choices.len() < 2 {
                return Err(format!("{} choice texts and {} labels", choices.len(), labels.len()));
            }
            let answer = answer_index(&labels, get_str(&v, "answerKey")?)?;
            Row::Choice { question, choices, answer, context: None }
        }
        Task::Obqa => {
            let q = v.get("question").ok_or("missing field `question`")?;
            let question = get_str(q, "stem")?.to_string();
            let list = q.get("choices").and_then(Value::as_array).ok_or("missing list `question.choices`")?;
            let mut choices = Vec::new();
            let mut labels = Vec::new();
            for c in list {
                choices.push(get_str(c, "text")?.to_string());
                labels.push(get_str(c, "label")?.to_string());
            }
            if choices.len() < 2 {
                return Err(format!("{} choices", choices.len()));
            }
            let answer = answer_index(&labels, get_str(&v, "answerKey")?)?;
            Row::Choice { question, choices, answer, context: None }
        }
        Task::Boolq => {
            let question = get_str(&v, "question")?.to_string();
            let passage = get_str(&v, "passage")?.to_string();
            // Google's format has a JSON bool; SuperGLUE's has `label` 0/1 (1 = True).
            let answer = match (v.get("answer"), v.get("label")) {
                (Some(Value::Bool(b)), _) => usize::from(*b),
                (_, Some(Value::Bool(b))) => usize::from(*b),
                (_, Some(Value::Number(n))) if n.as_u64().is_some_and(|x| x <= 1) => n.as_u64().unwrap_or(0) as usize,
                _ => return Err("missing boolean `answer`".into()),
            };
            Row::Choice { question, choices: vec!["False".into(), "True".into()], answer, context: Some(passage) }
        }
        Task::JsonlText | Task::JsonlRegression => {
            let text = get_str(&v, "text")?.to_string();
            let text_pair = match v.get("text_pair") {
                None | Some(Value::Null) => None,
                Some(_) => Some(get_str(&v, "text_pair")?.to_string()),
            };
            let label = match (task, v.get("label")) {
                (_, None) => return Err("missing field `label`".into()),
                (Task::JsonlRegression, Some(Value::Number(n))) => match n.as_f64() {
                    Some(x) if x.is_finite() => Label::Score(x as f32),
                    _ => return Err(format!("label {n} is not a finite number")),
                },
                (Task::JsonlRegression, Some(other)) => return Err(format!("label {other} is not a number")),
                (_, Some(Value::Number(n))) => match n.as_u64() {
                    Some(c) => Label::Class(c as usize),
                    None => return Err(format!("label {n} is not a class index (0, 1, ..)")),
                },
                (_, Some(Value::String(s))) => match spec.label_names.iter().position(|n| n == s) {
                    Some(c) => Label::Class(c),
                    None if spec.label_names.is_empty() => {
                        return Err(format!("string label `{s}` needs `label_names` in the data config"))
                    }
                    None => return Err(format!("label `{s}` is not in label_names {:?}", spec.label_names)),
                },
                (_, Some(other)) => return Err(format!("label {other} is neither a class index nor a name")),
            };
            Row::Text { text, text_pair, label }
        }
        Task::JsonlChoice => {
            let question = get_str(&v, "question")?.to_string();
            let choices = get_str_list(&v, "choices")?;
            if choices.len() < 2 || choices.len() > LETTERS.len() {
                return Err(format!("{} choices; need 2 to 26", choices.len()));
            }
            let answer = match v.get("answer") {
                Some(Value::Number(n)) => n.as_u64().map(|x| x as usize).filter(|&x| x < choices.len()),
                Some(Value::String(s)) => choices.iter().position(|c| c == s).or_else(|| {
                    let mut cs = s.chars();
                    match (cs.next(), cs.next()) {
                        (Some(c), None) => LETTERS.find(c).filter(|&i| i < choices.len()),
                        _ => None,
                    }
                }),
                _ => return Err("missing field `answer`".into()),
            }
            .ok_or_else(|| format!("answer {} is not a choice index, letter or choice text", v["answer"]))?;
            let context = match v.get("context") {
                None | Some(Value::Null) => None,
                Some(_) => Some(get_str(&v, "context")?.to_string()),
            };
            Row::Choice { question, choices, answer, context }
        }
        _ => return Err(format!("{} is not a JSONL task", task.name())),
    };
    Ok(Some(row))
}

/// Resolves `split` of `task` under `data_dir` (the repository's `data/` folder).
pub(super) fn standard_path(task: Task, split: Split, data_dir: &Path) -> Result<PathBuf> {
    match task.standard_file(split) {
        Some(rel) => Ok(data_dir.join(rel)),
        None => Err(Error::config(
            "split",
            format!("{split:?}").to_lowercase(),
            format!(
                "{} has no labelled {split:?} file in data/; see data/README.md (use dev as the test set)",
                task.name()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcqa_prompt_matches_ivon_lora() {
        let p = mcqa_prompt("Which is a gas?", &["water".into(), "steam.".into()]);
        assert_eq!(
            p,
            "Select one of the choices that answers the following question: Which is a gas? Choices: A. Water. B. Steam. Answer:"
        );
    }

    #[test]
    fn winogrande_prompt_keeps_reference_typo() {
        let p = winogrande_prompt("Sarah was better than Maria so _ won.", "Sarah", "Maria");
        assert!(p.ends_with("Choices: A. Sarah. B Maria. Answer:"), "{p}");
    }

    #[test]
    fn task_names_round_trip() {
        for t in Task::ALL {
            assert_eq!(Task::from_name(t.name()).unwrap(), t);
        }
        assert!(Task::from_name("mnli").is_err());
    }
}
