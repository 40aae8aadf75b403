//! The hypervisor's instructions and fixed-address tables; the only module of l1hv with `unsafe`.
//!
//! Everything here runs in ring 0 of a virtual machine: L1 (this hypervisor, on the identity page
//! tables its VMM built for the first 4 GiB) or L2 (the payload, on [`L2_TABLES`], through the
//! EPT L1 builds). Nothing here can reach outside that virtual machine: port I/O, MSRs, CPUID and
//! the VMX instructions exit to the VMM below, which emulates them.
//!
//! - the entry point (switches to this image's own per-vCPU stack);
//! - L1's GDT (with one TSS descriptor per vCPU), TSS and IDT, and L2's GDT, TSS, IDT, stacks,
//!   per-vCPU blocks and identity page tables, built in place;
//! - port I/O, CPUID, MSRs, control registers, RDTSC, HLT, PAUSE;
//! - VMXON, VMXOFF, VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE, INVEPT, INVVPID, and the
//!   VM-entry trampoline (`l1hv_vm_run`) with its VM-exit half (`l1hv_vm_exit`, HOST_RIP);
//! - L1 memory by physical address (identity-mapped), L2 memory by guest-physical address.
//!
//! SDM references are to the Intel SDM, 2023+ numbering (Vol. 3C chapter 31 is the VMX
//! instruction reference).

use core::arch::{asm, global_asm};
use core::mem::size_of;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::layout::{self, MAX_VCPUS, PAGE};

/// Each vCPU's L1 stack (this image's, not the boot stack).
pub const L1_STACK_SIZE: usize = 32 * 1024;
/// Each vCPU's L2 stack.
pub const L2_STACK_SIZE: usize = 16 * 1024;
/// log2 of [`L1_STACK_SIZE`], for the entry code.
const L1_STACK_SHIFT: u32 = 15;
const _: () = assert!(1 << L1_STACK_SHIFT == L1_STACK_SIZE);

/// Code, data and the first TSS selector, the same in L1's and L2's GDT.
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR_BASE: u16 = 0x18;
/// A 64-bit TSS is 104 bytes (SDM Vol. 3A §8.7); its limit is 103.
pub const TSS_LIMIT: u32 = 103;
/// Entries of L2's IDT: the 32 exceptions and [`layout::L2_INTERRUPT_VECTOR`].
const L2_IDT_ENTRIES: usize = layout::L2_INTERRUPT_VECTOR as usize + 1;

#[repr(C, align(4096))]
struct Stacks<const N: usize>([[u8; N]; MAX_VCPUS]);

#[repr(C, align(16))]
struct Gdt([u64; 3 + 2 * MAX_VCPUS]);

#[repr(C, align(16))]
struct Tss([u8; 104]);

#[repr(C, align(16))]
struct Tsses([Tss; MAX_VCPUS]);

#[repr(C, align(4096))]
struct Idt<const N: usize>([u64; N]);

#[repr(C, align(4096))]
struct Tables([[u64; 512]; 6]);

#[repr(C, align(64))]
struct Blocks([[u64; 8]; MAX_VCPUS]);

static mut L1_STACKS: Stacks<L1_STACK_SIZE> = Stacks([[0; L1_STACK_SIZE]; MAX_VCPUS]);
static mut L1_GDT: Gdt = Gdt([0; 3 + 2 * MAX_VCPUS]);
static mut L1_TSS: Tsses = Tsses([const { Tss([0; 104]) }; MAX_VCPUS]);
static mut L1_IDT: Idt<512> = Idt([0; 512]);

static mut L2_STACKS: Stacks<L2_STACK_SIZE> = Stacks([[0; L2_STACK_SIZE]; MAX_VCPUS]);
static mut L2_GDT: Gdt = Gdt([0; 3 + 2 * MAX_VCPUS]);
static mut L2_TSS: Tsses = Tsses([const { Tss([0; 104]) }; MAX_VCPUS]);
static mut L2_IDT: Idt<{ 2 * L2_IDT_ENTRIES }> = Idt([0; 2 * L2_IDT_ENTRIES]);
/// L2's identity page tables: PML4, PDPT, four page directories of 2 MiB pages (0 to 4 GiB).
static mut L2_TABLES: Tables = Tables([[0; 512]; 6]);
/// L2's per-vCPU blocks (L2's GS base): word 0 counts [`layout::L2_INTERRUPT_VECTOR`]
/// interrupts, word 1 the #UDs L2's handler skipped.
static mut L2_BLOCKS: Blocks = Blocks([[0; 8]; MAX_VCPUS]);

