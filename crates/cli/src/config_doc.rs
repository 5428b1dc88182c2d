//! The reference table of every TOML key of a run (`docs/config.md`), generated from
//! [`RunConfig::default`] so the keys and defaults cannot drift from the code: the test
//! `config_reference_is_current` fails when the file differs, and rewrites it when run with
//! `BAYESLORA_BLESS=1`.
use bayeslora::adapters::lora::TargetModules;
use bayeslora::run::RunConfig;
use std::collections::BTreeMap;

/// What each key means (every key of the table must have one: the test checks).
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("model", "HF model folder, .gguf file, or an asset name (minilm, smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)"),
    ("task", "sst2 mrpc rte cola stsb qnli wnli winogrande_s winogrande_m arc_easy arc_challenge obqa boolq jsonl_text jsonl_choice jsonl_regression"),
    ("train_file", "training data file (default: the task's file in data/)"),
    ("eval_file", "evaluation data file (default: the task's dev split)"),
    ("train_limit", "use only the first N training rows"),
    ("eval_limit", "use only the first N evaluation rows"),
    ("num_labels", "class count of a user JSONL task (default: inferred from the labels, 0..k)"),
    ("label_words", "decoders: one label word per class, scored after the prompt (jsonl_text needs them, e.g. [\" no\", \" yes\"])"),
    ("template", "decoders: the jsonl_text prompt with {text} and {text_pair} (default \"{text}\\nAnswer:\")"),
    ("overwrite", "delete an earlier run's outputs in `output` first (not saved in config.toml)"),
    ("skip_bad_rows", "skip malformed rows (with a count) instead of stopping at the first"),
    ("skip_memory_check", "start even when the peak-memory estimate exceeds the device's memory"),
    ("max_len", "truncate sequences to this many tokens"),
    ("output", "run folder: adapter, checkpoints, metrics, results, plots"),
    ("device", "cpu, cuda or cuda:N"),
    ("dtype", "frozen weights and activations: f32, bf16 or f16 (adapters and optimizer state stay f32)"),
    ("method", "lora, or blora (learned ranks and bit-widths)"),
    ("lora.r", "LoRA rank"),
    ("lora.lora_alpha", "scaling numerator: scale = lora_alpha / r (/ √r with use_rslora)"),
    ("lora.lora_dropout", "dropout on the adapter's input while training"),
    ("lora.target_modules", "module names (suffix match) or a regex; unset: the architecture's query and value"),
    ("lora.use_rslora", "rank-stabilized scaling lora_alpha / √r"),
    ("lora.bias", "peft's bias setting (only \"none\")"),
    ("lora.modules_to_save", "modules trained in full beside the adapters (peft's modules_to_save)"),
    ("lora.rank_pattern", "per-module rank, {module = r}"),
    ("lora.alpha_pattern", "per-module alpha, {module = alpha}"),
    ("blora.r", "B-LoRA's initial (largest) rank"),
    ("blora.lora_alpha", "B-LoRA scaling numerator"),
    ("blora.lora_dropout", "B-LoRA input dropout"),
    ("blora.target_modules", "as lora.target_modules"),
    ("blora.prune_rank", "learn the rank with hard-concrete gates"),
    ("blora.quantize", "learn the bit-widths of the adapter weights"),
    ("blora.quantize_activations", "learn the bit-widths of the adapter's activations"),
    ("blora.quantize_base", "quantize the frozen base weights too"),
    ("blora.init_e", "initialization of the per-rank scales E"),
    ("blora.rank_gate_init", "initial logit of the rank gates (larger: open longer)"),
    ("blora.bit_gate_init", "initial logits of the 4→8→16→32-bit gates"),
    ("blora.cost", "what the prior penalizes: bops or bits"),
    ("blora.mu", "prior strength μ: loss = task + μ · Σ gate priors"),
    ("blora.gate_lr", "learning rate of the gate logits (AdamW)"),
    ("blora.mu_warmup_steps", "prior warm-up: μ grows linearly to its value over N steps (0: off)"),
    ("train.optimizer", "ivon, adamw or sgd"),
    ("train.epochs", "passes over the training data (when max_steps is unset)"),
    ("train.max_steps", "optimizer steps (overrides epochs)"),
    ("train.grad_accum", "micro-batches per optimizer step"),
    ("train.schedule", "learning-rate schedule: linear (decay to 0), cosine or constant"),
    ("train.warmup_steps", "linear warm-up steps"),
    ("train.max_grad_norm", "clip the gradient norm to this value (AdamW/SGD); unset: off"),
    ("train.eval_every", "evaluate the mean every N steps (0: only at the end)"),
    ("train.checkpoint_every", "checkpoint every N steps (0: only at the end and on Ctrl-C)"),
    ("train.checkpoint_dir", "checkpoint folder (default: <output>/checkpoints)"),
    ("train.keep_checkpoints", "checkpoints kept (the newest N; 0: all), HF's save_total_limit"),
    ("train.seed", "seed of initialization, shuffling, dropout and posterior samples"),
    ("train.gradient_checkpointing", "recompute each decoder layer in the backward (less memory)"),
    ("train.ivon.lr", "IVON learning rate"),
    ("train.ivon.ess", "effective sample size λ: σ = 1/√(λ(h + δ))"),
    ("train.ivon.hess_init", "initial Hessian estimate h₀"),
    ("train.ivon.beta1", "momentum of the gradient"),
    ("train.ivon.beta2", "EMA of the Hessian estimate"),
    ("train.ivon.weight_decay", "weight decay δ (also the prior precision)"),
    ("train.ivon.mc_samples", "weight samples per step"),
    ("train.ivon.clip_radius", "element-wise clip of the update direction (each weight moves ≤ lr·clip per step)"),
    ("ivon_size_defaults", "on models with hidden size ≥ 1024, IVON's clip_radius / ess left at 3e-2 / 1e6 become 1e-2 / 1e7 (measured on Qwen2.5-Coder-1.5B); false keeps them"),
    ("train.ivon.rescale_lr", "scale lr by (h₀ + δ) as ivon-opt's rescale_lr"),
    ("train.ivon.debias", "bias-correct the momentum"),
    ("train.ivon.hess_approx", "price (reparameterization) or gradsq"),
    ("train.ivon.sync", "average the statistics across data-parallel ranks"),
    ("train.ivon_head.lr", "IVON lr of a freshly initialized classifier head (unset: train.ivon.lr)"),
    ("train.ivon_head.hess_init", "IVON hess_init of the head (unset: train.ivon's)"),
    ("train.ivon_head.clip_radius", "IVON clip_radius of the head (unset: train.ivon's)"),
    ("train.ivon_head.weight_decay", "IVON weight decay of the head (unset: train.ivon's)"),
    ("train.adamw.lr", "AdamW learning rate"),
    ("train.adamw.beta1", "AdamW β₁"),
    ("train.adamw.beta2", "AdamW β₂"),
    ("train.adamw.eps", "AdamW ε"),
    ("train.adamw.weight_decay", "decoupled weight decay"),
    ("train.sgd.lr", "SGD learning rate"),
    ("train.sgd.momentum", "heavy-ball momentum"),
    ("train.sgd.weight_decay", "L2 weight decay added to the gradient"),
    ("train.gates.lr", "B-LoRA gate learning rate (set from blora.gate_lr)"),
    ("train.gates.beta1", "AdamW β₁ of the gates"),
    ("train.gates.beta2", "AdamW β₂ of the gates"),
    ("train.gates.eps", "AdamW ε of the gates"),
    ("train.gates.weight_decay", "weight decay of the gates"),
    ("train.batch.batch_size", "examples per micro-batch"),
    ("train.batch.shuffle", "shuffle every epoch"),
    ("train.batch.seed", "shuffling seed (set from train.seed)"),
    ("train.batch.bucket", "group examples of similar length in windows of N batches (less padding)"),
    ("train.batch.drop_last", "drop a last, smaller batch"),
    ("eval.samples", "posterior samples K of the predictive (0: the mean only)"),
    ("eval.batch_size", "evaluation batch size"),
    ("eval.bins", "reliability-diagram bins (ECE-15 convention of torchmetrics)"),
];

