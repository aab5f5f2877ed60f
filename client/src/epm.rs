//! `ipcbus epm ...`: talk to an endpoint manager service.

use std::process::ExitCode;

use crate::common::{config_error, Common, EPM_UNAVAILABLE};

/// Commands for an endpoint manager (EPM) service.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Show the EPM's status: version, uptime, connections, handles and registrations
    Status,
}

/// Runs `ipcbus epm ...`.
///
/// # Errors
/// Configuration errors, or the EPM cannot be reached.
pub async fn run(_common: &Common, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Status => Err(config_error(EPM_UNAVAILABLE)),
    }
}