/// 0: L2's tables not built; 1: being built; 2: built.
static L2_TABLES_STATE: AtomicU32 = AtomicU32::new(0);

// The entry: RDI = vCPU index, RSI = vCPU count | mode << 8 (docs/nested.md). Moves to this
// vCPU's stack in the image (so that nothing L1 uses lies outside its image and page arena) and
// passes the boot RSP as the third argument. An index beyond the stacks ends the vCPU with
// failure 2 (layout) before touching memory.
global_asm!(
    ".pushsection .text._start, \"ax\", @progbits",
    ".globl _start",
    "_start:",
    "    cli",
    "    cld",
    "    cmp rdi, {max}",
    "    jae 2f",
    "    mov rdx, rsp",
    "    lea rsp, [rip + {stacks}]",
    "    mov rax, rdi",
    "    inc rax",
    "    shl rax, {shift}",
    "    add rsp, rax",
    "    call {main}",
    "2:",
    "    mov eax, 2",
    "    mov dx, 0xf4",
    "    out dx, eax",
    "3:",
    "    hlt",
    "    jmp 3b",
    ".popsection",
    max = const MAX_VCPUS,
    stacks = sym L1_STACKS,
    shift = const L1_STACK_SHIFT,
    main = sym crate::l1_main,
);

// L1's exception stubs: an exception in L1 is a bug; it ends the vCPU with 0x100 + vector.
// Vectors 32 to 255 never reach L1 (it runs with interrupts disabled) and report 0x1ff.
global_asm!(
    ".pushsection .text.l1hv_handlers, \"ax\", @progbits",
    ".balign 16",
    ".globl l1hv_l1_exceptions",
    "l1hv_l1_exceptions:",
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .balign 16",
    "    push \\vector",
    "    jmp l1hv_l1_fatal",
    ".endr",
    ".balign 16",
    ".globl l1hv_l1_other",
    "l1hv_l1_other:",
    "    push 0xff",
    "l1hv_l1_fatal:",
    "    pop rax",
    "    add eax, 0x100",
    "    mov dx, 0xf4",
    "    out dx, eax",
    "2:",
    "    cli",
    "    hlt",
    "    jmp 2b",
    ".popsection",
);

// L2's handlers. GS base is L2's per-vCPU block. The interrupt L1 injects counts in word 0;
// #UD (which L1 intercepts through its exception bitmap and reflects) counts in word 1 and
// skips the 2-byte UD2; any other exception ends L2 with 0x80 + vector (port 0xf4, which L1
// intercepts).
global_asm!(
    ".pushsection .text.l1hv_l2_handlers, \"ax\", @progbits",
    ".balign 16",
    ".globl l1hv_l2_interrupt",
    "l1hv_l2_interrupt:",
    "    lock inc qword ptr gs:[0]",
    "    iretq",
    ".balign 16",
    ".globl l1hv_l2_invalid_opcode",
    "l1hv_l2_invalid_opcode:",
    "    lock inc qword ptr gs:[8]",
    "    add qword ptr [rsp], 2",
    "    iretq",
    ".balign 16",
    ".globl l1hv_l2_exceptions",
    "l1hv_l2_exceptions:",
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .balign 16",
    "    push \\vector",
    "    jmp l1hv_l2_fatal",
    ".endr",
    "l1hv_l2_fatal:",
    "    pop rax",
    "    add eax, 0x80",
    "    mov dx, 0xf4",
    "    out dx, eax",
    "2:",
    "    hlt",
    "    jmp 2b",
    ".balign 16",
    // L2's first instruction: RSP is the top of its stack, RDI/RSI/RDX its arguments.
    ".globl l1hv_l2_entry",
    "l1hv_l2_entry:",
    "    call {l2_main}",
    "    ud2",
    ".popsection",
    l2_main = sym crate::l2::l2_main,
);

