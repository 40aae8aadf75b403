//! ACPI: the MADT's list of processors (ACPI 6.5, 5.2.12 "Multiple APIC Description Table").

use crate::phys::{firmware_bytes, le_u32, le_u64};

pub const MAX_APICS: usize = 64;

/// Processors the MADT lists as enabled (or online-capable).
pub struct Madt {
    pub local_apic_address: u64,
    pub apic_ids: [u32; MAX_APICS],
    pub count: usize,
    /// I/O APICs: (MMIO address, first global system interrupt).
    pub ioapics: [(u32, u32); 4],
    pub ioapic_count: usize,
    /// Interrupt source overrides: (ISA IRQ, global system interrupt, MPS INTI flags).
    pub overrides: [(u8, u32, u16); 16],
    pub override_count: usize,
}

#[derive(Debug)]
pub enum AcpiError {
    NoRsdp,
    BadTable(&'static str),
    NoMadt,
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRsdp => write!(f, "the boot loader passed no RSDP"),
            Self::BadTable(why) => write!(f, "malformed ACPI table: {why}"),
            Self::NoMadt => write!(f, "no MADT in the RSDT/XSDT"),
        }
    }
}

fn table(addr: u64) -> Result<&'static [u8], AcpiError> {
    let header = firmware_bytes(addr, 36).ok_or(AcpiError::BadTable("header out of reach"))?;
    let len = le_u32(header, 4).ok_or(AcpiError::BadTable("short header"))? as usize;
    if len < 36 {
        return Err(AcpiError::BadTable("length below header size"));
    }
    let t = firmware_bytes(addr, len).ok_or(AcpiError::BadTable("table out of reach"))?;
    if t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
        return Err(AcpiError::BadTable("checksum"));
    }
    Ok(t)
}

/// Finds the MADT through the XSDT (preferred) or RSDT and lists its processors.
pub fn madt(rsdt: Option<u64>, xsdt: Option<u64>) -> Result<Madt, AcpiError> {
    let (root, entry_size) = match (xsdt, rsdt) {
        (Some(x), _) if x != 0 => (x, 8),
        (_, Some(r)) if r != 0 => (r, 4),
        _ => return Err(AcpiError::NoRsdp),
    };
    let root = table(root)?;
    let mut madt = None;
    let mut off = 36;
    while off + entry_size <= root.len() {
        let addr = if entry_size == 8 {
            le_u64(root, off)
        } else {
            le_u32(root, off).map(u64::from)
        }
        .ok_or(AcpiError::BadTable("root entries"))?;
        off += entry_size;
        if let Some(sig) = firmware_bytes(addr, 4)
            && sig == b"APIC"
        {
            madt = Some(table(addr)?);
            break;
        }
    }
    let t = madt.ok_or(AcpiError::NoMadt)?;
    let mut out = Madt {
        local_apic_address: u64::from(le_u32(t, 36).ok_or(AcpiError::BadTable("MADT"))?),
        apic_ids: [0; MAX_APICS],
        count: 0,
        ioapics: [(0, 0); 4],
        ioapic_count: 0,
        overrides: [(0, 0, 0); 16],
        override_count: 0,
    };
    let mut off = 44;
    while off + 2 <= t.len() {
        let kind = t[off];
        let len = t[off + 1] as usize;
        if len < 2 || off + len > t.len() {
            return Err(AcpiError::BadTable("MADT entry length"));
        }
        let e = &t[off..off + len];
        let id_flags = match kind {
            // Processor Local APIC: uid u8, APIC ID u8, flags u32.
            0 if len >= 8 => Some((u32::from(e[3]), le_u32(e, 4).unwrap_or(0))),
            // Processor Local x2APIC: reserved u16, x2APIC ID u32, flags u32, uid u32.
            9 if len >= 16 => Some((le_u32(e, 4).unwrap_or(0), le_u32(e, 8).unwrap_or(0))),
            // I/O APIC: id u8, reserved u8, address u32, GSI base u32.
            1 if len >= 12 => {
                if out.ioapic_count < out.ioapics.len() {
                    out.ioapics[out.ioapic_count] =
                        (le_u32(e, 4).unwrap_or(0), le_u32(e, 8).unwrap_or(0));
                    out.ioapic_count += 1;
                }
                None
            }
            // Interrupt Source Override: bus u8, source u8, GSI u32, flags u16.
            2 if len >= 10 => {
                if out.override_count < out.overrides.len() {
                    let flags = u16::from_le_bytes([e[8], e[9]]);
                    out.overrides[out.override_count] = (e[3], le_u32(e, 4).unwrap_or(0), flags);
                    out.override_count += 1;
                }
                None
            }
            // Local APIC Address Override.
            5 if len >= 12 => {
                out.local_apic_address = le_u64(e, 4).unwrap_or(out.local_apic_address);
                None
            }
            _ => None,
        };
        if let Some((id, flags)) = id_flags {
            // Bit 0: enabled; bit 1: online capable.
            if flags & 0b11 != 0
                && out.count < MAX_APICS
                && !out.apic_ids[..out.count].contains(&id)
            {
                out.apic_ids[out.count] = id;
                out.count += 1;
            }
        }
        off += len;
    }
    Ok(out)
}
