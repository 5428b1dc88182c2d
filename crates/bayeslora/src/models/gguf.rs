//! Llama-family checkpoints in llama.cpp's GGUF format: weights dequantized to HF names, the
//! config from the metadata, and a `tokenizers::Tokenizer` rebuilt from the embedded vocabulary.
//!
//! [`read`] parses the file (candle's `gguf_file::Content`), dequantizes every tensor on the CPU
//! and renames it to the HF key ([`hf_name`]); [`load`] then builds a [`Llama`] in the compute
//! dtype. The quantized base is thus frozen at its dequantized values, which is the QLoRA setting.
//!
//! Two things llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) changes and
//! we undo, as transformers' GGUF loader does:
//! - the rows of `attn_q` / `attn_k` (weight and bias) are permuted from HF's rotate-half RoPE
//!   layout (each head's first half, then second half) to llama.cpp's interleaved pairs
//!   ([`unpermute_rows`]); Qwen2 is converted without this permutation;
//! - a tied model has no `output.weight`, so `tie_word_embeddings` is set when it is absent.
//!
//! The tokenizer follows what transformers builds for the same file
//! (`integrations/gguf/gguf_tokenizer_mapping.py`, transformers 5.x), since the golden fixtures
//! come from it: byte-level BPE over `tokenizer.ggml.tokens` / `merges`, control tokens (type 3)
//! as special added tokens, user-defined ones (type 4) as plain added tokens, no BOS added, and
//! the GPT-2 split regex unless `tokenizer.ggml.pre` names a llama3 or qwen2 split. llama.cpp
//! splits digits one by one for `pre = smollm` first; transformers does not, and for SmolLM2's
//! vocabulary (single-digit tokens only, no space+digit merges) both give the same ids.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! let path = std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf");
//! let (model, tokenizer, cfg) = bayeslora::models::gguf::load(path, DType::F32, &Device::Cpu)?;
//! let ids = tokenizer.encode("Question: 2+2? Answer:", false).map_err(|e| bayeslora::Error::Tokenizer(e.to_string()))?;
//! assert_eq!(cfg.num_hidden_layers, model.config().num_hidden_layers);
//! # Ok::<(), bayeslora::Error>(())
//! ```
use super::llama::{Llama, LlamaConfig, LlamaVariant};
use super::load::Weights;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// `general.architecture` values we load.
pub const SUPPORTED: &[&str] = &["llama", "qwen2"];

/// A GGUF checkpoint read into memory.
#[derive(Debug)]
pub struct GgufCheckpoint {
    /// Dequantized f32 tensors on the CPU, under HF names.
    pub weights: Weights,
    pub config: LlamaConfig,
    pub tokenizer: Tokenizer,
    pub special_tokens: SpecialTokens,
    /// `tokenizer.chat_template`, if the file has one.
    pub chat_template: Option<String>,
}

/// Special token ids from `tokenizer.ggml.*_token_id`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
}

/// Reads a GGUF file and builds the model in `dtype` on `device`.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<(Llama, Tokenizer, LlamaConfig)> {
    let ckpt = read(path)?;
    let model = Llama::load(&ckpt.weights, &ckpt.config, dtype, device)?;
    Ok((model, ckpt.tokenizer, ckpt.config))
}

/// Reads a GGUF file: config, tokenizer and dequantized HF-named weights.
pub fn read(path: &Path) -> Result<GgufCheckpoint> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| bad(path, format!("not a valid GGUF file ({})", inner(e))))?;
    let meta = Meta { content: &content, file: path };
    let config = meta.config()?;
    let (tokenizer, special_tokens) = meta.tokenizer()?;
    let chat_template = meta.string("tokenizer.chat_template").ok();

    let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
    // Sorted, so a failure names the same tensor on every run.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let unpermute = config.variant != LlamaVariant::Qwen2;
    for name in names {
        let Some(hf) = hf_name(name) else {
            tracing::debug!(tensor = %name, "gguf: skipping tensor with no HF counterpart");
            continue;
        };
        let t =
            content.tensor(&mut reader, name, &Device::Cpu).and_then(|q| q.dequantize(&Device::Cpu)).map_err(|e| {
                bad(path, format!("tensor `{name}`: {}; the file may be truncated, re-download it", inner(e)))
            })?;
        let t = if unpermute && name.contains(".attn_q.") {
            unpermute_rows(&t, config.num_attention_heads)?
        } else if unpermute && name.contains(".attn_k.") {
            unpermute_rows(&t, config.num_key_value_heads)?
        } else {
            t
        };
        tensors.insert(hf, t);
    }
    Ok(GgufCheckpoint {
        weights: Weights::from_tensors(path, tensors),
        config,
        tokenizer,
        special_tokens,
        chat_template,
    })
}

/// Tensor names with their shapes.
pub type TensorShapes = Vec<(String, Vec<usize>)>;

