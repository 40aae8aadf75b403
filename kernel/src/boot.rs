//! Boot code: the multiboot2 header, the 32-bit entry that switches to long mode, and the
//! real-mode trampoline that brings application processors to the same long-mode state.
//!
//! GRUB enters `_start` in 32-bit protected mode with paging off, EAX = the multiboot2 magic
//! and EBX = the physical address of the boot information (multiboot2 spec, "I386 machine
//! state"). The kernel runs at its link address, identity mapped: the boot page tables map the
//! first 4 GiB with 2 MiB pages, supervisor only; `paging::init` extends the map to all RAM.

use core::arch::global_asm;

/// Physical page the AP trampoline is copied to; the SIPI vector is its page number.
pub const TRAMPOLINE_BASE: u64 = 0x8000;

global_asm!(
    r#"
    .section .multiboot2, "a"
    .balign 8
mb2_header_start:
    .long 0xe85250d6
    .long 0
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header_start))
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
    .global boot_pdpt
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
boot_stack_bottom:
    .skip 65536
    .global boot_stack_top
boot_stack_top:

    .section .data.boot, "aw"
    .balign 8
    .global boot_magic
boot_magic:
    .quad 0
    .global boot_info_addr
boot_info_addr:
    .quad 0

    .section .rodata.boot, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00209a0000000000
    .quad 0x0000920000000000
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl %eax, boot_magic
    movl %ebx, boot_info_addr
    movl $boot_stack_top, %esp

    /* PML4[0] -> PDPT; PDPT[0..4] -> PD tables; PD entries: 2 MiB identity pages. */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jne 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 2b

    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax              /* CR4.PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx       /* IA32_EFER */
    rdmsr
    orl $0x100, %eax             /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80010021, %eax        /* CR0.PG | CR0.WP | CR0.NE | CR0.PE */
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    pushl $0x08
    pushl $long_mode_entry
    lret

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    movl boot_magic(%rip), %edi
    movl boot_info_addr(%rip), %esi
    xorl %ebp, %ebp
    call kernel_main
3:  cli
    hlt
    jmp 3b

    /* ---- Application-processor trampoline: copied to TRAMPOLINE_BASE and started by SIPI. */
    .balign 4096
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - ap_trampoline_start + 0x8000)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    .byte 0x66, 0xea
    .long ap_pm32 - ap_trampoline_start + 0x8000
    .short 0x18

    .code32
ap_pm32:
    movw $0x20, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl (ap_cr3 - ap_trampoline_start + 0x8000), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    movl (ap_efer - ap_trampoline_start + 0x8000), %eax
    xorl %edx, %edx
    wrmsr
    movl %cr0, %eax
    orl $0x80010021, %eax
    movl %eax, %cr0
    .byte 0xea
    .long ap_lm64 - ap_trampoline_start + 0x8000
    .short 0x08

    .code64
ap_lm64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl $(ap_stack - ap_trampoline_start + 0x8000), %eax
    movq (%rax), %rsp
    movl $(ap_cpu - ap_trampoline_start + 0x8000), %eax
    movq (%rax), %rdi
    movl $(ap_entry - ap_trampoline_start + 0x8000), %eax
    movq (%rax), %rax
    xorl %ebp, %ebp
    pushq $0
    jmpq *%rax

    .balign 16
ap_gdt:
    .quad 0
    .quad 0x00209a0000000000     /* 0x08: 64-bit code */
    .quad 0x0000920000000000     /* 0x10: data */
    .quad 0x00cf9a000000ffff     /* 0x18: 32-bit flat code */
    .quad 0x00cf92000000ffff     /* 0x20: 32-bit flat data */
ap_gdt_end:
ap_gdt_ptr:
    .short ap_gdt_end - ap_gdt - 1
    .long ap_gdt - ap_trampoline_start + 0x8000
    .balign 8
    .global ap_cr3
ap_cr3:
    .quad 0
    .global ap_efer
ap_efer:
    .quad 0
    .global ap_stack
ap_stack:
    .quad 0
    .global ap_cpu
ap_cpu:
    .quad 0
    .global ap_entry
ap_entry:
    .quad 0
    .global ap_trampoline_end
ap_trampoline_end:
    .code64
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_cr3: u8;
    static ap_efer: u8;
    static ap_stack: u8;
    static ap_cpu: u8;
    static ap_entry: u8;
    static __kernel_start: u8;
    static __kernel_end: u8;
    static boot_pml4: u8;
    static boot_stack_top: u8;
}

/// Top of the BSP's boot stack (its kernel stack for good).
pub fn kernel_stack_top() -> u64 {
    core::ptr::addr_of!(boot_stack_top) as u64
}

/// Physical address of the boot PML4, whose entry 0 (the kernel's identity map) every address
/// space shares.
pub fn kernel_pml4() -> u64 {
    core::ptr::addr_of!(boot_pml4) as u64
}

/// The physical range `[start, end)` the kernel image occupies (all sections, with BSS).
pub fn kernel_range() -> (u64, u64) {
    (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    )
}

/// The trampoline's bytes and the offsets of its parameter slots within it.
pub struct Trampoline {
    /// Start of the code in the kernel image.
    pub image: *const u8,
    /// Length in bytes.
    pub len: usize,
    /// Offsets of CR3, EFER, stack, CPU index and entry point.
    pub cr3: usize,
    pub efer: usize,
    pub stack: usize,
    pub cpu: usize,
    pub entry: usize,
}

/// Describes the AP trampoline so that `smp` can copy and parameterise it.
pub fn trampoline() -> Trampoline {
    let start = core::ptr::addr_of!(ap_trampoline_start) as usize;
    let off = |p: *const u8| p as usize - start;
    Trampoline {
        image: core::ptr::addr_of!(ap_trampoline_start),
        len: core::ptr::addr_of!(ap_trampoline_end) as usize - start,
        cr3: off(core::ptr::addr_of!(ap_cr3)),
        efer: off(core::ptr::addr_of!(ap_efer)),
        stack: off(core::ptr::addr_of!(ap_stack)),
        cpu: off(core::ptr::addr_of!(ap_cpu)),
        entry: off(core::ptr::addr_of!(ap_entry)),
    }
}
