//! Every example under `deploy/` stays true: configs parse, scripts are valid bash, the systemd
//! units only use flags the binaries accept, and the release build's training load runs.

use std::path::PathBuf;
use std::process::Command;

fn deploy(file: &str) -> PathBuf {
    airlock_tests::workspace_root().join("deploy").join(file)
}

#[test]
fn agent_example_config_parses() {
    let text = std::fs::read_to_string(deploy("agent.example.toml")).unwrap();
    let config: airlock_agent::config::FileConfig = toml::from_str(&text).unwrap();
    assert!(config.relay_url.is_some());
    for entry in &config.allow {
        entry
            .parse::<airlock_shared::exec::AllowEntry>()
            .unwrap_or_else(|e| panic!("allow entry {entry}: {e}"));
    }
}

#[test]
fn shell_scripts_are_valid_bash() {
    let root = airlock_tests::workspace_root();
    for script in [
        "deploy/quickstart.sh",
        "deploy/bench/run",
        "deploy/bench/agents",
        "deploy/bench/instructions",
        "deploy/build-release",
        "tests/run",
        ".ci/run",
    ] {
        let status = Command::new("bash")
            .arg("-n")
            .arg(root.join(script))
            .status()
            .unwrap();
        assert!(status.success(), "{script} has a syntax error");
    }
}

/// The `--flag`s of a unit's ExecStart must be accepted by the binary's `--help`.
fn check_unit(unit: &str, binary: &str, subcommand: &str) {
    let text = std::fs::read_to_string(deploy(unit)).unwrap();
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let help = Command::new(airlock_tests::binary(binary).unwrap())
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(
            help.contains(flag),
            "{unit}: {flag} is not a flag of {binary} {subcommand}"
        );
    }
}

#[test]
fn systemd_units_use_real_flags() {
    check_unit("airlock-relay.service", "e2e-relay", "serve");
    check_unit("airlock-agent.service", "e2e-agent", "run");
}

/// `deploy/pgo-train.py`, the load the profile-guided release build trains on, runs against this
/// build's relay and agent and gets every answer right; a change that breaks it (a CLI flag, an
/// API field, a proxied body) fails here, not in the middle of `deploy/build-release`.
#[test]
fn the_release_build_training_load_runs() {
    let dir = airlock_tests::workspace_root()
        .join("tmp")
        .join("tests")
        .join(format!("pgo-train-{}", std::process::id()));
    let bins = dir.join("bin");
    std::fs::create_dir_all(&bins).unwrap();
    for (link, name) in [
        ("airlock-relay", "e2e-relay"),
        ("airlock-agent", "e2e-agent"),
    ] {
        let target = airlock_tests::binary(name).unwrap();
        let _ = std::fs::remove_file(bins.join(link));
        std::os::unix::fs::symlink(target, bins.join(link)).unwrap();
    }
    let out = Command::new("python3")
        .arg(deploy("pgo-train.py"))
        .arg(&bins)
        .arg(dir.join("work"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgo-train.py failed (logs under {}): {stderr}",
        dir.display()
    );
    assert!(stderr.contains("pgo-train: load done"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