/// The config and the HF-named tensor shapes of a GGUF file, from its header alone (no tensor
/// data is read): what [`crate::train::memory`] needs to size a run before loading it. Fails
/// like [`read`] on a damaged header, and when a tensor's data would reach past the end of the
/// file.
pub fn read_shapes(path: &Path) -> Result<(LlamaConfig, TensorShapes)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = std::io::BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| bad(path, format!("not a valid GGUF file ({})", inner(e))))?;
    let config = Meta { content: &content, file: path }.config()?;
    let mut shapes = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims().to_vec();
        let elems = dims.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
        let dtype = info.ggml_dtype;
        let bytes = (elems / dtype.block_size().max(1) as u64).saturating_mul(dtype.type_size() as u64);
        let end = content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
        if end > file_len {
            return Err(bad(
                path,
                format!("tensor `{name}` ends at byte {end}, past the end of the file ({file_len})"),
            ));
        }
        if let Some(hf) = hf_name(name) {
            shapes.push((hf, dims));
        }
    }
    shapes.sort();
    Ok((config, shapes))
}

/// llama.cpp tensor name → HF name (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`).
/// `None` for tensors the HF model has no slot for (`rope_freqs.weight`).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's q/k row permutation: `x: [heads·D, ..]` (or `[heads·D]` for a bias).
///
/// The converter maps HF row `c·D/2 + i` of each head (half `c` ∈ {0, 1}, pair `i` < D/2) to
/// row `2i + c`, so that RoPE rotates adjacent pairs. Viewing each head's rows as `[D/2, 2]`
/// and transposing to `[2, D/2]` puts them back in HF's rotate-half order.
pub fn unpermute_rows(x: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(Error::config(
            "attention.head_count",
            heads,
            format!("does not split {rows} q/k rows into heads of even size"),
        ));
    }
    let cols: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(x.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

fn bad(file: &Path, reason: String) -> Error {
    Error::BadFile { file: file.to_path_buf(), reason }
}

/// candle's error without its backtrace/path wrappers, for one-line messages.
fn inner(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } | candle_core::Error::WithPath { inner, .. } => *inner,
        other => other,
    }
}

