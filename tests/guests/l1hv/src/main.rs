//! capvisor's L1 test hypervisor: a small 64-bit hypervisor, written to the Intel SDM, that runs
//! a 64-bit L2 with EPT under the nested VMM server and checks what L2 reads on every path an
//! L2 EPT violation can take.
//!
//! Linked at 1 MiB and entered in 64-bit mode on its VMM's identity page tables with RDI = the
//! vCPU index and RSI = the vCPU count | mode << 8 (docs/nested.md, the contract this image
//! relies on and nothing more). Every vCPU runs its own hypervisor on its own stack, with its
//! own VMXON region, VMCS, EPT and L2. Set-up as SDM Vol. 3C chapter 24 describes: CPUID.1:ECX.VMX,
//! IA32_FEATURE_CONTROL, the capability MSRs (TRUE_ ones when IA32_VMX_BASIC[55]), controls
//! negotiated as `required | desired & allowed1 | allowed0`, CR0/CR4 fixed bits and VMXE, VMXON,
//! VMCLEAR, VMPTRLD; L1's own GDT (a TSS per vCPU), IDT and stacks for the host state.
//!
//! L2 runs [`l2::l2_main`] from this image, which L1's EPT maps one to one, on its own stack,
//! GDT, IDT and identity page tables (in this image too). L1 uses external-interrupt and NMI
//! exiting, HLT exiting, I/O and MSR bitmaps, a #UD exception bitmap, EPT (4-level, WB), VPID,
//! unrestricted guest if offered, save/load of IA32_EFER and IA32_PAT, acknowledge interrupt on
//! exit, and injects events into L2 ([`hv`]).
//!
//! Modes (RSI bits 15:8), each ending with a 32-bit OUT to port 0xf4 of 0 (PASS) or the
//! failed check ([`layout::fail`]):
//!
//! - 0, checks ([`checks`]), per vCPU: L2 reads pages L1 mapped up front (L1's pattern), pages
//!   L1 maps lazily on its EPT-violation exits (their count must be exactly
//!   [`layout::LAZY_PAGES`]), pages mapped to untouched on-demand L1 memory (the L0 pager's
//!   pattern), a page L1 remaps with INVEPT (new contents), the on-demand page it read, revoked
//!   through L1's port 0xf6 (generation 1, never 0), 64 MiB mapped with 2 MiB pages at every
//!   level (at most 64 shadow faults, port 0xf7), event injection, #UD, MSRs; with 2 vCPUs the
//!   physical CPU (CPUID 0x4000_0001) must change on at least one of them;
//! - 1, benchmarks ([`bench`]): medians of emulated cycles in L2 for an EPT violation fixed in
//!   the vEPT, one reflected to L1, the same with INVEPT, a CPUID reflected to L1, written to
//!   port 0xf5 in that order, then the 2 MiB test's shadow faults;
//! - 2, malformed VMX ([`malformed`]): the table of cases and the outcomes the SDM prescribes.
//!
//! Failure codes: 1 VMX unusable, 2 layout, 3 VMX set-up, 4 VM entry, 5 unexpected exit,
//! 10 up front, 11 lazy contents, 12 lazy count, 13 L0 pager, 14 remap, 15 revoke, 16 2 MiB
//! contents, 17 2 MiB shadow faults, 18 migration, 19 CPUID, 20 injection, 21 #UD, 22 MSR,
//! 23 L1's exit counters, 30-33 benchmark contents, 40-41 malformed VMX, 0x80 + v an exception
//! in L2, 0x100 + v an exception in L1, 0xff a panic.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod arch;
mod bench;
mod checks;
mod hv;
mod l2;
mod l2_ept;
mod layout;
mod malformed;
mod memory;
mod vmx;

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use layout::{fail, mode, port};

/// Writes to the 16550, polling the line status register like a real driver (in L1 through its
/// VMM; in L2 through L1, which forwards L2's lines).
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            while arch::inb(port::SERIAL_LSR) & port::LSR_THRE == 0 {}
            arch::outb(port::SERIAL, b);
        }
        Ok(())
    }
}

/// Serializes L1's lines between vCPUs (L2 never takes it: it shares this image, and its
/// lines reach the serial port through L1 whole).
static PRINT_LOCK: AtomicBool = AtomicBool::new(false);

/// Writes one line for L1, whole (after waiting a bounded time for another vCPU's line).
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut owned = false;
    for _ in 0..1u32 << 24 {
        if PRINT_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            owned = true;
            break;
        }
        core::hint::spin_loop();
    }
    let _ = writeln!(Serial, "{args}");
    if owned {
        PRINT_LOCK.store(false, Ordering::Release);
    }
}

/// A line from L1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::print_line(format_args!($($arg)*))
    };
}

/// A line from L2 (to its serial port, which L1 intercepts and forwards line by line).
#[macro_export]
macro_rules! l2_println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::Serial, $($arg)*);
    }};
}

/// Ends this vCPU: 0 is PASS, anything else the failed check.
fn exit(code: u32) -> ! {
    arch::outl(port::END, code);
    arch::halt()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("l1hv: panic: {info}");
    exit(fail::PANIC)
}

/// Entered from `_start` on this vCPU's stack; `boot_rsp` is the stack the VMM gave.
pub extern "C" fn l1_main(index: u64, config: u64, boot_rsp: u64) -> ! {
    let count = (config & 0xff) as usize;
    let mode = (config >> 8) & 0xff;
    let index = index as usize;
    let host = arch::init_l1_cpu(index);
    let result = if count > layout::MAX_VCPUS || index >= count {
        Err(fail::LAYOUT)
    } else {
        memory::check_layout(boot_rsp).and_then(|()| match mode {
            mode::CHECKS => checks::run(index, count, host),
            mode::BENCH => bench::run(index, count, host),
            mode::MALFORMED => malformed::run(index, count, host),
            _ => Err(fail::MODE),
        })
    };
    match result {
        Ok(()) => {
            println!("l1hv: vcpu{index} of {count}, mode {mode}: PASS");
            exit(0)
        }
        Err(code) => {
            println!("l1hv: vcpu{index} of {count}, mode {mode}: FAIL {code}");
            exit(code)
        }
    }
}
