//! VMX root operation on every CPU: detection (CPUID, IA32_FEATURE_CONTROL, the capability
//! MSRs, the CR0/CR4 fixed bits) and VMXON (SDM Vol. 3C, 24.7 "Enabling and Entering VMX
//! Operation").

use crate::hw::{self, msr};
use crate::memory;
use crate::percpu::{self, VmxState};
use vcpu::controls::{SecondaryControls, VmxCapabilities};

const CPUID_1_ECX_VMX: u32 = 1 << 5;
const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const CR4_VMXE: u64 = 1 << 13;

static CAPABILITIES: spin::Once<VmxCapabilities> = spin::Once::new();

/// The VMX capability MSRs, read once (every CPU of a machine reports the same; the BSP reads
/// them after its CPUID check says VMX exists).
pub fn capabilities() -> &'static VmxCapabilities {
    CAPABILITIES.call_once(|| VmxCapabilities::from_msrs(hw::rdmsr))
}

/// Brings the calling CPU into VMX root operation if it can; records the outcome.
pub fn init_this_cpu() -> VmxState {
    let state = enter_root();
    percpu::current().set_vmx_state(state);
    state
}

fn enter_root() -> VmxState {
    let (_, _, ecx, _) = hw::cpuid(1, 0);
    if ecx & CPUID_1_ECX_VMX == 0 {
        return VmxState::Absent;
    }
    let fc = hw::rdmsr(msr::IA32_FEATURE_CONTROL);
    if fc & FEATURE_CONTROL_LOCK == 0 {
        // SAFETY: the firmware left the MSR unlocked; enabling VMX outside SMX and locking it
        // is what the SDM prescribes (24.7) and changes nothing else.
        unsafe {
            hw::wrmsr(
                msr::IA32_FEATURE_CONTROL,
                fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            )
        };
    } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return VmxState::DisabledByFirmware;
    }

    let caps = capabilities();
    let cr0 = caps.fixed_cr0(hw::read_cr0(), false);
    let cr4 = caps.fixed_cr4(hw::read_cr4() | CR4_VMXE);
    let revision = caps.revision_id();
    // SAFETY: the new values only add the bits IA32_VMX_CR{0,4}_FIXED0 require (CR0.NE, CR0.PE,
    // CR0.PG are already set; CR4.VMXE is the VMX enable) and keep every bit the kernel set,
    // since FIXED1 reports them as allowed.
    unsafe {
        hw::write_cr0(cr0);
        hw::write_cr4(cr4);
    }

    let Some(region) = memory::alloc_zeroed_pages(1) else {
        return VmxState::VmxonFailed;
    };
    // SAFETY: the region was just allocated (identity mapped, ours alone); its first 31 bits
    // hold the VMCS revision identifier (SDM 25.11.5).
    unsafe { core::ptr::write_volatile(region as *mut u32, revision) };
    // SAFETY: CR4.VMXE is set, CR0/CR4 honour the fixed bits, and the region is a page this
    // CPU owns forever with the revision identifier written.
    match unsafe { hw::vmx::vmxon(region) } {
        Ok(()) => {
            percpu::current()
                .vmxon_region
                .store(region, core::sync::atomic::Ordering::Release);
            VmxState::Root
        }
        Err(()) => {
            memory::free_pages(region, 1);
            VmxState::VmxonFailed
        }
    }
}

/// Logs what the BSP's VMX capability MSRs offer.
pub fn log_features() {
    let caps = capabilities();
    crate::println!(
        "vmx: VMCS revision {:#x}, secondary controls {:?}, EPT/VPID {:?}",
        caps.revision_id(),
        SecondaryControls::from_bits_truncate(caps.secondary_settings().allowed1 as u32),
        caps.ept_vpid()
    );
}
