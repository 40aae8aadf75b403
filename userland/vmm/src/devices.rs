//! What the VMM emulates for its guests: the filtered CPUID, the 16550 UART at 0x3f8, the
//! debug-exit and result ports, and the MSRs a guest may read or write.

use crate::memory;
use rt::vmx::protocol::layout::{SIGNATURE, SIGNATURE_LEAF};
use rt::vmx::protocol::port;

/// CPUID.1:ECX bits (SDM Vol. 2A, CPUID, Table 3-10).
const CPUID_1_ECX_VMX: u32 = 1 << 5;
const CPUID_1_ECX_SMX: u32 = 1 << 6;
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
/// Reserved for hypervisors: "a hypervisor is present" (leaf 0x4000_0000 is defined).
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Highest hypervisor leaf the VMM defines.
const HYPERVISOR_MAX_LEAF: u32 = SIGNATURE_LEAF;

/// The guest's CPUID for `leaf`/`subleaf` on vCPU `index`: the VMM CPU's values, with VMX, SMX
/// and x2APIC hidden, the hypervisor bit set and the initial APIC ID the vCPU index, and the
/// hypervisor leaves 0x4000_0000.. (signature "capvisor").
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32, index: u32) -> [u32; 4] {
    match leaf {
        SIGNATURE_LEAF => [
            HYPERVISOR_MAX_LEAF,
            SIGNATURE[0],
            SIGNATURE[1],
            SIGNATURE[2],
        ],
        0x4000_0001..=0x4fff_ffff => [0; 4],
        1 => {
            let [a, b, c, d] = memory::cpuid(1, subleaf);
            let c = (c & !(CPUID_1_ECX_VMX | CPUID_1_ECX_SMX | CPUID_1_ECX_X2APIC))
                | CPUID_1_ECX_HYPERVISOR;
            [a, (b & 0x00ff_ffff) | (index << 24), c, d]
        }
        _ => memory::cpuid(leaf, subleaf),
    }
}

/// CPUID leaf with the physical CPU of the asking vCPU (nested guests, `docs/nested.md`).
pub const PHYSICAL_CPU_LEAF: u32 = 0x4000_0001;

/// An L1 hypervisor's CPUID for `leaf`/`subleaf` on vCPU `index`, running on physical CPU
/// `cpu`: as [`cpuid`], but VMX shown (leaf 1 ECX bit 5: the VMM emulates VMX, with the
/// capability MSRs filtered to what it emulates), and leaf 0x4000_0001 answering `cpu` in EAX.
pub fn nested_cpuid(leaf: u32, subleaf: u32, index: u32, cpu: u32) -> [u32; 4] {
    match leaf {
        SIGNATURE_LEAF => [PHYSICAL_CPU_LEAF, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]],
        PHYSICAL_CPU_LEAF => [cpu, 0, 0, 0],
        1 => {
            let [a, b, c, d] = cpuid(1, subleaf, index);
            [a, b, c | CPUID_1_ECX_VMX, d]
        }
        _ => cpuid(leaf, subleaf, index),
    }
}

/// The 16550's line status register: transmitter holding register empty, transmitter empty.
const LSR_THRE_TEMT: u32 = 0x60;
/// The interrupt identification register: no interrupt pending.
const IIR_NONE: u32 = 0x01;

/// What a port read returns (a `size`-byte value; unclaimed ports read all ones, as on a PC).
pub fn port_in(p: u16, size: u8) -> u32 {
    let all_ones = match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    };
    match p {
        port::SERIAL_LSR => LSR_THRE_TEMT,
        x if x == port::SERIAL + 2 => IIR_NONE,
        x if (port::SERIAL..port::SERIAL + 8).contains(&x) => 0,
        _ => all_ones,
    }
}

/// A guest's console: the 16550's transmitter, one line buffer per vCPU, printed with a prefix.
#[derive(Debug)]
pub struct SerialLine {
    buffer: [u8; 256],
    len: usize,
}

impl SerialLine {
    pub const fn new() -> Self {
        Self {
            buffer: [0; 256],
            len: 0,
        }
    }

    /// A byte written to the transmitter; prints the line at a newline or when the buffer fills.
    pub fn put(&mut self, byte: u8, prefix: &dyn core::fmt::Display) {
        match byte {
            b'\r' => {}
            b'\n' => self.flush(prefix),
            _ => {
                self.buffer[self.len] = byte;
                self.len += 1;
                if self.len == self.buffer.len() {
                    self.flush(prefix);
                }
            }
        }
    }

    /// Prints what is buffered (if anything).
    pub fn flush(&mut self, prefix: &dyn core::fmt::Display) {
        if self.len > 0 {
            let text = core::str::from_utf8(&self.buffer[..self.len]).unwrap_or("<not UTF-8>");
            rt::println!("{prefix}{text}");
            self.len = 0;
        }
    }
}

/// MSR indices (SDM Vol. 4, Table 2-2).
pub mod msr {
    pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_MTRRCAP: u32 = 0xfe;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// IA32_APIC_BASE: the default base, enabled (bit 11), BSP (bit 8) for vCPU 0.
pub const fn apic_base(index: u32) -> u64 {
    0xfee0_0000 | (1 << 11) | if index == 0 { 1 << 8 } else { 0 }
}

/// EFER bits (SDM Vol. 3A §2.2.1): SCE, LME, LMA, NXE.
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Whether a guest running with `current` may write `value` to EFER: only SCE and NXE may
/// change (long mode stays on), no other bit may be set.
pub const fn efer_write_allowed(current: u64, value: u64) -> bool {
    let changeable = EFER_SCE | EFER_NXE;
    let fixed = EFER_LME | EFER_LMA;
    value & !(changeable | fixed) == 0 && value & fixed == current & fixed
}

/// Whether every entry of a PAT value is a valid memory type (0 UC, 1 WC, 4 WT, 5 WP, 6 WB,
/// 7 UC-; SDM Vol. 3A §13.12.2).
pub fn pat_valid(value: u64) -> bool {
    value
        .to_le_bytes()
        .iter()
        .all(|t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7))
}
