//! The `epm-service` entry point, built as a binary of this package so the tests can
//! find it with `CARGO_BIN_EXE_test-epm-service` (Cargo gives that only for binaries
//! of the package under test). It runs exactly what `epm-service` runs.

fn main() -> std::process::ExitCode {
    ipcbus_epm::cli::main()
}
