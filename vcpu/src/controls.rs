//! VMX control bits and their negotiation against the VMX capability MSRs.
//!
//! The control fields are described in SDM Vol. 3C §25.6 (VM-execution), §25.7 (VM-exit) and
//! §25.8 (VM-entry); which settings a processor allows is reported by the capability MSRs of
//! SDM Vol. 3D Appendix A. Each control MSR of §A.3-A.5 reports:
//!
//! * bits 31:0, the *allowed 0-settings*: a bit that is 1 here must be 1 in the control;
//! * bits 63:32, the *allowed 1-settings*: a bit that is 0 here must be 0 in the control.
//!
//! When IA32_VMX_BASIC\[55\] is 1 the `TRUE_*` MSRs report the same for the pin-based,
//! primary processor-based, exit and entry controls, with some "default1" bits freed (§A.2).

/// Capability MSR indices (SDM Vol. 3D Appendix A, Vol. 4 Table 2-2).
pub mod msr {
    /// IA32_VMX_BASIC (§A.1).
    pub const IA32_VMX_BASIC: u32 = 0x480;
    /// IA32_VMX_PINBASED_CTLS (§A.3.1).
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    /// IA32_VMX_PROCBASED_CTLS (§A.3.2).
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    /// IA32_VMX_EXIT_CTLS (§A.4.1).
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    /// IA32_VMX_ENTRY_CTLS (§A.5).
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    /// IA32_VMX_MISC (§A.6).
    pub const IA32_VMX_MISC: u32 = 0x485;
    /// IA32_VMX_CR0_FIXED0 (§A.7).
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    /// IA32_VMX_CR0_FIXED1 (§A.7).
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    /// IA32_VMX_CR4_FIXED0 (§A.8).
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    /// IA32_VMX_CR4_FIXED1 (§A.8).
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    /// IA32_VMX_VMCS_ENUM (§A.9).
    pub const IA32_VMX_VMCS_ENUM: u32 = 0x48A;
    /// IA32_VMX_PROCBASED_CTLS2 (§A.3.3).
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    /// IA32_VMX_EPT_VPID_CAP (§A.10).
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    /// IA32_VMX_TRUE_PINBASED_CTLS (§A.3.1).
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    /// IA32_VMX_TRUE_PROCBASED_CTLS (§A.3.2).
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    /// IA32_VMX_TRUE_EXIT_CTLS (§A.4.1).
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    /// IA32_VMX_TRUE_ENTRY_CTLS (§A.5).
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    /// IA32_VMX_VMFUNC (§A.11).
    pub const IA32_VMX_VMFUNC: u32 = 0x491;
    /// IA32_VMX_PROCBASED_CTLS3 (§A.3.4): allowed 1-settings of the 64 tertiary controls.
    pub const IA32_VMX_PROCBASED_CTLS3: u32 = 0x492;
}

bitflags::bitflags! {
    /// Pin-based VM-execution controls (SDM Vol. 3C §25.6.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct PinBasedControls: u32 {
        /// External-interrupt exiting.
        const EXTERNAL_INTERRUPT_EXITING = 1 << 0;
        /// NMI exiting.
        const NMI_EXITING = 1 << 3;
        /// Virtual NMIs.
        const VIRTUAL_NMIS = 1 << 5;
        /// Activate VMX-preemption timer.
        const ACTIVATE_VMX_PREEMPTION_TIMER = 1 << 6;
        /// Process posted interrupts.
        const PROCESS_POSTED_INTERRUPTS = 1 << 7;
    }
}

bitflags::bitflags! {
    /// Primary processor-based VM-execution controls (SDM Vol. 3C §25.6.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct ProcessorBasedControls: u32 {
        /// Interrupt-window exiting.
        const INTERRUPT_WINDOW_EXITING = 1 << 2;
        /// Use TSC offsetting.
        const USE_TSC_OFFSETTING = 1 << 3;
        /// HLT exiting.
        const HLT_EXITING = 1 << 7;
        /// INVLPG exiting.
        const INVLPG_EXITING = 1 << 9;
        /// MWAIT exiting.
        const MWAIT_EXITING = 1 << 10;
        /// RDPMC exiting.
        const RDPMC_EXITING = 1 << 11;
        /// RDTSC exiting.
        const RDTSC_EXITING = 1 << 12;
        /// CR3-load exiting.
        const CR3_LOAD_EXITING = 1 << 15;
        /// CR3-store exiting.
        const CR3_STORE_EXITING = 1 << 16;
        /// Activate tertiary controls.
        const ACTIVATE_TERTIARY_CONTROLS = 1 << 17;
        /// CR8-load exiting.
        const CR8_LOAD_EXITING = 1 << 19;
        /// CR8-store exiting.
        const CR8_STORE_EXITING = 1 << 20;
        /// Use TPR shadow.
        const USE_TPR_SHADOW = 1 << 21;
        /// NMI-window exiting.
        const NMI_WINDOW_EXITING = 1 << 22;
        /// MOV-DR exiting.
        const MOV_DR_EXITING = 1 << 23;
        /// Unconditional I/O exiting.
        const UNCONDITIONAL_IO_EXITING = 1 << 24;
        /// Use I/O bitmaps.
        const USE_IO_BITMAPS = 1 << 25;
        /// Monitor trap flag.
        const MONITOR_TRAP_FLAG = 1 << 27;
        /// Use MSR bitmaps.
        const USE_MSR_BITMAPS = 1 << 28;
        /// MONITOR exiting.
        const MONITOR_EXITING = 1 << 29;
        /// PAUSE exiting.
        const PAUSE_EXITING = 1 << 30;
        /// Activate secondary controls.
        const ACTIVATE_SECONDARY_CONTROLS = 1 << 31;
    }
}

bitflags::bitflags! {
    /// Secondary processor-based VM-execution controls (SDM Vol. 3C §25.6.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct SecondaryControls: u32 {
        /// Virtualize APIC accesses.
        const VIRTUALIZE_APIC_ACCESSES = 1 << 0;
        /// Enable EPT.
        const ENABLE_EPT = 1 << 1;
        /// Descriptor-table exiting.
        const DESCRIPTOR_TABLE_EXITING = 1 << 2;
        /// Enable RDTSCP.
        const ENABLE_RDTSCP = 1 << 3;
        /// Virtualize x2APIC mode.
        const VIRTUALIZE_X2APIC_MODE = 1 << 4;
        /// Enable VPID.
        const ENABLE_VPID = 1 << 5;
        /// WBINVD exiting.
        const WBINVD_EXITING = 1 << 6;
        /// Unrestricted guest.
        const UNRESTRICTED_GUEST = 1 << 7;
        /// APIC-register virtualization.
        const APIC_REGISTER_VIRTUALIZATION = 1 << 8;
        /// Virtual-interrupt delivery.
        const VIRTUAL_INTERRUPT_DELIVERY = 1 << 9;
        /// PAUSE-loop exiting.
        const PAUSE_LOOP_EXITING = 1 << 10;
        /// RDRAND exiting.
        const RDRAND_EXITING = 1 << 11;
        /// Enable INVPCID.
        const ENABLE_INVPCID = 1 << 12;
        /// Enable VM functions.
        const ENABLE_VM_FUNCTIONS = 1 << 13;
        /// VMCS shadowing.
        const VMCS_SHADOWING = 1 << 14;
        /// Enable ENCLS exiting.
        const ENABLE_ENCLS_EXITING = 1 << 15;
        /// RDSEED exiting.
        const RDSEED_EXITING = 1 << 16;
        /// Enable PML.
        const ENABLE_PML = 1 << 17;
        /// EPT-violation #VE.
        const EPT_VIOLATION_VE = 1 << 18;
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = 1 << 19;
        /// Enable XSAVES/XRSTORS.
        const ENABLE_XSAVES_XRSTORS = 1 << 20;
        /// PASID translation.
        const PASID_TRANSLATION = 1 << 21;
        /// Mode-based execute control for EPT.
        const MODE_BASED_EXECUTE_CONTROL_FOR_EPT = 1 << 22;
        /// Sub-page write permissions for EPT.
        const SUB_PAGE_WRITE_PERMISSIONS_FOR_EPT = 1 << 23;
        /// Intel PT uses guest physical addresses.
        const PT_USES_GUEST_PHYSICAL_ADDRESSES = 1 << 24;
        /// Use TSC scaling.
        const USE_TSC_SCALING = 1 << 25;
        /// Enable user wait and pause.
        const ENABLE_USER_WAIT_AND_PAUSE = 1 << 26;
        /// Enable PCONFIG.
        const ENABLE_PCONFIG = 1 << 27;
        /// Enable ENCLV exiting.
        const ENABLE_ENCLV_EXITING = 1 << 28;
        /// VMM bus-lock detection.
        const VMM_BUS_LOCK_DETECTION = 1 << 30;
        /// Instruction timeout.
        const INSTRUCTION_TIMEOUT = 1 << 31;
    }
}

