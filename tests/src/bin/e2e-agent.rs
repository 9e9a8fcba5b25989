//! The agent binary, built inside this crate so integration tests find it through
//! `env!("CARGO_BIN_EXE_e2e-agent")`.

fn main() -> std::process::ExitCode {
    airlock_agent::main()
}