// The VM-entry trampoline, `l1hv_vm_run(regs, launched) -> status`, and its VM-exit half.
//
// `regs` points at a `GuestRegs`: L2's 16 GPRs by their SDM number (RSP's slot unused: RSP is
// in the VMCS) and, at +128, the HOST_RSP last written to the current VMCS. The trampoline
// saves L1's callee-saved registers and `regs` on L1's stack, writes HOST_RSP if it changed,
// loads L2's GPRs and executes VMLAUNCH (launched = 0) or VMRESUME. If the instruction fails
// (VMfailInvalid: CF, VMfailValid: ZF; SDM Vol. 3C §31.2) it falls through and returns
// 0x100 | (RFLAGS & (CF | ZF)); 0x200 | ... if the VMWRITE of HOST_RSP failed.
//
// A VM exit loads HOST_RSP (pointing at the saved `regs`) and jumps to `l1hv_vm_exit`
// (HOST_RIP), which stores L2's GPRs, restores L1's registers and returns 0 from
// `l1hv_vm_run`. The exit loaded RFLAGS = 2 (SDM §28.5): interrupts stay disabled in L1.
global_asm!(
    ".pushsection .text.l1hv_vm, \"ax\", @progbits",
    ".balign 16",
    ".globl l1hv_vm_run",
    "l1hv_vm_run:",
    "    push rbp",
    "    push rbx",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    push rdi",
    "    cmp rsp, [rdi + 128]",
    "    je 2f",
    "    mov rax, 0x6c14", // HOST_RSP
    "    vmwrite rax, rsp",
    "    jbe 6f", // CF or ZF: VMWRITE failed
    "    mov [rdi + 128], rsp",
    "2:",
    "    test rsi, rsi", // ZF = not launched; MOVs keep the flags
    "    mov rax, [rdi + 0]",
    "    mov rcx, [rdi + 8]",
    "    mov rdx, [rdi + 16]",
    "    mov rbx, [rdi + 24]",
    "    mov rbp, [rdi + 40]",
    "    mov rsi, [rdi + 48]",
    "    mov r8, [rdi + 64]",
    "    mov r9, [rdi + 72]",
    "    mov r10, [rdi + 80]",
    "    mov r11, [rdi + 88]",
    "    mov r12, [rdi + 96]",
    "    mov r13, [rdi + 104]",
    "    mov r14, [rdi + 112]",
    "    mov r15, [rdi + 120]",
    "    mov rdi, [rdi + 56]",
    "    jz 3f",
    "    vmresume",
    "    jmp 4f",
    "3:",
    "    vmlaunch",
    "4:",
    "    pushfq",
    "    pop rax",
    "    and eax, 0x41",
    "    or eax, 0x100",
    "    jmp 7f",
    "6:",
    "    pushfq",
    "    pop rax",
    "    and eax, 0x41",
    "    or eax, 0x200",
    "7:",
    "    add rsp, 8",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbx",
    "    pop rbp",
    "    ret",
    ".balign 16",
    ".globl l1hv_vm_exit",
    "l1hv_vm_exit:",
    "    push rdi",
    "    mov rdi, [rsp + 8]",
    "    mov [rdi + 0], rax",
    "    mov [rdi + 8], rcx",
    "    mov [rdi + 16], rdx",
    "    mov [rdi + 24], rbx",
    "    mov [rdi + 40], rbp",
    "    mov [rdi + 48], rsi",
    "    mov [rdi + 64], r8",
    "    mov [rdi + 72], r9",
    "    mov [rdi + 80], r10",
    "    mov [rdi + 88], r11",
    "    mov [rdi + 96], r12",
    "    mov [rdi + 104], r13",
    "    mov [rdi + 112], r14",
    "    mov [rdi + 120], r15",
    "    pop rax",
    "    mov [rdi + 56], rax",
    "    add rsp, 8",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbx",
    "    pop rbp",
    "    xor eax, eax",
    "    ret",
    ".popsection",
);

unsafe extern "C" {
    /// 32 stubs of 16 bytes, one per exception vector (L1).
    fn l1hv_l1_exceptions();
    /// Any other vector (L1).
    fn l1hv_l1_other();
    /// L2's handler of the injected interrupt.
    fn l1hv_l2_interrupt();
    /// L2's #UD handler.
    fn l1hv_l2_invalid_opcode();
    /// 32 stubs of 16 bytes, one per exception vector (L2).
    fn l1hv_l2_exceptions();
    /// L2's first instruction.
    fn l1hv_l2_entry();
    /// HOST_RIP: the VM-exit half of the trampoline (never called).
    fn l1hv_vm_exit();
    /// The image's first and last-plus-one byte (guest.ld).
    static __l1hv_image_start: u8;
    static __l1hv_image_end: u8;
}

