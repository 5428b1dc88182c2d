//! `bayeslora merge RUN -o OUT` (or `merge ADAPTER --model BASE -o OUT`): a full model folder
//! with the mean adapter folded into the weights, loadable by transformers without peft.
use crate::args::MergeArgs;
use crate::steps::open_run;
use anyhow::{Context, Result};
use bayeslora::export;
use bayeslora::run;
use std::process::ExitCode;

pub fn run(args: MergeArgs) -> Result<ExitCode> {
    let (model, base) = if args.source.join(export::CONFIG_FILE).is_file() {
        let base = args.model.clone().context("merging an adapter folder needs --model BASE (the model it adapts)")?;
        let base = crate::assets::resolve(&base)?;
        (run::open_adapter(&base, &args.source, &run::device(&args.device)?)?, base)
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
