//! `bayeslora merge RUN -o OUT` (or `merge ADAPTER --model BASE -o OUT`): a full model folder
//! with the mean adapter folded into the weights, loadable by transformers without peft.
use crate::args::MergeArgs;
use crate::steps::open_run;
use anyhow::{Context, Result};
use bayeslora::export;
use bayeslora::models::{self, LoadOptions};
use bayeslora::run::{self, adapter_num_labels, bare_model};
use std::process::ExitCode;

pub fn run(args: MergeArgs) -> Result<ExitCode> {
    let (model, base) = if args.source.join(export::CONFIG_FILE).is_file() {
        let base = args.model.clone().context("merging an adapter folder needs --model BASE (the model it adapts)")?;
        let base = crate::assets::resolve(&base)?;
        let device = run::device(&args.device)?;
        let loaded = models::load(&base, &LoadOptions { device: device.clone(), ..Default::default() })
            .with_context(|| format!("loading {}", base.display()))?;
        let k = adapter_num_labels(&args.source)?.unwrap_or(2);
        let mut model = bare_model(loaded, k, &device)?;
        export::load_peft(&args.source, &mut model, &device)
            .with_context(|| format!("loading {}", args.source.display()))?;
        (model, base)
    } else {
        let trained = open_run(&args.source)?;
        (trained.model, trained.base)
    };
    let weights = export::merge(&model, &base, &args.output)
        .with_context(|| format!("merging into {}", args.output.display()))?;
    let n = model.adapters.len();
    eprintln!("wrote {} ({n} adapted modules merged)", weights.display());
    Ok(ExitCode::SUCCESS)
}