unsafe extern "sysv64" {
    /// See the trampoline's comment above.
    fn l1hv_vm_run(regs: *mut GuestRegs, launched: u64) -> u64;
}

/// L2's general-purpose registers, indexed by their SDM number (`vcpu::exit::Gpr`), and the
/// HOST_RSP last written to the current VMCS (0: write it on the next entry).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestRegs {
    pub gpr: [u64; 16],
    pub host_rsp: u64,
}

/// The image's range `[start, end)`, page-aligned (guest.ld).
pub fn image_range() -> (u64, u64) {
    let start = &raw const __l1hv_image_start as u64;
    let end = &raw const __l1hv_image_end as u64;
    (start, end)
}

/// A 64-bit code segment descriptor (SDM Vol. 3A §3.4.5): present, DPL 0, L = 1.
const CODE_DESCRIPTOR: u64 = 0x00af_9b00_0000_ffff;
/// A flat writable data segment descriptor.
const DATA_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;

/// The two words of an available 64-bit TSS descriptor (type 9; SDM Vol. 3A §8.2.3).
const fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = TSS_LIMIT as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// A 64-bit interrupt gate to `handler` in the code segment (SDM Vol. 3A §6.14.1).
const fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | ((CODE_SELECTOR as u64) << 16)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// The address of element `index` of an array of `size`-byte elements at `base`.
const fn element(base: u64, size: usize, index: usize) -> u64 {
    base + (size * index) as u64
}

/// The TSS selector of vCPU `index` (in L1's and in L2's GDT).
pub const fn tss_selector(index: usize) -> u16 {
    TSS_SELECTOR_BASE + 16 * index as u16
}

/// Writes a GDT (null, code, data, one TSS descriptor per vCPU at `tss`) at `gdt`.
///
/// # Safety
/// `gdt` and `tss` point at this module's statics; concurrent callers write the same values
/// (except each vCPU's own TSS, which only that vCPU writes).
unsafe fn write_gdt(gdt: *mut Gdt, tss: *mut Tsses, index: usize) {
    // SAFETY: per the caller; the GDT and TSS are statics outliving every use, and the CPU only
    // reads them through GDTR/TR (no Rust reference to them exists).
    unsafe {
        let tss_base = (&raw mut (*tss).0[index]) as u64;
        (&raw mut (*gdt).0[1]).write_volatile(CODE_DESCRIPTOR);
        (&raw mut (*gdt).0[2]).write_volatile(DATA_DESCRIPTOR);
        // I/O map base beyond the limit: no I/O permission bitmap.
        let iomap = (&raw mut (*tss).0[index].0[102]).cast::<[u8; 2]>();
        iomap.write_volatile((TSS_LIMIT as u16 + 1).to_le_bytes());
        let [low, high] = tss_descriptor(tss_base);
        let slot = 3 + 2 * index;
        (&raw mut (*gdt).0[slot]).write_volatile(low);
        (&raw mut (*gdt).0[slot + 1]).write_volatile(high);
    }
}

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

/// L1's descriptor tables, as the host-state area needs them (SDM Vol. 3C §25.5).
#[derive(Debug, Clone, Copy)]
pub struct HostTables {
    pub gdt_base: u64,
    pub idt_base: u64,
    pub tr_base: u64,
    pub tr_selector: u16,
}

