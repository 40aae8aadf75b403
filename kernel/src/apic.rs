//! The local APIC, in x2APIC mode where the CPU has it, else xAPIC through MMIO
//! (SDM Vol. 3A, chapter 11 "Advanced Programmable Interrupt Controller").

use crate::cpu::{VECTOR_SPURIOUS, VECTOR_TIMER};
use crate::hw::{self, msr};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);

/// Register offsets in xAPIC MMIO space; the x2APIC MSR is 0x800 + offset / 16.
const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

fn read(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        hw::rdmsr(msr::X2APIC_BASE + reg / 16) as u32
    } else {
        // SAFETY: the xAPIC page (from IA32_APIC_BASE, below 4 GiB) is identity mapped and
        // `reg` is one of the register offsets above.
        unsafe { hw::mmio_read32(XAPIC_BASE.load(Ordering::Relaxed) + u64::from(reg)) }
    }
}

fn write(reg: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: writes to the local APIC's own registers affect interrupt delivery only.
        unsafe { hw::wrmsr(msr::X2APIC_BASE + reg / 16, u64::from(value)) }
    } else {
        // SAFETY: as in `read`.
        unsafe { hw::mmio_write32(XAPIC_BASE.load(Ordering::Relaxed) + u64::from(reg), value) }
    }
}

/// Whether the kernel drives the APIC in x2APIC mode.
pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Enables the calling CPU's local APIC (x2APIC where CPUID.1:ECX[21] says so). Never clears
/// the global enable bit (Bochs ignores re-enabling after that).
pub fn init_this_cpu(bsp: bool) {
    let (_, _, ecx, _) = hw::cpuid(1, 0);
    let x2 = ecx & (1 << 21) != 0;
    if bsp {
        X2APIC.store(x2, Ordering::Relaxed);
    }
    let base = hw::rdmsr(msr::IA32_APIC_BASE);
    if bsp {
        XAPIC_BASE.store(base & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
    }
    let want = base | APIC_BASE_ENABLE | if x2 { APIC_BASE_X2APIC } else { 0 };
    if want != base {
        // SAFETY: only sets the enable (and x2APIC) bits of this CPU's APIC base MSR.
        unsafe { hw::wrmsr(msr::IA32_APIC_BASE, want) };
    }
    write(REG_SVR, 0x100 | u32::from(VECTOR_SPURIOUS));
}

/// Remaps the legacy 8259 PICs above the exception vectors and masks every line, so that
/// a firmware-programmed IRQ 0 cannot arrive as vector 8 (#DF).
pub fn disable_legacy_pic() {
    for (cmd, data, offset, cascade) in [(0x20, 0x21, 0x20u8, 4u8), (0xa0, 0xa1, 0x28, 2)] {
        hw::outb(cmd, 0x11); // ICW1: initialise, ICW4 follows
        hw::outb(data, offset); // ICW2: vector offset
        hw::outb(data, cascade); // ICW3: cascade wiring
        hw::outb(data, 0x01); // ICW4: 8086 mode
        hw::outb(data, 0xff); // mask all lines
    }
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    if is_x2apic() {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    }
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn send_ipi(apic_id: u32, low: u32) {
    if is_x2apic() {
        // SAFETY: an IPI through the x2APIC ICR; the caller chose the target and kind.
        unsafe {
            hw::wrmsr(
                msr::X2APIC_BASE + REG_ICR_LOW / 16,
                (u64::from(apic_id) << 32) | u64::from(low),
            )
        };
    } else {
        write(REG_ICR_HIGH, apic_id << 24);
        write(REG_ICR_LOW, low);
        let mut spins = 0;
        while read(REG_ICR_LOW) & (1 << 12) != 0 && spins < 1_000_000 {
            spins += 1;
            hw::pause();
        }
    }
}

/// A fixed-delivery IPI with `vector` to one CPU.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x4000 | u32::from(vector));
}

/// INIT IPI (level assert) to one CPU.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, 0x4500);
}

/// Start-up IPI: the CPU starts in real mode at `vector << 12`.
pub fn send_sipi(apic_id: u32, vector: u8) {
    send_ipi(apic_id, 0x4600 | u32::from(vector));
}

/// Starts the periodic local APIC timer on this CPU.
pub fn start_timer(initial_count: u32) {
    write(REG_TIMER_DIVIDE, 0b1011); // divide by 1
    write(REG_LVT_TIMER, (1 << 17) | u32::from(VECTOR_TIMER)); // periodic
    write(REG_TIMER_INITIAL, initial_count);
}

/// Roughly `us` microseconds: port 0x80 writes take about 1 us on PC hardware, and far less
/// under emulation, where the APs start at once anyway.
pub fn delay_us(us: u32) {
    for _ in 0..us {
        hw::outb(0x80, 0);
    }
}
