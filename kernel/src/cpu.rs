//! Descriptor tables and traps: a GDT and TSS (with IST stacks) per CPU, one shared IDT, and
//! the trap entry that reports every exception with its vector, error code, RIP, CR2 and the
//! registers before ending the run with a FAIL verdict.

use crate::{hw, memory, percpu, scenario};
use alloc::boxed::Box;
use core::arch::global_asm;
use core::fmt::Write;
use spin::Once;

/// GDT selectors (the user ones are laid out for SYSCALL/SYSRET: SDM Vol. 2B, SYSRET).
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;
pub const TSS_SELECTOR: u16 = 0x30;

/// Interrupt vectors the kernel uses.
pub const VECTOR_TIMER: u8 = 0x20;
pub const VECTOR_SHOOTDOWN: u8 = 0x21;
pub const VECTOR_RESCHEDULE: u8 = 0x22;
pub const VECTOR_SPURIOUS: u8 = 0xff;

/// IST slots: 1 = double fault, 2 = NMI, 3 = machine check.
const IST_STACK_PAGES: usize = 4;

/// The 64-bit TSS (SDM Vol. 3A, 8.7 "Task Management in 64-bit Mode").
#[repr(C, packed)]
pub struct Tss {
    _reserved0: u32,
    pub rsp: [u64; 3],
    _reserved1: u64,
    pub ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    pub iomap_base: u16,
}

/// Bytes of an I/O permission bitmap: one bit per port, a set bit denies (SDM Vol. 1, 19.5.2).
pub const IO_BITMAP_BYTES: usize = 8192;

/// A TSS followed by its I/O permission bitmap and the 0xff byte the SDM requires after it.
#[repr(C, packed)]
pub struct TssWithBitmap {
    pub tss: Tss,
    pub bitmap: [u8; IO_BITMAP_BYTES],
    pub end: u8,
}

/// `iomap_base` when the bitmap is in force, and when every port is denied (beyond the limit).
const IOMAP_ACTIVE: u16 = core::mem::size_of::<Tss>() as u16;
const IOMAP_NONE: u16 = core::mem::size_of::<TssWithBitmap>() as u16;

/// A 16-byte IDT gate (SDM Vol. 3A, 6.14.1).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}

impl Gate {
    const fn missing() -> Self {
        Self {
            offset_low: 0,
            selector: 0,
            ist: 0,
            attributes: 0,
            offset_mid: 0,
            offset_high: 0,
            _reserved: 0,
        }
    }

    fn interrupt(handler: u64, ist: u8, dpl: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            attributes: 0x8e | (dpl << 5),
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            _reserved: 0,
        }
    }
}

static IDT: Once<[Gate; 256]> = Once::new();

/// Register state pushed by the trap entry, in memory order.
#[derive(Debug)]
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// One 16-byte stub per vector: push a zero error code where the CPU pushes none, push the
// vector, join the common path. Vectors with an error code: SDM Vol. 3A, Table 6-1.
global_asm!(
    r#"
    .section .text.traps, "ax"
    .balign 16
    .global trap_stubs
trap_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp trap_common
    .set vec, vec + 1
    .endr

trap_common:
    testb $3, 24(%rsp)
    jz kernel_trap
    /* From user mode: the CPU pushed the frame into the thread's context (TSS.RSP0). */
    swapgs
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
    call trap_from_user
    jmp return_to_user

kernel_trap:
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
    cld
    call trap_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

    /* Resumes the current thread from its saved frame (GS: context_base). */
    .global return_to_user
return_to_user:
    movq %gs:24, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    swapgs
    iretq
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static trap_stubs: u8;
}

fn stub_address(vector: usize) -> u64 {
    core::ptr::addr_of!(trap_stubs) as u64 + 16 * vector as u64
}