/// Gives this vCPU L1's own GDT (with its TSS), TSS and IDT: loads GDTR, reloads CS, SS, DS and
/// ES (FS and GS null), loads TR (LTR marks this vCPU's descriptor busy) and IDTR.
pub fn init_l1_cpu(index: usize) -> HostTables {
    let gdt = &raw mut L1_GDT;
    let tss = &raw mut L1_TSS;
    let idt = &raw mut L1_IDT;
    // SAFETY: L1's own statics; other vCPUs write the same shared values and their own TSS.
    unsafe { write_gdt(gdt, tss, index) };
    let stubs = l1hv_l1_exceptions as *const () as u64;
    let other = l1hv_l1_other as *const () as u64;
    for vector in 0..256 {
        let handler = if vector < 32 {
            stubs + 16 * vector as u64
        } else {
            other
        };
        let [low, high] = gate(handler);
        // SAFETY: as above (the same values from every vCPU); the CPU reads the IDT only
        // through IDTR.
        unsafe {
            (&raw mut (*idt).0[2 * vector]).write_volatile(low);
            (&raw mut (*idt).0[2 * vector + 1]).write_volatile(high);
        }
    }
    let gdtr = TablePointer {
        limit: (size_of::<Gdt>() - 1) as u16,
        base: gdt as u64,
    };
    let idtr = TablePointer {
        limit: (256 * 16 - 1) as u16,
        base: idt as u64,
    };
    let selector = tss_selector(index);
    // SAFETY: the GDT holds a 64-bit code segment at CODE_SELECTOR and a data segment at
    // DATA_SELECTOR, so the far return and the segment loads keep the flat 64-bit environment;
    // the TSS descriptor at `selector` is this vCPU's alone and available (type 9) until this
    // LTR; the IDT's gates lead to handlers that report and halt. The tables are statics.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {data}",
            "mov ss, {tmp:x}",
            "mov ds, {tmp:x}",
            "mov es, {tmp:x}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            "ltr {sel:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            code = const CODE_SELECTOR as u64,
            data = const DATA_SELECTOR as u32,
            sel = in(reg) u64::from(selector),
            tmp = out(reg) _,
        )
    };
    HostTables {
        gdt_base: gdt as u64,
        idt_base: idt as u64,
        tr_base: element(tss as u64, size_of::<Tss>(), index),
        tr_selector: selector,
    }
}

/// What L2's guest-state area needs: its tables, built once for every vCPU.
#[derive(Debug, Clone, Copy)]
pub struct L2Tables {
    pub cr3: u64,
    pub gdt_base: u64,
    pub gdt_limit: u32,
    pub idt_base: u64,
    pub idt_limit: u32,
    pub tr_base: u64,
    pub tr_selector: u16,
    pub rsp: u64,
    pub rip: u64,
    pub gs_base: u64,
}

/// Builds L2's page tables, GDT and IDT (once; later callers wait for the first) and this
/// vCPU's L2 TSS and block, and returns their addresses: L1 guest-physical = L2 guest-physical
/// (L1 maps its image into L2's EPT one to one) = L2 virtual (L2's tables are an identity map).
pub fn l2_tables(index: usize) -> L2Tables {
    let tables = &raw mut L2_TABLES;
    let gdt = &raw mut L2_GDT;
    let tss = &raw mut L2_TSS;
    let idt = &raw mut L2_IDT;
    let pml4 = tables as u64;
    if L2_TABLES_STATE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        // PML4[0] -> PDPT; PDPT[0..4] -> 4 page directories of 2 MiB pages (present, writable,
        // page size; SDM Vol. 3A §4.5), an identity map of 0 to 4 GiB.
        let entries: [(usize, usize, u64); 5] = [
            (0, 0, (pml4 + PAGE) | 0x3),
            (1, 0, (pml4 + 2 * PAGE) | 0x3),
            (1, 1, (pml4 + 3 * PAGE) | 0x3),
            (1, 2, (pml4 + 4 * PAGE) | 0x3),
            (1, 3, (pml4 + 5 * PAGE) | 0x3),
        ];
        for (table, slot, value) in entries {
            // SAFETY: L2's tables are statics in this image that only this code (now, once)
            // writes; L2 reads them through its CR3 only after this vCPU's first VM entry.
            unsafe { (&raw mut (*tables).0[table][slot]).write_volatile(value) };
        }
        for directory in 0..4u64 {
            for slot in 0..512u64 {
                let address = (directory << 30) | (slot << 21);
                // SAFETY: as above.
                unsafe {
                    (&raw mut (*tables).0[2 + directory as usize][slot as usize])
                        .write_volatile(address | 0x83)
                };
            }
        }
        let stubs = l1hv_l2_exceptions as *const () as u64;
        for vector in 0..L2_IDT_ENTRIES {
            let handler = match vector {
                6 => l1hv_l2_invalid_opcode as *const () as u64,
                v if v == layout::L2_INTERRUPT_VECTOR as usize => {
                    l1hv_l2_interrupt as *const () as u64
                }
                v if v < 32 => stubs + 16 * v as u64,
                _ => continue,
            };
            let [low, high] = gate(handler);
            // SAFETY: as above.
            unsafe {
                (&raw mut (*idt).0[2 * vector]).write_volatile(low);
                (&raw mut (*idt).0[2 * vector + 1]).write_volatile(high);
            }
        }
        L2_TABLES_STATE.store(2, Ordering::Release);
    }
    while L2_TABLES_STATE.load(Ordering::Acquire) != 2 {
        core::hint::spin_loop();
    }
    // SAFETY: L2's GDT and TSS statics; each vCPU writes its own TSS and descriptor, and the
    // shared descriptors with the same values as every other vCPU.
    unsafe { write_gdt(gdt, tss, index) };
    let stacks = &raw mut L2_STACKS;
    let blocks = &raw mut L2_BLOCKS;
    L2Tables {
        cr3: pml4,
        gdt_base: gdt as u64,
        gdt_limit: (size_of::<Gdt>() - 1) as u32,
        idt_base: idt as u64,
        idt_limit: (L2_IDT_ENTRIES * 16 - 1) as u32,
        tr_base: element(tss as u64, size_of::<Tss>(), index),
        tr_selector: tss_selector(index),
        rsp: element(stacks as u64, L2_STACK_SIZE, index) + L2_STACK_SIZE as u64,
        rip: l1hv_l2_entry as *const () as u64,
        gs_base: element(blocks as u64, size_of::<[u64; 8]>(), index),
    }
}

