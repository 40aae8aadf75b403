//! `cargo xtask test`: lints, host tests, then every scenario on the emulator it needs.

use crate::emulator::{self, Verdict};
use crate::{Emulator, RunSpec, deps, root, step};
use std::process::Command;
use std::time::Instant;

/// What a scenario run must show.
pub enum Expect {
    Pass,
    /// A FAIL verdict whose reason contains every one of these strings.
    FailWith(&'static [&'static str]),
}

pub struct Case {
    pub spec: RunSpec,
    pub expect: Expect,
}

fn spec(scenario: &str, emulator: Emulator, cpus: u32, uefi: bool) -> RunSpec {
    let mut s = RunSpec {
        scenario: scenario.into(),
        emulator,
        cpus,
        uefi,
        timeout_secs: 0,
        kernel_args: Vec::new(),
        stream: false,
    };
    s.timeout_secs = emulator::default_timeout(&s);
    s
}

/// Every scenario test, in the order they run (QEMU first: fast feedback).
pub fn cases() -> Vec<Case> {
    use Emulator::{Bochs, Qemu};
    let case = |scenario, emulator, cpus, uefi| Case {
        spec: spec(scenario, emulator, cpus, uefi),
        expect: Expect::Pass,
    };
    vec![
        case("boot", Qemu, 2, false),
        case("boot", Qemu, 2, true),
        Case {
            spec: spec("fault", Qemu, 1, false),
            expect: Expect::FailWith(&["vector 14 (#PF)", "cr2 0x5eadbeef0000"]),
        },
        case("ipc", Qemu, 2, false),
        case("boot", Bochs, 1, false),
        case("boot", Bochs, 2, false),
        case("ipc", Bochs, 2, false),
        case("guest", Bochs, 1, false),
        case("guest", Bochs, 2, false),
        case("nested", Bochs, 1, false),
        case("nested", Bochs, 2, false),
    ]
}

fn cargo(args: &[&str]) -> Result<(), String> {
    cargo_in(".", args)
}

fn cargo_in(dir: &str, args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    step!("cargo {} (in {dir})", args.join(" "));
    let status = Command::new(cargo)
        .current_dir(root().join(dir))
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("'cargo {}' failed", args.join(" ")))
    }
}

/// Formatting, clippy on the host crates and on the target crates, and the host tests.
pub fn host() -> Result<(), String> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    // Host crates: the workspace's default members.
    cargo(&[
        "clippy",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ])?;
    // Target-only crates, from the directory each is built in (ring-3 programs from
    // userland/, for their relocation model).
    let mut dirs: Vec<&str> = crate::image::TARGET_BINARIES.iter().map(|b| b.2).collect();
    dirs.sort_unstable();
    dirs.dedup();
    for dir in dirs {
        let mut args = vec!["clippy", "--locked", "--release", "--target", deps::TARGET];
        for b in crate::image::TARGET_BINARIES.iter().filter(|b| b.2 == dir) {
            args.extend(["-p", b.0]);
        }
        if dir == "userland" {
            args.extend(["-p", "rt"]);
        }
        args.extend(["--", "-D", "warnings"]);
        cargo_in(dir, &args)?;
    }
    cargo(&["test", "--locked"])
}

/// Runs one case; returns whether it met its expectation, and a summary line.
pub fn run_case(case: &Case) -> (bool, String) {
    let label = case.spec.label();
    match emulator::run(&case.spec) {
        Err(e) => (false, format!("{label}: error: {e}")),
        Ok(o) => {
            let secs = o.seconds;
            match (&case.expect, &o.verdict) {
                (Expect::Pass, Verdict::Pass) => (true, format!("{label}: PASS ({secs:.1} s)")),
                (Expect::FailWith(needles), Verdict::Fail(reason))
                    if needles.iter().all(|n| reason.contains(n)) =>
                {
                    (
                        true,
                        format!("{label}: expected failure seen ({secs:.1} s): {reason}"),
                    )
                }
                (_, v) => {
                    let tail: Vec<&str> = o
                        .lines
                        .iter()
                        .rev()
                        .take(6)
                        .rev()
                        .map(String::as_str)
                        .collect();
                    (
                        false,
                        format!(
                            "{label}: UNEXPECTED {v:?} (log {}); last console lines:\n      {}",
                            o.log.display(),
                            tail.join("\n      ")
                        ),
                    )
                }
            }
        }
    }
}

pub fn run(args: &[String]) -> Result<u8, String> {
    let host_only = args.iter().any(|a| a == "--host-only");
    if let Some(a) = args.iter().find(|a| *a != "--host-only") {
        return Err(format!("unknown option '{a}' (test takes --host-only)"));
    }
    let start = Instant::now();
    deps::ensure_all()?;
    host()?;
    if host_only {
        return Ok(0);
    }
    let cases = cases();
    let mut results = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        step!("scenario {}/{}: {}", i + 1, cases.len(), case.spec.label());
        let (ok, line) = run_case(case);
        step!("{line}");
        results.push((ok, line));
    }
    println!("\nscenario results:");
    for (ok, line) in &results {
        println!("  [{}] {line}", if *ok { " ok " } else { "FAIL" });
    }
    let failed = results.iter().filter(|(ok, _)| !ok).count();
    println!(
        "{} of {} scenarios as expected; total {:.0} s",
        results.len() - failed,
        results.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 { 0 } else { 1 })
}