/// Every key with its default (`unset` for optional keys), flattened to dotted names.
fn keys() -> BTreeMap<String, String> {
    let default = RunConfig::default();
    // Optional keys are absent from the default's TOML: set each once to list it.
    let mut all = default.clone();
    all.model = Some("m".into());
    all.train_file = Some("f".into());
    all.eval_file = Some("f".into());
    all.train_limit = Some(1);
    all.eval_limit = Some(1);
    all.num_labels = Some(2);
    all.template = Some("t".into());
    all.lora.target_modules = Some(TargetModules::List(vec![]));
    all.lora.modules_to_save = Some(vec![]);
    all.blora.target_modules = Some(TargetModules::List(vec![]));
    all.train.max_steps = Some(1);
    all.train.max_grad_norm = Some(1.0);
    all.train.checkpoint_dir = Some("c".into());
    all.train.batch.bucket = Some(1);
    let h = &mut all.train.ivon_head;
    (h.lr, h.hess_init, h.clip_radius, h.weight_decay) = (Some(1.0), Some(1.0), Some(1.0), Some(1.0));
    let flat = |c: &RunConfig| {
        let mut out = BTreeMap::new();
        flatten("", &toml::Value::try_from(c).expect("config serializes"), &mut out);
        out
    };
    let defaults = flat(&default);
    let mut keys: BTreeMap<String, String> = flat(&all)
        .into_keys()
        .map(|k| (k.clone(), defaults.get(&k).cloned().unwrap_or_else(|| "unset".into())))
        .collect();
    // Read but never written (an action, not a setting of the run).
    keys.insert("overwrite".into(), default.overwrite.to_string());
    keys
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) if !(prefix.ends_with("_pattern")) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        toml::Value::Table(_) => {
            out.insert(prefix.to_string(), "{}".into());
        }
        // f32 settings print as f32 (0.1, not 0.10000000149011612)
        toml::Value::Float(x) if (*x as f32) as f64 == *x => {
            out.insert(prefix.to_string(), format!("{}", *x as f32));
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The markdown of `docs/config.md`.
pub fn reference_markdown() -> Result<String, String> {
    let descriptions: BTreeMap<&str, &str> = DESCRIPTIONS.iter().copied().collect();
    let mut md = String::from(
        "# Run settings\n\nEvery key a `bayeslora train --config FILE` TOML file (and `[run]` of a `compare` sweep) \
         takes, with its default. Flags of `bayeslora train --help` override the same keys; each run saves its \
         resolved settings as `<output>/config.toml`, itself a valid `--config`. Generated from the code by the \
         test `config_reference_is_current` (`BAYESLORA_BLESS=1 cargo test --release -p bayeslora-cli \
         config_reference` rewrites it).\n\n| key | default | meaning |\n|---|---|---|\n",
    );
    let mut missing = Vec::new();
    let mut rows: Vec<(String, String)> = keys().into_iter().collect();
    rows.sort_by_key(|(k, _)| (k.contains('.'), k.clone())); // top-level keys first
    for (key, default) in rows {
        let Some(meaning) = descriptions.get(key.as_str()) else {
            missing.push(key);
            continue;
        };
        md.push_str(&format!("| `{key}` | `{}` | {meaning} |\n", default.replace('|', "\\|")));
    }
    if !missing.is_empty() {
        return Err(format!("keys without a description in config_doc.rs: {}", missing.join(", ")));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md");
        let want = reference_markdown().unwrap_or_else(|e| panic!("{e}"));
        if std::env::var_os("BAYESLORA_BLESS").is_some() {
            std::fs::write(&path, &want).expect("writing docs/config.md");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/config.md is out of date with the config types: rerun with BAYESLORA_BLESS=1 and commit it"
        );
        let described: Vec<&str> = DESCRIPTIONS.iter().map(|(k, _)| *k).collect();
        let keys = keys();
        for k in described {
            assert!(keys.contains_key(k), "described key `{k}` is not a config key (renamed?)");
        }
    }
}