/// The address of the VM-exit half of the trampoline (HOST_RIP).
pub fn vm_exit_entry() -> u64 {
    l1hv_vm_exit as *const () as u64
}

// --- Port I/O, CPUID, MSRs, control registers, time ---

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O exits to the VMM below (or, from L2, to L1), which emulates the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
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

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// L2's request to L1: a 32-bit OUT of `command` to the test port with `argument` in RSI; L1
/// answers in RAX.
pub fn l2_request(command: u32, argument: u64) -> u64 {
    let answer: u64;
    // SAFETY: the OUT exits to L1, which may change RAX (the answer) and what L2's memory maps
    // to (so no `nomem`), nothing else of L2.
    unsafe {
        asm!(
            "out dx, eax",
            in("dx") layout::port::TEST,
            inout("rax") u64::from(command) => answer,
            in("rsi") argument,
            options(nostack, preserves_flags)
        )
    };
    answer
}

/// CPUID: [EAX, EBX, ECX, EDX].
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// RDMSR of an MSR that exists: in L1 the VMX capability MSRs (read only as far as they exist,
/// `VmxCapabilities::from_msrs`), IA32_FEATURE_CONTROL, EFER and PAT; in L2 the hypervisor's own
/// MSR (L1 emulates it) and IA32_FS_BASE. A #GP would be fatal (reported), never unsound.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reads EDX:EAX only.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// WRMSR. The MSRs written: IA32_FEATURE_CONTROL (lock, VMX outside SMX), and from L2 the
/// hypervisor's own MSR and IA32_FS_BASE, which change nothing L1 or L2 relies on.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: per the list above: none of these writes changes memory, paging or the mode.
    unsafe {
        asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags)
        )
    };
}

