//! Booting an image headless in Bochs or QEMU, streaming the serial console to the terminal
//! and to a log file, and turning what the kernel printed into one verdict.

use crate::{Emulator, RunSpec, build_dir, image, step};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// The kernel printed a FAIL verdict: the reason it gave.
    Fail(String),
    /// No verdict: the emulator stopped, failed or the time ran out.
    Stopped(String),
}

/// The result of one run: verdict, the serial log, and every console line.
pub struct Outcome {
    pub spec: RunSpec,
    pub verdict: Verdict,
    pub log: PathBuf,
    /// Every console line up to the verdict (benchmarks read their figures from here).
    pub lines: Vec<String>,
    pub seconds: f64,
}

impl Outcome {
    /// The one-line result, and the exit code for `cargo xtask run`.
    pub fn report_and_code(&self) -> u8 {
        match &self.verdict {
            Verdict::Pass => {
                println!(
                    "xtask: {} PASS ({:.1} s, log {})",
                    self.spec.label(),
                    self.seconds,
                    self.log.display()
                );
                0
            }
            Verdict::Fail(r) => {
                println!(
                    "xtask: {} FAIL: {r} (log {})",
                    self.spec.label(),
                    self.log.display()
                );
                1
            }
            Verdict::Stopped(r) => {
                println!(
                    "xtask: {} FAIL: {r} (log {})",
                    self.spec.label(),
                    self.log.display()
                );
                1
            }
        }
    }
}

/// Default time limit for a run.
pub fn default_timeout(spec: &RunSpec) -> u64 {
    match spec.emulator {
        Emulator::Bochs => 180 + 60 * u64::from(spec.cpus),
        Emulator::Qemu | Emulator::Kvm if spec.uefi => 90,
        Emulator::Qemu | Emulator::Kvm => 60,
    }
}

const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

fn bochsrc(spec: &RunSpec, iso: &Path, serial: &Path, log: &Path) -> String {
    format!(
        "megs: 512
cpu: model=corei7_skylake_x, count={cpus}, ips=10000000, reset_on_triple_fault=0
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev={serial}
port_e9_hack: enabled=1
clock: sync=none, time0=1
display_library: rfb, options=\"timeout=0\"
plugin_ctrl: speaker=0
log: {log}
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
",
        cpus = spec.cpus,
        iso = iso.display(),
        serial = serial.display(),
        log = log.display()
    )
}

fn spawn(spec: &RunSpec, iso: &Path, serial: &Path, work: &Path) -> Result<Child, String> {
    let out = File::create(work.join("emulator.out")).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    match spec.emulator {
        Emulator::Bochs => {
            let rc = work.join("bochsrc");
            std::fs::write(&rc, bochsrc(spec, iso, serial, &work.join("bochs.log")))
                .map_err(|e| e.to_string())?;
            // The Debian build includes the debugger, which stops before the first
            // instruction: the rc file tells it to continue.
            std::fs::write(work.join("debugger.rc"), "c\n").map_err(|e| e.to_string())?;
            Command::new("bochs")
                .arg("-q")
                .arg("-f")
                .arg(&rc)
                .arg("-rc")
                .arg(work.join("debugger.rc"))
                .current_dir(work)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| format!("cannot start bochs: {e}"))
        }
        Emulator::Qemu | Emulator::Kvm => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.arg("-cdrom")
                .arg(iso)
                .arg("-serial")
                .arg(format!("file:{}", serial.display()))
                .args(["-display", "none", "-no-reboot", "-m", "512"])
                .args(["-smp", &spec.cpus.to_string()])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
            if spec.uefi {
                cmd.args(["-bios", OVMF]);
            }
            if spec.emulator == Emulator::Kvm {
                cmd.args(["-enable-kvm", "-cpu", "host,+vmx"]);
            } else {
                cmd.args(["-cpu", "max"]);
            }
            cmd.stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))
        }
    }
}

