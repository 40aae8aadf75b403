//! The SYSCALL entry (SDM Vol. 2B, SYSCALL) and the way into user mode.
//!
//! The entry builds the same frame as a trap from user mode (`cpu::TrapFrame`, vector 0x100)
//! directly in the current thread's context, switches to the CPU's kernel stack and calls
//! `syscall::dispatch`; the kernel then resumes whatever thread is current through
//! `return_to_user`. The kernel never blocks on a kernel stack: a thread that waits is just
//! not current, so one kernel stack per CPU suffices.

use crate::cpu::{KERNEL_CS, TrapFrame, USER_CS};
use crate::hw::{self, msr};
use core::arch::global_asm;

/// The frame's `vector` for a system call.
pub const VECTOR_SYSCALL: u64 = 0x100;

global_asm!(
    r#"
    .section .text.entry, "ax"
    .global syscall_entry
syscall_entry:
    swapgs
    movq %rsp, %gs:8
    movq %gs:16, %rsp
    pushq ${user_ds}
    pushq %gs:8
    pushq %r11
    pushq ${user_cs}
    pushq %rcx
    pushq $0
    pushq ${vector}
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    movq %gs:0, %rsp
    cld
    call syscall_dispatch
    jmp return_to_user
"#,
    user_ds = const crate::cpu::USER_DS as u64,
    user_cs = const USER_CS as u64,
    vector = const VECTOR_SYSCALL,
    options(att_syntax)
);

unsafe extern "C" {
    fn syscall_entry();
    fn return_to_user() -> !;
}

/// Programs SYSCALL on this CPU: EFER.SCE, STAR (kernel CS 0x08; SYSRET base 0x18 | 3),
/// LSTAR = the entry, FMASK clears IF, DF, TF and AC on entry.
pub fn init_this_cpu() {
    let star = (u64::from(KERNEL_CS) << 32) | ((0x18u64 | 3) << 48);
    // SAFETY: STAR/LSTAR/FMASK only take effect on SYSCALL, whose entry is `syscall_entry`;
    // EFER.SCE enables the instruction. None of this changes the running kernel's state.
    unsafe {
        hw::wrmsr(msr::IA32_STAR, star);
        hw::wrmsr(msr::IA32_LSTAR, syscall_entry as *const () as u64);
        hw::wrmsr(msr::IA32_FMASK, (1 << 9) | (1 << 10) | (1 << 8) | (1 << 18));
        hw::wrmsr(msr::IA32_EFER, hw::rdmsr(msr::IA32_EFER) | 1);
    }
}

/// Resumes the current thread (whose frame `percpu` and TSS.RSP0 point at) in user mode.
pub fn enter_user() -> ! {
    // SAFETY: the scheduler made a thread current: GS's context_base points at its complete
    // frame with user CS/SS, a canonical RIP and IF set in RFLAGS, and its address space is
    // loaded. `return_to_user` pops that frame and IRETQs, swapping GS back to the user's.
    unsafe { return_to_user() }
}

/// Builds the frame a new thread starts from.
pub fn initial_frame(rip: u64, rsp: u64) -> TrapFrame {
    TrapFrame {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        error_code: 0,
        rip,
        cs: u64::from(USER_CS),
        rflags: 0x202,
        rsp,
        ss: u64::from(crate::cpu::USER_DS),
    }
}