pub fn read_cr0() -> u64 {
    let value: u64;
    // SAFETY: reads CR0.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reads CR3.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reads CR4.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes CR0 with the VMX fixed bits applied by the caller (SDM Vol. 3D §A.7): in practice NE,
/// which changes only how x87 errors are reported (this image uses no x87).
pub fn write_cr0(value: u64) {
    // SAFETY: the caller only forces bits that IA32_VMX_CR0_FIXED0 requires while already in
    // protected mode with paging (PE, PG are set already, NE is harmless).
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

/// Writes CR4 with VMXE and the fixed bits (SDM Vol. 3D §A.8) applied by the caller.
pub fn write_cr4(value: u64) {
    // SAFETY: the caller sets VMXE and bits IA32_VMX_CR4_FIXED0 requires on top of the current
    // value; PAE and the rest of the paging mode stay as they are.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

/// The time-stamp counter after earlier instructions completed (`LFENCE; RDTSC`).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reads the TSC into EDX:EAX only.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// Halts this vCPU for good (L1, interrupts disabled).
pub fn halt() -> ! {
    loop {
        // SAFETY: with interrupts off, HLT stops this vCPU (the VMM ends it).
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// L2: HLT with interrupts enabled (L2 always runs with IF = 1): L1 intercepts it and injects
/// an interrupt, whose handler counts in L2's block.
pub fn l2_hlt() {
    // SAFETY: the handler of the interrupt L1 injects only counts in L2's block (memory
    // changes: no `nomem`).
    unsafe { asm!("hlt", options(nostack)) };
}

/// L2: executes UD2; L2's #UD handler counts it and skips it.
pub fn l2_ud2() {
    // SAFETY: L1 intercepts #UD (exception bitmap) and reflects it into L2, whose handler
    // counts in L2's block and returns past the 2-byte UD2.
    unsafe { asm!("ud2", options(nostack)) };
}

/// L2: word `word` of L2's per-vCPU block (through GS).
pub fn l2_block(word: usize) -> u64 {
    let value: u64;
    // SAFETY: GS's base is this vCPU's L2 block (VMCS guest state), mapped through L2's tables
    // and L1's EPT (it is in the image).
    unsafe {
        asm!("mov {}, gs:[{}]", out(reg) value, in(reg) word * 8, options(nostack, readonly, preserves_flags))
    };
    value
}

// --- Memory by address ---

/// L1: the u64 at L1 guest-physical `address` (identity-mapped), in L1's image, page arena or
/// 2 MiB frames (`layout::l1`), never in the on-demand region unless the caller means to touch
/// it.
#[inline(always)]
pub fn phys_read(address: u64) -> u64 {
    // SAFETY: every address below 4 GiB is mapped by L1's boot identity tables and backed (or
    // provided on demand) by the VMM; the regions L1 reads hold EPT tables, VMX regions or
    // patterns, never Rust objects.
    unsafe { (address as *const u64).read_volatile() }
}

/// L1: writes the u64 at L1 guest-physical `address` (the page arena or the 2 MiB frames,
/// outside the image: see [`phys_read`]).
#[inline(always)]
pub fn phys_write(address: u64, value: u64) {
    // SAFETY: as in `phys_read`: the page arena and the frames are L1's own memory, outside its
    // image, page tables and stacks (checked at start-up), holding no Rust objects.
    unsafe { (address as *mut u64).write_volatile(value) };
}

/// L2: the u64 at L2 guest-physical (= virtual) `address`.
#[inline(always)]
pub fn l2_read(address: u64) -> u64 {
    // SAFETY: L2's identity tables map 0 to 4 GiB; L1's EPT maps the address, maps it on its
    // EPT-violation exit, or the access ends L2. The addresses L2 reads hold patterns only.
    unsafe { (address as *const u64).read_volatile() }
}

// --- VMX instructions (SDM Vol. 3C chapter 31) ---

/// How a VMX instruction ended (SDM Vol. 3C §31.2): RFLAGS.CF = VMfailInvalid, ZF =
/// VMfailValid (the error number is in the VMCS), neither = VMsucceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxStatus {
    Succeed,
    FailInvalid,
    FailValid,
}

impl VmxStatus {
    fn from_flags(cf: u8, zf: u8) -> VmxStatus {
        if cf != 0 {
            VmxStatus::FailInvalid
        } else if zf != 0 {
            VmxStatus::FailValid
        } else {
            VmxStatus::Succeed
        }
    }
}

/// An instruction with a 64-bit memory operand holding a physical address (VMXON, VMCLEAR,
/// VMPTRLD).
macro_rules! vmx_pointer_instruction {
    ($name:ident, $mnemonic:literal, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(address: u64) -> VmxStatus {
            let (cf, zf): (u8, u8);
            // SAFETY: the VMM emulates the instruction; the region at `address` is L1 memory
            // set aside for it (or, for the malformed cases, an address the instruction must
            // refuse); the operand is a local.
            unsafe {
                asm!(
                    concat!($mnemonic, " qword ptr [{ptr}]"),
                    "setc {cf}",
                    "setz {zf}",
                    ptr = in(reg) &address,
                    cf = out(reg_byte) cf,
                    zf = out(reg_byte) zf,
                    options(nostack)
                )
            };
            VmxStatus::from_flags(cf, zf)
        }
    };
}

vmx_pointer_instruction!(vmxon, "vmxon", "VMXON with the VMXON region at `address`.");
vmx_pointer_instruction!(vmclear, "vmclear", "VMCLEAR of the VMCS at `address`.");
vmx_pointer_instruction!(vmptrld, "vmptrld", "VMPTRLD of the VMCS at `address`.");

/// VMXOFF.
pub fn vmxoff() -> VmxStatus {
    let (cf, zf): (u8, u8);
    // SAFETY: leaves VMX operation; nothing of this image depends on it afterwards.
    unsafe {
        asm!("vmxoff", "setc {cf}", "setz {zf}", cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack))
    };
    VmxStatus::from_flags(cf, zf)
}

/// VMPTRST: the current-VMCS pointer.
pub fn vmptrst() -> (VmxStatus, u64) {
    let mut pointer: u64 = 0;
    let (cf, zf): (u8, u8);
    // SAFETY: stores 8 bytes into the local.
    unsafe {
        asm!(
            "vmptrst qword ptr [{ptr}]",
            "setc {cf}",
            "setz {zf}",
            ptr = in(reg) &mut pointer,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack)
        )
    };
    (VmxStatus::from_flags(cf, zf), pointer)
}

/// VMREAD of the field with encoding `encoding`.
pub fn vmread(encoding: u64) -> (VmxStatus, u64) {
    let value: u64;
    let (cf, zf): (u8, u8);
    // SAFETY: reads a field of the current VMCS into a register.
    unsafe {
        asm!(
            "vmread {value}, {field}",
            "setc {cf}",
            "setz {zf}",
            field = in(reg) encoding,
            value = out(reg) value,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nomem, nostack)
        )
    };
    (VmxStatus::from_flags(cf, zf), value)
}

/// VMWRITE of `value` to the field with encoding `encoding`.
pub fn vmwrite(encoding: u64, value: u64) -> VmxStatus {
    let (cf, zf): (u8, u8);
    // SAFETY: writes a field of the current VMCS; what the fields mean for L1 is checked by VM
    // entry (host state) before it is used.
    unsafe {
        asm!(
            "vmwrite {field}, {value}",
            "setc {cf}",
            "setz {zf}",
            field = in(reg) encoding,
            value = in(reg) value,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nomem, nostack)
        )
    };
    VmxStatus::from_flags(cf, zf)
}

