//! VMX operation for L1, as the SDM describes it for any hypervisor: discovery, enabling and
//! control negotiation (Vol. 3C §24.6-24.8, Vol. 3D Appendix A), VMXON, VMCS field access with its
//! VMfail results (Vol. 3C §31.2), and the contents of L2's VMCS (Vol. 3C chapter 25) chosen to
//! pass the VM-entry checks of Vol. 3C chapter 27.

use core::fmt;

use vcpu::controls::{
    CR4_VMXE, ControlSet, EntryControls, EptVpidCapabilities, ExitControls, PinBasedControls,
    ProcessorBasedControls, SecondaryControls, VmcsMemoryType, VmxCapabilities,
};
use vcpu::vmcs::{VmcsAccess, VmcsField};

use crate::arch::{self, HostTables, L2Tables, VmxStatus};
use crate::layout::{self, DEFAULT_PAT, IA32_EFER, IA32_FEATURE_CONTROL, IA32_PAT, fail};
use crate::println;

/// A VMX instruction's failure (SDM Vol. 3C §31.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmFail {
    /// VMfailInvalid (CF): no current VMCS to hold an error number.
    Invalid,
    /// VMfailValid (ZF) with the VM-instruction error number (§31.4).
    Valid(u32),
}

impl fmt::Display for VmFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmFail::Invalid => write!(f, "VMfailInvalid"),
            VmFail::Valid(number) => write!(f, "VMfailValid {number}"),
        }
    }
}

/// The VM-instruction error field of the current VMCS (0 if it cannot be read).
pub fn instruction_error() -> u32 {
    match arch::vmread(u64::from(VmcsField::VM_INSTRUCTION_ERROR.encoding())) {
        (VmxStatus::Succeed, value) => value as u32,
        _ => 0,
    }
}

/// Turns an instruction's status into a result, reading the error number of a VMfailValid.
pub fn check(status: VmxStatus) -> Result<(), VmFail> {
    match status {
        VmxStatus::Succeed => Ok(()),
        VmxStatus::FailInvalid => Err(VmFail::Invalid),
        VmxStatus::FailValid => Err(VmFail::Valid(instruction_error())),
    }
}

/// VMREAD of `field` from the current VMCS.
pub fn read(field: VmcsField) -> Result<u64, VmFail> {
    let (status, value) = arch::vmread(u64::from(field.encoding()));
    check(status).map(|()| value)
}

/// VMWRITE of `value` to `field` of the current VMCS.
pub fn write(field: VmcsField, value: u64) -> Result<(), VmFail> {
    check(arch::vmwrite(u64::from(field.encoding()), value))
}

/// The current VMCS through `vcpu`'s trait, for `RawExit::read` (a field that cannot be read
/// reads as 0; writes that fail are dropped). Used for diagnostics only.
pub struct CurrentVmcs;

impl VmcsAccess for CurrentVmcs {
    fn read(&self, field: VmcsField) -> u64 {
        read(field).unwrap_or(0)
    }

    fn write(&mut self, field: VmcsField, value: u64) {
        let _ = write(field, value);
    }
}

/// INVEPT types (SDM Vol. 3C §31.3 INVEPT).
pub const INVEPT_SINGLE_CONTEXT: u64 = 1;
pub const INVEPT_ALL_CONTEXT: u64 = 2;
/// INVVPID single-context type.
pub const INVVPID_SINGLE_CONTEXT: u64 = 1;

/// IA32_FEATURE_CONTROL bits (SDM Vol. 3C §24.7): lock, VMX outside SMX.
const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// CPUID.1:ECX.VMX (SDM Vol. 3C §24.6).
const CPUID_1_ECX_VMX: u32 = 1 << 5;

/// CR0 and CR4 bits L2 runs with (before the fixed bits): PE, ET, NE, PG; PAE.
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// IA32_EFER.LME | LMA.
const EFER_LONG_MODE: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: bit 1 (always 1) and IF. L2 runs with interrupts enabled; only L1 injects any.
pub const RFLAGS_FIXED: u64 = 1 << 1;
pub const RFLAGS_IF: u64 = 1 << 9;

