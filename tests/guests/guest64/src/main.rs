//! capvisor's 64-bit test guest: runs under the user-level VMM (`userland/vmm`) and checks
//! what the VMM promises.
//!
//! Linked at 1 MiB and entered in 64-bit mode on the VMM's identity page tables with RDI = the
//! vCPU index and RSI = the vCPU count | mode << 8. Every vCPU runs the same code on its own
//! stack. Modes (`rt::vmx::protocol::Mode`, whose numbers and guest-physical layout this file
//! repeats, as the guest cannot link the runtime):
//!
//! - 0, checks: prints over the 16550, then checks in turn (the number is the failure code):
//!   1-2 CPUID.1 (VMX hidden, hypervisor bit, APIC ID), 3 the signature leaf, 4 SSE state
//!   across an exit, 5 EFER, 6 APIC base, 7 PAT written and read back, 8 an unknown MSR read
//!   and an APIC base write raise #GP, 9 MTRRcap and the TSC MSR, 10 timer interrupts through
//!   `STI; HLT`, 11-12 64 demand-paged pages at 16 MiB (contents, then written and read
//!   back), 13 pages at 1 GiB and 3 GiB, 14 the image's data and bss; then writes 0 (PASS) or
//!   the failed check's number to port 0xf4 (an unexpected exception writes 0x80 + vector);
//! - 1, triple fault: a zero-limit IDT and INT3;
//! - 2, benchmarks: the median emulated cycles of a CPUID exit and of a demand fault, written
//!   to the result port 0xf5, then 0 to port 0xf4.
//!
//! (Mode 3, an invalid initial state, never reaches the guest: VM entry fails.)
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod arch;

use core::fmt::{self, Write};

/// Guest-physical layout and constants shared with the VMM (`rt::vmx::protocol`).
mod vmm {
    pub const SERIAL: u16 = 0x3f8;
    pub const SERIAL_LSR: u16 = SERIAL + 5;
    pub const LSR_THRE: u8 = 0x20;
    pub const DEBUG_EXIT: u16 = 0xf4;
    pub const RESULT: u16 = 0xf5;
    pub const TIMER_VECTOR: u8 = 0x20;
    pub const PATTERN: u64 = 0x5a5a_5a5a_0000_0000;
    pub const SIGNATURE_LEAF: u32 = 0x4000_0000;
    pub const SIGNATURE: [u32; 3] = [
        u32::from_le_bytes(*b"capv"),
        u32::from_le_bytes(*b"isor"),
        0,
    ];
    pub const MODE_CHECKS: u64 = 0;
    pub const MODE_TRIPLE_FAULT: u64 = 1;
    pub const MODE_BENCH: u64 = 2;
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Timer interrupts each vCPU takes.
const TIMER_INTERRUPTS: u64 = 6;
/// Demand-paged pages each vCPU checks at 16 MiB.
const DEMAND_PAGES: u64 = 64;

/// Writes to the emulated 16550, polling the line status register like a real driver.
struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            while arch::inb(vmm::SERIAL_LSR) & vmm::LSR_THRE == 0 {}
            arch::outb(vmm::SERIAL, b);
        }
        Ok(())
    }
}

macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = writeln!(Serial, $($arg)*);
    }};
}

/// Ends this vCPU: 0 is PASS, anything else the failed check.
fn exit(code: u8) -> ! {
    arch::outb(vmm::DEBUG_EXIT, code);
    arch::halt()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("guest64: panic: {info}");
    exit(0xff)
}

/// Entered from `_start`.
pub extern "C" fn guest_main(index: u64, config: u64) -> ! {
    let count = config & 0xff;
    match (config >> 8) & 0xff {
        vmm::MODE_CHECKS => match checks(index, count) {
            Ok(()) => {
                println!("guest64: vcpu {index} of {count}: all checks passed");
                exit(0)
            }
            Err(check) => {
                println!("guest64: vcpu {index} of {count}: check {check} failed");
                exit(check)
            }
        },
        vmm::MODE_TRIPLE_FAULT => {
            println!("guest64: vcpu {index}: triple-faulting on purpose");
            arch::triple_fault()
        }
        vmm::MODE_BENCH => match bench(index) {
            Ok(()) => exit(0),
            Err(check) => exit(check),
        },
        _ => exit(0xfe),
    }
}

/// Fails with `check` unless `cond`.
fn check(cond: bool, check: u8) -> Result<(), u8> {
    if cond { Ok(()) } else { Err(check) }
}

/// Initialized data and bss, to check the image was loaded (14).
static DATA: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
static mut BSS: [u64; 4] = [0; 4];