/// INVEPT of type `kind` with the descriptor (EPTP, 0) (SDM Vol. 3C §31.3 INVEPT).
pub fn invept(kind: u64, eptp: u64) -> VmxStatus {
    let descriptor: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: invalidates cached EPT translations only; the descriptor is a local.
    unsafe {
        asm!(
            "invept {kind}, xmmword ptr [{descriptor}]",
            "setc {cf}",
            "setz {zf}",
            kind = in(reg) kind,
            descriptor = in(reg) &descriptor,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack)
        )
    };
    VmxStatus::from_flags(cf, zf)
}

/// INVVPID of type `kind` for `vpid` (and `linear` for the individual-address type).
pub fn invvpid(kind: u64, vpid: u16, linear: u64) -> VmxStatus {
    let descriptor: [u64; 2] = [u64::from(vpid), linear];
    let (cf, zf): (u8, u8);
    // SAFETY: invalidates cached linear translations only; the descriptor is a local.
    unsafe {
        asm!(
            "invvpid {kind}, xmmword ptr [{descriptor}]",
            "setc {cf}",
            "setz {zf}",
            kind = in(reg) kind,
            descriptor = in(reg) &descriptor,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack)
        )
    };
    VmxStatus::from_flags(cf, zf)
}

/// How [`vm_run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// L2 ran and a VM exit (or an entry failure reported as an exit) returned here.
    Exited,
    /// VMLAUNCH/VMRESUME failed.
    Failed(VmxStatus),
    /// The VMWRITE of HOST_RSP failed.
    HostRspFailed(VmxStatus),
}

/// Enters L2 from `regs` (VMLAUNCH unless `launched`, else VMRESUME) and returns at its next VM
/// exit with L2's registers in `regs`.
pub fn vm_run(regs: &mut GuestRegs, launched: bool) -> RunStatus {
    // SAFETY: the trampoline saves and restores every callee-saved register and returns on the
    // same stack, at the same depth, both when the instruction fails and on the VM exit (the
    // current VMCS's HOST_RSP is this frame, HOST_RIP `l1hv_vm_exit`, and the rest of its host
    // state this vCPU's own: checked by VM entry itself). `regs` is exclusively borrowed.
    let status = unsafe { l1hv_vm_run(regs, u64::from(launched)) };
    let flags = |status: u64| VmxStatus::from_flags((status & 1) as u8, (status & 0x40) as u8);
    match status {
        0 => RunStatus::Exited,
        s if s & 0x200 != 0 => RunStatus::HostRspFailed(flags(s)),
        s => RunStatus::Failed(flags(s)),
    }
}
