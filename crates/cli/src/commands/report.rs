//! `bayeslora report bops RUN`: the bit operations of a trained B-LoRA run against LoRA of the same
//! initial rank (per layer and in total, with every counting assumption), the learned ranks and
//! bit-widths, and their heat map. `bayeslora train --method blora` writes the same files into its
//! output folder; this command recomputes them from the newest checkpoint, at another precision
//! or token count if asked.
use crate::args::{ReportArgs, ReportWhat};
use crate::steps;
use anyhow::{bail, Result};
use bayeslora::adapters::blora::render_table;
use bayeslora::run::write_bops;
use std::process::ExitCode;

pub fn run(args: ReportArgs) -> Result<ExitCode> {
    match args.what {
        ReportWhat::Bops => {
            let trained = steps::open_run(&args.run)?;
            let Some(blora) = trained.model.adapters.blora() else {
                bail!("{} is not a B-LoRA run (train with --method blora)", args.run.display());
            };
            let stem = args.output.clone().unwrap_or_else(|| args.run.join("bops"));
            let bops = write_bops(blora, &stem, args.precision, args.tokens)?;
            println!("{}", render_table(&bops.report));
            for f in bops.files {
                eprintln!("wrote {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