fn checks(index: u64, count: u64) -> Result<(), u8> {
    println!("guest64: vcpu {index} of {count} up");

    // CPUID, filtered by the VMM.
    let [_, ebx, ecx, _] = arch::cpuid(1, 0);
    check(ecx & (1 << 5) == 0, 1)?;
    check(ecx & (1 << 31) != 0, 2)?;
    check(u64::from(ebx >> 24) == index, 2)?;
    let [max, sig0, sig1, sig2] = arch::cpuid(vmm::SIGNATURE_LEAF, 0);
    check(
        max >= vmm::SIGNATURE_LEAF && [sig0, sig1, sig2] == vmm::SIGNATURE,
        3,
    )?;
    check(arch::sse_survives_exit(0x5eed_0000_0000_0001 ^ index), 4)?;

    // MSRs. The IDT first: an unknown MSR raises #GP.
    arch::install_idt(vmm::TIMER_VECTOR);
    const EFER: u32 = 0xc000_0080;
    const APIC_BASE: u32 = 0x1b;
    const PAT: u32 = 0x277;
    const MTRRCAP: u32 = 0xfe;
    const TSC: u32 = 0x10;
    check(arch::rdmsr(EFER) == (1 << 8) | (1 << 10), 5)?;
    let apic = arch::rdmsr(APIC_BASE);
    check(
        apic & !0xfff == 0xfee0_0000
            && apic & (1 << 11) != 0
            && (apic & (1 << 8) != 0) == (index == 0),
        6,
    )?;
    let pat = arch::rdmsr(PAT);
    let new_pat = 0x0007_0406_0007_0106;
    arch::wrmsr(PAT, new_pat);
    check(arch::rdmsr(PAT) == new_pat, 7)?;
    arch::wrmsr(PAT, pat);
    check(arch::rdmsr(PAT) == pat, 7)?;
    let gps = arch::gp_count();
    arch::expect_gp();
    let _ = arch::rdmsr(0x0c0d_e000);
    check(arch::gp_count() == gps + 1, 8)?;
    arch::expect_gp();
    arch::wrmsr(APIC_BASE, apic);
    check(arch::gp_count() == gps + 2, 8)?;
    let _ = arch::rdmsr(MTRRCAP);
    // The VMM reads its own CPU's TSC (plus the guest's offset): nonzero and monotonic.
    let tsc = arch::rdmsr(TSC);
    check(tsc != 0 && arch::rdmsr(TSC) > tsc, 9)?;

    // Timer interrupts through HLT.
    for i in 1..=TIMER_INTERRUPTS {
        arch::wait_for_interrupt();
        check(arch::timer_count() == i, 10)?;
    }
    println!("guest64: vcpu {index}: {TIMER_INTERRUPTS} timer interrupts");

    // Demand paging: pages the VMM has never seen hold the pattern, and keep what is written.
    let first = 16 * MIB + index * DEMAND_PAGES * PAGE;
    for page in 0..DEMAND_PAGES {
        check_pattern(first + page * PAGE, 11)?;
    }
    for page in 0..DEMAND_PAGES {
        let address = first + page * PAGE + (page % 512) * 8;
        arch::write(address, !address);
        check(arch::read(address) == !address, 12)?;
    }
    for address in [
        GIB + index * 4 * PAGE,
        GIB + (index * 4 + 3) * PAGE,
        3 * GIB + index * PAGE,
    ] {
        check_pattern(address, 13)?;
    }
    println!(
        "guest64: vcpu {index}: {} demand-paged pages checked",
        DEMAND_PAGES + 3
    );

    // The image: data as linked, bss zero.
    let data = core::hint::black_box(&DATA);
    check(
        data[0] == 0x0123_4567_89ab_cdef && data[1] == 0xfedc_ba98_7654_3210,
        14,
    )?;
    let bss = core::hint::black_box(&raw const BSS) as u64;
    check((0..4).all(|i| arch::read(bss + i * 8) == 0), 14)?;
    Ok(())
}

/// Checks every u64 of the page at `address` against the VMM's pattern: the page's address
/// XOR `PATTERN` (a fresh page at the right guest-physical address).
fn check_pattern(address: u64, code: u8) -> Result<(), u8> {
    let page = address & !(PAGE - 1);
    for word in 0..512 {
        check(arch::read(page + word * 8) == page ^ vmm::PATTERN, code)?;
    }
    Ok(())
}

/// CPUID exits timed; [`BENCH_CPUID`] samples after a warm-up.
pub const BENCH_CPUID: usize = 1024;
/// Demand faults timed; [`BENCH_FAULTS`] samples after a warm-up.
const BENCH_FAULTS: usize = 288;
const WARM_UP: usize = 32;
/// Where the benchmark touches fresh pages.
const BENCH_MEMORY: u64 = 32 * MIB;

fn bench(index: u64) -> Result<(), u8> {
    // One vCPU measures; any other only exits.
    let Some(samples) = (index == 0).then(arch::samples).flatten() else {
        return Ok(());
    };
    // Touch the buffer first, so its pages are not loaded during the measurements.
    samples.fill(0);

    for _ in 0..WARM_UP {
        arch::cpuid(0, 0);
    }
    for sample in samples.iter_mut() {
        let start = arch::rdtsc();
        let r = arch::cpuid(vmm::SIGNATURE_LEAF, 0);
        let end = arch::rdtsc();
        core::hint::black_box(r);
        *sample = end - start;
    }
    let cpuid = median(&mut samples[..]);

    for page in 0..WARM_UP as u64 {
        check_pattern(BENCH_MEMORY + page * PAGE, 20)?;
    }
    for (i, sample) in samples[..BENCH_FAULTS].iter_mut().enumerate() {
        let address = BENCH_MEMORY + (WARM_UP + i) as u64 * PAGE;
        let start = arch::rdtsc();
        let value = arch::read(address);
        let end = arch::rdtsc();
        check(value == address ^ vmm::PATTERN, 21)?; // `address` is a page's first word
        *sample = end - start;
    }
    let fault = median(&mut samples[..BENCH_FAULTS]);
    let [_, sig0, sig1, sig2] = arch::cpuid(vmm::SIGNATURE_LEAF, 0);
    check([sig0, sig1, sig2] == vmm::SIGNATURE, 22)?;

    arch::outl(vmm::RESULT, cpuid.min(u64::from(u32::MAX)) as u32);
    arch::outl(vmm::RESULT, fault.min(u64::from(u32::MAX)) as u32);
    println!("guest64: cpuid exit {cpuid} cycles, demand fault {fault} cycles (medians)");
    Ok(())
}

fn median(samples: &mut [u64]) -> u64 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}
