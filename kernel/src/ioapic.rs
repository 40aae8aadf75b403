//! I/O APICs: routing of global system interrupts (GSIs) to vectors on the BSP (82093AA
//! datasheet; ACPI MADT for where they are and how ISA IRQs map to GSIs).

use crate::acpi::Madt;
use crate::hw;
use spin::Mutex;

/// Vector of GSI n: `IRQ_VECTOR_BASE + n`.
pub const IRQ_VECTOR_BASE: u8 = 0x30;
/// GSIs the kernel routes (vectors 0x30..0xef).
pub const MAX_GSI: u32 = 0xc0;

struct Ioapic {
    address: u64,
    gsi_base: u32,
    lines: u32,
}

struct State {
    ioapics: [Option<Ioapic>; 4],
    overrides: [(u8, u32, u16); 16],
    override_count: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    ioapics: [None, None, None, None],
    overrides: [(0, 0, 0); 16],
    override_count: 0,
});

fn read(address: u64, reg: u32) -> u32 {
    // SAFETY: `address` is an I/O APIC's MMIO page from the MADT, inside the identity map
    // (below 4 GiB); IOREGSEL/IOWIN accesses have no effect beyond the I/O APIC.
    unsafe {
        hw::mmio_write32(address, reg);
        hw::mmio_read32(address + 0x10)
    }
}

fn write(address: u64, reg: u32, value: u32) {
    // SAFETY: as in `read`.
    unsafe {
        hw::mmio_write32(address, reg);
        hw::mmio_write32(address + 0x10, value);
    }
}

/// Finds the I/O APICs and masks every line.
pub fn init(madt: &Madt) {
    let mut st = STATE.lock();
    for (i, &(address, gsi_base)) in madt.ioapics[..madt.ioapic_count].iter().enumerate() {
        let address = u64::from(address);
        if address == 0 || address >= crate::memory::MAPPED_LIMIT {
            continue;
        }
        let lines = ((read(address, 1) >> 16) & 0xff) + 1;
        for line in 0..lines {
            write(address, 0x10 + 2 * line, 1 << 16);
        }
        st.ioapics[i] = Some(Ioapic {
            address,
            gsi_base,
            lines,
        });
    }
    st.overrides = madt.overrides;
    st.override_count = madt.override_count;
}

/// The GSI of ISA IRQ `irq`, and whether it is level-triggered and active low (MADT
/// interrupt source overrides; ISA defaults: same number, edge, active high).
pub fn isa_irq(irq: u8) -> (u32, bool, bool) {
    let st = STATE.lock();
    for &(source, gsi, flags) in &st.overrides[..st.override_count] {
        if source == irq {
            let low = flags & 0b11 == 0b11;
            let level = (flags >> 2) & 0b11 == 0b11;
            return (gsi, level, low);
        }
    }
    (u32::from(irq), false, false)
}

/// Routes `gsi` to its vector on the CPU with `apic_id`, masked or not. False if no I/O APIC
/// has that line.
pub fn route(gsi: u32, apic_id: u32, level: bool, active_low: bool, masked: bool) -> bool {
    if gsi >= MAX_GSI {
        return false;
    }
    let st = STATE.lock();
    let Some(io) = st
        .ioapics
        .iter()
        .flatten()
        .find(|io| gsi >= io.gsi_base && gsi < io.gsi_base + io.lines)
    else {
        return false;
    };
    let line = gsi - io.gsi_base;
    let mut low = u32::from(IRQ_VECTOR_BASE) + gsi;
    if active_low {
        low |= 1 << 13;
    }
    if level {
        low |= 1 << 15;
    }
    if masked {
        low |= 1 << 16;
    }
    write(io.address, 0x11 + 2 * line, apic_id << 24);
    write(io.address, 0x10 + 2 * line, low);
    true
}

/// Masks or unmasks `gsi`.
pub fn set_masked(gsi: u32, masked: bool) {
    let st = STATE.lock();
    if let Some(io) = st
        .ioapics
        .iter()
        .flatten()
        .find(|io| gsi >= io.gsi_base && gsi < io.gsi_base + io.lines)
    {
        let reg = 0x10 + 2 * (gsi - io.gsi_base);
        let low = read(io.address, reg);
        write(
            io.address,
            reg,
            if masked {
                low | 1 << 16
            } else {
                low & !(1 << 16)
            },
        );
    }
}
