//! The guest's instructions: the entry point, port I/O, CPUID, MSRs, RDTSC, the IDT and its
//! handlers, HLT, SSE, and memory by address. The only module of the guest with `unsafe`.
//!
//! The guest runs in ring 0 of its own virtual machine, on the VMM's identity page tables:
//! every address below 4 GiB is mapped, and every access either reaches guest memory (demand-
//! paged by the VMM) or ends the guest. Nothing here can affect anything outside the guest.

use core::arch::{asm, global_asm};

// The entry: the VMM sets RSP to the top of this vCPU's stack, RDI to the vCPU index and RSI to
// the vCPU count | mode << 8, which are `guest_main`'s arguments.
global_asm!(
    ".pushsection .text._start, \"ax\", @progbits",
    ".globl _start",
    "_start:",
    "    and rsp, -16",
    "    call {main}",
    "    ud2",
    ".popsection",
    main = sym crate::guest_main,
);

// The interrupt and exception handlers. Each vCPU's GS base points at its block in the VMM's
// system page (`PER_VCPU`): word 0 counts timer interrupts, word 1 counts expected #GPs, word 2
// is set while a #GP is expected. An unexpected exception writes 0x80 + its vector to the
// debug-exit port: the VMM ends the guest with that failure code.
global_asm!(
    ".pushsection .text.guest_handlers, \"ax\", @progbits",
    ".balign 16",
    ".globl guest_timer_handler",
    "guest_timer_handler:",
    "    lock inc qword ptr gs:[0]",
    "    iretq",
    ".balign 16",
    ".globl guest_gp_handler",
    "guest_gp_handler:",
    "    cmp qword ptr gs:[16], 0",
    "    je 2f",
    "    mov qword ptr gs:[16], 0",
    "    lock inc qword ptr gs:[8]",
    // Past the faulting RDMSR/WRMSR (2 bytes), below the error code.
    "    add qword ptr [rsp + 8], 2",
    "    add rsp, 8",
    "    iretq",
    "2:",
    "    push 13",
    "    jmp guest_fatal",
    ".balign 16",
    ".globl guest_exception_stubs",
    "guest_exception_stubs:",
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .balign 16",
    "    push \\vector",
    "    jmp guest_fatal",
    ".endr",
    "guest_fatal:",
    "    pop rax",
    "    add eax, 0x80",
    "    mov dx, 0xf4",
    "    out dx, al",
    "3:",
    "    cli",
    "    hlt",
    "    jmp 3b",
    ".popsection",
);

unsafe extern "C" {
    /// Vector 0x20: counts in the vCPU's block.
    safe fn guest_timer_handler();
    /// #GP: expected ones skip the 2-byte MSR instruction.
    safe fn guest_gp_handler();
    /// 32 stubs of 16 bytes, one per exception vector.
    safe fn guest_exception_stubs();
}

/// The IDT's entries: vectors 0 to 0x20.
const IDT_ENTRIES: usize = 0x21;

#[repr(C, align(16))]
struct Idt([u64; 2 * IDT_ENTRIES]);

/// Shared by every vCPU (each writes the same values).
static mut IDT: Idt = Idt([0; 2 * IDT_ENTRIES]);

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

