//! `bayeslora export RUN -o OUT`: a train run folder's newest checkpoint as a peft LoRA folder
//! (+ the IVON posterior sidecar).
use crate::args::ExportArgs;
use crate::steps;
use anyhow::Result;
use bayeslora::run::{self, AdapterKind};
use std::process::ExitCode;

pub fn run(args: ExportArgs) -> Result<ExitCode> {
    let trained = steps::open_run(&args.run)?;
    let base_name = args.base_name.clone().unwrap_or_else(|| trained.base.display().to_string());
    run::write_adapter(&trained.model, &trained.config, &base_name, trained.posterior.as_ref(), &args.output)?;
    let n = trained.model.adapters.len();
    let sidecar = match (&trained.posterior, trained.config.method) {
        (None, _) => "",
        (Some(_), AdapterKind::Lora) => ", IVON posterior sidecar",
        (Some(_), AdapterKind::Blora) => ", IVON posterior sidecar in compressed/",
    };
    eprintln!("wrote {} ({n} adapted modules{sidecar})", args.output.display());
    Ok(ExitCode::SUCCESS)
}