bitflags::bitflags! {
    /// Tertiary processor-based VM-execution controls (SDM Vol. 3C §25.6.2), 64 bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct TertiaryControls: u64 {
        /// LOADIWKEY exiting.
        const LOADIWKEY_EXITING = 1 << 0;
        /// Enable HLAT.
        const ENABLE_HLAT = 1 << 1;
        /// EPT paging-write control.
        const EPT_PAGING_WRITE_CONTROL = 1 << 2;
        /// Guest-paging verification.
        const GUEST_PAGING_VERIFICATION = 1 << 3;
        /// IPI virtualization.
        const IPI_VIRTUALIZATION = 1 << 4;
        /// Virtualize IA32_SPEC_CTRL.
        const VIRTUALIZE_IA32_SPEC_CTRL = 1 << 7;
    }
}

bitflags::bitflags! {
    /// Primary VM-exit controls (SDM Vol. 3C §25.7.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct ExitControls: u32 {
        /// Save debug controls.
        const SAVE_DEBUG_CONTROLS = 1 << 2;
        /// Host address-space size.
        const HOST_ADDRESS_SPACE_SIZE = 1 << 9;
        /// Load IA32_PERF_GLOBAL_CTRL.
        const LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 12;
        /// Acknowledge interrupt on exit.
        const ACKNOWLEDGE_INTERRUPT_ON_EXIT = 1 << 15;
        /// Save IA32_PAT.
        const SAVE_IA32_PAT = 1 << 18;
        /// Load IA32_PAT.
        const LOAD_IA32_PAT = 1 << 19;
        /// Save IA32_EFER.
        const SAVE_IA32_EFER = 1 << 20;
        /// Load IA32_EFER.
        const LOAD_IA32_EFER = 1 << 21;
        /// Save VMX-preemption timer value.
        const SAVE_VMX_PREEMPTION_TIMER_VALUE = 1 << 22;
        /// Clear IA32_BNDCFGS.
        const CLEAR_IA32_BNDCFGS = 1 << 23;
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = 1 << 24;
        /// Clear IA32_RTIT_CTL.
        const CLEAR_IA32_RTIT_CTL = 1 << 25;
        /// Clear IA32_LBR_CTL.
        const CLEAR_IA32_LBR_CTL = 1 << 26;
        /// Clear UINV.
        const CLEAR_UINV = 1 << 27;
        /// Load CET state.
        const LOAD_CET_STATE = 1 << 28;
        /// Load PKRS.
        const LOAD_PKRS = 1 << 29;
        /// Save IA32_PERF_GLOBAL_CTL.
        const SAVE_IA32_PERF_GLOBAL_CTL = 1 << 30;
        /// Activate secondary controls.
        const ACTIVATE_SECONDARY_CONTROLS = 1 << 31;
    }
}

bitflags::bitflags! {
    /// VM-entry controls (SDM Vol. 3C §25.8.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct EntryControls: u32 {
        /// Load debug controls.
        const LOAD_DEBUG_CONTROLS = 1 << 2;
        /// IA-32e mode guest.
        const IA32E_MODE_GUEST = 1 << 9;
        /// Entry to SMM.
        const ENTRY_TO_SMM = 1 << 10;
        /// Deactivate dual-monitor treatment.
        const DEACTIVATE_DUAL_MONITOR_TREATMENT = 1 << 11;
        /// Load IA32_PERF_GLOBAL_CTRL.
        const LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 13;
        /// Load IA32_PAT.
        const LOAD_IA32_PAT = 1 << 14;
        /// Load IA32_EFER.
        const LOAD_IA32_EFER = 1 << 15;
        /// Load IA32_BNDCFGS.
        const LOAD_IA32_BNDCFGS = 1 << 16;
        /// Conceal VMX from PT.
        const CONCEAL_VMX_FROM_PT = 1 << 17;
        /// Load IA32_RTIT_CTL.
        const LOAD_IA32_RTIT_CTL = 1 << 18;
        /// Load UINV.
        const LOAD_UINV = 1 << 19;
        /// Load CET state.
        const LOAD_CET_STATE = 1 << 20;
        /// Load guest IA32_LBR_CTL.
        const LOAD_GUEST_IA32_LBR_CTL = 1 << 21;
        /// Load PKRS.
        const LOAD_PKRS = 1 << 22;
    }
}

bitflags::bitflags! {
    /// IA32_VMX_EPT_VPID_CAP (SDM Vol. 3D §A.10).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct EptVpidCapabilities: u64 {
        /// Execute-only EPT translations.
        const EXECUTE_ONLY = 1 << 0;
        /// Page-walk length of 4.
        const PAGE_WALK_LENGTH_4 = 1 << 6;
        /// Page-walk length of 5.
        const PAGE_WALK_LENGTH_5 = 1 << 7;
        /// EPT paging structures may be uncacheable (UC).
        const MEMORY_TYPE_UC = 1 << 8;
        /// EPT paging structures may be write-back (WB).
        const MEMORY_TYPE_WB = 1 << 14;
        /// 2-Mbyte pages (PDE maps a page).
        const PAGES_2M = 1 << 16;
        /// 1-Gbyte pages (PDPTE maps a page).
        const PAGES_1G = 1 << 17;
        /// INVEPT is supported.
        const INVEPT = 1 << 20;
        /// Accessed and dirty flags for EPT.
        const ACCESSED_DIRTY_FLAGS = 1 << 21;
        /// Advanced VM-exit information for EPT violations.
        const ADVANCED_EPT_VIOLATION_INFORMATION = 1 << 22;
        /// Supervisor shadow-stack control.
        const SUPERVISOR_SHADOW_STACK_CONTROL = 1 << 23;
        /// Single-context INVEPT.
        const INVEPT_SINGLE_CONTEXT = 1 << 25;
        /// All-context INVEPT.
        const INVEPT_ALL_CONTEXT = 1 << 26;
        /// INVVPID is supported.
        const INVVPID = 1 << 32;
        /// Individual-address INVVPID.
        const INVVPID_INDIVIDUAL_ADDRESS = 1 << 40;
        /// Single-context INVVPID.
        const INVVPID_SINGLE_CONTEXT = 1 << 41;
        /// All-context INVVPID.
        const INVVPID_ALL_CONTEXT = 1 << 42;
        /// Single-context-retaining-globals INVVPID.
        const INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43;
    }
}

impl EptVpidCapabilities {
    /// Bits 31:0, the EPT half of the MSR.
    pub const EPT_BITS: u64 = 0xffff_ffff;
    /// Bits 63:32, the VPID half of the MSR.
    pub const VPID_BITS: u64 = 0xffff_ffff_0000_0000;
}

