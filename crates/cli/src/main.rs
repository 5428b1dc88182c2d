//! `bayeslora`: Bayesian LoRA finetuning from the command line.
//!
//! Each subcommand lives in `commands/<name>.rs`; flags are parsed here and in `args.rs`,
//! merged with an optional TOML file in `config.rs`, and handed to the library. Errors print
//! their whole chain and exit with status 2; Ctrl-C during training checkpoints and exits 130.
mod args;
mod assets;
mod commands;
mod config;
#[cfg(test)]
mod config_doc;
mod oom;
mod runtime;
mod steps;
mod ui;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Before anything touches candle: its thread pools and the allocator are set once.
    runtime::tune_cpu();
    // Errors print their chain, never a backtrace: candle attaches one to every error when
    // RUST_BACKTRACE is set (some GPU machines set it), which buried the message under 25
    // `<unknown>` frames. Panics still follow RUST_BACKTRACE; RUST_LIB_BACKTRACE=1 brings the
    // error backtraces back for debugging.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Single-threaded `main` here: no other thread reads the environment yet.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = args::Cli::parse();
    let filter = if cli.verbose { "info,bayeslora=debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            let text = format!("{err:#}");
            // nvidia-smi is asked for the device's memory only for an out-of-memory error.
            match oom::is_oom(&text).then(|| oom::explain(&text, &oom::context())).flatten() {
                Some(advice) => eprintln!("error: {advice}"),
                None => eprintln!("error: {text}"),
            }
            ExitCode::from(2)
        }
    }
}
