//! The `lmms-ft` command line. The adapter crates are linked through `lmms_ft_adapters`
//! (`src/adapters.rs`) so their registrations reach the registry; the commands themselves
//! only talk to the core.

mod chat;
mod cli;
mod commands;
mod convert;
mod demo;

// Linking the adapters is what registers them (inventory collects at link time).
use lmms_ft_adapters as _;

use std::process::ExitCode;

fn main() -> ExitCode {
    // A panic is a bug, but the user should still see one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error: {msg}{loc}\nhint: this is a bug in lmms-ft; please report it with the command you ran");
    }));
    let cli = cli::parse();
    lmms_ft_core::logging::init(cli.log_format == cli::LogFormat::Json, cli.verbose);
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            eprintln!("hint: {}", cli::hint_for(&e));
            ExitCode::FAILURE
        }
    }
}
