//! `bayeslora predict --model BASE --adapter DIR`: class probabilities with uncertainty for new
//! inputs, one JSON object per line on stdout (the library's [`bayeslora::run::Served`] says
//! what the inputs and answers are).
use crate::args::PredictArgs;
use anyhow::{Context, Result};
use bayeslora::run::{self, Served};
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

pub fn run(args: PredictArgs) -> Result<ExitCode> {
    let device = run::device(&args.device)?;
    let base = crate::assets::resolve(&args.model)?;
    let served = Served::open(&base, &args.adapter, &device, args.max_len)?;
    let mut session = served.session(args.samples, args.seed, args.abstain_below)?;
    let input: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    // Interactively, answer each line at once; otherwise fill batches.
    let batch_size = if args.input.is_none() && std::io::stdin().is_terminal() { 1 } else { args.batch_size.max(1) };
    let mut stdout = std::io::stdout().lock();
    let (start, mut count, mut pending) = (Instant::now(), 0usize, Vec::new());
    let mut lines = input.lines().enumerate();
    loop {
        let next = lines.next();
        if let Some((i, line)) = &next {
            let line = line.as_ref().map_err(|e| anyhow::anyhow!("reading input line {}: {e}", i + 1))?;
            if !line.trim().is_empty() {
                pending.push((i + 1, line.clone()));
            }
        }
        if pending.len() >= batch_size || (next.is_none() && !pending.is_empty()) {
            let items = std::mem::take(&mut pending);
            for row in session.predict(&items)? {
                writeln!(stdout, "{row}")?;
            }
            stdout.flush()?;
            count += items.len();
        }
        if next.is_none() {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let samples = session.samples();
    eprintln!("{count} inputs in {secs:.2} s ({:.1} examples/s, K = {samples})", count as f64 / secs.max(1e-9));
    Ok(ExitCode::SUCCESS)
}