/// Segment access rights in the VMCS format (SDM Vol. 3C §25.4.1, Table 25-2).
mod access_rights {
    /// 64-bit code: type 11 (execute/read, accessed), S, P, L, G.
    pub const CODE64: u64 = 0xa09b;
    /// Flat data: type 3 (read/write, accessed), S, P, D/B, G.
    pub const DATA: u64 = 0xc093;
    /// 64-bit TSS, busy (type 11), P (§27.3.1.2: TR type 11 in IA-32e mode).
    pub const TSS_BUSY: u64 = 0x8b;
    /// Unusable (bit 16): LDTR.
    pub const UNUSABLE: u64 = 1 << 16;
}

/// What L1 learned about VMX on this vCPU, and the controls it chose.
#[derive(Debug, Clone, Copy)]
pub struct Vmx {
    pub caps: VmxCapabilities,
    pub controls: ControlSet,
    pub ept: EptVpidCapabilities,
    /// MAXPHYADDR (CPUID.80000008H:EAX[7:0]).
    pub max_phys_bits: u8,
    /// "Unrestricted guest" was offered and is used.
    pub unrestricted: bool,
    /// INVEPT type used after changing a present EPT entry.
    pub invept_kind: u64,
}

impl Vmx {
    /// Discovers VMX as SDM Vol. 3C §24.6-24.7 describes (CPUID, IA32_FEATURE_CONTROL, the
    /// capability MSRs, TRUE_ MSRs when IA32_VMX_BASIC[55] says so) and negotiates the controls
    /// this hypervisor needs: `required | desired & allowed1 | allowed0` per class.
    pub fn discover(verbose: bool) -> Result<Vmx, u32> {
        let unavailable = |what: &str| {
            println!("l1hv: VMX unusable: {what}");
            fail::VMX_UNAVAILABLE
        };
        if arch::cpuid(1, 0)[2] & CPUID_1_ECX_VMX == 0 {
            return Err(unavailable("CPUID.1:ECX.VMX = 0"));
        }
        let mut feature = arch::rdmsr(IA32_FEATURE_CONTROL);
        if feature & FEATURE_CONTROL_LOCK == 0 {
            // Unlocked (firmware left it to us): allow VMX outside SMX and lock.
            arch::wrmsr(
                IA32_FEATURE_CONTROL,
                feature | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            );
            feature = arch::rdmsr(IA32_FEATURE_CONTROL);
        }
        if feature & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 || feature & FEATURE_CONTROL_LOCK == 0 {
            return Err(unavailable("IA32_FEATURE_CONTROL"));
        }
        let caps = VmxCapabilities::from_msrs(arch::rdmsr);
        if caps.vmcs_region_size() == 0 || caps.vmcs_region_size() > layout::PAGE as u32 {
            return Err(unavailable("VMCS region size"));
        }
        // This image keeps its VMX regions in write-back memory (§A.1, bits 53:50).
        if caps.vmcs_memory_type() != VmcsMemoryType::WriteBack {
            return Err(unavailable("VMCS memory type not WB"));
        }
        let required = ControlSet {
            pin_based: PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING,
            primary: ProcessorBasedControls::HLT_EXITING
                | ProcessorBasedControls::USE_IO_BITMAPS
                | ProcessorBasedControls::USE_MSR_BITMAPS,
            secondary: SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID,
            exit: ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::ACKNOWLEDGE_INTERRUPT_ON_EXIT
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER,
            entry: EntryControls::IA32E_MODE_GUEST
                | EntryControls::LOAD_IA32_PAT
                | EntryControls::LOAD_IA32_EFER,
            ..ControlSet::default()
        };
        let desired = ControlSet {
            secondary: SecondaryControls::UNRESTRICTED_GUEST,
            ..ControlSet::default()
        };
        let controls = match caps.negotiate_all(&required, &desired) {
            Ok(controls) => controls,
            Err(e) => {
                println!(
                    "l1hv: VMX unusable: {:?} controls {:#x} not allowed",
                    e.class, e.missing
                );
                return Err(fail::VMX_UNAVAILABLE);
            }
        };
        let ept = caps.ept_vpid();
        use EptVpidCapabilities as C;
        for (cap, what) in [
            (C::PAGE_WALK_LENGTH_4, "4-level EPT"),
            (C::MEMORY_TYPE_WB, "WB EPT tables"),
            (C::PAGES_2M, "2 MiB EPT pages"),
            (C::INVEPT, "INVEPT"),
        ] {
            if !ept.contains(cap) {
                return Err(unavailable(what));
            }
        }
        let invept_kind = if ept.contains(C::INVEPT_SINGLE_CONTEXT) {
            INVEPT_SINGLE_CONTEXT
        } else if ept.contains(C::INVEPT_ALL_CONTEXT) {
            INVEPT_ALL_CONTEXT
        } else {
            return Err(unavailable("INVEPT types"));
        };
        let max_extended = arch::cpuid(0x8000_0000, 0)[0];
        let max_phys_bits = if max_extended >= 0x8000_0008 {
            arch::cpuid(0x8000_0008, 0)[0] as u8
        } else {
            36
        };
        let unrestricted = controls
            .secondary
            .contains(SecondaryControls::UNRESTRICTED_GUEST);
        if verbose {
            println!(
                "l1hv: VMX rev {:#x}{}, EPT/VPID caps {:#x}, pin {:#x} cpu {:#x}/{:#x} exit {:#x} entry {:#x}",
                caps.revision_id(),
                if caps.true_controls() { " (TRUE)" } else { "" },
                ept.bits(),
                controls.pin_based.bits(),
                controls.primary.bits(),
                controls.secondary.bits(),
                controls.exit.bits(),
                controls.entry.bits()
            );
        }
        Ok(Vmx {
            caps,
            controls,
            ept,
            max_phys_bits,
            unrestricted,
            invept_kind,
        })
    }

