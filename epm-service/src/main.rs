//! `epm-service`: parses arguments, sets up logging and runs the endpoint manager.
//! Everything is in the library (`ipcbus_epm::cli`), so tests can run the very same
//! entry point.

fn main() -> std::process::ExitCode {
    ipcbus_epm::cli::main()
}