/// Typed access to the metadata, naming the file and key in errors.
struct Meta<'a> {
    content: &'a Content,
    file: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| bad(self.file, format!("metadata key `{key}` is missing")))
    }
    fn wrong(&self, key: &str, e: candle_core::Error) -> Error {
        bad(self.file, format!("metadata key `{key}`: {}", inner(e)))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => return Err(bad(self.file, format!("metadata key `{key}`: expected a count, got {other:?}"))),
        };
        usize::try_from(n).map_err(|_| bad(self.file, format!("metadata key `{key}`: {n} is too large")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.content.metadata.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(bad(self.file, format!("metadata key `{key}`: expected a float, got {other:?}"))),
        }
    }
    fn string(&self, key: &str) -> Result<String> {
        self.get(key)?.to_string().cloned().map_err(|e| self.wrong(key, e))
    }
    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.get(key)?.to_vec().map_err(|e| self.wrong(key, e))
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?.iter().map(|v| v.to_string().cloned().map_err(|e| self.wrong(key, e))).collect()
    }

    /// The resolved config from `{arch}.*` keys, as transformers' `gguf_config_mapping`.
    fn config(&self) -> Result<LlamaConfig> {
        let arch = self.string("general.architecture")?;
        let variant = match arch.as_str() {
            "llama" => LlamaVariant::Llama,
            "qwen2" => LlamaVariant::Qwen2,
            _ => {
                return Err(Error::UnknownArchitecture {
                    file: self.file.to_path_buf(),
                    found: format!("general.architecture = {arch}"),
                    supported: SUPPORTED.join(", "),
                })
            }
        };
        let k = |name: &str| format!("{arch}.{name}");
        if let Ok(kind) = self.string(&k("rope.scaling.type")) {
            if kind != "none" {
                return Err(Error::config("rope.scaling.type", kind, "GGUF rope scaling is not implemented"));
            }
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(Error::config(
                "rope_freqs.weight",
                "present",
                "GGUF per-frequency rope factors (llama 3.1 scaling) are not implemented; use the safetensors checkpoint",
            ));
        }
        let hidden_size = self.usize(&k("embedding_length"))?;
        let heads = self.usize(&k("attention.head_count"))?;
        let kv_heads = self.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
        let vocab_size = match self.opt_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => self.array("tokenizer.ggml.tokens")?.len(),
        };
        let has_bias = self.content.tensor_infos.contains_key("blk.0.attn_q.bias");
        let cfg = LlamaConfig {
            variant,
            vocab_size,
            hidden_size,
            intermediate_size: self.usize(&k("feed_forward_length"))?,
            num_hidden_layers: self.usize(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: self.opt_usize(&k("attention.key_length"))?.unwrap_or(hidden_size / heads.max(1)),
            rms_norm_eps: self.opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: self.opt_f64(&k("rope.freq_base"))?.unwrap_or(match variant {
                LlamaVariant::Qwen2 => 1_000_000.0,
                _ => 10_000.0,
            }),
            rope_scaling: None,
            max_position_embeddings: self.opt_usize(&k("context_length"))?.unwrap_or(2048),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: variant == LlamaVariant::Qwen2 || has_bias,
            o_bias: variant == LlamaVariant::Llama && self.content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            mlp_bias: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Byte-level BPE from `tokenizer.ggml.*`, as transformers' `byte_level_tokenizer` +
    /// `add_gguf_special_tokens` + `set_split_regex`.
    fn tokenizer(&self) -> Result<(Tokenizer, SpecialTokens)> {
        let file = self.file;
        let tk = |reason: String| Error::Tokenizer(format!("{}: {reason}", file.display()));
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(tk(format!("tokenizer.ggml.model = `{model}` is not supported; only `gpt2` (byte-level BPE)")));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| self.wrong("tokenizer.ggml.token_type", e))?
                .iter()
                .map(|t| t.to_i32().map(i64::from).map_err(|e| self.wrong("tokenizer.ggml.token_type", e)))
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };

        let byte_chars = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = byte_chars.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        // Tokens spelled with raw UTF-8 (rare; llama.cpp writes some added tokens that way) are
        // respelled in the byte alphabet, as transformers does.
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let spelled =
                    if in_alphabet(t) { t.clone() } else { t.bytes().map(|b| byte_chars[b as usize]).collect() };
                (spelled, i as u32)
            })
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tk(format!("merge `{m}` is not two tokens separated by a space")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| tk(format!("bpe: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);

        let pre = self.string("tokenizer.ggml.pre").unwrap_or_default();
        let byte_level = ByteLevel::new(false, true, true);
        match split_regex(&pre) {
            Some(re) => {
                let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| tk(format!("split regex for pre `{pre}`: {e}")))?;
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ])));
            }
            None => {
                tokenizer.with_pre_tokenizer(Some(byte_level));
            }
        }
        tokenizer.with_decoder(Some(ByteLevel::default()));

        // 3 = CONTROL → special; 4 = USER_DEFINED → plain added token (llama.cpp's llama_token_type).
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| **ty == 3 && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        tokenizer.add_special_tokens(control).map_err(|e| tk(format!("special tokens: {e}")))?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| **ty == 4 && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        tokenizer.add_tokens(user).map_err(|e| tk(format!("user-defined tokens: {e}")))?;

        let id = |key: &str| -> Result<Option<u32>> {
            match self.opt_usize(key)? {
                Some(i) if i < tokens.len() => Ok(Some(i as u32)),
                Some(i) => {
                    Err(bad(file, format!("metadata key `{key}` = {i} is outside the vocabulary of {}", tokens.len())))
                }
                None => Ok(None),
            }
        };
        let special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
        };
        Ok((tokenizer, special))
    }
}

/// The split regex transformers applies before byte-level BPE for a `tokenizer.ggml.pre` value
/// (`GGUF_PRE_TOKENIZER_SPLITS`, llama3 and qwen2 groups); `None`: GPT-2's own regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx"
        | "smaug-bpe" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

/// GPT-2's byte → printable-char table (`bytes_to_unicode`): printable Latin-1 bytes map to
/// themselves, the other 68 to U+0100 onwards, in byte order.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

/// Whether `path` names a GGUF file (by its extension), for `models::load` to dispatch on.
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(hf_name("blk.12.attn_output.weight").as_deref(), Some("model.layers.12.self_attn.o_proj.weight"));
        assert_eq!(hf_name("blk.0.attn_q.bias").as_deref(), Some("model.layers.0.self_attn.q_proj.bias"));
        assert_eq!(hf_name("blk.3.ffn_norm.weight").as_deref(), Some("model.layers.3.post_attention_layernorm.weight"));
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(heads, 2, D/2, cols).swapaxes(1, 2).reshape(w.shape)
        let (heads, d, cols) = (3, 4, 2);
        let hf = Tensor::arange(0f32, (heads * d * cols) as f32, &Device::Cpu)?.reshape((heads * d, cols))?;
        let permuted =
            hf.reshape((heads, 2, d / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((heads * d, cols))?;
        let back = unpermute_rows(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        let bias = Tensor::arange(0f32, (heads * d) as f32, &Device::Cpu)?;
        let pb = bias.reshape((heads, 2, d / 2))?.transpose(1, 2)?.contiguous()?.flatten_all()?;
        assert_eq!(unpermute_rows(&pb, heads)?.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t.iter().collect::<std::collections::HashSet<_>>().len(), 256);
    }
}
