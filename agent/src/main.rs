//! The `estafeta` binary: everything lives in the library; `main` hands over to
//! [`estafeta::cli::main`] and returns its exit code (documented in `cli/mod.rs`).

fn main() -> std::process::ExitCode {
    estafeta::cli::main()
}