bitflags::bitflags! {
    /// VM functions (VM-function controls, SDM Vol. 3C §25.6.14; IA32_VMX_VMFUNC, §A.11).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct VmFunctions: u64 {
        /// VM function 0: EPTP switching.
        const EPTP_SWITCHING = 1 << 0;
    }
}

/// The allowed settings of one class of controls (one control MSR, SDM Vol. 3D §A.3-A.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllowedSettings {
    /// Bits that must be 1 (MSR bits 31:0; always 0 for the tertiary controls).
    pub allowed0: u64,
    /// Bits that may be 1 (MSR bits 63:32; all 64 bits for the tertiary controls).
    pub allowed1: u64,
}

impl AllowedSettings {
    /// Splits a 32-bit control MSR into its halves.
    pub const fn from_msr(value: u64) -> AllowedSettings {
        AllowedSettings {
            allowed0: value & 0xffff_ffff,
            allowed1: value >> 32,
        }
    }

    /// Joins the halves into a 32-bit control MSR value.
    pub const fn to_msr(self) -> u64 {
        (self.allowed0 & 0xffff_ffff) | (self.allowed1 << 32)
    }

    /// The settings of IA32_VMX_PROCBASED_CTLS3: every bit is an allowed 1-setting.
    pub const fn from_allowed1(value: u64) -> AllowedSettings {
        AllowedSettings {
            allowed0: 0,
            allowed1: value,
        }
    }

    /// Whether `value` obeys these settings.
    pub const fn permits(self, value: u64) -> bool {
        value & self.allowed0 == self.allowed0 && value & !self.allowed1 == 0
    }

    /// Negotiates a control value; see [`negotiate`].
    pub const fn negotiate(self, required: u64, desired: u64) -> Result<u64, ControlError> {
        let missing = required & !self.allowed1;
        if missing != 0 {
            return Err(ControlError { missing });
        }
        Ok(required | (desired & self.allowed1) | self.allowed0)
    }

    /// Limits the allowed 1-settings to `mask`, keeping every must-be-one bit (and thus keeping
    /// it allowed-1).
    pub const fn filtered(self, mask: u64) -> AllowedSettings {
        AllowedSettings {
            allowed0: self.allowed0,
            allowed1: self.allowed1 & (mask | self.allowed0),
        }
    }
}

/// Negotiation failed: the `missing` required bits are not allowed to be 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlError {
    /// Required control bits the processor cannot set.
    pub missing: u64,
}

/// Computes a control value from what the caller requires and desires and what the processor
/// allows (SDM Vol. 3D §A.3-A.5):
/// `(required | (desired & allowed1)) | allowed0`.
///
/// Desired bits the processor does not allow are dropped; must-be-one bits (`allowed0`) are
/// set whether asked for or not; negotiation fails only when a required bit is not allowed-1.
pub const fn negotiate(
    required: u32,
    desired: u32,
    allowed0: u32,
    allowed1: u32,
) -> Result<u32, ControlError> {
    let settings = AllowedSettings {
        allowed0: allowed0 as u64,
        allowed1: allowed1 as u64,
    };
    match settings.negotiate(required as u64, desired as u64) {
        Ok(value) => Ok(value as u32),
        Err(e) => Err(e),
    }
}

/// One class of controls, for error reports of [`VmxCapabilities::negotiate_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlClass {
    /// Pin-based VM-execution controls.
    PinBased,
    /// Primary processor-based VM-execution controls.
    Primary,
    /// Secondary processor-based VM-execution controls.
    Secondary,
    /// Tertiary processor-based VM-execution controls.
    Tertiary,
    /// VM-exit controls.
    Exit,
    /// VM-entry controls.
    Entry,
}

/// [`VmxCapabilities::negotiate_all`] failed for one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiationError {
    /// The class of controls that could not be satisfied.
    pub class: ControlClass,
    /// The required bits of that class the processor cannot set.
    pub missing: u64,
}

/// A value for every control field: what [`VmxCapabilities::negotiate_all`] takes and returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlSet {
    /// Pin-based VM-execution controls.
    pub pin_based: PinBasedControls,
    /// Primary processor-based VM-execution controls.
    pub primary: ProcessorBasedControls,
    /// Secondary processor-based VM-execution controls.
    pub secondary: SecondaryControls,
    /// Tertiary processor-based VM-execution controls.
    pub tertiary: TertiaryControls,
    /// VM-exit controls.
    pub exit: ExitControls,
    /// VM-entry controls.
    pub entry: EntryControls,
}

/// VMCS memory type reported in IA32_VMX_BASIC bits 53:50 (SDM Vol. 3D §A.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmcsMemoryType {
    /// 0: uncacheable.
    Uncacheable,
    /// 6: write-back.
    WriteBack,
    /// Values the SDM does not use.
    Reserved(u8),
}

/// IA32_VMX_MISC decoded (SDM Vol. 3D §A.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MiscData {
    /// Bits 4:0: the preemption timer counts down by 1 every time TSC bit X changes, X = this.
    pub preemption_timer_tsc_shift: u8,
    /// Bit 5: VM exits store EFER.LMA into the "IA-32e mode guest" entry control.
    pub stores_lma_on_exit: bool,
    /// Bit 6: activity state HLT supported.
    pub activity_hlt: bool,
    /// Bit 7: activity state shutdown supported.
    pub activity_shutdown: bool,
    /// Bit 8: activity state wait-for-SIPI supported.
    pub activity_wait_for_sipi: bool,
    /// Bit 14: Intel PT may be used in VMX operation.
    pub intel_pt_in_vmx: bool,
    /// Bit 15: RDMSR may read IA32_SMBASE in SMM.
    pub rdmsr_smbase_in_smm: bool,
    /// Bits 24:16: number of CR3-target values supported.
    pub cr3_target_count: u16,
    /// Bits 27:25 (N): recommended maximum MSR-list entries, 512 * (N + 1).
    pub max_msr_list_entries: u32,
    /// Bit 28: bit 2 of IA32_SMM_MONITOR_CTL can be set.
    pub smm_monitor_ctl_bit2: bool,
    /// Bit 29: VMWRITE may write any supported field, including VM-exit information fields.
    pub vmwrite_any_field: bool,
    /// Bit 30: VM entry may inject software interrupts/exceptions with instruction length 0.
    pub zero_length_injection: bool,
    /// Bits 63:32: MSEG revision identifier.
    pub mseg_revision: u32,
}

impl MiscData {
    /// Flag bits of IA32_VMX_MISC (the rest are numeric fields).
    pub const FLAG_BITS: u64 = (1 << 5)
        | (1 << 6)
        | (1 << 7)
        | (1 << 8)
        | (1 << 14)
        | (1 << 15)
        | (1 << 28)
        | (1 << 29)
        | (1 << 30);

    /// Decodes the MSR.
    pub const fn from_msr(value: u64) -> MiscData {
        MiscData {
            preemption_timer_tsc_shift: (value & 0x1f) as u8,
            stores_lma_on_exit: value & (1 << 5) != 0,
            activity_hlt: value & (1 << 6) != 0,
            activity_shutdown: value & (1 << 7) != 0,
            activity_wait_for_sipi: value & (1 << 8) != 0,
            intel_pt_in_vmx: value & (1 << 14) != 0,
            rdmsr_smbase_in_smm: value & (1 << 15) != 0,
            cr3_target_count: ((value >> 16) & 0x1ff) as u16,
            max_msr_list_entries: 512 * (((value >> 25) & 7) as u32 + 1),
            smm_monitor_ctl_bit2: value & (1 << 28) != 0,
            vmwrite_any_field: value & (1 << 29) != 0,
            zero_length_injection: value & (1 << 30) != 0,
            mseg_revision: (value >> 32) as u32,
        }
    }
}

