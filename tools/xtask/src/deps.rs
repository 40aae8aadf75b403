//! What a fresh machine lacks: Debian packages and the rustup target. Installed when running
//! as root (as on these machines and in CI), otherwise the exact command is printed.

use crate::{Emulator, step};
use std::path::Path;
use std::process::Command;

/// A Debian package and a file that shows it is installed.
struct Package {
    name: &'static str,
    probe: &'static str,
}

const BUILD: &[Package] = &[
    Package {
        name: "grub-common",
        probe: "/usr/bin/grub-mkrescue",
    },
    Package {
        name: "grub-pc-bin",
        probe: "/usr/lib/grub/i386-pc/multiboot2.mod",
    },
    Package {
        name: "grub-efi-amd64-bin",
        probe: "/usr/lib/grub/x86_64-efi/multiboot2.mod",
    },
    Package {
        name: "xorriso",
        probe: "/usr/bin/xorriso",
    },
    Package {
        name: "mtools",
        probe: "/usr/bin/mformat",
    },
];

const BOCHS: &[Package] = &[
    Package {
        name: "bochs",
        probe: "/usr/bin/bochs",
    },
    Package {
        name: "bochsbios",
        probe: "/usr/share/bochs/BIOS-bochs-latest",
    },
    Package {
        name: "vgabios",
        probe: "/usr/share/vgabios/vgabios.bin",
    },
];

const QEMU: &[Package] = &[
    Package {
        name: "qemu-system-x86",
        probe: "/usr/bin/qemu-system-x86_64",
    },
    Package {
        name: "ovmf",
        probe: "/usr/share/ovmf/OVMF.fd",
    },
];

pub const TARGET: &str = "x86_64-unknown-none";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn install(packages: &[&Package]) -> Result<(), String> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|p| !Path::new(p.probe).exists())
        .map(|p| p.name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        return Err(format!(
            "missing Debian packages: {}. Install them with:\n    sudo apt-get update && sudo {cmd}",
            missing.join(" ")
        ));
    }
    step!(
        "installing {} (apt-get; this takes a minute)",
        missing.join(" ")
    );
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("apt-get update failed".into());
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!("'{cmd}' failed"));
    }
    Ok(())
}

fn ensure_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup not found ({e}); capvisor needs a rustup toolchain"))?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    step!("adding the rustup target {TARGET}");
    let ok = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!("'rustup target add {TARGET}' failed"))
    }
}

/// What building an image needs.
pub fn ensure_build() -> Result<(), String> {
    ensure_target()?;
    install(&BUILD.iter().collect::<Vec<_>>())
}

/// What building and running on `emulator` needs.
pub fn ensure(emulator: Emulator) -> Result<(), String> {
    ensure_target()?;
    let mut pkgs: Vec<&Package> = BUILD.iter().collect();
    match emulator {
        Emulator::Bochs => pkgs.extend(BOCHS),
        Emulator::Qemu | Emulator::Kvm => pkgs.extend(QEMU),
    }
    install(&pkgs)
}

/// Everything any command needs.
pub fn ensure_all() -> Result<(), String> {
    ensure_target()?;
    install(&BUILD.iter().chain(BOCHS).chain(QEMU).collect::<Vec<_>>())?;
    step!("all build and emulator dependencies are present");
    Ok(())
}