/// Builds the shared IDT (once) and the calling CPU's GDT and TSS, and loads all three.
pub fn init_this_cpu() {
    let idt = IDT.call_once(|| {
        let mut idt = [Gate::missing(); 256];
        for (v, gate) in idt.iter_mut().enumerate() {
            let ist = match v {
                8 => 1,
                2 => 2,
                18 => 3,
                _ => 0,
            };
            *gate = Gate::interrupt(stub_address(v), ist, 0);
        }
        idt
    });

    let mut tss = Box::new(TssWithBitmap {
        tss: Tss {
            _reserved0: 0,
            rsp: [0; 3],
            _reserved1: 0,
            ist: [0; 7],
            _reserved2: 0,
            _reserved3: 0,
            iomap_base: IOMAP_NONE,
        },
        bitmap: [0xff; IO_BITMAP_BYTES],
        end: 0xff,
    });
    for slot in 0..3 {
        let stack = memory::alloc_zeroed_pages(IST_STACK_PAGES)
            .expect("no memory for an IST stack at boot");
        tss.tss.ist[slot] = stack + (IST_STACK_PAGES * memory::PAGE_SIZE) as u64;
    }
    let tss: &'static mut TssWithBitmap = Box::leak(tss);
    let tss_addr = tss as *mut TssWithBitmap as u64;
    percpu::current()
        .tss
        .store(tss_addr, core::sync::atomic::Ordering::Relaxed);
    let limit = (core::mem::size_of::<TssWithBitmap>() - 1) as u64;

    let gdt: &'static mut [u64; 8] = Box::leak(Box::new([
        0,
        0x0020_9a00_0000_0000, // 0x08 kernel code, 64-bit
        0x0000_9200_0000_0000, // 0x10 kernel data
        0,                     // 0x18 (SYSRET's 32-bit user code slot, unused)
        0x0000_f200_0000_0000, // 0x20 user data, DPL 3
        0x0020_fa00_0000_0000, // 0x28 user code, 64-bit, DPL 3
        // 0x30: available 64-bit TSS (type 9), present.
        (limit & 0xffff)
            | ((tss_addr & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss_addr >> 24) & 0xff) << 56),
        tss_addr >> 32,
    ]));

    percpu::current()
        .gdt
        .store(gdt.as_ptr() as u64, core::sync::atomic::Ordering::Relaxed);
    percpu::current()
        .idt
        .store(idt.as_ptr() as u64, core::sync::atomic::Ordering::Relaxed);
    let gdt_ptr = hw::DescriptorTablePointer {
        limit: (core::mem::size_of::<[u64; 8]>() - 1) as u16,
        base: gdt.as_ptr() as u64,
    };
    let idt_ptr = hw::DescriptorTablePointer {
        limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
        base: idt.as_ptr() as u64,
    };
    // SAFETY: the GDT and TSS were leaked and live forever; the GDT holds a 64-bit code
    // descriptor at KERNEL_CS, data at KERNEL_DS and an available TSS at TSS_SELECTOR; the IDT
    // is in a static `Once` and every gate points at a trap stub.
    unsafe {
        hw::load_gdt(&gdt_ptr, KERNEL_CS, KERNEL_DS);
        hw::load_tr(TSS_SELECTOR);
        hw::load_idt(&idt_ptr);
    }
}

/// Sets where the CPU puts the frame of an interrupt or exception taken in user mode
/// (TSS.RSP0): the end of the current thread's saved-register frame.
pub fn set_user_trap_frame(cpu: &percpu::PerCpu, top: u64) {
    let tss = cpu.tss.load(core::sync::atomic::Ordering::Relaxed);
    if tss == 0 {
        return;
    }
    // SAFETY: `tss` is this CPU's TSS (leaked TssWithBitmap), written only by this CPU
    // (with interrupts off in the kernel); RSP0 is the u64 at offset 4 of the packed struct.
    unsafe { core::ptr::write_unaligned((tss + 4) as *mut u64, top) };
}

/// Loads the I/O permissions of the PD about to run on this CPU: its bitmap (copied only when
/// another PD's is loaded), or none at all. Restores the TR limit a VM exit cut to 0x67.
pub fn load_io_bitmap(cpu: &percpu::PerCpu, owner: Option<(u32, &[u8; IO_BITMAP_BYTES])>) {
    use core::sync::atomic::Ordering;
    let tss = cpu.tss.load(Ordering::Relaxed);
    if tss == 0 {
        return;
    }
    let iomap = tss + core::mem::offset_of!(Tss, iomap_base) as u64;
    match owner {
        None => {
            // SAFETY: `tss` is this CPU's leaked TssWithBitmap, written only by this CPU with
            // interrupts off; the field is a packed u16, hence the unaligned write.
            unsafe { core::ptr::write_unaligned(iomap as *mut u16, IOMAP_NONE) };
        }
        Some((pd, bitmap)) => {
            if cpu.io_owner.load(Ordering::Relaxed) != u64::from(pd) + 1 {
                let at = tss + core::mem::offset_of!(TssWithBitmap, bitmap) as u64;
                // SAFETY: as above; the bitmap field is IO_BITMAP_BYTES long.
                unsafe {
                    core::ptr::copy_nonoverlapping(bitmap.as_ptr(), at as *mut u8, IO_BITMAP_BYTES)
                };
                cpu.io_owner.store(u64::from(pd) + 1, Ordering::Relaxed);
            }
            // SAFETY: as above.
            unsafe { core::ptr::write_unaligned(iomap as *mut u16, IOMAP_ACTIVE) };
            if cpu.tr_clobbered.swap(false, Ordering::Relaxed) {
                reload_task_register(cpu);
            }
        }
    }
}

