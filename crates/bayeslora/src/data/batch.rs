//! Batching: dynamic right padding, optional length bucketing, deterministic shuffling and a
//! resumable cursor.
//!
//! Shape legend: B = batch size, T = longest sequence in the batch, K = number of classes.
//! The epoch's order is a pure function of (seed, epoch, dataset), drawn with our own SplitMix64
//! so that it does not change with the `rand` crate's version; a [`Cursor`] (epoch, position)
//! therefore restores the exact batch stream after a resume.
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

use super::{EncodedDataset, Label};

/// Batching options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Examples per batch (ivon-lora: 4; GLUE encoders: 32).
    pub batch_size: usize,
    /// Shuffle every epoch (training). Evaluation keeps the file order.
    pub shuffle: bool,
    /// Seed of the per-epoch permutation.
    pub seed: u64,
    /// Length bucketing: sort windows of `bucket * batch_size` shuffled examples by length, then
    /// cut batches and shuffle their order. Less padding, nearly the same randomness. `None`: off.
    pub bucket: Option<usize>,
    /// Drop the last, smaller batch of each epoch.
    pub drop_last: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        // batch 4 and shuffling: ivon-lora's `finetune.py` defaults.
        BatchConfig { batch_size: 4, shuffle: true, seed: 0, bucket: None, drop_last: false }
    }
}

impl BatchConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", 0, "must be at least 1"));
        }
        if self.bucket == Some(0) {
            return Err(Error::config("bucket", 0, "use at least 1 batch per bucket, or leave it unset"));
        }
        Ok(())
    }
}

/// Where the batch stream stands: the next batch is batch `position` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: usize,
}

/// Labels of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchLabels {
    /// Class indices, `[B]`.
    Class(Vec<u32>),
    /// Regression targets, `[B]`.
    Score(Vec<f32>),
}

/// A padded batch, flat row-major host vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Row indices into the [`EncodedDataset`] (to map predictions back to examples).
    pub indices: Vec<usize>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// `[B, T]`, right-padded with the pad id.
    pub input_ids: Vec<u32>,
    /// `[B, T]`, 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// `[B, T]`, segment ids (BERT pairs); 0 for decoders and padding.
    pub token_type_ids: Vec<u32>,
    pub labels: BatchLabels,
    /// `[K]`: token id of each class's label word (decoders); empty for encoders.
    pub label_token_ids: Vec<u32>,
    /// `[B, K]`: 1 where class k is a real choice of row b, 0 for padded choices (ARC rows with
    /// fewer than K choices); empty for regression. Mask logits to −∞ where it is 0.
    pub class_mask: Vec<u32>,
    /// `[B]`: index of the last real token of each row; with right padding the decoder's class
    /// logits are read there.
    pub last_positions: Vec<u32>,
    /// Number of non-padding tokens in the batch.
    pub num_real_tokens: usize,
}

/// The candle tensors of a [`Batch`].
#[derive(Debug, Clone)]
pub struct BatchTensors {
    /// `[B, T]` u32.
    pub input_ids: Tensor,
    /// `[B, T]` f32 (1 real, 0 pad).
    pub attention_mask: Tensor,
    /// `[B, T]` u32.
    pub token_type_ids: Tensor,
    /// `[B]` u32 class indices, or `[B]` f32 targets.
    pub labels: Tensor,
    /// `[K]` u32, decoders only.
    pub label_token_ids: Option<Tensor>,
    /// `[B, K]` f32, classification only.
    pub class_mask: Option<Tensor>,
    /// `[B]` u32.
    pub last_positions: Tensor,
}