/// CR0.PE, relaxed by "unrestricted guest" (SDM Vol. 3D §A.7).
pub const CR0_PE: u64 = 1 << 0;
/// CR0.NE: 1 in IA32_VMX_CR0_FIXED0 on every processor so far (VMXON faults without it).
pub const CR0_NE: u64 = 1 << 5;
/// CR0.PG, relaxed by "unrestricted guest" (SDM Vol. 3D §A.7).
pub const CR0_PG: u64 = 1 << 31;
/// CR4.VMXE.
pub const CR4_VMXE: u64 = 1 << 13;

/// The VMX capability MSRs of one processor, raw, with decoded views (SDM Vol. 3D Appendix A).
///
/// MSRs that do not exist on the processor are `None`: which exist follows from the others
/// (see [`VmxCapabilities::from_msrs`]). The kernel builds this once with RDMSR; the nested
/// server advertises a [`VmxCapabilities::filtered`] copy to L1 through RDMSR emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmxCapabilities {
    /// IA32_VMX_BASIC.
    pub basic: u64,
    /// IA32_VMX_PINBASED_CTLS.
    pub pinbased_ctls: u64,
    /// IA32_VMX_PROCBASED_CTLS.
    pub procbased_ctls: u64,
    /// IA32_VMX_EXIT_CTLS.
    pub exit_ctls: u64,
    /// IA32_VMX_ENTRY_CTLS.
    pub entry_ctls: u64,
    /// IA32_VMX_MISC.
    pub misc: u64,
    /// IA32_VMX_CR0_FIXED0.
    pub cr0_fixed0: u64,
    /// IA32_VMX_CR0_FIXED1.
    pub cr0_fixed1: u64,
    /// IA32_VMX_CR4_FIXED0.
    pub cr4_fixed0: u64,
    /// IA32_VMX_CR4_FIXED1.
    pub cr4_fixed1: u64,
    /// IA32_VMX_VMCS_ENUM.
    pub vmcs_enum: u64,
    /// IA32_VMX_PROCBASED_CTLS2: exists if "activate secondary controls" may be 1.
    pub procbased_ctls2: Option<u64>,
    /// IA32_VMX_EPT_VPID_CAP: exists if "enable EPT" or "enable VPID" may be 1.
    pub ept_vpid_cap: Option<u64>,
    /// IA32_VMX_TRUE_PINBASED_CTLS: exists if IA32_VMX_BASIC\[55\].
    pub true_pinbased_ctls: Option<u64>,
    /// IA32_VMX_TRUE_PROCBASED_CTLS: exists if IA32_VMX_BASIC\[55\].
    pub true_procbased_ctls: Option<u64>,
    /// IA32_VMX_TRUE_EXIT_CTLS: exists if IA32_VMX_BASIC\[55\].
    pub true_exit_ctls: Option<u64>,
    /// IA32_VMX_TRUE_ENTRY_CTLS: exists if IA32_VMX_BASIC\[55\].
    pub true_entry_ctls: Option<u64>,
    /// IA32_VMX_VMFUNC: exists if "enable VM functions" may be 1.
    pub vmfunc: Option<u64>,
    /// IA32_VMX_PROCBASED_CTLS3: exists if "activate tertiary controls" may be 1.
    pub procbased_ctls3: Option<u64>,
}

const fn bit(value: u64, n: u32) -> bool {
    value & (1 << n) != 0
}

impl VmxCapabilities {
    /// IA32_VMX_BASIC bit 55: the TRUE_* control MSRs exist.
    pub const BASIC_TRUE_CONTROLS: u64 = 1 << 55;
    /// IA32_VMX_BASIC bit 54: VM exits due to INS/OUTS report instruction information.
    pub const BASIC_INS_OUTS_INFORMATION: u64 = 1 << 54;

    /// Reads the capability MSRs through `rdmsr`, touching only MSRs that exist (reading one
    /// that does not exist would #GP): SDM Vol. 3D §A.1 (TRUE MSRs), §A.3.3, §A.3.4, §A.10,
    /// §A.11.
    pub fn from_msrs(mut rdmsr: impl FnMut(u32) -> u64) -> VmxCapabilities {
        let basic = rdmsr(msr::IA32_VMX_BASIC);
        let procbased_ctls = rdmsr(msr::IA32_VMX_PROCBASED_CTLS);
        let has_true = basic & Self::BASIC_TRUE_CONTROLS != 0;
        let mut true_msr = |index| if has_true { Some(rdmsr(index)) } else { None };
        let true_pinbased_ctls = true_msr(msr::IA32_VMX_TRUE_PINBASED_CTLS);
        let true_procbased_ctls = true_msr(msr::IA32_VMX_TRUE_PROCBASED_CTLS);
        let true_exit_ctls = true_msr(msr::IA32_VMX_TRUE_EXIT_CTLS);
        let true_entry_ctls = true_msr(msr::IA32_VMX_TRUE_ENTRY_CTLS);
        let primary1 = procbased_ctls >> 32;
        let procbased_ctls2 = bit(primary1, 31).then(|| rdmsr(msr::IA32_VMX_PROCBASED_CTLS2));
        let procbased_ctls3 = bit(primary1, 17).then(|| rdmsr(msr::IA32_VMX_PROCBASED_CTLS3));
        let secondary1 = procbased_ctls2.unwrap_or(0) >> 32;
        let ept_vpid_cap =
            (bit(secondary1, 1) || bit(secondary1, 5)).then(|| rdmsr(msr::IA32_VMX_EPT_VPID_CAP));
        let vmfunc = bit(secondary1, 13).then(|| rdmsr(msr::IA32_VMX_VMFUNC));
        VmxCapabilities {
            basic,
            pinbased_ctls: rdmsr(msr::IA32_VMX_PINBASED_CTLS),
            procbased_ctls,
            exit_ctls: rdmsr(msr::IA32_VMX_EXIT_CTLS),
            entry_ctls: rdmsr(msr::IA32_VMX_ENTRY_CTLS),
            misc: rdmsr(msr::IA32_VMX_MISC),
            cr0_fixed0: rdmsr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(msr::IA32_VMX_CR4_FIXED1),
            vmcs_enum: rdmsr(msr::IA32_VMX_VMCS_ENUM),
            procbased_ctls2,
            ept_vpid_cap,
            true_pinbased_ctls,
            true_procbased_ctls,
            true_exit_ctls,
            true_entry_ctls,
            vmfunc,
            procbased_ctls3,
        }
    }

    /// The value of capability MSR `index`, or `None` if it does not exist here: what RDMSR
    /// returns (or #GP) on this processor, or for an L1 hypervisor on a filtered copy.
    pub const fn msr(&self, index: u32) -> Option<u64> {
        match index {
            msr::IA32_VMX_BASIC => Some(self.basic),
            msr::IA32_VMX_PINBASED_CTLS => Some(self.pinbased_ctls),
            msr::IA32_VMX_PROCBASED_CTLS => Some(self.procbased_ctls),
            msr::IA32_VMX_EXIT_CTLS => Some(self.exit_ctls),
            msr::IA32_VMX_ENTRY_CTLS => Some(self.entry_ctls),
            msr::IA32_VMX_MISC => Some(self.misc),
            msr::IA32_VMX_CR0_FIXED0 => Some(self.cr0_fixed0),
            msr::IA32_VMX_CR0_FIXED1 => Some(self.cr0_fixed1),
            msr::IA32_VMX_CR4_FIXED0 => Some(self.cr4_fixed0),
            msr::IA32_VMX_CR4_FIXED1 => Some(self.cr4_fixed1),
            msr::IA32_VMX_VMCS_ENUM => Some(self.vmcs_enum),
            msr::IA32_VMX_PROCBASED_CTLS2 => self.procbased_ctls2,
            msr::IA32_VMX_EPT_VPID_CAP => self.ept_vpid_cap,
            msr::IA32_VMX_TRUE_PINBASED_CTLS => self.true_pinbased_ctls,
            msr::IA32_VMX_TRUE_PROCBASED_CTLS => self.true_procbased_ctls,
            msr::IA32_VMX_TRUE_EXIT_CTLS => self.true_exit_ctls,
            msr::IA32_VMX_TRUE_ENTRY_CTLS => self.true_entry_ctls,
            msr::IA32_VMX_VMFUNC => self.vmfunc,
            msr::IA32_VMX_PROCBASED_CTLS3 => self.procbased_ctls3,
            _ => None,
        }
    }