/// Why an emulator stopped without a verdict, from its own output.
fn emulator_reason(spec: &RunSpec, work: &Path) -> String {
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let text = read(work.join("emulator.out")) + &read(work.join("bochs.log"));
    if text.contains("exception with no resolution") || text.contains("triple fault") {
        return "triple fault".into();
    }
    if spec.emulator == Emulator::Kvm && (text.contains("kvm") || text.contains("KVM")) {
        let first = text
            .lines()
            .find(|l| l.to_lowercase().contains("kvm"))
            .unwrap_or("");
        return format!(
            "KVM cannot run capvisor here ({}); --emulator kvm needs an Intel host with nested VMX",
            first.trim()
        );
    }
    if let Some(l) = text
        .lines()
        .find(|l| l.contains(">>PANIC<<") || l.contains("qemu-system"))
    {
        return format!("emulator error: {}", l.trim());
    }
    "the emulator stopped without a verdict (reset, triple fault or shutdown)".into()
}

/// Boots `spec` and waits for its verdict.
pub fn run(spec: &RunSpec) -> Result<Outcome, String> {
    if spec.emulator == Emulator::Kvm && !Path::new("/dev/kvm").exists() {
        return Err(
            "--emulator kvm needs /dev/kvm: run on an Intel host with KVM and nested VMX \
             (kvm_intel nested=1); here, use --emulator bochs (VMX) or qemu (no VMX)"
                .into(),
        );
    }
    if spec.uefi && !Path::new(OVMF).exists() {
        return Err(format!("UEFI boot needs {OVMF} (Debian package ovmf)"));
    }
    let iso = image::build(spec)?;
    let work = build_dir().join("run").join(spec.label());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let logs = build_dir().join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let log = logs.join(format!("{}.log", spec.label()));
    File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;

    step!(
        "booting {} on {} with {} CPU(s){} (timeout {} s, log {})",
        spec.scenario,
        spec.emulator.name(),
        spec.cpus,
        if spec.uefi { ", UEFI" } else { "" },
        spec.timeout_secs,
        log.display()
    );
    let start = Instant::now();
    let mut child = spawn(spec, &iso, &log, &work)?;
    let mut lines = Vec::new();
    let mut partial = String::new();
    let mut offset = 0u64;
    let mut verdict = None;
    let pass = format!("capvisor: scenario {}: PASS", spec.scenario);
    let fail = format!("capvisor: scenario {}: FAIL", spec.scenario);
    let mut exited = false;

    while verdict.is_none() {
        exited = child.try_wait().map(|s| s.is_some()).unwrap_or(true);
        if let Ok(mut f) = File::open(&log) {
            let _ = f.seek(SeekFrom::Start(offset));
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_ok() {
                offset += buf.len() as u64;
                partial.push_str(&String::from_utf8_lossy(&buf));
            }
        }
        while let Some(nl) = partial.find('\n') {
            let line: String = partial[..nl].trim_end_matches('\r').to_string();
            partial.drain(..=nl);
            if spec.stream {
                println!("{line}");
                let _ = std::io::stdout().flush();
            }
            if line.contains(&pass) {
                verdict = Some(Verdict::Pass);
            } else if let Some(i) = line.find(&fail) {
                let reason = line[i + fail.len()..]
                    .trim_start_matches(':')
                    .trim()
                    .to_string();
                verdict = Some(Verdict::Fail(reason));
            } else if line.contains("capvisor: scenario ") && line.contains(": PASS") {
                verdict = Some(Verdict::Fail(format!(
                    "the kernel ran another scenario: {line}"
                )));
            }
            lines.push(line);
            if verdict.is_some() {
                break;
            }
        }
        if verdict.is_some() {
            break;
        }
        if exited {
            verdict = Some(Verdict::Stopped(emulator_reason(spec, &work)));
            break;
        }
        if start.elapsed() > Duration::from_secs(spec.timeout_secs) {
            verdict = Some(Verdict::Stopped(format!(
                "timeout: no verdict after {} s",
                spec.timeout_secs
            )));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the emulator stop by itself (the kernel shuts it down after its verdict), then
    // make sure it is gone.
    let grace = Instant::now();
    while !exited && grace.elapsed() < Duration::from_secs(3) {
        exited = child.try_wait().map(|s| s.is_some()).unwrap_or(true);
        std::thread::sleep(Duration::from_millis(20));
    }
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    Ok(Outcome {
        spec: spec.clone(),
        verdict: verdict.unwrap_or(Verdict::Stopped("no verdict".into())),
        log,
        lines,
        seconds: start.elapsed().as_secs_f64(),
    })
}
