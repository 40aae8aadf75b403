//! Scenarios chosen on the kernel command line (`scenario=NAME`) and the verdict line the
//! runner reads: `capvisor: scenario NAME: PASS` or `... FAIL: reason`.

use crate::hw;
use crate::percpu::{CPU_COUNT, CPUS, VmxState};
use crate::serial::{CONSOLE, Serial};
use core::fmt::{self, Write};
use core::sync::atomic::Ordering;
use spin::Once;

static NAME: Once<&'static str> = Once::new();

/// Every scenario this kernel knows.
pub const SCENARIOS: &[&str] = &["boot", "fault"];

pub fn set_name(name: &'static str) {
    NAME.call_once(|| name);
}

fn name() -> &'static str {
    NAME.get().copied().unwrap_or("boot")
}

/// Exits the emulator: Bochs on `Shutdown` written to port 0x8900, QEMU through
/// isa-debug-exit on port 0xf4. On hardware, halts.
pub fn shutdown(success: bool) -> ! {
    Serial::unlocked().drain();
    for b in b"Shutdown" {
        hw::outb(0x8900, *b);
    }
    hw::outb(0xf4, if success { 0 } else { 1 });
    hw::halt_forever()
}

/// Prints the PASS verdict and ends the run.
pub fn pass() -> ! {
    let _ = writeln!(CONSOLE.lock(), "capvisor: scenario {}: PASS", name());
    shutdown(true)
}

/// Prints a FAIL verdict with its reason and ends the run.
pub fn fail(reason: fmt::Arguments<'_>) -> ! {
    let _ = writeln!(
        CONSOLE.lock(),
        "capvisor: scenario {}: FAIL: {}",
        name(),
        reason
    );
    shutdown(false)
}

/// As `fail`, without taking the console lock (exception and panic paths).
pub fn fail_unlocked(reason: fmt::Arguments<'_>) -> ! {
    hw::disable_interrupts();
    let _ = writeln!(
        Serial::unlocked(),
        "capvisor: scenario {}: FAIL: {}",
        name(),
        reason
    );
    shutdown(false)
}

/// Runs the chosen scenario on the BSP once the machine is up: the kernel's own (`boot`,
/// `fault`), or any other, which the root task runs.
pub fn run(expected_cpus: usize, info: &crate::bootinfo::BootInfo) -> ! {
    match name() {
        "boot" => boot(expected_cpus),
        "fault" => fault(),
        other => match crate::roottask::create(info) {
            Ok(thread) => crate::sched::start_first(thread),
            Err(e) => fail(format_args!(
                "scenario '{other}' is not one of the kernel's ({}) and needs the root task: {e}",
                SCENARIOS.join(", ")
            )),
        },
    }
}

/// `boot`: every CPU up, VMX root on each where VMX exists, allocator and heap self-checks,
/// timer interrupts on every CPU.
fn boot(expected_cpus: usize) -> ! {
    if let Err(e) = crate::memory::self_check_frames() {
        fail(format_args!("frame allocator self-check: {e}"));
    }
    if let Err(e) = crate::memory::self_check_heap() {
        fail(format_args!("heap self-check: {e}"));
    }
    crate::println!("memory: frame allocator and heap self-checks passed");

    let count = CPU_COUNT.load(Ordering::Acquire) as usize;
    if count != expected_cpus {
        fail(format_args!("{count} of {expected_cpus} CPUs online"));
    }
    // Every CPU must take timer interrupts.
    let mut waited = 0;
    while CPUS[..count]
        .iter()
        .any(|c| c.timer_ticks.load(Ordering::Relaxed) < 3)
    {
        hw::halt();
        waited += 1;
        if waited > 100_000 {
            fail(format_args!("a CPU takes no timer interrupts"));
        }
    }
    let vmx_here = CPUS[0].vmx_state() != VmxState::Absent;
    for (i, c) in CPUS[..count].iter().enumerate() {
        let s = c.vmx_state();
        crate::println!(
            "cpu {i}: APIC {} online, timer ticking, VMX {}",
            c.apic_id.load(Ordering::Relaxed),
            match s {
                VmxState::Root => "root (VMXON ok)",
                VmxState::Absent => "not available",
                VmxState::DisabledByFirmware => "disabled by firmware",
                VmxState::VmxonFailed => "VMXON failed",
                VmxState::Unknown => "not probed",
            }
        );
        if vmx_here && s != VmxState::Root {
            fail(format_args!("cpu {i} is not in VMX root ({s:?})"));
        }
    }
    crate::println!(
        "boot: {count} CPUs online, {}",
        if vmx_here {
            "all in VMX root"
        } else {
            "no VMX on this machine"
        }
    );
    pass()
}

/// `fault`: a deliberate page fault; the exception handler must report vector 14 and CR2.
fn fault() -> ! {
    const UNMAPPED: u64 = 0x5ead_beef_0000;
    crate::println!("fault: reading unmapped address {UNMAPPED:#x}");
    // SAFETY: the address is canonical but outside the identity map (its PML4 entry is empty), so the read faults before touching
    // memory; the page-fault handler reports it and ends the run.
    let v = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    fail(format_args!("read of an unmapped address returned {v:#x}"))
}