    // --- IA32_VMX_BASIC (§A.1) ---

    /// Bits 30:0: VMCS revision identifier (written to the first dword of VMXON and VMCS
    /// regions).
    pub const fn revision_id(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// Bits 44:32: bytes to allocate for the VMXON region and each VMCS region (at most 4096).
    pub const fn vmcs_region_size(&self) -> u32 {
        ((self.basic >> 32) & 0x1fff) as u32
    }

    /// Bit 48: VMXON, VMCS and the structures they point to are limited to 32-bit physical
    /// addresses.
    pub const fn physical_address_width_32(&self) -> bool {
        bit(self.basic, 48)
    }

    /// Bit 49: dual-monitor treatment of SMIs and SMM is supported.
    pub const fn dual_monitor(&self) -> bool {
        bit(self.basic, 49)
    }

    /// Bits 53:50: memory type for the VMCS and the structures it references.
    pub const fn vmcs_memory_type(&self) -> VmcsMemoryType {
        match ((self.basic >> 50) & 0xf) as u8 {
            0 => VmcsMemoryType::Uncacheable,
            6 => VmcsMemoryType::WriteBack,
            other => VmcsMemoryType::Reserved(other),
        }
    }

    /// Bit 54: VM exits due to INS/OUTS fill the VM-exit instruction-information field.
    pub const fn ins_outs_information(&self) -> bool {
        self.basic & Self::BASIC_INS_OUTS_INFORMATION != 0
    }

    /// Bit 55: the TRUE_* control MSRs exist and must be used to find allowed settings.
    pub const fn true_controls(&self) -> bool {
        self.basic & Self::BASIC_TRUE_CONTROLS != 0
    }

    /// Bit 56: VM entry may deliver a hardware exception with or without an error code
    /// regardless of the vector.
    pub const fn relaxed_exception_error_code(&self) -> bool {
        bit(self.basic, 56)
    }

    // --- Allowed settings (§A.3-A.5), TRUE MSRs preferred when they exist ---

    const fn control_msr(&self, plain: u64, true_msr: Option<u64>) -> AllowedSettings {
        match (self.true_controls(), true_msr) {
            (true, Some(value)) => AllowedSettings::from_msr(value),
            _ => AllowedSettings::from_msr(plain),
        }
    }

    /// Allowed settings of the pin-based controls.
    pub const fn pin_based_settings(&self) -> AllowedSettings {
        self.control_msr(self.pinbased_ctls, self.true_pinbased_ctls)
    }

    /// Allowed settings of the primary processor-based controls.
    pub const fn primary_settings(&self) -> AllowedSettings {
        self.control_msr(self.procbased_ctls, self.true_procbased_ctls)
    }

    /// Allowed settings of the secondary controls (all 0 when the MSR does not exist).
    pub const fn secondary_settings(&self) -> AllowedSettings {
        match self.procbased_ctls2 {
            Some(value) => AllowedSettings::from_msr(value),
            None => AllowedSettings {
                allowed0: 0,
                allowed1: 0,
            },
        }
    }

    /// Allowed settings of the tertiary controls (all 0 when the MSR does not exist).
    pub const fn tertiary_settings(&self) -> AllowedSettings {
        match self.procbased_ctls3 {
            Some(value) => AllowedSettings::from_allowed1(value),
            None => AllowedSettings::from_allowed1(0),
        }
    }

    /// Allowed settings of the VM-exit controls.
    pub const fn exit_settings(&self) -> AllowedSettings {
        self.control_msr(self.exit_ctls, self.true_exit_ctls)
    }

    /// Allowed settings of the VM-entry controls.
    pub const fn entry_settings(&self) -> AllowedSettings {
        self.control_msr(self.entry_ctls, self.true_entry_ctls)
    }

    /// Negotiates the pin-based controls (see [`negotiate`]).
    pub const fn negotiate_pin_based(
        &self,
        required: PinBasedControls,
        desired: PinBasedControls,
    ) -> Result<PinBasedControls, ControlError> {
        match self
            .pin_based_settings()
            .negotiate(required.bits() as u64, desired.bits() as u64)
        {
            Ok(v) => Ok(PinBasedControls::from_bits_retain(v as u32)),
            Err(e) => Err(e),
        }
    }

    /// Negotiates the primary processor-based controls (see [`negotiate`]).
    pub const fn negotiate_primary(
        &self,
        required: ProcessorBasedControls,
        desired: ProcessorBasedControls,
    ) -> Result<ProcessorBasedControls, ControlError> {
        match self
            .primary_settings()
            .negotiate(required.bits() as u64, desired.bits() as u64)
        {
            Ok(v) => Ok(ProcessorBasedControls::from_bits_retain(v as u32)),
            Err(e) => Err(e),
        }
    }

    /// Negotiates the secondary controls (see [`negotiate`]).
    pub const fn negotiate_secondary(
        &self,
        required: SecondaryControls,
        desired: SecondaryControls,
    ) -> Result<SecondaryControls, ControlError> {
        match self
            .secondary_settings()
            .negotiate(required.bits() as u64, desired.bits() as u64)
        {
            Ok(v) => Ok(SecondaryControls::from_bits_retain(v as u32)),
            Err(e) => Err(e),
        }
    }

    /// Negotiates the tertiary controls (see [`negotiate`]).
    pub const fn negotiate_tertiary(
        &self,
        required: TertiaryControls,
        desired: TertiaryControls,
    ) -> Result<TertiaryControls, ControlError> {
        match self
            .tertiary_settings()
            .negotiate(required.bits(), desired.bits())
        {
            Ok(v) => Ok(TertiaryControls::from_bits_retain(v)),
            Err(e) => Err(e),
        }
    }

    /// Negotiates the VM-exit controls (see [`negotiate`]).
    pub const fn negotiate_exit(
        &self,
        required: ExitControls,
        desired: ExitControls,
    ) -> Result<ExitControls, ControlError> {
        match self
            .exit_settings()
            .negotiate(required.bits() as u64, desired.bits() as u64)
        {
            Ok(v) => Ok(ExitControls::from_bits_retain(v as u32)),
            Err(e) => Err(e),
        }
    }

    /// Negotiates the VM-entry controls (see [`negotiate`]).
    pub const fn negotiate_entry(
        &self,
        required: EntryControls,
        desired: EntryControls,
    ) -> Result<EntryControls, ControlError> {
        match self
            .entry_settings()
            .negotiate(required.bits() as u64, desired.bits() as u64)
        {
            Ok(v) => Ok(EntryControls::from_bits_retain(v as u32)),
            Err(e) => Err(e),
        }
    }

    /// Negotiates every class at once. The "activate secondary/tertiary controls" bits are
    /// added to the required primary controls when the secondary/tertiary result is non-zero,
    /// and left out otherwise (unless must-be-one).
    pub fn negotiate_all(
        &self,
        required: &ControlSet,
        desired: &ControlSet,
    ) -> Result<ControlSet, NegotiationError> {
        let fail = |class| {
            move |e: ControlError| NegotiationError {
                class,
                missing: e.missing,
            }
        };
        let secondary = self
            .negotiate_secondary(required.secondary, desired.secondary)
            .map_err(fail(ControlClass::Secondary))?;
        let tertiary = self
            .negotiate_tertiary(required.tertiary, desired.tertiary)
            .map_err(fail(ControlClass::Tertiary))?;
        let mut primary_required = required.primary;
        let mut primary_desired = desired.primary;
        for (active, flag) in [
            (
                !secondary.is_empty(),
                ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS,
            ),
            (
                !tertiary.is_empty(),
                ProcessorBasedControls::ACTIVATE_TERTIARY_CONTROLS,
            ),
        ] {
            primary_required.set(flag, active);
            primary_desired.set(flag, active);
        }
        Ok(ControlSet {
            pin_based: self
                .negotiate_pin_based(required.pin_based, desired.pin_based)
                .map_err(fail(ControlClass::PinBased))?,
            primary: self
                .negotiate_primary(primary_required, primary_desired)
                .map_err(fail(ControlClass::Primary))?,
            secondary,
            tertiary,
            exit: self
                .negotiate_exit(required.exit, desired.exit)
                .map_err(fail(ControlClass::Exit))?,
            entry: self
                .negotiate_entry(required.entry, desired.entry)
                .map_err(fail(ControlClass::Entry))?,
        })
    }

    // --- MISC, CR fixed bits, VMCS enumeration, EPT/VPID, VM functions ---

    /// IA32_VMX_MISC decoded.
    pub const fn misc(&self) -> MiscData {
        MiscData::from_msr(self.misc)
    }

    /// The value CR0 must have for VMXON or, as guest CR0, for VM entry (SDM Vol. 3D §A.7):
    /// bits set in FIXED0 are forced to 1, bits clear in FIXED1 forced to 0. With
    /// `unrestricted_guest` (guest CR0 only) PE and PG are not forced to 1.
    pub const fn fixed_cr0(&self, value: u64, unrestricted_guest: bool) -> u64 {
        let mut fixed0 = self.cr0_fixed0;
        if unrestricted_guest {
            fixed0 &= !(CR0_PE | CR0_PG);
        }
        (value | fixed0) & self.cr0_fixed1
    }

    /// The value CR4 must have in VMX operation (SDM Vol. 3D §A.8).
    pub const fn fixed_cr4(&self, value: u64) -> u64 {
        (value | self.cr4_fixed0) & self.cr4_fixed1
    }

    /// Whether `value` obeys the CR0 fixed bits (see [`VmxCapabilities::fixed_cr0`]).
    pub const fn cr0_is_valid(&self, value: u64, unrestricted_guest: bool) -> bool {
        self.fixed_cr0(value, unrestricted_guest) == value
    }

    /// Whether `value` obeys the CR4 fixed bits.
    pub const fn cr4_is_valid(&self, value: u64) -> bool {
        self.fixed_cr4(value) == value
    }

    /// IA32_VMX_VMCS_ENUM bits 9:1: the highest index used in any VMCS field encoding
    /// (SDM Vol. 3D §A.9).
    pub const fn max_vmcs_index(&self) -> u16 {
        ((self.vmcs_enum >> 1) & 0x1ff) as u16
    }

    /// IA32_VMX_EPT_VPID_CAP (empty when the MSR does not exist).
    pub const fn ept_vpid(&self) -> EptVpidCapabilities {
        match self.ept_vpid_cap {
            Some(value) => EptVpidCapabilities::from_bits_retain(value),
            None => EptVpidCapabilities::empty(),
        }
    }

    /// IA32_VMX_VMFUNC: the VM functions that may be enabled.
    pub const fn vm_functions(&self) -> VmFunctions {
        match self.vmfunc {
            Some(value) => VmFunctions::from_bits_retain(value),
            None => VmFunctions::empty(),
        }
    }

    /// The capability MSRs to advertise to an L1 hypervisor when the nested server emulates
    /// only the features in `features`: every allowed 1-setting outside the mask is cleared,
    /// allowed 0-settings (must-be-one bits) are kept, EPT/VPID, VM-function and MISC flags are
    /// intersected with the mask, and MSRs whose enabling control is no longer allowed vanish
    /// (SDM Vol. 3D §A.3.3, §A.3.4, §A.10, §A.11). BASIC, the CR fixed bits and VMCS_ENUM are
    /// kept: L1's guest runs on this processor.
    pub fn filtered(&self, features: &NestedFeatures) -> VmxCapabilities {
        let control =
            |value: u64, mask: u64| AllowedSettings::from_msr(value).filtered(mask).to_msr();
        let pin = features.pin_based.bits() as u64;
        let primary = features.primary.bits() as u64;
        let exit = features.exit.bits() as u64;
        let entry = features.entry.bits() as u64;

        let procbased_ctls = control(self.procbased_ctls, primary);
        let true_procbased_ctls = self.true_procbased_ctls.map(|v| control(v, primary));
        // An MSR that depends on a primary control exists only if every view allows it.
        let primary_allows = |flag: ProcessorBasedControls| {
            let bit = (flag.bits() as u64) << 32;
            procbased_ctls & bit != 0 && true_procbased_ctls.is_none_or(|v| v & bit != 0)
        };
        let procbased_ctls2 = self
            .procbased_ctls2
            .filter(|_| primary_allows(ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS))
            .map(|v| control(v, features.secondary.bits() as u64));
        let procbased_ctls3 = self
            .procbased_ctls3
            .filter(|_| primary_allows(ProcessorBasedControls::ACTIVATE_TERTIARY_CONTROLS))
            .map(|v| v & features.tertiary.bits());
        let secondary1 =
            SecondaryControls::from_bits_retain((procbased_ctls2.unwrap_or(0) >> 32) as u32);
        let ept = secondary1.contains(SecondaryControls::ENABLE_EPT);
        let vpid = secondary1.contains(SecondaryControls::ENABLE_VPID);
        let ept_vpid_cap = self.ept_vpid_cap.filter(|_| ept || vpid).map(|v| {
            let mut v = v & features.ept_vpid.bits();
            if !ept {
                v &= !EptVpidCapabilities::EPT_BITS;
            }
            if !vpid {
                v &= !EptVpidCapabilities::VPID_BITS;
            }
            v
        });
        let vmfunc = self
            .vmfunc
            .filter(|_| secondary1.contains(SecondaryControls::ENABLE_VM_FUNCTIONS))
            .map(|v| v & features.vm_functions.bits());

        VmxCapabilities {
            basic: self.basic,
            pinbased_ctls: control(self.pinbased_ctls, pin),
            procbased_ctls,
            exit_ctls: control(self.exit_ctls, exit),
            entry_ctls: control(self.entry_ctls, entry),
            misc: self.misc & (!MiscData::FLAG_BITS | features.misc_flags),
            cr0_fixed0: self.cr0_fixed0,
            cr0_fixed1: self.cr0_fixed1,
            cr4_fixed0: self.cr4_fixed0,
            cr4_fixed1: self.cr4_fixed1,
            vmcs_enum: self.vmcs_enum,
            procbased_ctls2,
            ept_vpid_cap,
            true_pinbased_ctls: self.true_pinbased_ctls.map(|v| control(v, pin)),
            true_procbased_ctls,
            true_exit_ctls: self.true_exit_ctls.map(|v| control(v, exit)),
            true_entry_ctls: self.true_entry_ctls.map(|v| control(v, entry)),
            vmfunc,
            procbased_ctls3,
        }
    }
}

/// The VMX features the nested server emulates for an L1 hypervisor: the masks
/// [`VmxCapabilities::filtered`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NestedFeatures {
    /// Pin-based controls L1 may set.
    pub pin_based: PinBasedControls,
    /// Primary processor-based controls L1 may set.
    pub primary: ProcessorBasedControls,
    /// Secondary controls L1 may set.
    pub secondary: SecondaryControls,
    /// Tertiary controls L1 may set.
    pub tertiary: TertiaryControls,
    /// VM-exit controls L1 may set.
    pub exit: ExitControls,
    /// VM-entry controls L1 may set.
    pub entry: EntryControls,
    /// EPT and VPID capabilities to report.
    pub ept_vpid: EptVpidCapabilities,
    /// VM functions to report.
    pub vm_functions: VmFunctions,
    /// IA32_VMX_MISC flag bits ([`MiscData::FLAG_BITS`]) to report; numeric fields are kept.
    pub misc_flags: u64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bochs 2.7 `corei7_skylake_x` (docs/emulators.md): IA32_VMX_BASIC and EPT_VPID_CAP as
    /// read in the emulator; the control MSRs are made up in the same style. (The `nested`
    /// tests start from it too.)
    pub(crate) fn bochs() -> VmxCapabilities {
        VmxCapabilities {
            basic: 0x00d8_1000_0000_002b,
            pinbased_ctls: 0x0000_007f_0000_0016,
            procbased_ctls: 0xfff9_fffe_0401_e172,
            exit_ctls: 0x00ff_ffff_0003_6dff,
            entry_ctls: 0x0000_f3ff_0000_11ff,
            misc: 0x0000_0000_0000_01e5,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0037_27ff,
            vmcs_enum: 0x2e,
            // No APICv: bits 0, 4, 8, 9 of the secondary controls are not allowed-1.
            procbased_ctls2: Some(0x0013_70ee_0000_0000),
            ept_vpid_cap: Some(0x0000_0f01_0633_4141),
            true_pinbased_ctls: Some(0x0000_007f_0000_0016),
            true_procbased_ctls: Some(0xfff9_fffe_0400_6172),
            true_exit_ctls: Some(0x00ff_ffff_0003_6dfb),
            true_entry_ctls: Some(0x0000_f3ff_0000_11fb),
            vmfunc: Some(1),
            procbased_ctls3: None,
        }
    }

