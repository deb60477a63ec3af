//! The `patina` binary.

fn main() -> std::process::ExitCode {
    patina::cli::main()
}