    /// Enters VMX operation (SDM Vol. 3C §24.7-24.8): CR0 and CR4 with their fixed bits and
    /// CR4.VMXE, the VMXON region stamped with the revision identifier, VMXON.
    pub fn enable(&self, vmxon_region: u64) -> Result<(), u32> {
        let cr0 = arch::read_cr0();
        let fixed_cr0 = self.caps.fixed_cr0(cr0, false);
        if fixed_cr0 != cr0 {
            arch::write_cr0(fixed_cr0);
        }
        let cr4 = arch::read_cr4();
        let fixed_cr4 = self.caps.fixed_cr4(cr4 | CR4_VMXE);
        if fixed_cr4 != cr4 {
            arch::write_cr4(fixed_cr4);
        }
        self.stamp(vmxon_region);
        check(arch::vmxon(vmxon_region)).map_err(|e| {
            println!("l1hv: VMXON: {e}");
            fail::VMX_SETUP
        })
    }

    /// Writes the VMCS revision identifier (bit 31 clear: not a shadow VMCS) at the start of a
    /// VMXON or VMCS region (SDM Vol. 3C §25.2).
    pub fn stamp(&self, region: u64) {
        let first = arch::phys_read(region);
        arch::phys_write(
            region,
            (first & !0xffff_ffff) | u64::from(self.caps.revision_id()),
        );
    }

    /// The mask of valid physical addresses for VMX structures: below MAXPHYADDR and, with
    /// IA32_VMX_BASIC[48], below 4 GiB (SDM Vol. 3D §A.1).
    pub fn max_address(&self) -> u64 {
        let bits = if self.caps.physical_address_width_32() {
            32
        } else {
            self.max_phys_bits
        };
        (1u64 << bits) - 1
    }

    /// L2's CR0: PE, ET, NE, PG with the fixed bits (SDM Vol. 3D §A.7, relaxed for PE and PG
    /// under unrestricted guest; L2 sets them anyway: it runs in 64-bit mode).
    pub fn guest_cr0(&self) -> u64 {
        self.caps
            .fixed_cr0(CR0_PE | CR0_ET | CR0_NE | CR0_PG, self.unrestricted)
    }

    /// L2's CR4: PAE with the fixed bits (VMXE among them, hidden from L2 by the read shadow).
    pub fn guest_cr4(&self) -> u64 {
        self.caps.fixed_cr4(CR4_PAE)
    }
}

/// Everything L2's VMCS is built from.
pub struct VmcsContents {
    pub host: HostTables,
    pub l2: L2Tables,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
    pub msr_bitmap: u64,
    pub eptp: u64,
    pub vpid: u16,
}