    /// A made-up KVM-like nested CPU: no TRUE MSRs, tertiary controls present, no VPID.
    fn kvm_like() -> VmxCapabilities {
        VmxCapabilities {
            basic: 0x0058_1000_0000_0001,
            pinbased_ctls: 0x0000_00ff_0000_0016,
            procbased_ctls: 0xfffb_fffe_0401_e172,
            exit_ctls: 0x003f_ffff_0003_6dff,
            entry_ctls: 0x0000_f3ff_0000_11ff,
            misc: 0x2004_01e5,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0077_27ff,
            vmcs_enum: 0x34,
            procbased_ctls2: Some(0x0000_00cb_0000_0000),
            ept_vpid_cap: Some(0x0000_0000_0671_4141),
            true_pinbased_ctls: None,
            true_procbased_ctls: None,
            true_exit_ctls: None,
            true_entry_ctls: None,
            vmfunc: None,
            procbased_ctls3: Some(0x10),
        }
    }

    #[test]
    fn bochs_basic_decodes_revision_size_memory_type_and_true_controls() {
        let caps = bochs();
        assert_eq!(caps.revision_id(), 0x2b);
        assert_eq!(caps.vmcs_region_size(), 4096);
        assert_eq!(caps.vmcs_memory_type(), VmcsMemoryType::WriteBack);
        assert!(caps.true_controls());
        assert!(caps.ins_outs_information());
        assert!(!caps.physical_address_width_32());
        assert!(!caps.dual_monitor());
    }