/// Forgets which PD's bitmap this CPU's TSS holds (after that PD's grants changed).
pub fn invalidate_io_bitmap(cpu: &percpu::PerCpu) {
    cpu.io_owner.store(0, core::sync::atomic::Ordering::Relaxed);
}

/// A VM exit sets the TR limit to 0x67 (SDM Vol. 3C 28.5.2), hiding the I/O bitmap: mark it
/// for a reload before a PD with I/O ports runs here.
pub fn note_vm_exit(cpu: &percpu::PerCpu) {
    cpu.tr_clobbered
        .store(true, core::sync::atomic::Ordering::Relaxed);
}

fn reload_task_register(cpu: &percpu::PerCpu) {
    let gdt = cpu.gdt.load(core::sync::atomic::Ordering::Relaxed);
    let descriptor = gdt + u64::from(TSS_SELECTOR);
    // SAFETY: this CPU's GDT (leaked, written only by this CPU); clearing the busy bit (type
    // 0xB -> 0x9) of its own TSS descriptor lets LTR load it again with the full limit.
    unsafe {
        let d = core::ptr::read_volatile(descriptor as *const u64);
        core::ptr::write_volatile(descriptor as *mut u64, d & !(1 << 41));
        hw::load_tr(TSS_SELECTOR);
    }
}

/// Names of the architectural exceptions (SDM Vol. 3A, Table 6-1).
fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "reserved",
    }
}

/// Called by `trap_common` for a trap taken in kernel mode, with the saved registers.
#[unsafe(no_mangle)]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    match frame.vector {
        v if v < 32 => exception(frame),
        v if v == VECTOR_TIMER as u64 => {
            percpu::current()
                .timer_ticks
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            crate::apic::eoi();
        }
        v if v == VECTOR_SHOOTDOWN as u64 => {
            crate::sched::shootdown_ack();
            crate::apic::eoi();
        }
        v if v == VECTOR_RESCHEDULE as u64 => crate::apic::eoi(),
        v if v == VECTOR_SPURIOUS as u64 => {}
        v if is_device_vector(v) => {
            crate::sched::device_interrupt((v - u64::from(IRQ_VECTOR_BASE)) as u32)
        }
        _ => crate::apic::eoi(),
    }
}

use crate::ioapic::IRQ_VECTOR_BASE;

fn is_device_vector(v: u64) -> bool {
    v >= u64::from(IRQ_VECTOR_BASE)
        && v < u64::from(IRQ_VECTOR_BASE) + u64::from(crate::ioapic::MAX_GSI)
}

/// Called by `trap_common` for a trap taken in user mode; `frame` is the current thread's
/// saved context. Afterwards the entry path resumes whatever thread is current then.
#[unsafe(no_mangle)]
extern "C" fn trap_from_user(frame: &mut TrapFrame) {
    match frame.vector {
        2 | 8 | 18 => exception(frame),
        v if v < 32 => crate::sched::user_exception(frame.vector, frame.error_code, hw::read_cr2()),
        v if v == VECTOR_TIMER as u64 => {
            percpu::current()
                .timer_ticks
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            crate::apic::eoi();
            crate::sched::timer_tick();
        }
        v if v == VECTOR_SHOOTDOWN as u64 => {
            crate::sched::shootdown_ack();
            crate::apic::eoi();
        }
        v if v == VECTOR_RESCHEDULE as u64 => {
            crate::apic::eoi();
            crate::sched::reschedule_ipi();
        }
        v if is_device_vector(v) => {
            crate::sched::device_interrupt((v - u64::from(IRQ_VECTOR_BASE)) as u32);
            crate::sched::reschedule_ipi();
        }
        v if v == VECTOR_SPURIOUS as u64 => {}
        _ => crate::apic::eoi(),
    }
}

fn exception(frame: &TrapFrame) -> ! {
    let cr2 = hw::read_cr2();
    let cpu = percpu::current_index_or_zero();
    // The console lock may be held by the code that faulted: write around it.
    let mut out = crate::serial::Serial::unlocked();
    let _ = write!(
        out,
        "\ncapvisor: exception vector {} ({}) error {:#x} on cpu {}\n  rip {:#018x} cs {:#x} rflags {:#x} rsp {:#018x} ss {:#x} cr2 {:#018x}\n  rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\n  rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}\n  r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}\n  r13 {:#018x} r14 {:#018x} r15 {:#018x} cr3 {:#018x}\n",
        frame.vector,
        exception_name(frame.vector),
        frame.error_code,
        cpu,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        cr2,
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15,
        hw::read_cr3(),
    );
    scenario::fail_unlocked(format_args!(
        "exception vector {} ({}) error {:#x} rip {:#x} cr2 {:#x}",
        frame.vector,
        exception_name(frame.vector),
        frame.error_code,
        frame.rip,
        cr2
    ))
}
