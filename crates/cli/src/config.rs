//! Run configuration from the command line: defaults (or a preset) < TOML file (`--config`) <
//! flags, merged into the library's [`RunConfig`] and validated by [`RunConfig::finish`]. Every
//! run writes its resolved config next to its outputs (`config.toml`).
use crate::args::{AdapterArg, OptimizerArg, RunArgs};
use anyhow::{Context, Result};
use bayeslora::run::{merge_toml, AdapterKind, RunConfig};
use bayeslora::train::OptimizerKind;

/// `base` (defaults or a preset), then the TOML file, then the flags.
pub fn resolve(base: RunConfig, args: &RunArgs) -> Result<RunConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            // Merge the file over `base` key by key through TOML values.
            let mut merged = toml::Value::try_from(&base).context("serializing defaults")?;
            let file: toml::Value = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            merge_toml(&mut merged, file);
            merged.try_into().with_context(|| format!("invalid settings in {}", path.display()))?
        }
        None => base,
    };
    if let Some(v) = &args.model {
        cfg.model = Some(v.clone());
    }
    if let Some(v) = &args.task {
        cfg.task = v.clone();
    }
    if let Some(v) = &args.train_file {
        cfg.train_file = Some(v.clone());
    }
    if let Some(v) = &args.eval_file {
        cfg.eval_file = Some(v.clone());
    }
    if args.train_limit.is_some() {
        cfg.train_limit = args.train_limit;
    }
    if args.eval_limit.is_some() {
        cfg.eval_limit = args.eval_limit;
    }
    if args.skip_bad_rows {
        cfg.skip_bad_rows = true;
    }
    if args.skip_memory_check {
        cfg.skip_memory_check = true;
    }
    if args.gradient_checkpointing {
        cfg.train.gradient_checkpointing = true;
    }
    if let Some(o) = args.optimizer {
        cfg.train.optimizer = match o {
            OptimizerArg::Ivon => OptimizerKind::Ivon,
            OptimizerArg::Adamw => OptimizerKind::Adamw,
            OptimizerArg::Sgd => OptimizerKind::Sgd,
        };
    }
    // --lr and --weight-decay set the chosen optimizer's (lr, weight decay).
    let t = &mut cfg.train;
    let (lr, wd) = match t.optimizer {
        OptimizerKind::Ivon => (&mut t.ivon.lr, &mut t.ivon.weight_decay),
        OptimizerKind::Adamw => (&mut t.adamw.lr, &mut t.adamw.weight_decay),
        OptimizerKind::Sgd => (&mut t.sgd.lr, &mut t.sgd.weight_decay),
    };
    if let Some(v) = args.lr {
        *lr = v;
    }
    if let Some(v) = args.weight_decay {
        *wd = v;
    }
    if let Some(v) = args.epochs {
        cfg.train.epochs = v;
    }
    if args.max_steps.is_some() {
        cfg.train.max_steps = args.max_steps;
    }
    if let Some(v) = args.batch_size {
        cfg.train.batch.batch_size = v;
    }
    if let Some(v) = args.max_len {
        cfg.max_len = v;
    }
    if let Some(v) = args.method {
        cfg.method = match v {
            AdapterArg::Lora => AdapterKind::Lora,
            AdapterArg::Blora => AdapterKind::Blora,
        };
    }
    if let Some(v) = args.lora_r {
        cfg.lora.r = v;
        cfg.blora.r = v;
    }
    if let Some(v) = args.lora_alpha {
        cfg.lora.lora_alpha = v;
        cfg.blora.lora_alpha = v;
    }
    if let Some(v) = &args.target_modules {
        let targets = Some(bayeslora::adapters::lora::TargetModules::List(v.clone()));
        cfg.lora.target_modules = targets.clone();
        cfg.blora.target_modules = targets;
    }
    if let Some(v) = args.mu {
        cfg.blora.mu = v;
    }
    if let Some(v) = args.lora_dropout {
        cfg.lora.lora_dropout = v;
        cfg.blora.lora_dropout = v;
    }
    if let Some(v) = args.warmup_steps {
        cfg.train.warmup_steps = v;
    }
    if let Some(v) = args.grad_accum {
        cfg.train.grad_accum = v;
    }
    if args.max_grad_norm.is_some() {
        cfg.train.max_grad_norm = args.max_grad_norm;
    }
    if let Some(v) = args.checkpoint_every {
        cfg.train.checkpoint_every = v;
    }
    if let Some(v) = args.eval_every {
        cfg.train.eval_every = v;
    }
    if let Some(v) = args.samples {
        cfg.eval.samples = v;
    }
    if let Some(v) = args.seed {
        cfg.train.seed = v;
        cfg.train.batch.seed = v;
    }
    if let Some(v) = &args.output {
        cfg.output = v.clone();
    }
    if args.overwrite {
        cfg.overwrite = true;
    }
    if cfg.overwrite && args.resume {
        anyhow::bail!(
            "--resume continues the run in {} and --overwrite deletes it; pass one of them",
            cfg.output.display()
        );
    }
    if let Some(v) = &args.device {
        cfg.device = v.clone();
    }
    if let Some(v) = &args.dtype {
        cfg.dtype = v.clone();
    }
    cfg.finish()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HF Trainer / peft knobs as flags land in their TOML keys.
    #[test]
    fn trainer_flags_set_their_keys() -> Result<()> {
        let args = RunArgs {
            optimizer: Some(OptimizerArg::Adamw),
            lora_dropout: Some(0.05),
            weight_decay: Some(0.01),
            warmup_steps: Some(7),
            grad_accum: Some(3),
            max_grad_norm: Some(1.0),
            checkpoint_every: Some(50),
            eval_every: Some(25),
            ..Default::default()
        };
        let c = resolve(RunConfig::default(), &args)?;
        assert_eq!((c.lora.lora_dropout, c.blora.lora_dropout), (0.05, 0.05));
        assert_eq!(c.train.adamw.weight_decay, 0.01);
        assert_eq!(c.train.ivon.weight_decay, 0.0, "only the chosen optimizer's decay");
        let t = &c.train;
        assert_eq!((t.warmup_steps, t.grad_accum, t.checkpoint_every, t.eval_every), (7, 3, 50, 25));
        assert_eq!(t.max_grad_norm, Some(1.0));
        Ok(())
    }

    /// `dtype` comes from the defaults (f32), a config file, then `--dtype`; a wrong name fails
    /// at resolution, naming the setting.
    #[test]
    fn dtype_resolves_from_file_and_flag() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "dtype = \"bf16\"\n")?;
        let base = RunConfig::default();
        assert_eq!(resolve(base.clone(), &RunArgs::default())?.compute_dtype()?, candle_core::DType::F32);
        let from_file = RunArgs { config: Some(file.clone()), ..Default::default() };
        assert_eq!(resolve(base.clone(), &from_file)?.compute_dtype()?, candle_core::DType::BF16);
        let flag = RunArgs { config: Some(file), dtype: Some("f16".into()), ..Default::default() };
        assert_eq!(resolve(base.clone(), &flag)?.compute_dtype()?, candle_core::DType::F16);
        let bad = RunArgs { dtype: Some("bf32".into()), ..Default::default() };
        let err = resolve(base, &bad).unwrap_err().to_string();
        assert!(err.contains("dtype") && err.contains("bf16"), "{err}");
        Ok(())
    }
}
