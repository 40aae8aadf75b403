//! Per-CPU state: one block per CPU, found through IA32_GS_BASE.

use crate::hw;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// The most CPUs the kernel manages; CPUs beyond this in the MADT are left parked (and logged).
pub const MAX_CPUS: usize = 32;

/// What one CPU found about VMX when it tried to enter VMX root operation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum VmxState {
    /// Not probed yet.
    Unknown = 0,
    /// CPUID.1:ECX.VMX is clear (e.g. QEMU TCG).
    Absent = 1,
    /// The firmware locked IA32_FEATURE_CONTROL with VMX disabled.
    DisabledByFirmware = 2,
    /// VMXON failed.
    VmxonFailed = 3,
    /// This CPU is in VMX root operation.
    Root = 4,
}

impl VmxState {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Absent,
            2 => Self::DisabledByFirmware,
            3 => Self::VmxonFailed,
            4 => Self::Root,
            _ => Self::Unknown,
        }
    }
}

/// Offsets of the fields the assembly entry paths read through GS (checked below).
pub const GS_KERNEL_STACK: usize = 0;
pub const GS_USER_RSP: usize = 8;
pub const GS_CONTEXT_TOP: usize = 16;
pub const GS_CONTEXT_BASE: usize = 24;

/// One CPU's block. Fields are atomics so that any CPU may read another's state.
#[repr(C, align(64))]
pub struct PerCpu {
    /// Top of this CPU's kernel stack: system calls and traps from user mode run here.
    pub kernel_stack_top: AtomicU64,
    /// The user RSP while the SYSCALL entry builds the frame.
    pub user_rsp: AtomicU64,
    /// End of the current thread's saved-register frame (the SYSCALL entry pushes below it;
    /// TSS.RSP0 holds the same value for interrupts from user mode).
    pub context_top: AtomicU64,
    /// Start of the current thread's frame (where `return_to_user` pops from).
    pub context_base: AtomicU64,
    /// This CPU's TSS (to update RSP0 on a thread switch; VMCS host TR base).
    pub tss: AtomicU64,
    /// This CPU's GDT and the IDT (VMCS host GDTR/IDTR bases).
    pub gdt: AtomicU64,
    pub idt: AtomicU64,
    /// Physical address of the VMCS current on this CPU (0: none).
    pub current_vmcs: AtomicU64,
    /// PD index + 1 whose I/O bitmap the TSS holds (0: none).
    pub io_owner: AtomicU64,
    /// A VM exit cut the TR limit; reload TR before a PD with I/O ports runs.
    pub tr_clobbered: AtomicBool,
    /// Index in `CPUS` (0 = the bootstrap processor).
    pub index: AtomicU32,
    /// Local APIC ID (x2APIC ID where x2APIC is on).
    pub apic_id: AtomicU32,
    /// Set once the CPU has finished its own initialisation.
    pub online: AtomicBool,
    /// Local APIC timer interrupts taken.
    pub timer_ticks: AtomicU64,
    vmx: AtomicU32,
    /// Physical address of this CPU's VMXON region (0 until VMXON).
    pub vmxon_region: AtomicU64,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            kernel_stack_top: AtomicU64::new(0),
            user_rsp: AtomicU64::new(0),
            context_top: AtomicU64::new(0),
            context_base: AtomicU64::new(0),
            tss: AtomicU64::new(0),
            gdt: AtomicU64::new(0),
            idt: AtomicU64::new(0),
            current_vmcs: AtomicU64::new(0),
            io_owner: AtomicU64::new(0),
            tr_clobbered: AtomicBool::new(false),
            index: AtomicU32::new(0),
            apic_id: AtomicU32::new(0),
            online: AtomicBool::new(false),
            timer_ticks: AtomicU64::new(0),
            vmx: AtomicU32::new(0),
            vmxon_region: AtomicU64::new(0),
        }
    }

    pub fn vmx_state(&self) -> VmxState {
        VmxState::from_u32(self.vmx.load(Ordering::Acquire))
    }

    pub fn set_vmx_state(&self, s: VmxState) {
        self.vmx.store(s as u32, Ordering::Release);
    }
}

const _: () = {
    assert!(core::mem::offset_of!(PerCpu, kernel_stack_top) == GS_KERNEL_STACK);
    assert!(core::mem::offset_of!(PerCpu, user_rsp) == GS_USER_RSP);
    assert!(core::mem::offset_of!(PerCpu, context_top) == GS_CONTEXT_TOP);
    assert!(core::mem::offset_of!(PerCpu, context_base) == GS_CONTEXT_BASE);
};

/// Every CPU's block.
pub static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

/// Number of CPUs the kernel started (the BSP plus APs that came online).
pub static CPU_COUNT: AtomicU32 = AtomicU32::new(1);

/// Makes `CPUS[index]` this CPU's block.
pub fn install(index: usize, apic_id: u32) {
    let block = &CPUS[index];
    block.index.store(index as u32, Ordering::Relaxed);
    block.apic_id.store(apic_id, Ordering::Relaxed);
    // SAFETY: the block is in a static, so the pointer stays valid forever; GS is used for
    // nothing but finding this block.
    unsafe { hw::set_gs_base(block as *const PerCpu as u64) };
}

/// This CPU's index, or 0 before `install` ran (early boot is on the BSP).
pub fn current_index_or_zero() -> usize {
    let base = hw::gs_base();
    let first = CPUS.as_ptr() as u64;
    let size = core::mem::size_of::<PerCpu>() as u64;
    if base < first {
        return 0;
    }
    let idx = ((base - first) / size) as usize;
    if idx < MAX_CPUS { idx } else { 0 }
}

/// This CPU's index through GS: one load. Only after `install` ran on this CPU (the
/// scheduler and the entry paths); early boot code uses `current_index_or_zero`.
#[inline(always)]
pub fn index() -> usize {
    hw::gs_read_u32(core::mem::offset_of!(PerCpu, index)) as usize
}

/// This CPU's block.
pub fn current() -> &'static PerCpu {
    &CPUS[current_index_or_zero()]
}