/// A 64-bit interrupt gate to `handler` in the code segment 0x08 (SDM Vol. 3A §6.14.1).
const fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Builds the IDT (the exception stubs, the #GP handler, the timer at `timer_vector`) and loads
/// it.
pub fn install_idt(timer_vector: u8) {
    let stubs = guest_exception_stubs as *const () as u64;
    let idt = &raw mut IDT;
    for vector in 0..IDT_ENTRIES {
        let handler = match vector {
            13 => guest_gp_handler as *const () as u64,
            v if v == usize::from(timer_vector) => guest_timer_handler as *const () as u64,
            v if v < 32 => stubs + 16 * v as u64,
            _ => continue,
        };
        let [low, high] = gate(handler);
        // SAFETY: `idt` points at the static IDT; every vCPU writes the same values there, and
        // the CPU reads it only through IDTR, so no Rust reference to it exists.
        unsafe {
            (&raw mut (*idt).0[2 * vector]).write_volatile(low);
            (&raw mut (*idt).0[2 * vector + 1]).write_volatile(high);
        }
    }
    let pointer = TablePointer {
        limit: (IDT_ENTRIES * 16 - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the table holds valid gates to handlers that end with IRETQ (or report and halt);
    // it is static, so it outlives its use.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// Loads an IDT of limit 0 and executes INT3: the breakpoint cannot be delivered (#GP), nor can
/// the #GP (#DF), nor the #DF: a triple fault, on purpose.
pub fn triple_fault() -> ! {
    let pointer = TablePointer { limit: 0, base: 0 };
    // SAFETY: this ends the guest (a triple fault is a VM exit the VMM turns into the end of
    // this guest); nothing after it runs.
    unsafe {
        asm!(
            "lidt [{}]",
            "int3",
            "ud2",
            in(reg) &pointer,
            options(noreturn, nostack)
        )
    }
}

/// Waits for the next interrupt with interrupts enabled (`STI; HLT`), then disables them.
pub fn wait_for_interrupt() {
    // SAFETY: STI's one-instruction shadow makes HLT the first instruction that can be
    // interrupted; the handler only counts in the vCPU's block and returns. Memory changes
    // (the counter), hence no `nomem`.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
}

/// Disables interrupts and halts for good.
pub fn halt() -> ! {
    loop {
        // SAFETY: with interrupts off, HLT stops this vCPU (the VMM ends the guest).
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O in the guest exits to the VMM, which emulates the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!(
            "out dx, eax",
            in("dx") port,
            in("eax") value,
            options(nomem, nostack, preserves_flags)
        )
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// CPUID: [EAX, EBX, ECX, EDX].
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// The time-stamp counter after earlier instructions completed (`LFENCE; RDTSC`).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reads the TSC into EDX:EAX only.
    unsafe {
        asm!(
            "lfence",
            "rdtsc",
            out("eax") low,
            out("edx") high,
            options(nomem, nostack, preserves_flags)
        )
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// RDMSR. A #GP is fatal unless [`expect_gp`] was called.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDMSR exits to the VMM; an MSR it refuses raises #GP, which the guest's handler
    // either skips (expected) or reports. The handler writes the vCPU's block: no `nomem`.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// WRMSR; a #GP as for [`rdmsr`].
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as in `rdmsr`. The MSRs the guest writes (PAT, EFER) keep its memory and mode as
    // they are: the values it writes are the ones it checks.
    unsafe {
        asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack)
        )
    };
}

/// Word `word` of this vCPU's block (through GS).
fn block(word: usize) -> u64 {
    let value: u64;
    // SAFETY: GS's base is this vCPU's 64-byte block in the system page, mapped by the VMM.
    unsafe {
        asm!(
            "mov {}, gs:[{}]",
            out(reg) value,
            in(reg) word * 8,
            options(nostack, readonly, preserves_flags)
        )
    };
    value
}

/// Timer interrupts this vCPU has taken.
pub fn timer_count() -> u64 {
    block(0)
}

/// Expected #GPs this vCPU has taken.
pub fn gp_count() -> u64 {
    block(1)
}

/// Makes the next #GP expected: the handler skips a 2-byte MSR instruction.
pub fn expect_gp() {
    // SAFETY: as in `block`: word 2 of this vCPU's block.
    unsafe {
        asm!(
            "mov qword ptr gs:[16], 1",
            options(nostack, preserves_flags)
        )
    };
}

/// Whether XMM0 still holds `pattern` after a CPUID exit (the vCPU's SSE state survives the
/// VMM's handling).
pub fn sse_survives_exit(pattern: u64) -> bool {
    let out: u64;
    // SAFETY: CR4.OSFXSR is set by the VMM; the compiled code never uses XMM registers (the
    // target is soft-float), so XMM0 can be overwritten. RBX is saved around CPUID.
    unsafe {
        asm!(
            "movq xmm0, rax",
            "mov {save}, rbx",
            "xor eax, eax",
            "xor ecx, ecx",
            "cpuid",
            "mov rbx, {save}",
            "movq rax, xmm0",
            save = out(reg) _,
            inout("rax") pattern => out,
            out("rcx") _,
            out("rdx") _,
            options(nostack)
        )
    };
    out == pattern
}

/// The u64 at guest address `address` (8-byte aligned, below 4 GiB).
#[inline(always)]
pub fn read(address: u64) -> u64 {
    // SAFETY: every address below 4 GiB is mapped by the VMM's identity tables; the VMM backs
    // it with a page or ends the guest. The addresses the guest reads hold no Rust objects.
    unsafe { (address as *const u64).read_volatile() }
}

/// Writes the u64 at guest address `address` (8-byte aligned, below 4 GiB, outside the image).
#[inline(always)]
pub fn write(address: u64, value: u64) {
    // SAFETY: as in `read`; the guest writes only demand-paged memory outside its image.
    unsafe { (address as *mut u64).write_volatile(value) };
}

/// The benchmark's sample buffer: handed out once (`None` after).
pub fn samples() -> Option<&'static mut [u64; crate::BENCH_CPUID]> {
    use core::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    static mut SAMPLES: [u64; crate::BENCH_CPUID] = [0; crate::BENCH_CPUID];
    if TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: `TAKEN` lets this run once, so the reference is the only one ever made.
    unsafe { (&raw mut SAMPLES).as_mut() }
}
