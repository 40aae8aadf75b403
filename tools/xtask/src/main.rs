//! `cargo xtask`: the one entry point to build images, boot them in emulators, run every test
//! and every benchmark, and install what a fresh machine lacks.

mod bench;
mod deps;
mod emulator;
mod emulator_bench;
mod image;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

/// Where the emulators are, what they can run, and which one a scenario needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Emulator {
    /// Bochs: emulates VMX with EPT; used for every VMX test.
    Bochs,
    /// QEMU TCG: no VMX, fast; used for everything else.
    Qemu,
    /// QEMU with KVM (`-enable-kvm -cpu host,+vmx`) on an Intel host with nested VMX.
    Kvm,
}

impl Emulator {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "bochs" => Ok(Self::Bochs),
            "qemu" => Ok(Self::Qemu),
            "kvm" => Ok(Self::Kvm),
            _ => Err(format!("unknown emulator '{s}' (bochs, qemu or kvm)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bochs => "bochs",
            Self::Qemu => "qemu",
            Self::Kvm => "kvm",
        }
    }
}

/// One boot of the kernel: what to run, where, and what counts as the expected outcome.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub scenario: String,
    pub emulator: Emulator,
    pub cpus: u32,
    pub uefi: bool,
    pub timeout_secs: u64,
    /// Extra kernel command-line words (e.g. `log=debug`).
    pub kernel_args: Vec<String>,
    /// Stream the serial console to the terminal.
    pub stream: bool,
}

impl RunSpec {
    pub fn label(&self) -> String {
        format!(
            "{}-{}{}-{}cpu",
            self.scenario,
            self.emulator.name(),
            if self.uefi { "-uefi" } else { "" },
            self.cpus
        )
    }
}

/// The workspace root (the xtask lives in tools/xtask).
pub fn root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or(dir)
}

/// Build output that is not cargo's (ISOs, logs, emulator configs, benchmark JSON).
pub fn build_dir() -> PathBuf {
    root().join("build")
}

/// A progress line on stderr.
#[macro_export]
macro_rules! step {
    ($($arg:tt)*) => { eprintln!("[xtask] {}", format!($($arg)*)) };
}

const USAGE: &str = "usage: cargo xtask <command> [options]

commands:
  run    [--emulator bochs|qemu|kvm] [--scenario NAME] [--cpus N] [--timeout SECONDS]
         [--uefi] [--log LEVEL]
         boot the kernel headless, stream the serial console, exit 0 only on
         `capvisor: scenario NAME: PASS` (default: the nested demo on Bochs, 2 CPUs)
  test   [--host-only]   lints, host tests and every scenario on the emulator it needs
  bench  [--quick]       benchmark scenarios and host benchmarks; table + build/bench.json
  image  [--scenario NAME] [--cpus N]   build the kernel, the user-level binaries and the ISO
  deps   check for (and as root install) what a fresh machine lacks";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match cmd.as_str() {
        "run" => parse_run(rest).and_then(|spec| {
            deps::ensure(spec.emulator)?;
            emulator::run(&spec).map(|o| o.report_and_code())
        }),
        "test" => test::run(rest),
        "bench" => bench::run(rest),
        "image" => parse_run(rest).and_then(|spec| {
            deps::ensure_build()?;
            image::build(&spec).map(|iso| {
                println!("{}", iso.display());
                0
            })
        }),
        "deps" => deps::ensure_all().map(|()| 0),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(format!("unknown command '{other}'\n{USAGE}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_run(args: &[String]) -> Result<RunSpec, String> {
    let mut spec = RunSpec {
        scenario: "nested".into(),
        emulator: Emulator::Bochs,
        cpus: 2,
        uefi: false,
        timeout_secs: 0,
        kernel_args: Vec::new(),
        stream: true,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--emulator" => spec.emulator = Emulator::parse(&value("--emulator")?)?,
            "--scenario" => spec.scenario = value("--scenario")?,
            "--cpus" => {
                spec.cpus = value("--cpus")?
                    .parse()
                    .map_err(|_| "--cpus needs a number from 1 to 32".to_string())?;
                if !(1..=32).contains(&spec.cpus) {
                    return Err("--cpus needs a number from 1 to 32".into());
                }
            }
            "--timeout" => {
                spec.timeout_secs = value("--timeout")?
                    .parse()
                    .map_err(|_| "--timeout needs a number of seconds".to_string())?
            }
            "--uefi" => spec.uefi = true,
            "--log" => spec.kernel_args.push(format!("log={}", value("--log")?)),
            other => return Err(format!("unknown option '{other}'\n{USAGE}")),
        }
    }
    if spec.timeout_secs == 0 {
        spec.timeout_secs = emulator::default_timeout(&spec);
    }
    Ok(spec)
}