    #[test]
    fn bochs_ept_vpid_caps_decode_per_appendix_a10() {
        let ept = bochs().ept_vpid();
        use EptVpidCapabilities as C;
        for cap in [
            C::EXECUTE_ONLY,
            C::PAGE_WALK_LENGTH_4,
            C::MEMORY_TYPE_UC,
            C::MEMORY_TYPE_WB,
            C::PAGES_2M,
            C::PAGES_1G,
            C::INVEPT,
            C::ACCESSED_DIRTY_FLAGS,
            C::INVEPT_SINGLE_CONTEXT,
            C::INVEPT_ALL_CONTEXT,
            C::INVVPID,
            C::INVVPID_INDIVIDUAL_ADDRESS,
            C::INVVPID_SINGLE_CONTEXT,
            C::INVVPID_ALL_CONTEXT,
            C::INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS,
        ] {
            assert!(ept.contains(cap), "{cap:?}");
        }
        assert!(!ept.contains(C::PAGE_WALK_LENGTH_5));
        assert!(!ept.contains(C::ADVANCED_EPT_VIOLATION_INFORMATION));
        assert_eq!(ept.bits(), 0xf01_0633_4141);
    }

    #[test]
    fn from_msrs_reads_only_msrs_that_exist() {
        let reference = bochs();
        let mut read = Vec::new();
        let caps = VmxCapabilities::from_msrs(|index| {
            read.push(index);
            reference
                .msr(index)
                .expect("read an MSR that does not exist")
        });
        assert_eq!(caps, reference);
        assert!(!read.contains(&msr::IA32_VMX_PROCBASED_CTLS3));

        let reference = kvm_like();
        let caps = VmxCapabilities::from_msrs(|index| {
            reference
                .msr(index)
                .expect("read an MSR that does not exist")
        });
        assert_eq!(caps, reference);
    }

    #[test]
    fn negotiation_sets_required_desired_allowed_and_must_be_one_bits() {
        // allowed0 = 0x16 (default1), allowed1 = 0x7f.
        assert_eq!(
            negotiate(0x01, 0x20 | 0x80, 0x16, 0x7f),
            Ok(0x01 | 0x20 | 0x16)
        );
        assert_eq!(negotiate(0, 0, 0x16, 0x7f), Ok(0x16));
    }

    #[test]
    fn negotiation_fails_only_when_a_required_bit_is_not_allowed1() {
        assert_eq!(
            negotiate(0x81, 0, 0x16, 0x7f),
            Err(ControlError { missing: 0x80 })
        );
        // Desired-but-unavailable bits are dropped silently.
        assert_eq!(negotiate(0x01, 0xff00, 0x16, 0x7f), Ok(0x17));
    }

    #[test]
    fn true_msrs_free_default1_bits_when_basic_bit_55_is_set() {
        let caps = bochs();
        // CR3-load/store exiting are default1: must be 1 in PROCBASED_CTLS, free in TRUE.
        let cr3 =
            ProcessorBasedControls::CR3_LOAD_EXITING | ProcessorBasedControls::CR3_STORE_EXITING;
        let primary = caps.negotiate_primary(
            ProcessorBasedControls::empty(),
            ProcessorBasedControls::empty(),
        );
        assert!(!primary.unwrap().intersects(cr3));
        let mut no_true = caps;
        no_true.basic &= !VmxCapabilities::BASIC_TRUE_CONTROLS;
        let primary = no_true.negotiate_primary(
            ProcessorBasedControls::empty(),
            ProcessorBasedControls::empty(),
        );
        assert!(primary.unwrap().contains(cr3));
    }

    #[test]
    fn bochs_refuses_apicv_when_required_and_drops_it_when_desired() {
        let caps = bochs();
        let apicv = SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY
            | SecondaryControls::APIC_REGISTER_VIRTUALIZATION;
        let err = caps.negotiate_secondary(
            SecondaryControls::ENABLE_EPT | apicv,
            SecondaryControls::empty(),
        );
        assert_eq!(
            err,
            Err(ControlError {
                missing: apicv.bits() as u64
            })
        );
        let ok = caps.negotiate_secondary(
            SecondaryControls::ENABLE_EPT,
            apicv | SecondaryControls::ENABLE_VPID,
        );
        assert_eq!(
            ok,
            Ok(SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID)
        );
        assert!(
            !caps
                .negotiate_pin_based(
                    PinBasedControls::empty(),
                    PinBasedControls::PROCESS_POSTED_INTERRUPTS
                )
                .unwrap()
                .contains(PinBasedControls::PROCESS_POSTED_INTERRUPTS)
        );
    }