impl Batch {
    /// Pads rows `indices` of `data` to the longest among them.
    pub fn collate(data: &EncodedDataset, indices: &[usize]) -> Result<Batch> {
        let rows = indices
            .iter()
            .map(|&i| {
                data.rows
                    .get(i)
                    .ok_or_else(|| Error::config("batch index", i, format!("dataset has {} rows", data.len())))
            })
            .collect::<Result<Vec<_>>>()?;
        let b = rows.len();
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let k = data.num_classes;
        let mut input_ids = vec![data.pad_id; b * t];
        let mut attention_mask = vec![0u32; b * t];
        let mut token_type_ids = vec![0u32; b * t];
        let mut last_positions = Vec::with_capacity(b);
        let mut class_mask = vec![0u32; if k > 0 { b * k } else { 0 }];
        let mut class_labels = Vec::with_capacity(b);
        let mut scores = Vec::with_capacity(b);
        let mut num_real_tokens = 0;
        for (row, r) in rows.iter().enumerate() {
            let n = r.ids.len();
            input_ids[row * t..row * t + n].copy_from_slice(&r.ids);
            attention_mask[row * t..row * t + n].fill(1);
            token_type_ids[row * t..row * t + n].copy_from_slice(&r.type_ids[..n.min(r.type_ids.len())]);
            last_positions.push(n.saturating_sub(1) as u32);
            num_real_tokens += n;
            if k > 0 {
                class_mask[row * k..row * k + r.num_choices.min(k)].fill(1);
            }
            match r.label {
                Label::Class(c) => class_labels.push(c as u32),
                Label::Score(s) => scores.push(s),
            }
        }
        let labels = if scores.is_empty() { BatchLabels::Class(class_labels) } else { BatchLabels::Score(scores) };
        Ok(Batch {
            indices: indices.to_vec(),
            batch_size: b,
            seq_len: t,
            input_ids,
            attention_mask,
            token_type_ids,
            labels,
            label_token_ids: data.label_token_ids.clone(),
            class_mask,
            last_positions,
            num_real_tokens,
        })
    }

