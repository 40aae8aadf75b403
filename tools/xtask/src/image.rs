//! Images: the kernel and every ring-3 or guest binary, built for x86_64-unknown-none, and a
//! GRUB ISO (BIOS and UEFI) whose grub.cfg picks the scenario on the kernel command line.

use crate::deps::TARGET;
use crate::{RunSpec, build_dir, root, step};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Binaries built for the target: (cargo package, binary name, directory cargo runs in).
/// User-level programs build from `userland/`: its `.cargo/config.toml` makes their code
/// position independent, as code linked above `abi::USER_BASE` must be (the workspace's
/// `relocation-model=static` is for the kernel).
pub const TARGET_BINARIES: &[(&str, &str, &str)] = &[
    ("kernel", "capvisor", "."),
    // Linked at guest-physical 1 MiB: the workspace's static code fits.
    ("guest64", "guest64", "."),
    ("l1hv", "l1hv", "."),
    ("roottask", "roottask", "userland"),
    ("echo", "echo", "userland"),
    ("vmm", "vmm", "userland"),
    ("pager", "pager", "userland"),
];

/// A boot module: the binary and the name given to it on the `module2` line.
pub struct Module {
    pub binary: &'static str,
    pub name: &'static str,
}

/// The modules a scenario boots with; the kernel starts the first as the root task.
fn modules_for(scenario: &str) -> Vec<Module> {
    let module = |binary, name| Module { binary, name };
    match scenario {
        "ipc" | "ipc-bench" => vec![module("roottask", "roottask"), module("echo", "echo")],
        "guest" | "vmexit-bench" => vec![
            module("roottask", "roottask"),
            module("echo", "echo"),
            module("vmm", "vmm"),
            module("guest64", "guest64"),
        ],
        "nested" | "nested-bench" => vec![
            module("roottask", "roottask"),
            module("echo", "echo"),
            module("vmm", "vmm"),
            module("pager", "pager"),
            module("l1hv", "l1hv"),
        ],
        _ => Vec::new(),
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The release binary `name` built for the target.
pub fn binary_path(name: &str) -> PathBuf {
    target_dir().join(TARGET).join("release").join(name)
}

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Builds every target binary once per xtask run.
pub fn build_binaries() -> Result<(), String> {
    BUILT
        .get_or_init(|| {
            step!("building the kernel and user-level binaries ({TARGET}, release)");
            let mut dirs: Vec<&str> = TARGET_BINARIES.iter().map(|b| b.2).collect();
            dirs.dedup();
            for dir in dirs {
                let mut cmd = Command::new(cargo());
                cmd.current_dir(root().join(dir))
                    .args(["build", "--release", "--target", TARGET]);
                for (pkg, _, _) in TARGET_BINARIES.iter().filter(|b| b.2 == dir) {
                    cmd.args(["-p", pkg]);
                }
                let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
                if !status.success() {
                    return Err(
                        "building the target binaries failed (see cargo's output above)".into(),
                    );
                }
            }
            Ok(())
        })
        .clone()
}

fn grub_cfg(spec: &RunSpec, modules: &[Module]) -> String {
    let mut args = vec![format!("scenario={}", spec.scenario)];
    args.extend(spec.kernel_args.iter().cloned());
    let mut cfg = String::from(
        "set timeout=0\nset default=0\nserial --unit=0 --speed=115200\n\
         terminal_input serial\nterminal_output serial\n\
         menuentry \"capvisor\" {\n",
    );
    cfg.push_str(&format!("  multiboot2 /boot/capvisor {}\n", args.join(" ")));
    for m in modules {
        cfg.push_str(&format!("  module2 /boot/{} {}\n", m.binary, m.name));
    }
    cfg.push_str("  boot\n}\n");
    cfg
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

/// Builds the binaries and the ISO for `spec`; returns the ISO's path.
pub fn build(spec: &RunSpec) -> Result<PathBuf, String> {
    build_binaries()?;
    let dir = build_dir().join("iso").join(spec.label());
    let boot = dir.join("boot");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(boot.join("grub"))
        .map_err(|e| format!("cannot create {}: {e}", boot.display()))?;
    copy(&binary_path("capvisor"), &boot.join("capvisor"))?;
    let modules = modules_for(&spec.scenario);
    for m in &modules {
        let path = binary_path(m.binary);
        if !path.exists() {
            return Err(format!(
                "boot module {} is missing at {}",
                m.binary,
                path.display()
            ));
        }
        copy(&path, &boot.join(m.binary))?;
    }
    std::fs::write(boot.join("grub/grub.cfg"), grub_cfg(spec, &modules))
        .map_err(|e| format!("cannot write grub.cfg: {e}"))?;

    let iso = build_dir().join(format!("capvisor-{}.iso", spec.label()));
    // Only the GRUB modules the boot needs: a smaller core boots faster under emulation.
    let out = Command::new("grub-mkrescue")
        .args([
            "--install-modules=multiboot2 normal serial terminal iso9660 configfile echo part_msdos part_gpt",
            "--locales=",
            "--fonts=",
            "--themes=",
            "-o",
        ])
        .arg(&iso)
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run grub-mkrescue: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "grub-mkrescue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(iso)
}
