//! The boot information GRUB hands over (multiboot2), copied into plain fixed-size tables.

use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

/// multiboot2 bootloader magic in EAX (multiboot2 spec, 3.3 "I386 machine state").
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
pub const MAX_REGIONS: usize = 64;
pub const MAX_MODULES: usize = 16;

#[derive(Clone, Copy, Debug, Default)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

/// A string copied out of the boot information (longer strings are cut at a char boundary).
#[derive(Clone, Copy)]
pub struct BootString {
    buf: [u8; 128],
    len: usize,
}

impl BootString {
    const fn empty() -> Self {
        Self {
            buf: [0; 128],
            len: 0,
        }
    }

    fn copy(s: &str) -> Self {
        let mut len = s.len().min(128);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        let mut out = Self::empty();
        out.buf[..len].copy_from_slice(&s.as_bytes()[..len]);
        out.len = len;
        out
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl core::fmt::Debug for BootString {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    /// The module's command line (`module2 /boot/FILE NAME args`).
    pub cmdline: BootString,
}

/// What the kernel keeps from the boot information.
pub struct BootInfo {
    pub cmdline: BootString,
    pub available: [Region; MAX_REGIONS],
    pub available_count: usize,
    pub modules: [Option<Module>; MAX_MODULES],
    pub module_count: usize,
    /// Physical range of the boot information itself (reserved: strings point into it).
    pub info_range: Region,
    /// RSDT (ACPI 1.0) or XSDT (ACPI 2.0+) physical address from the RSDP tag.
    pub rsdt: Option<u64>,
    pub xsdt: Option<u64>,
    /// Modules or memory regions that did not fit the fixed tables (logged, not lost silently).
    pub dropped: usize,
}

#[derive(Debug)]
pub enum BootInfoError {
    BadMagic(u32),
    Unreadable,
    NoMemoryMap,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "not started by a multiboot2 loader (magic {m:#x})"),
            Self::Unreadable => write!(f, "the multiboot2 information is malformed"),
            Self::NoMemoryMap => write!(f, "the boot loader passed no memory map"),
        }
    }
}

/// Parses the boot information at physical `addr`.
pub fn parse(magic: u32, addr: u64) -> Result<BootInfo, BootInfoError> {
    if magic != MULTIBOOT2_MAGIC {
        return Err(BootInfoError::BadMagic(magic));
    }
    // SAFETY: a multiboot2 loader passed `addr` in EBX (magic checked above); the structure
    // lies in identity-mapped memory below 4 GiB that `memory` reserves; everything kept is
    // copied out before this function returns.
    let info: BootInformation<'_> =
        unsafe { BootInformation::load(addr as *const BootInformationHeader) }
            .map_err(|_| BootInfoError::Unreadable)?;

    let mut out = BootInfo {
        cmdline: BootString::copy(
            info.command_line_tag()
                .and_then(|t| t.cmdline().ok())
                .unwrap_or(""),
        ),
        available: [Region::default(); MAX_REGIONS],
        available_count: 0,
        modules: [None; MAX_MODULES],
        module_count: 0,
        info_range: Region {
            start: info.start_address() as u64,
            end: info.end_address() as u64,
        },
        rsdt: None,
        xsdt: None,
        dropped: 0,
    };
    let mmap = info.memory_map_tag().ok_or(BootInfoError::NoMemoryMap)?;
    for area in mmap.memory_areas() {
        if area.typ() != MemoryAreaType::Available {
            continue;
        }
        if out.available_count == MAX_REGIONS {
            out.dropped += 1;
            continue;
        }
        out.available[out.available_count] = Region {
            start: area.start_address(),
            end: area.end_address(),
        };
        out.available_count += 1;
    }
    for m in info.module_tags() {
        if out.module_count == MAX_MODULES {
            out.dropped += 1;
            continue;
        }
        out.modules[out.module_count] = Some(Module {
            start: m.start_address() as u64,
            end: m.end_address() as u64,
            cmdline: BootString::copy(m.cmdline().unwrap_or("")),
        });
        out.module_count += 1;
    }
    if let Some(t) = info.rsdp_v2_tag() {
        out.xsdt = Some(t.xsdt_address() as u64);
    }
    if let Some(t) = info.rsdp_v1_tag() {
        out.rsdt = Some(t.rsdt_address() as u64);
    }
    Ok(out)
}

impl BootInfo {
    pub fn available(&self) -> &[Region] {
        &self.available[..self.available_count]
    }

    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules[..self.module_count].iter().flatten()
    }

    /// The value of `key=` on the kernel command line.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.cmdline
            .as_str()
            .split_ascii_whitespace()
            .find_map(|w| {
                let (k, v) = w.split_once('=')?;
                (k == key).then_some(v)
            })
    }
}
