//! `airlock-agent`: see the library crate.
fn main() -> std::process::ExitCode {
    airlock_agent::main()
}