    /// Copies the batch to `device` (ids u32, masks f32).
    pub fn to_tensors(&self, device: &Device) -> Result<BatchTensors> {
        let (b, t) = (self.batch_size, self.seq_len);
        let f32_of = |v: &[u32]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let labels = match &self.labels {
            BatchLabels::Class(c) => Tensor::from_slice(c, b, device)?,
            BatchLabels::Score(s) => Tensor::from_slice(s, b, device)?,
        };
        let k = self.label_token_ids.len();
        let class_mask = if self.class_mask.is_empty() || b == 0 {
            None
        } else {
            let k_mask = self.class_mask.len() / b;
            Some(Tensor::from_vec(f32_of(&self.class_mask), (b, k_mask), device)?)
        };
        Ok(BatchTensors {
            input_ids: Tensor::from_slice(&self.input_ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(f32_of(&self.attention_mask), (b, t), device)?,
            token_type_ids: Tensor::from_slice(&self.token_type_ids, (b, t), device)?,
            labels,
            label_token_ids: if k > 0 { Some(Tensor::from_slice(&self.label_token_ids, k, device)?) } else { None },
            class_mask,
            last_positions: Tensor::from_slice(&self.last_positions, b, device)?,
        })
    }

    /// Batches of `data` in file order, for evaluation and prediction.
    pub fn in_order(data: &EncodedDataset, batch_size: usize) -> impl Iterator<Item = Result<Batch>> + '_ {
        let n = data.len();
        let bs = batch_size.max(1);
        (0..n.div_ceil(bs)).map(move |i| {
            let idx: Vec<usize> = (i * bs..((i + 1) * bs).min(n)).collect();
            Batch::collate(data, &idx)
        })
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fixed forever, unlike `StdRng`.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, epoch: u64) -> Self {
        let mut s = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next_u64();
        s
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (rejection sampling, no modulo bias); n > 0.
    fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The batches of one epoch, as lists of row indices.
fn epoch_plan(data: &EncodedDataset, cfg: &BatchConfig, epoch: u64) -> Vec<Vec<usize>> {
    let n = data.len();
    let bs = cfg.batch_size;
    let mut rng = SplitMix64::new(cfg.seed, epoch);
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.shuffle {
        rng.shuffle(&mut order);
    }
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(n.div_ceil(bs));
    match cfg.bucket {
        Some(m) => {
            for window in order.chunks(m * bs) {
                let mut w = window.to_vec();
                // stable sort: equal lengths keep their shuffled order
                w.sort_by_key(|&i| data.rows[i].ids.len());
                batches.extend(w.chunks(bs).map(<[usize]>::to_vec));
            }
        }
        None => batches.extend(order.chunks(bs).map(<[usize]>::to_vec)),
    }
    if cfg.drop_last {
        batches.retain(|b| b.len() == bs);
    }
    if cfg.shuffle && cfg.bucket.is_some() {
        rng.shuffle(&mut batches);
    }
    batches
}

/// An endless, resumable stream of training batches.
#[derive(Debug, Clone)]
pub struct Batcher {
    data: Arc<EncodedDataset>,
    cfg: BatchConfig,
    cursor: Cursor,
    plan: Vec<Vec<usize>>,
}

impl Batcher {
    pub fn new(data: Arc<EncodedDataset>, cfg: BatchConfig) -> Result<Self> {
        cfg.validate()?;
        if data.is_empty() {
            return Err(Error::config("dataset", "empty", "no rows to batch"));
        }
        let plan = epoch_plan(&data, &cfg, 0);
        if plan.is_empty() {
            return Err(Error::config(
                "batch_size",
                cfg.batch_size,
                format!("larger than the {} rows with drop_last = true; lower it", data.len()),
            ));
        }
        Ok(Batcher { data, cfg, cursor: Cursor::default(), plan })
    }

    /// The position of the next batch; save it in checkpoints.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Restores a saved cursor: the following batches are bit-identical to the original run's.
    pub fn seek(&mut self, cursor: Cursor) -> Result<()> {
        let plan = epoch_plan(&self.data, &self.cfg, cursor.epoch);
        if cursor.position > plan.len() {
            return Err(Error::config(
                "cursor.position",
                cursor.position,
                format!(
                    "epoch has only {} batches; was the checkpoint made with other data or batch size?",
                    plan.len()
                ),
            ));
        }
        self.plan = plan;
        self.cursor = cursor;
        Ok(())
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    pub fn data(&self) -> &EncodedDataset {
        &self.data
    }

    /// The next batch; moves to the next epoch (new permutation) at the end of one.
    pub fn next_batch(&mut self) -> Batch {
        if self.cursor.position >= self.plan.len() {
            self.cursor = Cursor { epoch: self.cursor.epoch + 1, position: 0 };
            self.plan = epoch_plan(&self.data, &self.cfg, self.cursor.epoch);
        }
        let idx = &self.plan[self.cursor.position];
        self.cursor.position += 1;
        // invariant: the plan holds only indices < data.len(), so collate cannot fail.
        Batch::collate(&self.data, idx).expect("invariant: plan indices are in range")
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Encoded, Format, Task};
    use super::*;

    fn toy(lens: &[usize], k: usize) -> EncodedDataset {
        let rows = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| Encoded {
                ids: (0..n as u32).map(|t| 10 + t + i as u32).collect(),
                type_ids: vec![0; n],
                label: Label::Class(i % k),
                num_choices: if i == 0 { k - 1 } else { k },
            })
            .collect();
        EncodedDataset {
            task: Task::ArcEasy,
            format: Format::Prompt,
            rows,
            num_classes: k,
            label_token_ids: (100..100 + k as u32).collect(),
            pad_id: 0,
            truncated: 0,
        }
    }

    #[test]
    fn padding_masks_and_last_positions() {
        let d = toy(&[3, 1, 2], 3);
        let b = Batch::collate(&d, &[0, 1, 2]).unwrap();
        assert_eq!((b.batch_size, b.seq_len), (3, 3));
        assert_eq!(b.input_ids, vec![10, 11, 12, 11, 0, 0, 12, 13, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 0, 0, 1, 1, 0]);
        assert_eq!(b.last_positions, vec![2, 0, 1]);
        assert_eq!(b.num_real_tokens, 6);
        assert_eq!(b.class_mask, vec![1, 1, 0, 1, 1, 1, 1, 1, 1]);
        assert_eq!(b.labels, BatchLabels::Class(vec![0, 1, 2]));
        let t = b.to_tensors(&Device::Cpu).unwrap();
        assert_eq!(t.input_ids.dims(), &[3, 3]);
        assert_eq!(t.attention_mask.to_vec2::<f32>().unwrap()[1], vec![1.0, 0.0, 0.0]);
        assert_eq!(t.label_token_ids.unwrap().to_vec1::<u32>().unwrap(), vec![100, 101, 102]);
        assert_eq!(t.class_mask.unwrap().dims(), &[3, 3]);
        assert_eq!(t.last_positions.to_vec1::<u32>().unwrap(), vec![2, 0, 1]);
    }

    #[test]
    fn shuffle_is_deterministic_and_covers_each_epoch() {
        let d: Arc<EncodedDataset> = toy(&[1; 23], 2).into();
        let cfg = BatchConfig { batch_size: 4, seed: 7, ..Default::default() };
        let mut a = Batcher::new(d.clone(), cfg.clone()).unwrap();
        let mut b = Batcher::new(d.clone(), cfg.clone()).unwrap();
        assert_eq!(a.batches_per_epoch(), 6);
        let ea: Vec<Vec<usize>> = (0..6).map(|_| a.next_batch().indices).collect();
        let eb: Vec<Vec<usize>> = (0..6).map(|_| b.next_batch().indices).collect();
        assert_eq!(ea, eb);
        let mut all: Vec<usize> = ea.concat();
        all.sort_unstable();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        assert_ne!(ea.concat(), (0..23).collect::<Vec<_>>(), "epoch 0 should be shuffled");
        let e1: Vec<usize> = (0..6).flat_map(|_| a.next_batch().indices).collect();
        assert_ne!(e1, ea.concat(), "each epoch gets its own permutation");
        assert_eq!(a.cursor(), Cursor { epoch: 1, position: 6 });
        let other = Batcher::new(d, BatchConfig { seed: 8, ..cfg }).unwrap();
        assert_ne!(other.plan, Batcher::new(a.data.clone(), a.cfg.clone()).unwrap().plan);
    }

    #[test]
    fn cursor_resume_is_exact() {
        let lens: Vec<usize> = (0..37).map(|i| 1 + (i * 7) % 11).collect();
        let d: Arc<EncodedDataset> = toy(&lens, 4).into();
        let cfg = BatchConfig { batch_size: 5, seed: 3, bucket: Some(2), ..Default::default() };
        let mut full = Batcher::new(d.clone(), cfg.clone()).unwrap();
        let reference: Vec<Batch> = (0..25).map(|_| full.next_batch()).collect();
        let mut first = Batcher::new(d.clone(), cfg.clone()).unwrap();
        for _ in 0..11 {
            first.next_batch();
        }
        let saved = first.cursor();
        let json = serde_json::to_string(&saved).unwrap();
        let mut resumed = Batcher::new(d, cfg).unwrap();
        resumed.seek(serde_json::from_str(&json).unwrap()).unwrap();
        let rest: Vec<Batch> = (0..14).map(|_| resumed.next_batch()).collect();
        assert_eq!(&reference[11..], &rest[..]);
    }

    #[test]
    fn bucketing_reduces_padding() {
        let lens: Vec<usize> = (0..64).map(|i| 1 + (i * 37) % 50).collect();
        let d: Arc<EncodedDataset> = toy(&lens, 2).into();
        let pad = |bucket| {
            let mut b =
                Batcher::new(d.clone(), BatchConfig { batch_size: 8, bucket, seed: 1, ..Default::default() }).unwrap();
            (0..8)
                .map(|_| {
                    let x = b.next_batch();
                    x.batch_size * x.seq_len - x.num_real_tokens
                })
                .sum::<usize>()
        };
        assert!(pad(Some(8)) < pad(None) / 2, "{} vs {}", pad(Some(8)), pad(None));
    }

    #[test]
    fn drop_last_and_in_order() {
        let d = toy(&[2; 10], 2);
        let b = Batcher::new(d.clone().into(), BatchConfig { batch_size: 4, drop_last: true, ..Default::default() })
            .unwrap();
        assert_eq!(b.batches_per_epoch(), 2);
        let ev: Vec<Batch> = Batch::in_order(&d, 4).collect::<Result<_>>().unwrap();
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[2].indices, vec![8, 9]);
        let err = Batcher::new(d.into(), BatchConfig { batch_size: 0, ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("batch_size"));
    }
}
