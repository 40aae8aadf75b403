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

/// One CPU's block. Fields are atomics so that any CPU may read another's state.
#[repr(C, align(64))]
pub struct PerCpu {
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

/// This CPU's block.
pub fn current() -> &'static PerCpu {
    &CPUS[current_index_or_zero()]
}