    #[test]
    fn negotiate_all_activates_secondary_controls_and_reports_the_failing_class() {
        let caps = bochs();
        let required = ControlSet {
            pin_based: PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING,
            primary: ProcessorBasedControls::USE_MSR_BITMAPS
                | ProcessorBasedControls::USE_IO_BITMAPS,
            secondary: SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST,
            exit: ExitControls::HOST_ADDRESS_SPACE_SIZE,
            entry: EntryControls::LOAD_IA32_EFER,
            ..ControlSet::default()
        };
        let set = caps
            .negotiate_all(&required, &ControlSet::default())
            .unwrap();
        assert!(
            set.primary
                .contains(ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS)
        );
        assert!(
            !set.primary
                .contains(ProcessorBasedControls::ACTIVATE_TERTIARY_CONTROLS)
        );
        assert!(caps.primary_settings().permits(set.primary.bits() as u64));
        assert!(caps.exit_settings().permits(set.exit.bits() as u64));

        let mut too_much = required;
        too_much.tertiary = TertiaryControls::IPI_VIRTUALIZATION;
        assert_eq!(
            caps.negotiate_all(&too_much, &ControlSet::default()),
            Err(NegotiationError {
                class: ControlClass::Tertiary,
                missing: 0x10
            })
        );
        let kvm = kvm_like();
        let set = kvm
            .negotiate_all(&too_much, &ControlSet::default())
            .unwrap();
        assert!(
            set.primary
                .contains(ProcessorBasedControls::ACTIVATE_TERTIARY_CONTROLS)
        );
        assert_eq!(set.tertiary, TertiaryControls::IPI_VIRTUALIZATION);
        // kvm_like has no VPID: requiring it names the secondary class.
        too_much.secondary |= SecondaryControls::ENABLE_VPID;
        assert_eq!(
            kvm.negotiate_all(&too_much, &ControlSet::default()),
            Err(NegotiationError {
                class: ControlClass::Secondary,
                missing: 1 << 5
            })
        );
    }

    #[test]
    fn cr0_fixed_bits_force_pe_ne_pg_unless_unrestricted_guest() {
        let caps = bochs();
        assert_eq!(caps.fixed_cr0(0, false), 0x8000_0021);
        assert_eq!(caps.fixed_cr0(0, true), CR0_NE);
        assert!(caps.cr0_is_valid(0x8000_0031, false));
        assert!(!caps.cr0_is_valid(0x11, false));
        assert!(caps.cr0_is_valid(0x30, true));
        // CR0 bits above 31 are clear in FIXED1.
        assert_eq!(caps.fixed_cr0(1 << 40, true), CR0_NE);
    }

    #[test]
    fn cr4_fixed_bits_force_vmxe_and_clear_unsupported_bits() {
        let caps = bochs();
        assert_eq!(caps.fixed_cr4(0), CR4_VMXE);
        assert_eq!(caps.fixed_cr4(1 << 22), CR4_VMXE);
        assert!(caps.cr4_is_valid(CR4_VMXE | 0x20));
        assert!(!caps.cr4_is_valid(0x20));
    }

    #[test]
    fn misc_decodes_timer_rate_activity_states_and_list_size() {
        let misc = kvm_like().misc();
        assert_eq!(misc.preemption_timer_tsc_shift, 5);
        assert!(misc.stores_lma_on_exit);
        assert!(misc.activity_hlt && misc.activity_shutdown && misc.activity_wait_for_sipi);
        assert_eq!(misc.cr3_target_count, 4);
        assert_eq!(misc.max_msr_list_entries, 512);
        assert!(misc.vmwrite_any_field);
        assert_eq!(kvm_like().max_vmcs_index(), 0x1a);
    }

    #[test]
    fn filtered_limits_allowed1_to_the_mask_and_keeps_allowed0() {
        let host = bochs();
        let features = NestedFeatures {
            pin_based: PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING,
            primary: ProcessorBasedControls::HLT_EXITING
                | ProcessorBasedControls::USE_MSR_BITMAPS
                | ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS,
            secondary: SecondaryControls::ENABLE_EPT
                | SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY,
            exit: ExitControls::HOST_ADDRESS_SPACE_SIZE,
            entry: EntryControls::IA32E_MODE_GUEST,
            ept_vpid: EptVpidCapabilities::PAGE_WALK_LENGTH_4
                | EptVpidCapabilities::MEMORY_TYPE_WB
                | EptVpidCapabilities::INVEPT
                | EptVpidCapabilities::INVEPT_ALL_CONTEXT
                | EptVpidCapabilities::INVVPID,
            ..NestedFeatures::default()
        };
        let l1 = host.filtered(&features);
        let pairs = [
            (
                host.pinbased_ctls,
                l1.pinbased_ctls,
                features.pin_based.bits(),
            ),
            (
                host.procbased_ctls,
                l1.procbased_ctls,
                features.primary.bits(),
            ),
            (host.exit_ctls, l1.exit_ctls, features.exit.bits()),
            (host.entry_ctls, l1.entry_ctls, features.entry.bits()),
            (
                host.true_pinbased_ctls.unwrap(),
                l1.true_pinbased_ctls.unwrap(),
                features.pin_based.bits(),
            ),
            (
                host.true_procbased_ctls.unwrap(),
                l1.true_procbased_ctls.unwrap(),
                features.primary.bits(),
            ),
            (
                host.true_exit_ctls.unwrap(),
                l1.true_exit_ctls.unwrap(),
                features.exit.bits(),
            ),
            (
                host.true_entry_ctls.unwrap(),
                l1.true_entry_ctls.unwrap(),
                features.entry.bits(),
            ),
        ];
        for (host_msr, l1_msr, mask) in pairs {
            let (h, f) = (
                AllowedSettings::from_msr(host_msr),
                AllowedSettings::from_msr(l1_msr),
            );
            assert_eq!(f.allowed0, h.allowed0);
            assert_eq!(f.allowed1, h.allowed1 & (mask as u64 | h.allowed0));
            assert_eq!(
                f.allowed1 & !h.allowed1,
                0,
                "never more than the host allows"
            );
        }
        let secondary = AllowedSettings::from_msr(l1.procbased_ctls2.unwrap());
        // The host lacks virtual-interrupt delivery: the mask cannot add it.
        assert_eq!(
            secondary.allowed1,
            SecondaryControls::ENABLE_EPT.bits() as u64
        );
        // VPID is not allowed to L1, so the VPID half vanishes; VM functions vanish too.
        assert_eq!(
            l1.ept_vpid(),
            EptVpidCapabilities::PAGE_WALK_LENGTH_4
                | EptVpidCapabilities::MEMORY_TYPE_WB
                | EptVpidCapabilities::INVEPT
                | EptVpidCapabilities::INVEPT_ALL_CONTEXT
        );
        assert_eq!(l1.vmfunc, None);
        assert_eq!(l1.misc & MiscData::FLAG_BITS, 0);
        assert_eq!(l1.misc & 0x1f, host.misc & 0x1f);
        assert_eq!(l1.basic, host.basic);
    }

    #[test]
    fn filtered_without_secondary_controls_hides_the_dependent_msrs() {
        let l1 = bochs().filtered(&NestedFeatures {
            primary: ProcessorBasedControls::HLT_EXITING,
            secondary: SecondaryControls::all(),
            ept_vpid: EptVpidCapabilities::all(),
            ..NestedFeatures::default()
        });
        assert_eq!(l1.procbased_ctls2, None);
        assert_eq!(l1.ept_vpid_cap, None);
        assert_eq!(l1.vmfunc, None);
        assert_eq!(l1.msr(msr::IA32_VMX_PROCBASED_CTLS2), None);
        // What the filtered copy reports, from_msrs reads back unchanged.
        assert_eq!(VmxCapabilities::from_msrs(|i| l1.msr(i).unwrap()), l1);
    }
}