/// Fills the current VMCS: controls (§25.6-25.8), host state (§25.5) and a 64-bit L2's guest
/// state (§25.4), every field the VM-entry checks of chapter 27 read. Returns the first field
/// whose VMWRITE failed.
pub fn write_vmcs(vmx: &Vmx, c: &VmcsContents) -> Result<(), (VmcsField, VmFail)> {
    use VmcsField as F;
    use access_rights as ar;
    let controls = &vmx.controls;
    let guest_cr0 = vmx.guest_cr0();
    let guest_cr4 = vmx.guest_cr4();
    // The CR0 bits L1 owns (must stay as the fixed bits say): L2 sees its own value in the read
    // shadow, and a write changing one of them would exit. CR4: VMXE only, hidden from L2.
    let mut cr0_fixed0 = vmx.caps.cr0_fixed0;
    if vmx.unrestricted {
        cr0_fixed0 &= !(CR0_PE | CR0_PG);
    }
    let cr0_mask = (cr0_fixed0 | !vmx.caps.cr0_fixed1) & 0xffff_ffff;
    let fields: &[(VmcsField, u64)] = &[
        // --- VM-execution controls (§25.6) ---
        (
            F::PIN_BASED_VM_EXECUTION_CONTROLS,
            u64::from(controls.pin_based.bits()),
        ),
        (
            F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            u64::from(controls.primary.bits()),
        ),
        (
            F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            u64::from(controls.secondary.bits()),
        ),
        // #UD exits (§25.6.3); L1 reflects it into L2.
        (F::EXCEPTION_BITMAP, 1 << vcpu::exit::vector::UD),
        (F::PAGE_FAULT_ERROR_CODE_MASK, 0),
        (F::PAGE_FAULT_ERROR_CODE_MATCH, 0),
        (F::IO_BITMAP_A_ADDRESS, c.io_bitmap_a),
        (F::IO_BITMAP_B_ADDRESS, c.io_bitmap_b),
        (F::MSR_BITMAPS_ADDRESS, c.msr_bitmap),
        (F::TSC_OFFSET, 0),
        (F::CR0_GUEST_HOST_MASK, cr0_mask),
        (F::CR0_READ_SHADOW, guest_cr0),
        (F::CR4_GUEST_HOST_MASK, CR4_VMXE),
        (F::CR4_READ_SHADOW, guest_cr4 & !CR4_VMXE),
        (F::CR3_TARGET_COUNT, 0),
        (F::EPT_POINTER, c.eptp),
        // Not 0 with "enable VPID" (§27.2.1.1).
        (F::VIRTUAL_PROCESSOR_ID, u64::from(c.vpid)),
        // --- VM-exit controls (§25.7) ---
        (F::PRIMARY_VM_EXIT_CONTROLS, u64::from(controls.exit.bits())),
        (F::VM_EXIT_MSR_STORE_COUNT, 0),
        (F::VM_EXIT_MSR_LOAD_COUNT, 0),
        // --- VM-entry controls (§25.8) ---
        (F::VM_ENTRY_CONTROLS, u64::from(controls.entry.bits())),
        (F::VM_ENTRY_MSR_LOAD_COUNT, 0),
        (F::VM_ENTRY_INTERRUPTION_INFORMATION, 0),
        (F::VM_ENTRY_EXCEPTION_ERROR_CODE, 0),
        (F::VM_ENTRY_INSTRUCTION_LENGTH, 0),
        // --- Host state (§25.5; checked by §27.2.2-27.2.4) ---
        (F::HOST_CR0, arch::read_cr0()),
        (F::HOST_CR3, arch::read_cr3()),
        (F::HOST_CR4, arch::read_cr4()),
        (F::HOST_ES_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::HOST_CS_SELECTOR, u64::from(arch::CODE_SELECTOR)),
        (F::HOST_SS_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::HOST_DS_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::HOST_FS_SELECTOR, 0),
        (F::HOST_GS_SELECTOR, 0),
        (F::HOST_TR_SELECTOR, u64::from(c.host.tr_selector)),
        (F::HOST_FS_BASE, 0),
        (F::HOST_GS_BASE, 0),
        (F::HOST_TR_BASE, c.host.tr_base),
        (F::HOST_GDTR_BASE, c.host.gdt_base),
        (F::HOST_IDTR_BASE, c.host.idt_base),
        (F::HOST_IA32_SYSENTER_CS, 0),
        (F::HOST_IA32_SYSENTER_ESP, 0),
        (F::HOST_IA32_SYSENTER_EIP, 0),
        (F::HOST_IA32_PAT, arch::rdmsr(IA32_PAT)),
        // LMA = LME = 1 = "host address-space size" (§27.2.2).
        (F::HOST_IA32_EFER, arch::rdmsr(IA32_EFER)),
        // Rewritten by the trampoline before every entry from a new stack depth.
        (F::HOST_RSP, 0),
        (F::HOST_RIP, arch::vm_exit_entry()),
        // --- Guest state (§25.4; checked by §27.3.1) ---
        (F::GUEST_CR0, guest_cr0),
        (F::GUEST_CR3, c.l2.cr3),
        (F::GUEST_CR4, guest_cr4),
        (F::GUEST_DR7, 0x400),
        (F::GUEST_IA32_DEBUGCTL, 0),
        (F::GUEST_IA32_SYSENTER_CS, 0),
        (F::GUEST_IA32_SYSENTER_ESP, 0),
        (F::GUEST_IA32_SYSENTER_EIP, 0),
        (F::GUEST_IA32_PAT, DEFAULT_PAT),
        // IA-32e mode guest: LMA = LME = 1 (§27.3.1.1).
        (F::GUEST_IA32_EFER, EFER_LONG_MODE),
        (F::GUEST_CS_SELECTOR, u64::from(arch::CODE_SELECTOR)),
        (F::GUEST_CS_BASE, 0),
        (F::GUEST_CS_LIMIT, 0xffff_ffff),
        (F::GUEST_CS_ACCESS_RIGHTS, ar::CODE64),
        (F::GUEST_SS_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::GUEST_SS_BASE, 0),
        (F::GUEST_SS_LIMIT, 0xffff_ffff),
        (F::GUEST_SS_ACCESS_RIGHTS, ar::DATA),
        (F::GUEST_DS_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::GUEST_DS_BASE, 0),
        (F::GUEST_DS_LIMIT, 0xffff_ffff),
        (F::GUEST_DS_ACCESS_RIGHTS, ar::DATA),
        (F::GUEST_ES_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::GUEST_ES_BASE, 0),
        (F::GUEST_ES_LIMIT, 0xffff_ffff),
        (F::GUEST_ES_ACCESS_RIGHTS, ar::DATA),
        (F::GUEST_FS_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::GUEST_FS_BASE, 0),
        (F::GUEST_FS_LIMIT, 0xffff_ffff),
        (F::GUEST_FS_ACCESS_RIGHTS, ar::DATA),
        (F::GUEST_GS_SELECTOR, u64::from(arch::DATA_SELECTOR)),
        (F::GUEST_GS_BASE, c.l2.gs_base),
        (F::GUEST_GS_LIMIT, 0xffff_ffff),
        (F::GUEST_GS_ACCESS_RIGHTS, ar::DATA),
        (F::GUEST_LDTR_SELECTOR, 0),
        (F::GUEST_LDTR_BASE, 0),
        (F::GUEST_LDTR_LIMIT, 0),
        (F::GUEST_LDTR_ACCESS_RIGHTS, ar::UNUSABLE),
        (F::GUEST_TR_SELECTOR, u64::from(c.l2.tr_selector)),
        (F::GUEST_TR_BASE, c.l2.tr_base),
        (F::GUEST_TR_LIMIT, u64::from(arch::TSS_LIMIT)),
        (F::GUEST_TR_ACCESS_RIGHTS, ar::TSS_BUSY),
        (F::GUEST_GDTR_BASE, c.l2.gdt_base),
        (F::GUEST_GDTR_LIMIT, u64::from(c.l2.gdt_limit)),
        (F::GUEST_IDTR_BASE, c.l2.idt_base),
        (F::GUEST_IDTR_LIMIT, u64::from(c.l2.idt_limit)),
        (F::GUEST_RSP, c.l2.rsp),
        (F::GUEST_RIP, c.l2.rip),
        (F::GUEST_RFLAGS, RFLAGS_FIXED | RFLAGS_IF),
        (F::GUEST_PENDING_DEBUG_EXCEPTIONS, 0),
        (F::GUEST_INTERRUPTIBILITY_STATE, 0),
        // Active (§25.4.2).
        (F::GUEST_ACTIVITY_STATE, 0),
        // No shadow VMCS: the link pointer must be all ones (§27.3.1.5).
        (F::VMCS_LINK_POINTER, u64::MAX),
    ];
    for &(field, value) in fields {
        write(field, value).map_err(|e| (field, e))?;
    }
    Ok(())
}
