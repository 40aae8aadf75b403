//! The only assembly in user land: the `SYSCALL` instruction, `RDTSC`, and the `_start` entry.
//!
//! Everything above this module calls [`syscall`] with a call number and six arguments and
//! gets back the status and six results, exactly as `docs/abi.md` lays them out in registers.

use core::arch::asm;

/// The registers a system call returns: RAX (status) and RDI, RSI, RDX, R10, R8, R9.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Returned {
    /// The raw status code (`abi::Status` numbering).
    pub status: u64,
    /// r0..r5.
    pub results: [u64; 6],
}

/// Issues system call `number` with arguments a0..a5 (RDI, RSI, RDX, R10, R8, R9).
#[inline(always)]
pub fn syscall(number: u64, args: [u64; 6]) -> Returned {
    let [mut r0, mut r1, mut r2, mut r3, mut r4, mut r5] = args;
    let status;
    // SAFETY: SYSCALL enters the kernel, which preserves every register except RCX and R11
    // (declared clobbered) and the result registers (declared as outputs), and does not touch
    // the user stack (`nostack`). The kernel may write memory the program can see (the UTCB,
    // mappings), so the block is not `nomem`/`readonly`: the compiler treats it as reading and
    // writing any memory. Arguments are plain integers; every one is validated by the kernel.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number => status,
            inlateout("rdi") r0,
            inlateout("rsi") r1,
            inlateout("rdx") r2,
            inlateout("r10") r3,
            inlateout("r8") r4,
            inlateout("r9") r5,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    Returned {
        status,
        results: [r0, r1, r2, r3, r4, r5],
    }
}

/// Reads the time-stamp counter after earlier instructions completed (`LFENCE; RDTSC`).
#[inline(always)]
/// IN from an I/O port (a byte). Faults with #GP unless the PD was granted the port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: IN only reads a device register; without a grant the CPU raises #GP, which the
    // kernel turns into a fault message to the thread's handler.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// OUT to an I/O port (a byte). Faults with #GP unless the PD was granted the port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: OUT only writes a device register; without a grant the CPU raises #GP, which the
    // kernel turns into a fault message to the thread's handler.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Loads `pattern ^ i` into the low quadword of XMMi (i = 0..16). The runtime is compiled
/// soft-float, so nothing else touches these registers: they keep their values unless the
/// kernel loses them across a thread switch.
pub fn set_sse_pattern(pattern: u64) {
    macro_rules! load {
        ($($n:literal),*) => {$(
            // SAFETY: writes one XMM register, which compiled code never uses (soft-float).
            unsafe { asm!(concat!("movq xmm", $n, ", {}"), in(reg) pattern ^ $n, options(nomem, nostack, preserves_flags)) };
        )*};
    }
    load!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

/// Whether XMM0..XMM15 still hold what `set_sse_pattern(pattern)` put there.
pub fn sse_pattern_holds(pattern: u64) -> bool {
    let mut ok = true;
    macro_rules! check {
        ($($n:literal),*) => {$(
            let v: u64;
            // SAFETY: reads one XMM register into a general register; no memory access.
            unsafe { asm!(concat!("movq {}, xmm", $n), out(reg) v, options(nomem, nostack, preserves_flags)) };
            ok &= v == pattern ^ $n;
        )*};
    }
    check!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    ok
}

pub fn rdtsc() -> u64 {
    let low: u32;
    let high: u32;
    // SAFETY: LFENCE and RDTSC only read the time-stamp counter into EDX:EAX (declared as
    // outputs); they touch no memory and no stack.
    unsafe {
        asm!(
            "lfence",
            "rdtsc",
            out("eax") low,
            out("edx") high,
            options(nomem, nostack, preserves_flags),
        );
    }
    (u64::from(high) << 32) | u64::from(low)
}

// The entry point of every program (and of the first thread of every protection domain):
// the creator sets RSP to the top of a stack; general registers are zero. Align the stack to
// 16 bytes as the System V ABI expects before a call, and enter the runtime, which never
// returns. `ud2` is unreachable; it only marks the end of the function.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text._start, \"ax\", @progbits",
    ".globl _start",
    ".type _start, @function",
    "_start:",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call {start}",
    "    ud2",
    ".size _start, . - _start",
    ".popsection",
    start = sym crate::runtime::start,
);

#[cfg(not(test))]
unsafe extern "Rust" {
    /// The program's entry, defined by [`crate::entry!`] in the binary.
    safe fn __rt_main() -> !;
}

/// Enters the program's `main` (through the symbol [`crate::entry!`] defines).
#[cfg(not(test))]
pub(crate) fn program_main() -> ! {
    __rt_main()
}
