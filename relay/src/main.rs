//! `airlock-relay`: see the library crate.
fn main() -> std::process::ExitCode {
    airlock_relay::main()
}
