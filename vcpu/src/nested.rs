//! VMX for an L1 hypervisor: VMXON to INVVPID emulated, VM-entry checks, the L2 context, and
//! the reflection of L2's VM exits into L1's VMCS.
//!
//! This is the library half of the nested VMM server: everything that is VMX semantics and no
//! system call. The server owns the vCPU objects and the shadow EPTs; it hands this module the
//! exits of L1 and L2 (decoded once by [`crate::exit::decode`]), L1 guest-physical memory
//! through [`L1Memory`], and applies what comes back ([`Outcome`], [`L2Entry`], [`L1Resume`])
//! with its `VcpuWriteState` calls and exit replies.
//!
//! # What L1 sees
//!
//! [`advertised`] filters the host's capability MSRs to [`NESTED_FEATURES`], the feature list of
//! `docs/nested.md`; IA32_FEATURE_CONTROL reads [`FEATURE_CONTROL_VALUE`]. Every check below
//! is made against those advertised MSRs, never the host's, so what L1 may set is exactly what
//! it was told it may set (SDM Vol. 3D Appendix A).
//!
//! # VMCS12 storage
//!
//! A VMCS of L1 ("VMCS12", by L1's guest-physical address) lives in a [`VmcsImage`] while it is
//! active. [`NestedVmx`] keeps up to [`VMCS_CACHE_SLOTS`] of them; VMPTRLD of another one when
//! all slots are taken evicts a non-current one (clear ones first, then the least recently
//! used), writing it back to its region in L1 memory. VMCLEAR writes a changed VMCS back and
//! drops it from the cache (SDM Vol. 3C §25.11.3: after VMCLEAR the data is in memory and the
//! VMCS is inactive). The in-memory format is this module's own (the VMCS region format is
//! implementation-specific, §25.2): bytes 0-3 the revision identifier, 4-7 the VMX-abort
//! indicator, 8-15 [`REGION_MAGIC`], 16-23 the launch state, then one u64 per field of
//! [`ALL_FIELDS`]. A region without the magic reads as a fresh VMCS: every field 0, clear.
//! [`advertised`] reports a region size of 4096 bytes, which holds this format.
//!
//! # Section references
//!
//! SDM Vol. 3C: §26.1-26.2 (instructions and events that cause VM exits), §27.2 (checks on
//! controls and host state, VMfailValid 7 and 8), §27.3 (guest-state checks and loading), §27.4
//! (VM-entry MSR loading), §27.8 (VM-entry failures), §28.2-28.6 (recording exit information,
//! saving guest state, loading host state), §31.2 (conventions: VMsucceed, VMfail), §31.3 (the
//! instructions' pseudocode), §31.4 (error numbers).

use crate::controls::{
    CR0_PE, CR0_PG, CR4_VMXE, EntryControls, EptVpidCapabilities, ExitControls, MiscData,
    NestedFeatures, PinBasedControls, ProcessorBasedControls, SecondaryControls, TertiaryControls,
    VmFunctions, VmxCapabilities,
};
use crate::exit::{
    CrAccess, EventInfo, EventType, ExitReasonField, Gpr, Operand, RawExit, SegmentRegister,
    VmExit, VmxInstr, vector,
};
use crate::message::{
    ControlState, DescriptorTable, EventInjection, GuestState, Reply, ResumeAction, SERVER_ENTRY,
    SERVER_EXCEPTION_BITMAP, SERVER_PRIMARY, SERVER_SECONDARY, Segment, StateMask,
};
use crate::qualification::EptViolationQualification;
use crate::vmcs::{
    ALL_FIELDS, ActivityState, Interruptibility, VmInstructionError, VmcsAccess, VmcsField,
    VmcsImage,
};

// ---------------------------------------------------------------------------------------------
// L1 memory
// ---------------------------------------------------------------------------------------------

/// L1 guest-physical memory as the server reaches it (through L1's EPT object).
///
/// Accesses are 8 bytes, little-endian, at any address (VMX structures are 4 KiB aligned, so
/// the library's own accesses are 8-byte aligned except for VMREAD/VMWRITE memory operands).
/// A read of memory that is not backed returns `None`; the library then behaves as the SDM
/// does for a physical address with no memory behind it: it reads all ones. An implementation
/// that can provide memory on demand (the L0 pager) should do so inside `read_u64` and
/// `write_u64`.
pub trait L1Memory {
    /// Reads the u64 at `gpa`; `None` if not backed.
    fn read_u64(&mut self, gpa: u64) -> Option<u64>;
    /// Writes the u64 at `gpa`; `false` if not backed (the write is lost).
    fn write_u64(&mut self, gpa: u64, value: u64) -> bool;

    /// Writes the u32 at `gpa` (read-modify-write of 8 bytes unless overridden).
    fn write_u32(&mut self, gpa: u64, value: u32) -> bool {
        let old = self.read_u64(gpa).unwrap_or(0);
        self.write_u64(gpa, (old & !0xffff_ffff) | u64::from(value))
    }
}

/// Reads `gpa`, all ones if not backed.
fn read_or_ones(mem: &mut impl L1Memory, gpa: u64) -> u64 {
    mem.read_u64(gpa).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Architectural constants
// ---------------------------------------------------------------------------------------------

/// RFLAGS bits (SDM Vol. 1 §3.4.3).
pub mod rflags {
    /// Carry flag.
    pub const CF: u64 = 1 << 0;
    /// Bit 1, always 1.
    pub const FIXED1: u64 = 1 << 1;
    /// Parity flag.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry flag.
    pub const AF: u64 = 1 << 4;
    /// Zero flag.
    pub const ZF: u64 = 1 << 6;
    /// Sign flag.
    pub const SF: u64 = 1 << 7;
    /// Trap flag.
    pub const TF: u64 = 1 << 8;
    /// Interrupt-enable flag.
    pub const IF: u64 = 1 << 9;
    /// Overflow flag.
    pub const OF: u64 = 1 << 11;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// The six arithmetic flags VMsucceed and VMfail set or clear (SDM Vol. 3C §31.2).
    pub const ARITHMETIC: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits that must be 0 for VM entry: 63:22, 15, 5, 3 (SDM Vol. 3C §27.3.1.4).
    pub const RESERVED: u64 = !0x3f_ffff | (1 << 15) | (1 << 5) | (1 << 3);
}

const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
/// CR0 bits VM entry never modifies: ET, NW, CD and reserved 15:6, 17, 28:19 (§27.3.2.1).
const CR0_KEPT_ON_ENTRY: u64 = CR0_ET | CR0_NW | CR0_CD | 0xffc0 | (1 << 17) | 0x1ff8_0000;
/// CR0 bits VM exit never modifies: those, and bits 63:32 (§28.5.1).
const CR0_KEPT_ON_EXIT: u64 = CR0_KEPT_ON_ENTRY | 0xffff_ffff_0000_0000;
const CR0_TS: u64 = 1 << 3;
const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;

const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
/// IA32_EFER bits an Intel processor defines; the rest are reserved.
const EFER_DEFINED: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

/// DR7 after a VM exit (§28.5.1), and its bits fixed on VM entry (§27.3.2.1).
const DR7_INIT: u64 = 0x400;

/// Segment access-rights bits in the VMX format (SDM Vol. 3C §25.4.1, Table 25-2).
mod ar {
    pub const TYPE: u32 = 0xf;
    pub const S: u32 = 1 << 4;
    pub const DPL_SHIFT: u32 = 5;
    pub const P: u32 = 1 << 7;
    pub const RESERVED_11_8: u32 = 0xf00;
    pub const L: u32 = 1 << 13;
    pub const DB: u32 = 1 << 14;
    pub const G: u32 = 1 << 15;
    pub const UNUSABLE: u32 = 1 << 16;
    pub const RESERVED_31_17: u32 = 0xfffe_0000;

    pub const fn dpl(ar: u32) -> u32 {
        (ar >> DPL_SHIFT) & 3
    }
}

/// IA32_FEATURE_CONTROL (SDM Vol. 4 Table 2-2).
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
/// What IA32_FEATURE_CONTROL reads for L1: locked (bit 0), VMX outside SMX (bit 2).
pub const FEATURE_CONTROL_VALUE: u64 = 0x5;

/// MSR indices this module loads and stores for VM-entry/exit MSR areas (SDM Vol. 4).
pub mod msr_index {
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// IA32_PAT.
    pub const IA32_PAT: u32 = 0x277;
    /// IA32_EFER.
    pub const IA32_EFER: u32 = 0xC000_0080;
    /// IA32_STAR.
    pub const IA32_STAR: u32 = 0xC000_0081;
    /// IA32_LSTAR.
    pub const IA32_LSTAR: u32 = 0xC000_0082;
    /// IA32_CSTAR.
    pub const IA32_CSTAR: u32 = 0xC000_0083;
    /// IA32_FMASK.
    pub const IA32_FMASK: u32 = 0xC000_0084;
    /// IA32_FS_BASE.
    pub const IA32_FS_BASE: u32 = 0xC000_0100;
    /// IA32_GS_BASE.
    pub const IA32_GS_BASE: u32 = 0xC000_0101;
    /// IA32_KERNEL_GS_BASE.
    pub const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;
}

/// Whether `value` is canonical for 48-bit linear addresses (4-level paging).
const fn canonical(value: u64) -> bool {
    (((value << 16) as i64) >> 16) as u64 == value
}

/// Whether every byte of a PAT value is a defined memory type (0, 1, 4, 5, 6, 7;
/// SDM Vol. 3C §27.2.2, §27.3.1.1).
const fn pat_valid(pat: u64) -> bool {
    let mut i = 0;
    while i < 8 {
        let memory_type = (pat >> (8 * i)) & 0xff;
        if !matches!(memory_type, 0 | 1 | 4 | 5 | 6 | 7) {
            return false;
        }
        i += 1;
    }
    true
}

/// The limit/granularity rule for a usable segment (§27.3.1.2, bit 15): limit bits 11:0 not
/// all 1 needs G = 0; limit bits 31:20 not all 0 needs G = 1.
const fn granularity_ok(limit: u32, access_rights: u32) -> bool {
    let g = access_rights & ar::G != 0;
    !((limit & 0xfff != 0xfff && g) || (limit >> 20 != 0 && !g))
}

// ---------------------------------------------------------------------------------------------
// Advertised capabilities
// ---------------------------------------------------------------------------------------------

/// The VMX features the server emulates for L1 (`docs/nested.md`, "VMX offered to L1"), as the
/// masks of [`VmxCapabilities::filtered`].
///
/// IA32_VMX_MISC reports only bit 5 (VM exits store EFER.LMA into the "IA-32e mode guest"
/// entry control, which [`NestedVmx::reflect_exit`] does): no activity state but active, no
/// VMWRITE to exit-information fields, no zero-length injection.
pub const NESTED_FEATURES: NestedFeatures = NestedFeatures {
    pin_based: PinBasedControls::EXTERNAL_INTERRUPT_EXITING.union(PinBasedControls::NMI_EXITING),
    primary: ProcessorBasedControls::HLT_EXITING
        .union(ProcessorBasedControls::UNCONDITIONAL_IO_EXITING)
        .union(ProcessorBasedControls::USE_IO_BITMAPS)
        .union(ProcessorBasedControls::USE_MSR_BITMAPS)
        .union(ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS),
    secondary: SecondaryControls::ENABLE_EPT
        .union(SecondaryControls::ENABLE_VPID)
        .union(SecondaryControls::UNRESTRICTED_GUEST),
    tertiary: TertiaryControls::empty(),
    exit: ExitControls::HOST_ADDRESS_SPACE_SIZE
        .union(ExitControls::SAVE_IA32_EFER)
        .union(ExitControls::LOAD_IA32_EFER)
        .union(ExitControls::SAVE_IA32_PAT)
        .union(ExitControls::LOAD_IA32_PAT)
        .union(ExitControls::ACKNOWLEDGE_INTERRUPT_ON_EXIT),
    entry: EntryControls::IA32E_MODE_GUEST
        .union(EntryControls::LOAD_IA32_EFER)
        .union(EntryControls::LOAD_IA32_PAT),
    ept_vpid: EptVpidCapabilities::PAGE_WALK_LENGTH_4
        .union(EptVpidCapabilities::MEMORY_TYPE_UC)
        .union(EptVpidCapabilities::MEMORY_TYPE_WB)
        .union(EptVpidCapabilities::PAGES_2M)
        .union(EptVpidCapabilities::PAGES_1G)
        .union(EptVpidCapabilities::INVEPT)
        .union(EptVpidCapabilities::INVEPT_SINGLE_CONTEXT)
        .union(EptVpidCapabilities::INVEPT_ALL_CONTEXT)
        .union(EptVpidCapabilities::INVVPID)
        .union(EptVpidCapabilities::INVVPID_SINGLE_CONTEXT)
        .union(EptVpidCapabilities::INVVPID_ALL_CONTEXT),
    vm_functions: VmFunctions::empty(),
    misc_flags: 1 << 5,
};

/// IA32_VMX_BASIC bit 49: dual-monitor treatment of SMIs and SMM (not emulated).
const BASIC_DUAL_MONITOR: u64 = 1 << 49;
/// IA32_VMX_BASIC bits 44:32: VMXON and VMCS region size.
const BASIC_REGION_SIZE: u64 = 0x1fff << 32;
/// The region size this module reports: a page, which holds its VMCS format.
pub const REGION_SIZE: u64 = 4096;

/// The capability MSRs L1 reads: `host` filtered to [`NESTED_FEATURES`] (see
/// [`VmxCapabilities::filtered`]), with three adjustments:
///
/// * the TRUE_* control MSRs also allow as 1 every bit the plain MSR reports as must-be-one
///   (SDM Vol. 3D §A.2: the TRUE MSRs only free "default1" bits, they never forbid what the plain
///   MSR demands; a hypervisor reading only the plain MSRs must be able to enter). Those bits
///   are reserved ones, CR3-load/store exiting and save/load debug controls, all of which this
///   module honours;
/// * IA32_VMX_BASIC reports a region size of [`REGION_SIZE`] and no dual-monitor treatment.
pub fn advertised(host: &VmxCapabilities) -> VmxCapabilities {
    let mut caps = host.filtered(&NESTED_FEATURES);
    let keep_default1 = |true_msr: &mut Option<u64>, plain: u64, host_true: Option<u64>| {
        if let (Some(value), Some(host_value)) = (true_msr.as_mut(), host_true) {
            *value |= ((plain & 0xffff_ffff) << 32) & host_value;
        }
    };
    keep_default1(
        &mut caps.true_pinbased_ctls,
        caps.pinbased_ctls,
        host.true_pinbased_ctls,
    );
    keep_default1(
        &mut caps.true_procbased_ctls,
        caps.procbased_ctls,
        host.true_procbased_ctls,
    );
    keep_default1(
        &mut caps.true_exit_ctls,
        caps.exit_ctls,
        host.true_exit_ctls,
    );
    keep_default1(
        &mut caps.true_entry_ctls,
        caps.entry_ctls,
        host.true_entry_ctls,
    );
    caps.basic = (caps.basic & !(BASIC_REGION_SIZE | BASIC_DUAL_MONITOR)) | (REGION_SIZE << 32);
    caps
}

// ---------------------------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------------------------

/// An event to inject into L1 instead of completing the instruction.
pub type Exception = EventInfo;

/// #UD.
const fn ud() -> Exception {
    EventInfo::hardware_exception(vector::UD, None)
}

/// #GP(0).
const fn gp0() -> Exception {
    EventInfo::hardware_exception(vector::GP, Some(0))
}

/// The result of an emulated VMX instruction.
///
/// The VMfail outcomes already wrote the VM-instruction error into the current VMCS12
/// (SDM Vol. 3C §31.2); the caller applies [`Outcome::rflags`] to L1's RFLAGS and completes the
/// instruction ([`Outcome::advances_rip`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // no_std, no allocation: the L1 state travels by value
pub enum Outcome {
    /// VMsucceed: CF, PF, AF, ZF, SF, OF cleared.
    Ok,
    /// VMsucceed, and VMREAD's register destination gets `value` (zero-extended; the caller
    /// writes it into L1's register).
    OkRead {
        /// The destination register.
        register: Gpr,
        /// The value read.
        value: u64,
    },
    /// VMfailInvalid: CF set, the other five cleared (no current VMCS to hold an error).
    VmFailInvalid,
    /// VMfailValid: ZF set, the other five cleared, the error number in the VM-instruction
    /// error field of the current VMCS12 (already written).
    VmFailValid(VmInstructionError),
    /// The instruction faults: inject this exception into L1; RIP and RFLAGS are unchanged.
    Inject(Exception),
    /// VMXOFF succeeded (VMsucceed): L1 left VMX operation, the server may drop its L2 vCPU
    /// and shadow EPTs of this virtual CPU.
    VmxOff,
    /// VMLAUNCH passed every check: L2 runs now. Build it with [`NestedVmx::l2_entry`]; L1's
    /// RIP is not advanced (L1 resumes at the host RIP on the next reflected exit).
    Launch,
    /// VMRESUME passed every check; as [`Outcome::Launch`].
    Resume,
    /// VMLAUNCH/VMRESUME failed on guest state or MSR loading (SDM Vol. 3C §27.8): a VM exit
    /// to L1 with bit 31 of the exit reason set; L1 resumes with this state (write it, do not
    /// advance RIP).
    EntryFailed(L1Resume),
    /// INVEPT succeeded (VMsucceed): the shadow engine drops what derives from these EPTs.
    InvalidateEpt(EptInvalidation),
    /// INVVPID succeeded (VMsucceed): flush L2's translations as described.
    InvalidateVpid(VpidInvalidation),
}

impl Outcome {
    /// L1's RFLAGS after the instruction (SDM Vol. 3C §31.2): VMsucceed clears the six
    /// arithmetic flags, VMfailInvalid sets CF, VMfailValid sets ZF; faults and VM entries
    /// leave RFLAGS alone.
    pub const fn rflags(&self, rflags: u64) -> u64 {
        let cleared = rflags & !rflags::ARITHMETIC;
        match self {
            Outcome::Ok
            | Outcome::OkRead { .. }
            | Outcome::VmxOff
            | Outcome::InvalidateEpt(_)
            | Outcome::InvalidateVpid(_) => cleared,
            Outcome::VmFailInvalid => cleared | rflags::CF,
            Outcome::VmFailValid(_) => cleared | rflags::ZF,
            Outcome::Inject(_) | Outcome::Launch | Outcome::Resume | Outcome::EntryFailed(_) => {
                rflags
            }
        }
    }

    /// Whether L1 continues after the instruction (RIP += instruction length): every VMsucceed
    /// and VMfail; not a fault, nor a VM entry or its failure.
    pub const fn advances_rip(&self) -> bool {
        !matches!(
            self,
            Outcome::Inject(_) | Outcome::Launch | Outcome::Resume | Outcome::EntryFailed(_)
        )
    }
}

/// What INVEPT invalidates (SDM Vol. 3C §31.3 INVEPT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EptInvalidation {
    /// Type 1: mappings derived from the EPT whose PML4 table is at `eptp & !0xfff`.
    SingleContext {
        /// The EPTP of the descriptor.
        eptp: u64,
    },
    /// Type 2: mappings derived from every EPT of L1.
    AllContext,
}

/// What INVVPID invalidates (SDM Vol. 3C §31.3 INVVPID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VpidInvalidation {
    /// Type 0: one linear address of one VPID (only if advertised).
    IndividualAddress {
        /// L1's VPID.
        vpid: u16,
        /// The linear address.
        linear: u64,
    },
    /// Type 1: every linear mapping of one VPID.
    SingleContext {
        /// L1's VPID.
        vpid: u16,
    },
    /// Type 2: every VPID but 0.
    AllContext,
    /// Type 3: one VPID, except global translations (only if advertised).
    SingleContextRetainingGlobals {
        /// L1's VPID.
        vpid: u16,
    },
}

// ---------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------

/// A resolved register or memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// A register and its value (the value is ignored for VMREAD's destination).
    Register {
        /// The register.
        gpr: Gpr,
        /// Its value when the instruction executed.
        value: u64,
    },
    /// A memory operand at this L1 guest-physical address (the caller translated the linear
    /// address through L1's paging; an operand crossing a page boundary must be contiguous
    /// there).
    Memory {
        /// L1 guest-physical address.
        gpa: u64,
    },
}

/// A VMX instruction of L1 with its operands resolved: [`VmExit::VmxInstruction`] with the
/// memory operand's guest-physical address and the register values filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Instruction {
    /// Which instruction.
    pub kind: VmxInstr,
    /// The r/m operand: the 64-bit pointer operand of VMXON/VMCLEAR/VMPTRLD (memory holding
    /// the pointer), VMPTRST's destination, VMREAD's destination, VMWRITE's source,
    /// INVEPT/INVVPID's 128-bit descriptor.
    pub operand: Option<Place>,
    /// The value of Reg2: the field encoding of VMREAD/VMWRITE, the type of INVEPT/INVVPID.
    pub reg2: Option<u64>,
}

/// Resolves a decoded VMX-instruction exit of L1 into an [`Instruction`]: register values from
/// `l1`, the memory operand's linear address from its segment, base, index, scale and
/// displacement (SDM Vol. 3C §28.2.5), then `translate` (the caller's walk of L1's paging,
/// returning the fault to inject when the walk fails) to a guest-physical address.
///
/// `None` if `exit` is not a VMX instruction. In 64-bit mode a non-canonical address gives
/// #GP(0) (#SS(0) through SS); outside it segment limits are not checked.
pub fn resolve(
    exit: &VmExit,
    l1: &GuestState,
    mut translate: impl FnMut(u64) -> Result<u64, Exception>,
) -> Option<Result<Instruction, Exception>> {
    let VmExit::VmxInstruction {
        instruction,
        operand,
        reg2,
    } = *exit
    else {
        return None;
    };
    let long_mode = L1Context::from_state(l1).long_mode;
    let operand = match operand {
        None => None,
        Some(Operand::Register(gpr)) => Some(Place::Register {
            gpr,
            value: l1.gpr(gpr),
        }),
        Some(Operand::Memory(m)) => {
            let base = match m.segment {
                SegmentRegister::Es => l1.es.base,
                SegmentRegister::Cs => l1.cs.base,
                SegmentRegister::Ss => l1.ss.base,
                SegmentRegister::Ds => l1.ds.base,
                SegmentRegister::Fs => l1.fs.base,
                SegmentRegister::Gs => l1.gs.base,
            };
            let linear = m.linear_address(|g| l1.gpr(g), base, long_mode);
            if long_mode && !canonical(linear) {
                let vector = if m.segment == SegmentRegister::Ss {
                    vector::SS
                } else {
                    vector::GP
                };
                return Some(Err(EventInfo::hardware_exception(vector, Some(0))));
            }
            match translate(linear) {
                Ok(gpa) => Some(Place::Memory { gpa }),
                Err(fault) => return Some(Err(fault)),
            }
        }
    };
    Some(Ok(Instruction {
        kind: instruction,
        operand,
        reg2: reg2.map(|g| l1.gpr(g)),
    }))
}

// ---------------------------------------------------------------------------------------------
// L1 context
// ---------------------------------------------------------------------------------------------

/// The state of L1 a VMX instruction depends on (SDM Vol. 3C §31.3, the checks before any
/// operand is read), as L1 sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Context {
    /// CR0 as L1 sees it (read shadow for the bits the server owns).
    pub cr0: u64,
    /// CR4 as L1 sees it (CR4.VMXE in particular is usually in the read shadow).
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// 64-bit mode: IA32_EFER.LMA and CS.L.
    pub long_mode: bool,
    /// Compatibility mode: IA32_EFER.LMA and not CS.L (VMX instructions #UD there).
    pub compatibility_mode: bool,
    /// CPL (SS.DPL).
    pub cpl: u8,
    /// Blocking by MOV SS (VMLAUNCH/VMRESUME fail with error 26).
    pub blocked_by_mov_ss: bool,
}

impl L1Context {
    /// The context from L1's exit message state. Needs the groups of [`L1_VMX_EXIT_STATE`];
    /// with [`StateMask::CONTROLS`] absent (masks 0) the real CR0/CR4 are taken as L1's view.
    pub fn from_state(l1: &GuestState) -> L1Context {
        let c = &l1.controls;
        let cr0 = (l1.cr0 & !c.cr0_guest_host_mask) | (c.cr0_read_shadow & c.cr0_guest_host_mask);
        let cr4 = (l1.cr4 & !c.cr4_guest_host_mask) | (c.cr4_read_shadow & c.cr4_guest_host_mask);
        let lma = l1.efer & EFER_LMA != 0;
        L1Context {
            cr0,
            cr4,
            efer: l1.efer,
            rflags: l1.rflags,
            long_mode: lma && l1.cs.long_mode(),
            compatibility_mode: lma && !l1.cs.long_mode(),
            cpl: ((l1.ss.ar >> 5) & 3) as u8,
            blocked_by_mov_ss: l1
                .interruptibility
                .contains(Interruptibility::BLOCKING_BY_MOV_SS),
        }
    }

    /// Operand-size mask of VMREAD/VMWRITE and the INVEPT/INVVPID type register: 64 bits in
    /// 64-bit mode, else 32.
    const fn operand_mask(&self) -> u64 {
        if self.long_mode {
            u64::MAX
        } else {
            0xffff_ffff
        }
    }
}

/// The groups of L1's state the server must capture on L1's VMX-instruction exits (and on
/// RDMSR/WRMSR of the VMX MSRs): registers, mode, CPL, the CR read shadows, and what VM entry
/// carries from L1 into L2 (CR2, DR7, EFER, PAT, the SYSCALL MSRs).
pub const L1_VMX_EXIT_STATE: StateMask = StateMask::GPRS
    .union(StateMask::RIP_RSP_RFLAGS)
    .union(StateMask::CR)
    .union(StateMask::DR7)
    .union(StateMask::SEGMENTS)
    .union(StateMask::EFER_PAT)
    .union(StateMask::SYSCALL_MSRS)
    .union(StateMask::INTERRUPTIBILITY_ACTIVITY)
    .union(StateMask::CONTROLS);

/// The groups of L2's state the server must capture on an L2 exit it reflects to L1 (or read
/// with `VcpuReadState` before [`NestedVmx::reflect_exit`]): the guest-state area of VMCS12
/// (SDM Vol. 3C §28.3) and what a VM exit carries from L2 into L1 (GPRs, CR2, SYSCALL MSRs).
pub const L2_EXIT_STATE: StateMask = StateMask::GPRS
    .union(StateMask::RIP_RSP_RFLAGS)
    .union(StateMask::CR)
    .union(StateMask::DR7)
    .union(StateMask::SEGMENTS)
    .union(StateMask::DESCRIPTOR_TABLES)
    .union(StateMask::EFER_PAT)
    .union(StateMask::SYSENTER)
    .union(StateMask::SYSCALL_MSRS)
    .union(StateMask::INTERRUPTIBILITY_ACTIVITY)
    .union(StateMask::PDPTES);

/// The groups [`L1Resume`] writes into L1's vCPU.
pub const L1_RESUME_STATE: StateMask = StateMask::GPRS
    .union(StateMask::RIP_RSP_RFLAGS)
    .union(StateMask::CR)
    .union(StateMask::DR7)
    .union(StateMask::SEGMENTS)
    .union(StateMask::DESCRIPTOR_TABLES)
    .union(StateMask::EFER_PAT)
    .union(StateMask::SYSENTER)
    .union(StateMask::SYSCALL_MSRS)
    .union(StateMask::INTERRUPTIBILITY_ACTIVITY)
    .union(StateMask::EVENT_INJECTION);

/// The groups [`L2Entry`] writes into L2's vCPU.
pub const L2_ENTRY_STATE: StateMask = L1_RESUME_STATE
    .union(StateMask::TSC)
    .union(StateMask::CONTROLS)
    .union(StateMask::PDPTES);

// ---------------------------------------------------------------------------------------------
// What the server applies
// ---------------------------------------------------------------------------------------------

/// L1's state after a VM exit from L2 (reflected) or a failed VM entry: the host-state area of
/// VMCS12 loaded as SDM Vol. 3C §28.5 says, ready for L1's vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Resume {
    /// L1's new state; the groups of `mask` are meaningful.
    pub state: GuestState,
    /// The groups to write ([`L1_RESUME_STATE`]).
    pub mask: StateMask,
    /// A VMX abort (SDM Vol. 3C §28.7): the indicator written into bytes 4-7 of the VMCS12
    /// region (2: saving guest MSRs failed, 4: loading host MSRs failed). L1's virtual CPU is in
    /// the shutdown state: stop it instead of resuming.
    pub abort: Option<u32>,
}

impl L1Resume {
    /// The reply (or `VcpuWriteState` argument) that installs this state in L1's vCPU and
    /// resumes it at the host RIP; a stop after a VMX abort.
    pub fn reply(&self) -> Reply {
        match self.abort {
            Some(_) => Reply::new(ResumeAction::Stop),
            None => Reply::with_state(ResumeAction::Resume, self.mask, self.state),
        }
    }
}

/// What L0 itself needs of L2's vCPU, merged with L1's requests by [`NestedVmx::l2_entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L0Requirements {
    /// L2's vCPU controls as the kernel last reported them (the `CONTROLS` group of an exit
    /// message or `VcpuReadState`): the kernel-owned bits are echoed from here, as the
    /// host-isolation rule requires (`message` module, rule 3).
    pub current: ControlState,
    /// Server-owned primary controls L0 wants for itself (e.g. interrupt-window exiting while
    /// it holds an interrupt for L2), on top of L1's.
    pub primary: ProcessorBasedControls,
    /// Server-owned secondary controls L0 wants for itself ("unrestricted guest" is always
    /// L1's setting and is ignored here).
    pub secondary: SecondaryControls,
    /// Exceptions L0 intercepts for itself (with #PF, every page fault exits and
    /// [`NestedVmx::exit_belongs_to_l1`] applies L1's error-code mask and match).
    pub exception_bitmap: u32,
    /// CR0 bits L0 owns in addition to L1's (their read-shadow bits show L2's CR0).
    pub cr0_guest_host_mask: u64,
    /// CR4 bits L0 owns in addition to L1's.
    pub cr4_guest_host_mask: u64,
    /// L1's TSC offset: L2 sees L1's TSC (TSC offsetting is not offered to L1).
    pub tsc_offset: u64,
}

/// L2's context for a VM entry by L1: the state and controls to write into L2's vCPU, and what
/// the shadow-EPT engine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    /// L2's state: VMCS12's guest-state area loaded as SDM Vol. 3C §27.3.2 says, with what
    /// VM entry carries over from L1 (GPRs, CR2, the SYSCALL MSRs, and DR7, EFER and PAT when
    /// not loaded), VM-entry MSR loads applied, VMCS12's event injection, and the merged
    /// controls.
    pub state: GuestState,
    /// The groups to write ([`L2_ENTRY_STATE`]).
    pub mask: StateMask,
    /// VMLAUNCH (the first entry with this VMCS12 since VMCLEAR) rather than VMRESUME.
    pub launch: bool,
    /// L1's EPTP when "enable EPT" is 1 in VMCS12: the shadow EPT translates L2-physical
    /// addresses through it. `None`: L2 runs in L1's guest-physical space.
    pub eptp: Option<u64>,
    /// L1's VPID when "enable VPID" is 1.
    pub vpid: Option<u16>,
    /// L1's I/O bitmaps A and B when "use I/O bitmaps" is 1 (L2's I/O always exits to L0;
    /// [`NestedVmx::exit_belongs_to_l1`] consults them).
    pub io_bitmaps: Option<[u64; 2]>,
    /// L1's MSR bitmap when "use MSR bitmaps" is 1 (likewise).
    pub msr_bitmap: Option<u64>,
}

impl L2Entry {
    /// The `VcpuWriteState` argument for L2's vCPU, with `action` (e.g. a resume with the
    /// shadow EPT's binding).
    pub fn reply(&self, action: ResumeAction) -> Reply {
        Reply::with_state(action, self.mask, self.state)
    }
}

/// Which EPT fault of L2 the shadow engine found to be L1's (SDM Vol. 3C §29.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EptFault {
    /// L1's EPT does not permit the access: an EPT violation (exit reason 48) with this
    /// qualification, whose bits 3-6 are the permissions of L1's EPT entries (the engine's walk),
    /// bits 0-2, 7-8 and 12 those of the real exit.
    Violation(EptViolationQualification),
    /// L1's EPT has a misconfigured entry (reserved bits, unsupported memory type, write without
    /// read): an EPT misconfiguration (exit reason 49).
    Misconfiguration,
}

// ---------------------------------------------------------------------------------------------
// VMCS12 cache and region format
// ---------------------------------------------------------------------------------------------

/// How many VMCS12s one virtual CPU keeps in memory.
pub const VMCS_CACHE_SLOTS: usize = 8;
/// Bytes 8-15 of a VMCS12 region written by this module.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"capvVMCS");
const REGION_ABORT_INDICATOR: u64 = 4;
const REGION_MAGIC_OFFSET: u64 = 8;
const REGION_LAUNCH_STATE: u64 = 16;
const REGION_FIELDS: u64 = 24;
const _: () = assert!(REGION_FIELDS + 8 * ALL_FIELDS.len() as u64 <= REGION_SIZE);

/// One active VMCS12.
#[derive(Debug, Clone)]
struct Vmcs12 {
    /// L1 guest-physical address of its region.
    address: u64,
    image: VmcsImage,
    /// Launch state "launched" (else "clear").
    launched: bool,
    /// Differs from its region in L1 memory.
    dirty: bool,
    /// Recency for eviction.
    last_use: u64,
    /// Bumped whenever a field outside [`SHADOW_READ_WRITE`] and the exit-information fields
    /// changes value: what the VM-entry checks read besides the hot fields.
    stamp: u64,
    /// The last complete VM-entry check that passed, and what it depends on besides the image.
    verified: Option<Verified>,
    /// L2's state at the last exit saved into this VMCS12.
    saved: Option<GuestState>,
}

/// A complete VM-entry check that passed on a VMCS12 ([`NestedVmx::vm_entry`]'s fast path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verified {
    /// [`Vmcs12::stamp`] at the check.
    stamp: u64,
    /// L1's IA32_EFER.LMA (the host-state checks depend on it).
    lma: bool,
    /// Guest RFLAGS.VM (the segment checks depend on it, and RFLAGS is a shadowed field).
    virtual_8086: bool,
}

/// Groups of L2's entry state that a VMRESUME on the fast path does not write: L2's vCPU
/// object holds them since its exit, and VMCS12 has not changed them (VM-entry carries the
/// other groups over from L1, or takes them from the fields L1 writes without an exit).
const FAST_ENTRY_KEPT: StateMask = StateMask::SEGMENTS
    .union(StateMask::DESCRIPTOR_TABLES)
    .union(StateMask::SYSENTER)
    .union(StateMask::PDPTES)
    .union(StateMask::CONTROLS);

/// What a successful VM entry left for [`NestedVmx::l2_entry`] and the exit path.
#[derive(Debug, Clone)]
struct EntryRecord {
    launch: bool,
    /// A VMRESUME on the fast path (see [`NestedVmx::vm_entry`]).
    fast: bool,
    /// L1's state at VMLAUNCH/VMRESUME.
    l1: GuestState,
    /// L2's state without the controls.
    l2: GuestState,
}

/// The controls of a VMCS12, with the secondary controls 0 unless activated (§25.6.2).
#[derive(Debug, Clone, Copy)]
struct Controls12 {
    pin: PinBasedControls,
    primary: ProcessorBasedControls,
    secondary: SecondaryControls,
    exit: ExitControls,
    entry: EntryControls,
}

impl Controls12 {
    fn read(v: &VmcsImage) -> Controls12 {
        let primary = ProcessorBasedControls::from_bits_retain(
            v.read32(VmcsField::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS),
        );
        let secondary = if primary.contains(ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS) {
            SecondaryControls::from_bits_retain(
                v.read32(VmcsField::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS),
            )
        } else {
            SecondaryControls::empty()
        };
        Controls12 {
            pin: PinBasedControls::from_bits_retain(
                v.read32(VmcsField::PIN_BASED_VM_EXECUTION_CONTROLS),
            ),
            primary,
            secondary,
            exit: ExitControls::from_bits_retain(v.read32(VmcsField::PRIMARY_VM_EXIT_CONTROLS)),
            entry: EntryControls::from_bits_retain(v.read32(VmcsField::VM_ENTRY_CONTROLS)),
        }
    }
}

/// Guest segment fields: the one table in `message`.
const GUEST_SEGMENTS: [[VmcsField; 4]; 8] = crate::message::SEGMENT_FIELDS;

/// Positions of CS and SS in [`GUEST_SEGMENTS`].
const CS: usize = 1;
const SS: usize = 2;

const PDPTE_FIELDS: [VmcsField; 4] = [
    VmcsField::GUEST_PDPTE0,
    VmcsField::GUEST_PDPTE1,
    VmcsField::GUEST_PDPTE2,
    VmcsField::GUEST_PDPTE3,
];

/// A guest segment as read from a VMCS12 (VMX access-rights format).
#[derive(Debug, Clone, Copy)]
struct Seg {
    selector: u16,
    base: u64,
    limit: u32,
    ar: u32,
}

impl Seg {
    fn read(v: &VmcsImage, which: usize) -> Seg {
        let [selector, base, limit, ar] = GUEST_SEGMENTS[which];
        Seg {
            selector: v.read16(selector),
            base: v.read(base),
            limit: v.read32(limit),
            ar: v.read32(ar),
        }
    }

    const fn usable(&self) -> bool {
        self.ar & ar::UNUSABLE == 0
    }

    const fn kind(&self) -> u32 {
        self.ar & ar::TYPE
    }

    const fn rpl(&self) -> u32 {
        (self.selector & 3) as u32
    }

    /// P = 1, S as given, reserved bits 11:8 and 31:17 clear, G consistent with the limit.
    const fn basic_ok(&self, system: bool) -> bool {
        let s_ok = (self.ar & ar::S != 0) != system;
        s_ok && self.ar & ar::P != 0
            && self.ar & (ar::RESERVED_11_8 | ar::RESERVED_31_17) == 0
            && granularity_ok(self.limit, self.ar)
    }

    fn message(&self) -> Segment {
        Segment {
            selector: self.selector,
            ar: Segment::ar_from_vmx(self.ar),
            limit: self.limit,
            base: self.base,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MSR areas (SDM Vol. 3C §25.7.2, §25.8.2, §27.4, §28.4, §28.6)
// ---------------------------------------------------------------------------------------------

/// Loads an MSR-area entry into `state`; `false` where VM entry/exit would fail on it: x2APIC
/// MSRs, FS/GS base, SMM MSRs, and every MSR the vCPU state does not carry (a model-specific
/// refusal the SDM allows), or a value WRMSR would refuse.
fn load_msr(state: &mut GuestState, index: u32, value: u64) -> bool {
    use msr_index as M;
    match index {
        M::IA32_SYSENTER_CS => state.sysenter_cs = value as u32,
        M::IA32_SYSENTER_ESP if canonical(value) => state.sysenter_esp = value,
        M::IA32_SYSENTER_EIP if canonical(value) => state.sysenter_eip = value,
        M::IA32_PAT if pat_valid(value) => state.pat = value,
        M::IA32_STAR => state.star = value,
        M::IA32_LSTAR if canonical(value) => state.lstar = value,
        M::IA32_CSTAR if canonical(value) => state.cstar = value,
        M::IA32_FMASK if value >> 32 == 0 => state.sfmask = value,
        M::IA32_KERNEL_GS_BASE if canonical(value) => state.kernel_gs_base = value,
        _ => return false,
    }
    true
}

/// The value RDMSR would return for an MSR-store entry; `None` where the store fails.
fn stored_msr(state: &GuestState, index: u32) -> Option<u64> {
    use msr_index as M;
    Some(match index {
        M::IA32_SYSENTER_CS => state.sysenter_cs.into(),
        M::IA32_SYSENTER_ESP => state.sysenter_esp,
        M::IA32_SYSENTER_EIP => state.sysenter_eip,
        M::IA32_PAT => state.pat,
        M::IA32_EFER => state.efer,
        M::IA32_STAR => state.star,
        M::IA32_LSTAR => state.lstar,
        M::IA32_CSTAR => state.cstar,
        M::IA32_FMASK => state.sfmask,
        M::IA32_FS_BASE => state.fs.base,
        M::IA32_GS_BASE => state.gs.base,
        M::IA32_KERNEL_GS_BASE => state.kernel_gs_base,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// VMCS shadowing (SDM Vol. 3C §25.10)
// ---------------------------------------------------------------------------------------------

/// VMCS12 fields a server with VMCS shadowing lets L1 VMREAD without a VM exit, from a shadow
/// VMCS it keeps equal to the current VMCS12: the exit-information fields every exit handler
/// reads. L1's VMWRITEs of them still exit (they are read-only unless IA32_VMX_MISC\[29\]).
pub const SHADOW_READ_ONLY: [VmcsField; 11] = [
    VmcsField::VM_INSTRUCTION_ERROR,
    VmcsField::EXIT_REASON,
    VmcsField::EXIT_QUALIFICATION,
    VmcsField::GUEST_LINEAR_ADDRESS,
    VmcsField::GUEST_PHYSICAL_ADDRESS,
    VmcsField::VM_EXIT_INTERRUPTION_INFORMATION,
    VmcsField::VM_EXIT_INTERRUPTION_ERROR_CODE,
    VmcsField::IDT_VECTORING_INFORMATION,
    VmcsField::IDT_VECTORING_ERROR_CODE,
    VmcsField::VM_EXIT_INSTRUCTION_LENGTH,
    VmcsField::VM_EXIT_INSTRUCTION_INFORMATION,
];

/// VMCS12 fields L1 both VMREADs and VMWRITEs without a VM exit: what a handler changes after
/// most exits (advancing RIP, injecting an event). They live in the shadow VMCS while L1 runs;
/// the server takes them back ([`NestedVmx::pull_shadow`]) at L1's next VMX-instruction exit,
/// before anything reads them.
pub const SHADOW_READ_WRITE: [VmcsField; 7] = [
    VmcsField::GUEST_RIP,
    VmcsField::GUEST_RSP,
    VmcsField::GUEST_RFLAGS,
    VmcsField::GUEST_INTERRUPTIBILITY_STATE,
    VmcsField::VM_ENTRY_INTERRUPTION_INFORMATION,
    VmcsField::VM_ENTRY_EXCEPTION_ERROR_CODE,
    VmcsField::VM_ENTRY_INSTRUCTION_LENGTH,
];

// ---------------------------------------------------------------------------------------------
// The per-vCPU VMX state of L1
// ---------------------------------------------------------------------------------------------

/// The VMX state of one virtual CPU of L1: VMX operation (off or root, with its VMXON pointer),
/// the current-VMCS pointer, the active VMCS12s, and whether L2 runs (SDM Vol. 3C §24.1,
/// §25.1).
#[derive(Debug, Clone)]
pub struct NestedVmx {
    /// The capability MSRs advertised to L1 ([`advertised`]).
    caps: VmxCapabilities,
    /// IA32_VMX_MISC of `caps`, decoded once (the entry and exit paths consult it).
    misc: MiscData,
    /// L1's MAXPHYADDR (CPUID.80000008H:EAX\[7:0\] as the server reports it).
    maxphyaddr: u32,
    /// The VMXON pointer in VMX operation.
    vmxon: Option<u64>,
    /// Slot of the current VMCS.
    current: Option<usize>,
    cache: [Option<Vmcs12>; VMCS_CACHE_SLOTS],
    clock: u64,
    /// Some while L2 runs.
    entry: Option<EntryRecord>,
    /// The VMCS12 whose L2 exited last (reflected into it): L2's vCPU object holds that
    /// exit's state until the next VM entry.
    reflected_into: Option<u64>,
    /// L0's requirements at the last [`NestedVmx::l2_entry`] (L2's controls depend on them).
    last_l0: Option<L0Requirements>,
}

impl NestedVmx {
    /// A virtual CPU outside VMX operation, offering `caps` (the result of [`advertised`]) with
    /// physical addresses of `maxphyaddr` bits (clamped to 32..=52).
    pub fn new(caps: VmxCapabilities, maxphyaddr: u8) -> NestedVmx {
        NestedVmx {
            misc: caps.misc(),
            caps,
            maxphyaddr: u32::from(maxphyaddr).clamp(32, 52),
            vmxon: None,
            current: None,
            cache: [const { None }; VMCS_CACHE_SLOTS],
            clock: 0,
            entry: None,
            reflected_into: None,
            last_l0: None,
        }
    }

    /// The capability MSRs advertised to L1.
    pub fn capabilities(&self) -> &VmxCapabilities {
        &self.caps
    }

    /// Whether L1 is in VMX operation (after VMXON, before VMXOFF).
    pub fn in_vmx_operation(&self) -> bool {
        self.vmxon.is_some()
    }

    /// The VMXON pointer.
    pub fn vmxon_pointer(&self) -> Option<u64> {
        self.vmxon
    }

    /// The current-VMCS pointer, `None` when it is invalid (FFFFFFFF_FFFFFFFFH for VMPTRST).
    pub fn current_vmcs(&self) -> Option<u64> {
        self.current
            .and_then(|slot| self.slot(slot))
            .map(|v| v.address)
    }

    /// The current VMCS12.
    pub fn vmcs12(&self) -> Option<&VmcsImage> {
        self.current
            .and_then(|slot| self.slot(slot))
            .map(|v| &v.image)
    }

    /// Writes L1's values of shadowed read-write fields (read back from the shadow VMCS) into
    /// the current VMCS12, as L1's VMWRITEs would have. The server shadows only fields of
    /// [`SHADOW_READ_WRITE`] that [`NestedVmx::supported_field`] accepts; other fields are
    /// ignored here. Nothing happens without a current VMCS.
    pub fn pull_shadow(&mut self, values: &[(VmcsField, u64)]) {
        let Some(v) = self.current_mut() else {
            return;
        };
        for &(field, value) in values {
            if SHADOW_READ_WRITE.contains(&field) && v.image.read(field) != value {
                v.image.write(field, value);
                v.dirty = true;
            }
        }
    }

    /// Whether L2 runs (a VM entry succeeded and no exit was reflected since).
    pub fn in_l2(&self) -> bool {
        self.entry.is_some()
    }

    /// L1's EPTP for L2, when the current VMCS12 enables EPT.
    pub fn l1_eptp(&self) -> Option<u64> {
        let v = self.vmcs12()?;
        Controls12::read(v)
            .secondary
            .contains(SecondaryControls::ENABLE_EPT)
            .then(|| v.read(VmcsField::EPT_POINTER))
    }

    fn slot(&self, slot: usize) -> Option<&Vmcs12> {
        self.cache.get(slot).and_then(Option::as_ref)
    }

    fn current_mut(&mut self) -> Option<&mut Vmcs12> {
        let slot = self.current?;
        self.cache.get_mut(slot).and_then(Option::as_mut)
    }

    // --- Addresses ---

    /// Width of physical addresses of VMX structures: MAXPHYADDR, or 32 if IA32_VMX_BASIC[48].
    fn address_width(&self) -> u32 {
        if self.caps.physical_address_width_32() {
            self.maxphyaddr.min(32)
        } else {
            self.maxphyaddr
        }
    }

    fn within_width(&self, address: u64) -> bool {
        address >> self.address_width() == 0
    }

    /// 4-KiB aligned and within the physical-address width (VMXON, VMCLEAR, VMPTRLD, bitmaps).
    fn valid_page_address(&self, address: u64) -> bool {
        address & 0xfff == 0 && self.within_width(address)
    }

    // --- VMfail (§31.2) ---

    /// VMfail(error): VMfailValid with the error in the current VMCS, else VMfailInvalid.
    fn fail(&mut self, error: VmInstructionError) -> Outcome {
        match self.current_mut() {
            Some(v) => {
                v.image
                    .write(VmcsField::VM_INSTRUCTION_ERROR, error.number().into());
                v.dirty = true;
                Outcome::VmFailValid(error)
            }
            None => Outcome::VmFailInvalid,
        }
    }

    /// The checks every VMX instruction but VMXON makes before its own (§31.3): #UD outside
    /// VMX operation, with CR0.PE = 0, in virtual-8086 or compatibility mode; #GP(0) at CPL > 0.
    fn common_checks(&self, ctx: &L1Context) -> Option<Exception> {
        if self.vmxon.is_none()
            || ctx.cr0 & CR0_PE == 0
            || ctx.rflags & rflags::VM != 0
            || ctx.compatibility_mode
        {
            return Some(ud());
        }
        (ctx.cpl > 0).then(gp0)
    }

    // --- Instructions ---

    /// Emulates one VMX instruction of L1 (SDM Vol. 3C §31.3); `l1` is L1's state at the exit
    /// ([`L1_VMX_EXIT_STATE`]). VMFUNC in VMX root operation is #UD. Only for exits of L1's
    /// vCPU: a VMX instruction of L2 always belongs to L1 ([`NestedVmx::exit_belongs_to_l1`]).
    pub fn execute(
        &mut self,
        instruction: &Instruction,
        l1: &GuestState,
        mem: &mut impl L1Memory,
    ) -> Outcome {
        let reg2 = instruction.reg2.unwrap_or(u64::MAX);
        match (instruction.kind, instruction.operand) {
            (VmxInstr::Vmxoff, _) => self.vmxoff(l1),
            (VmxInstr::Vmlaunch, _) => self.vmlaunch(l1, mem),
            (VmxInstr::Vmresume, _) => self.vmresume(l1, mem),
            (VmxInstr::Vmfunc, _) | (_, None) => Outcome::Inject(ud()),
            (VmxInstr::Vmxon, Some(operand)) => self.vmxon(l1, operand, mem),
            (VmxInstr::Vmclear, Some(operand)) => self.vmclear(l1, operand, mem),
            (VmxInstr::Vmptrld, Some(operand)) => self.vmptrld(l1, operand, mem),
            (VmxInstr::Vmptrst, Some(operand)) => self.vmptrst(l1, operand, mem),
            (VmxInstr::Vmread, Some(operand)) => self.vmread(l1, reg2, operand, mem),
            (VmxInstr::Vmwrite, Some(operand)) => self.vmwrite(l1, reg2, operand, mem),
            (VmxInstr::Invept, Some(operand)) => self.invept(l1, reg2, operand, mem),
            (VmxInstr::Invvpid, Some(operand)) => self.invvpid(l1, reg2, operand, mem),
        }
    }

    /// VMXON (§31.3): `operand` is the memory holding the VMXON pointer.
    ///
    /// #UD with a register operand, CR0.PE = 0, CR4.VMXE = 0, in virtual-8086 or compatibility
    /// mode; in VMX operation #GP(0) at CPL > 0, else VMfail 15; outside it #GP(0) at CPL > 0
    /// or with CR0/CR4 outside their fixed bits, VMfailInvalid for a pointer that is not 4-KiB
    /// aligned or beyond the physical-address width or whose region does not start with the
    /// revision identifier (bit 31 clear).
    pub fn vmxon(&mut self, l1: &GuestState, operand: Place, mem: &mut impl L1Memory) -> Outcome {
        let ctx = L1Context::from_state(l1);
        let Place::Memory { gpa } = operand else {
            return Outcome::Inject(ud());
        };
        if ctx.cr0 & CR0_PE == 0
            || ctx.cr4 & CR4_VMXE == 0
            || ctx.rflags & rflags::VM != 0
            || ctx.compatibility_mode
        {
            return Outcome::Inject(ud());
        }
        if self.vmxon.is_some() {
            if ctx.cpl > 0 {
                return Outcome::Inject(gp0());
            }
            return self.fail(VmInstructionError::VmxonInVmxRoot);
        }
        if ctx.cpl > 0
            || !self.caps.cr0_is_valid(ctx.cr0, false)
            || !self.caps.cr4_is_valid(ctx.cr4)
        {
            return Outcome::Inject(gp0());
        }
        let pointer = read_or_ones(mem, gpa);
        if !self.valid_page_address(pointer) {
            return Outcome::VmFailInvalid;
        }
        // rev[30:0] must be the revision identifier and rev[31] clear.
        if read_or_ones(mem, pointer) as u32 != self.caps.revision_id() {
            return Outcome::VmFailInvalid;
        }
        self.vmxon = Some(pointer);
        self.current = None;
        self.entry = None;
        Outcome::Ok
    }

    /// VMXOFF (§31.3): leaves VMX operation. Active VMCS12s stay cached (the SDM asks software
    /// to VMCLEAR them first; their data is not lost here either).
    pub fn vmxoff(&mut self, l1: &GuestState) -> Outcome {
        if let Some(e) = self.common_checks(&L1Context::from_state(l1)) {
            return Outcome::Inject(e);
        }
        self.vmxon = None;
        self.current = None;
        self.entry = None;
        Outcome::VmxOff
    }

    /// VMCLEAR (§31.3): VMfail 2 for a pointer not 4-KiB aligned or beyond the physical-address
    /// width, VMfail 3 for the VMXON pointer; else the VMCS's data is written to its region,
    /// its launch state becomes clear, and it is no longer current.
    pub fn vmclear(&mut self, l1: &GuestState, operand: Place, mem: &mut impl L1Memory) -> Outcome {
        if let Some(e) = self.common_checks(&L1Context::from_state(l1)) {
            return Outcome::Inject(e);
        }
        let Place::Memory { gpa } = operand else {
            return Outcome::Inject(ud());
        };
        let pointer = read_or_ones(mem, gpa);
        if !self.valid_page_address(pointer) {
            return self.fail(VmInstructionError::VmclearInvalidAddress);
        }
        if Some(pointer) == self.vmxon {
            return self.fail(VmInstructionError::VmclearVmxonPointer);
        }
        match self.find(pointer) {
            Some(slot) => {
                if let Some(v) = self.cache[slot].as_mut()
                    && v.launched
                {
                    v.launched = false;
                    v.dirty = true;
                }
                self.write_back(slot, mem);
                self.cache[slot] = None;
                if self.current == Some(slot) {
                    self.current = None;
                }
            }
            None => {
                // Not active: only a region this module wrote holds a launch state.
                if mem.read_u64(pointer + REGION_MAGIC_OFFSET) == Some(REGION_MAGIC) {
                    mem.write_u64(pointer + REGION_LAUNCH_STATE, 0);
                }
            }
        }
        Outcome::Ok
    }

    /// VMPTRLD (§31.3): VMfail 9 for a pointer not 4-KiB aligned or beyond the
    /// physical-address width, VMfail 10 for the VMXON pointer, VMfail 11 when the region does
    /// not start with the revision identifier (bit 31, a shadow VMCS, is refused: VMCS
    /// shadowing is not offered); else the VMCS becomes current (and active).
    pub fn vmptrld(&mut self, l1: &GuestState, operand: Place, mem: &mut impl L1Memory) -> Outcome {
        if let Some(e) = self.common_checks(&L1Context::from_state(l1)) {
            return Outcome::Inject(e);
        }
        let Place::Memory { gpa } = operand else {
            return Outcome::Inject(ud());
        };
        let pointer = read_or_ones(mem, gpa);
        if !self.valid_page_address(pointer) {
            return self.fail(VmInstructionError::VmptrldInvalidAddress);
        }
        if Some(pointer) == self.vmxon {
            return self.fail(VmInstructionError::VmptrldVmxonPointer);
        }
        if read_or_ones(mem, pointer) as u32 != self.caps.revision_id() {
            return self.fail(VmInstructionError::VmptrldIncorrectRevision);
        }
        let slot = match self.find(pointer) {
            Some(slot) => slot,
            None => self.activate(pointer, mem),
        };
        self.current = Some(slot);
        self.touch(slot);
        Outcome::Ok
    }

    /// VMPTRST (§31.3): stores the current-VMCS pointer (all ones if invalid).
    pub fn vmptrst(&mut self, l1: &GuestState, operand: Place, mem: &mut impl L1Memory) -> Outcome {
        if let Some(e) = self.common_checks(&L1Context::from_state(l1)) {
            return Outcome::Inject(e);
        }
        let Place::Memory { gpa } = operand else {
            return Outcome::Inject(ud());
        };
        mem.write_u64(gpa, self.current_vmcs().unwrap_or(u64::MAX));
        Outcome::Ok
    }

    /// VMREAD (§31.3) of the field `encoding` into `destination`: VMfailInvalid without a
    /// current VMCS, VMfail 12 for an unsupported component ([`NestedVmx::supported_field`]);
    /// 64-bit operands in 64-bit mode, 32-bit (truncated) outside.
    pub fn vmread(
        &mut self,
        l1: &GuestState,
        encoding: u64,
        destination: Place,
        mem: &mut impl L1Memory,
    ) -> Outcome {
        let ctx = L1Context::from_state(l1);
        if let Some(e) = self.common_checks(&ctx) {
            return Outcome::Inject(e);
        }
        let Some(v) = self.vmcs12() else {
            return Outcome::VmFailInvalid;
        };
        let Some(field) = self.supported_field(encoding & ctx.operand_mask()) else {
            return self.fail(VmInstructionError::UnsupportedVmcsComponent);
        };
        let value = v.read(field) & ctx.operand_mask();
        match destination {
            Place::Register { gpr, .. } => Outcome::OkRead {
                register: gpr,
                value,
            },
            Place::Memory { gpa } => {
                if ctx.long_mode {
                    mem.write_u64(gpa, value);
                } else {
                    mem.write_u32(gpa, value as u32);
                }
                Outcome::Ok
            }
        }
    }

    /// VMWRITE (§31.3) of `source` into the field `encoding`: VMfailInvalid without a current
    /// VMCS, VMfail 12 for an unsupported component, VMfail 13 for a VM-exit information field
    /// unless IA32_VMX_MISC\[29\] is advertised; the value is truncated to the operand size and
    /// then to the field's width.
    pub fn vmwrite(
        &mut self,
        l1: &GuestState,
        encoding: u64,
        source: Place,
        mem: &mut impl L1Memory,
    ) -> Outcome {
        let ctx = L1Context::from_state(l1);
        if let Some(e) = self.common_checks(&ctx) {
            return Outcome::Inject(e);
        }
        if self.current.is_none() {
            return Outcome::VmFailInvalid;
        }
        let value = match source {
            Place::Register { value, .. } => value,
            Place::Memory { gpa } => read_or_ones(mem, gpa),
        } & ctx.operand_mask();
        let Some(field) = self.supported_field(encoding & ctx.operand_mask()) else {
            return self.fail(VmInstructionError::UnsupportedVmcsComponent);
        };
        if field.is_read_only() && !self.misc.vmwrite_any_field {
            return self.fail(VmInstructionError::VmwriteReadOnlyComponent);
        }
        if let Some(v) = self.current_mut() {
            if !SHADOW_READ_WRITE.contains(&field.full()) && v.image.read(field) != value {
                v.stamp += 1;
                v.saved = None;
            }
            v.image.write(field, value);
            v.dirty = true;
        }
        Outcome::Ok
    }

    /// VMLAUNCH (§31.3): see [`NestedVmx::vmresume`]; VMfail 4 when the VMCS is not clear.
    pub fn vmlaunch(&mut self, l1: &GuestState, mem: &mut impl L1Memory) -> Outcome {
        self.vm_entry(l1, true, mem)
    }

    /// VMRESUME (§31.3): VMfailInvalid without a current VMCS, VMfail 26 with blocking by MOV
    /// SS, VMfail 5 when the VMCS is not launched, VMfail 7 for invalid control fields
    /// (§27.2.1), VMfail 8 for invalid host state (§27.2.2-27.2.4); then a VM-entry failure
    /// (reason 33, §27.3.1, or 34, §27.4) as [`Outcome::EntryFailed`]; else
    /// [`Outcome::Resume`] (or [`Outcome::Launch`]), and L2 runs.
    pub fn vmresume(&mut self, l1: &GuestState, mem: &mut impl L1Memory) -> Outcome {
        self.vm_entry(l1, false, mem)
    }

    fn vm_entry(&mut self, l1: &GuestState, launch: bool, mem: &mut impl L1Memory) -> Outcome {
        let ctx = L1Context::from_state(l1);
        if let Some(e) = self.common_checks(&ctx) {
            return Outcome::Inject(e);
        }
        let Some(slot) = self.current else {
            return Outcome::VmFailInvalid;
        };
        if ctx.blocked_by_mov_ss {
            return self.fail(VmInstructionError::EntryEventsBlockedByMovSs);
        }
        let reflected_into = self.reflected_into.take();
        let Some(current) = self.slot(slot) else {
            return Outcome::VmFailInvalid;
        };
        let v = &current.image;
        if launch && current.launched {
            return self.fail(VmInstructionError::VmlaunchNonClearVmcs);
        }
        if !launch && !current.launched {
            return self.fail(VmInstructionError::VmresumeNonLaunchedVmcs);
        }
        // The fast path: a VMRESUME right after an exit of this VMCS12's L2 (reflected into
        // it), with nothing changed since a complete check passed but the fields L1 writes
        // through the shadow VMCS, and no VM-entry MSR loads. Only the checks that read those
        // fields run again; the rest would give the same answer.
        let lma = ctx.efer & EFER_LMA != 0;
        let virtual_8086 = v.read(VmcsField::GUEST_RFLAGS) & rflags::VM != 0;
        let fast = !launch
            && current.verified
                == Some(Verified {
                    stamp: current.stamp,
                    lma,
                    virtual_8086,
                })
            && reflected_into == Some(current.address)
            && v.read32(VmcsField::VM_ENTRY_MSR_LOAD_COUNT) == 0;
        let checked = if fast {
            if !self.injection_valid(v, &Controls12::read(v)) {
                return self.fail(VmInstructionError::EntryInvalidControlFields);
            }
            self.guest_hot_check(v).map(|()| None)
        } else {
            if !self.controls_valid(v) {
                return self.fail(VmInstructionError::EntryInvalidControlFields);
            }
            if !self.host_state_valid(v, &ctx) {
                return self.fail(VmInstructionError::EntryInvalidHostStateFields);
            }
            self.guest_state_check(v, mem)
        };
        let pdptes = match checked {
            Ok(pdptes) => pdptes,
            Err(qualification) => {
                return Outcome::EntryFailed(self.entry_failure(
                    ExitReasonField::ENTRY_FAILURE | 33,
                    qualification,
                    l1,
                    mem,
                ));
            }
        };
        let mut l2 = build_l2_state(v, l1, pdptes);
        if let Err(index) = self.load_entry_msrs(v, &mut l2, mem) {
            return Outcome::EntryFailed(self.entry_failure(
                ExitReasonField::ENTRY_FAILURE | 34,
                index.into(),
                l1,
                mem,
            ));
        }
        if let Some(v) = self.current_mut() {
            if launch {
                v.launched = true;
                v.dirty = true;
            }
            // A later fast path may skip the checks of this one when the PDPTEs come from the
            // VMCS12 or are not used, and no VMCS is linked (its revision identifier lives in
            // L1 memory, which L1 may change without a VMWRITE).
            let unlinked = v.image.read(VmcsField::VMCS_LINK_POINTER) == u64::MAX;
            if !fast && pdptes.is_none() && unlinked {
                v.verified = Some(Verified {
                    stamp: v.stamp,
                    lma,
                    virtual_8086,
                });
            }
        }
        self.touch(slot);
        self.entry = Some(EntryRecord {
            launch,
            fast,
            l1: *l1,
            l2,
        });
        if launch {
            Outcome::Launch
        } else {
            Outcome::Resume
        }
    }

    /// INVEPT (§31.3) of type `kind` with the descriptor at `descriptor`: #UD if INVEPT is not
    /// advertised; VMfail 28 for a type not advertised (1 single-context: IA32_VMX_EPT_VPID_CAP
    /// bit 25, 2 all-context: bit 26) or, single-context, an EPTP that would fail the VM-entry
    /// checks.
    pub fn invept(
        &mut self,
        l1: &GuestState,
        kind: u64,
        descriptor: Place,
        mem: &mut impl L1Memory,
    ) -> Outcome {
        let ctx = L1Context::from_state(l1);
        let ept = self.caps.ept_vpid();
        if !ept.contains(EptVpidCapabilities::INVEPT) {
            return Outcome::Inject(ud());
        }
        if let Some(e) = self.common_checks(&ctx) {
            return Outcome::Inject(e);
        }
        let Place::Memory { gpa } = descriptor else {
            return Outcome::Inject(ud());
        };
        let kind = kind & ctx.operand_mask();
        let supported = match kind {
            1 => ept.contains(EptVpidCapabilities::INVEPT_SINGLE_CONTEXT),
            2 => ept.contains(EptVpidCapabilities::INVEPT_ALL_CONTEXT),
            _ => false,
        };
        if !supported {
            return self.fail(VmInstructionError::InvalidInveptInvvpidOperand);
        }
        let eptp = read_or_ones(mem, gpa);
        if kind == 2 {
            return Outcome::InvalidateEpt(EptInvalidation::AllContext);
        }
        if !self.eptp_valid(eptp) {
            return self.fail(VmInstructionError::InvalidInveptInvvpidOperand);
        }
        Outcome::InvalidateEpt(EptInvalidation::SingleContext { eptp })
    }

    /// INVVPID (§31.3) of type `kind` with the descriptor at `descriptor`: #UD if INVVPID is not
    /// advertised; VMfail 28 for a type not advertised (IA32_VMX_EPT_VPID_CAP bit 40 + type),
    /// descriptor bits 63:16 not 0, VPID 0 for types 0, 1 and 3, or a non-canonical address
    /// for type 0.
    pub fn invvpid(
        &mut self,
        l1: &GuestState,
        kind: u64,
        descriptor: Place,
        mem: &mut impl L1Memory,
    ) -> Outcome {
        let ctx = L1Context::from_state(l1);
        let caps = self.caps.ept_vpid();
        if !caps.contains(EptVpidCapabilities::INVVPID) {
            return Outcome::Inject(ud());
        }
        if let Some(e) = self.common_checks(&ctx) {
            return Outcome::Inject(e);
        }
        let Place::Memory { gpa } = descriptor else {
            return Outcome::Inject(ud());
        };
        let kind = kind & ctx.operand_mask();
        let supported = kind <= 3 && caps.bits() & (1 << (40 + kind)) != 0;
        if !supported {
            return self.fail(VmInstructionError::InvalidInveptInvvpidOperand);
        }
        let low = read_or_ones(mem, gpa);
        let linear = read_or_ones(mem, gpa.wrapping_add(8));
        if low >> 16 != 0 {
            return self.fail(VmInstructionError::InvalidInveptInvvpidOperand);
        }
        let vpid = low as u16;
        let invalidation = match kind {
            0 if vpid != 0 && canonical(linear) => {
                VpidInvalidation::IndividualAddress { vpid, linear }
            }
            1 if vpid != 0 => VpidInvalidation::SingleContext { vpid },
            2 => VpidInvalidation::AllContext,
            3 if vpid != 0 => VpidInvalidation::SingleContextRetainingGlobals { vpid },
            _ => return self.fail(VmInstructionError::InvalidInveptInvvpidOperand),
        };
        Outcome::InvalidateVpid(invalidation)
    }

    /// VMCALL of L1 (not in L2): in VMX root operation it is VMfail 1 (§31.3 VMCALL, no
    /// dual-monitor treatment), after the #UD and #GP checks; `None` outside VMX operation,
    /// where VMCALL is the server's business.
    pub fn vmcall(&mut self, l1: &GuestState) -> Option<Outcome> {
        self.vmxon?;
        let ctx = L1Context::from_state(l1);
        Some(match self.common_checks(&ctx) {
            Some(e) => Outcome::Inject(e),
            None => self.fail(VmInstructionError::VmcallInVmxRoot),
        })
    }

    /// RDMSR of a VMX MSR by L1: `Some(Ok(value))` for IA32_FEATURE_CONTROL
    /// ([`FEATURE_CONTROL_VALUE`]) and the advertised capability MSRs, `Some(Err(#GP(0)))` for a
    /// capability MSR that does not exist on the advertised CPU, `None` for other MSRs.
    pub fn read_msr(&self, index: u32) -> Option<Result<u64, Exception>> {
        match index {
            IA32_FEATURE_CONTROL => Some(Ok(FEATURE_CONTROL_VALUE)),
            0x480..=0x492 => Some(self.caps.msr(index).ok_or(gp0())),
            _ => None,
        }
    }

    /// WRMSR of a VMX MSR by L1: #GP(0) (IA32_FEATURE_CONTROL is locked, the capability MSRs
    /// are read-only); `None` for other MSRs.
    pub fn write_msr(&self, index: u32) -> Option<Exception> {
        matches!(index, IA32_FEATURE_CONTROL | 0x480..=0x492).then(gp0)
    }

    // --- Field support ---

    /// The VMCS component an encoding names, if the advertised CPU supports it: a field this
    /// crate knows ([`VmcsField::from_encoding`]), with an index no higher than
    /// IA32_VMX_VMCS_ENUM reports (SDM Vol. 3D §A.9), and that exists on a processor with the
    /// advertised controls (the "exists only on processors that support" rules of Vol. 3C
    /// §25.4-25.9). `None` is VMfail 12 for VMREAD and VMWRITE.
    pub fn supported_field(&self, encoding: u64) -> Option<VmcsField> {
        let encoding = u32::try_from(encoding).ok()?;
        let field = VmcsField::from_encoding(encoding)?;
        if field.index() > self.caps.max_vmcs_index() {
            return None;
        }
        self.field_exists(field.full()).then_some(field)
    }

    fn field_exists(&self, field: VmcsField) -> bool {
        use VmcsField as F;
        let caps = &self.caps;
        let pin = PinBasedControls::from_bits_retain(caps.pin_based_settings().allowed1 as u32);
        let primary =
            ProcessorBasedControls::from_bits_retain(caps.primary_settings().allowed1 as u32);
        let secondary =
            SecondaryControls::from_bits_retain(caps.secondary_settings().allowed1 as u32);
        let tertiary = TertiaryControls::from_bits_retain(caps.tertiary_settings().allowed1);
        let exit = ExitControls::from_bits_retain(caps.exit_settings().allowed1 as u32);
        let entry = EntryControls::from_bits_retain(caps.entry_settings().allowed1 as u32);
        let vmfunc = caps.vm_functions();
        match field {
            F::VIRTUAL_PROCESSOR_ID => secondary.contains(SecondaryControls::ENABLE_VPID),
            F::POSTED_INTERRUPT_NOTIFICATION_VECTOR | F::POSTED_INTERRUPT_DESCRIPTOR_ADDRESS => {
                pin.contains(PinBasedControls::PROCESS_POSTED_INTERRUPTS)
            }
            F::EPTP_INDEX | F::VIRTUALIZATION_EXCEPTION_INFORMATION_ADDRESS => {
                secondary.contains(SecondaryControls::EPT_VIOLATION_VE)
            }
            F::HLAT_PREFIX_SIZE | F::HLAT_POINTER => {
                tertiary.contains(TertiaryControls::ENABLE_HLAT)
            }
            F::LAST_PID_POINTER_INDEX | F::PID_POINTER_TABLE_ADDRESS => {
                tertiary.contains(TertiaryControls::IPI_VIRTUALIZATION)
            }
            F::GUEST_INTERRUPT_STATUS
            | F::EOI_EXIT_BITMAP_0
            | F::EOI_EXIT_BITMAP_1
            | F::EOI_EXIT_BITMAP_2
            | F::EOI_EXIT_BITMAP_3 => {
                secondary.contains(SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY)
            }
            F::PML_INDEX | F::PML_ADDRESS => secondary.contains(SecondaryControls::ENABLE_PML),
            F::GUEST_UINV => {
                exit.contains(ExitControls::CLEAR_UINV) || entry.contains(EntryControls::LOAD_UINV)
            }
            F::VIRTUAL_APIC_ADDRESS | F::TPR_THRESHOLD => {
                primary.contains(ProcessorBasedControls::USE_TPR_SHADOW)
            }
            F::APIC_ACCESS_ADDRESS => {
                secondary.contains(SecondaryControls::VIRTUALIZE_APIC_ACCESSES)
            }
            F::VM_FUNCTION_CONTROLS => secondary.contains(SecondaryControls::ENABLE_VM_FUNCTIONS),
            F::EPTP_LIST_ADDRESS => vmfunc.contains(VmFunctions::EPTP_SWITCHING),
            F::EPT_POINTER
            | F::GUEST_PHYSICAL_ADDRESS
            | F::GUEST_PDPTE0
            | F::GUEST_PDPTE1
            | F::GUEST_PDPTE2
            | F::GUEST_PDPTE3 => secondary.contains(SecondaryControls::ENABLE_EPT),
            F::VMREAD_BITMAP_ADDRESS | F::VMWRITE_BITMAP_ADDRESS => {
                secondary.contains(SecondaryControls::VMCS_SHADOWING)
            }
            F::XSS_EXITING_BITMAP => secondary.contains(SecondaryControls::ENABLE_XSAVES_XRSTORS),
            F::ENCLS_EXITING_BITMAP => secondary.contains(SecondaryControls::ENABLE_ENCLS_EXITING),
            F::ENCLV_EXITING_BITMAP => secondary.contains(SecondaryControls::ENABLE_ENCLV_EXITING),
            F::SUB_PAGE_PERMISSION_TABLE_POINTER => {
                secondary.contains(SecondaryControls::SUB_PAGE_WRITE_PERMISSIONS_FOR_EPT)
            }
            F::TSC_MULTIPLIER => secondary.contains(SecondaryControls::USE_TSC_SCALING),
            F::TERTIARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS => {
                primary.contains(ProcessorBasedControls::ACTIVATE_TERTIARY_CONTROLS)
            }
            F::LOW_PASID_DIRECTORY_ADDRESS | F::HIGH_PASID_DIRECTORY_ADDRESS => {
                secondary.contains(SecondaryControls::PASID_TRANSLATION)
            }
            F::SHARED_EPT_POINTER => false,
            F::PCONFIG_EXITING_BITMAP => secondary.contains(SecondaryControls::ENABLE_PCONFIG),
            F::SECONDARY_VM_EXIT_CONTROLS => {
                exit.contains(ExitControls::ACTIVATE_SECONDARY_CONTROLS)
            }
            F::GUEST_IA32_PAT => {
                entry.contains(EntryControls::LOAD_IA32_PAT)
                    || exit.contains(ExitControls::SAVE_IA32_PAT)
            }
            F::HOST_IA32_PAT => exit.contains(ExitControls::LOAD_IA32_PAT),
            F::GUEST_IA32_EFER => {
                entry.contains(EntryControls::LOAD_IA32_EFER)
                    || exit.contains(ExitControls::SAVE_IA32_EFER)
            }
            F::HOST_IA32_EFER => exit.contains(ExitControls::LOAD_IA32_EFER),
            F::GUEST_IA32_PERF_GLOBAL_CTRL => {
                entry.contains(EntryControls::LOAD_IA32_PERF_GLOBAL_CTRL)
                    || exit.contains(ExitControls::SAVE_IA32_PERF_GLOBAL_CTL)
            }
            F::HOST_IA32_PERF_GLOBAL_CTRL => {
                exit.contains(ExitControls::LOAD_IA32_PERF_GLOBAL_CTRL)
            }
            F::GUEST_IA32_BNDCFGS => {
                entry.contains(EntryControls::LOAD_IA32_BNDCFGS)
                    || exit.contains(ExitControls::CLEAR_IA32_BNDCFGS)
            }
            F::GUEST_IA32_RTIT_CTL => {
                entry.contains(EntryControls::LOAD_IA32_RTIT_CTL)
                    || exit.contains(ExitControls::CLEAR_IA32_RTIT_CTL)
            }
            F::GUEST_IA32_LBR_CTL => {
                entry.contains(EntryControls::LOAD_GUEST_IA32_LBR_CTL)
                    || exit.contains(ExitControls::CLEAR_IA32_LBR_CTL)
            }
            F::GUEST_IA32_PKRS => entry.contains(EntryControls::LOAD_PKRS),
            F::HOST_IA32_PKRS => exit.contains(ExitControls::LOAD_PKRS),
            F::GUEST_IA32_S_CET | F::GUEST_SSP | F::GUEST_IA32_INTERRUPT_SSP_TABLE_ADDR => {
                entry.contains(EntryControls::LOAD_CET_STATE)
            }
            F::HOST_IA32_S_CET | F::HOST_SSP | F::HOST_IA32_INTERRUPT_SSP_TABLE_ADDR => {
                exit.contains(ExitControls::LOAD_CET_STATE)
            }
            F::VMX_PREEMPTION_TIMER_VALUE => {
                pin.contains(PinBasedControls::ACTIVATE_VMX_PREEMPTION_TIMER)
            }
            F::PLE_GAP | F::PLE_WINDOW => secondary.contains(SecondaryControls::PAUSE_LOOP_EXITING),
            F::INSTRUCTION_TIMEOUT_CONTROL => {
                secondary.contains(SecondaryControls::INSTRUCTION_TIMEOUT)
            }
            _ => true,
        }
    }

    // --- VM-entry checks (§27.2, §27.3.1) ---

    /// An EPTP as VM entry checks it (§27.2.1.1) against the advertised IA32_VMX_EPT_VPID_CAP:
    /// memory type UC (bit 8) or WB (bit 14), page-walk length 4 (bit 6) or 5 (bit 7), A/D
    /// enable only with bit 21, supervisor shadow stack only with bit 23, bits 11:8 and those
    /// beyond MAXPHYADDR clear.
    pub fn eptp_valid(&self, eptp: u64) -> bool {
        use EptVpidCapabilities as C;
        let caps = self.caps.ept_vpid();
        let memory_type_ok = match eptp & 7 {
            0 => caps.contains(C::MEMORY_TYPE_UC),
            6 => caps.contains(C::MEMORY_TYPE_WB),
            _ => false,
        };
        let walk_ok = match (eptp >> 3) & 7 {
            3 => caps.contains(C::PAGE_WALK_LENGTH_4),
            4 => caps.contains(C::PAGE_WALK_LENGTH_5),
            _ => false,
        };
        memory_type_ok
            && walk_ok
            && (eptp & (1 << 6) == 0 || caps.contains(C::ACCESSED_DIRTY_FLAGS))
            && (eptp & (1 << 7) == 0 || caps.contains(C::SUPERVISOR_SHADOW_STACK_CONTROL))
            && eptp & 0xf00 == 0
            && eptp >> self.maxphyaddr == 0
    }

    /// An MSR area (§27.2.1.2, §27.2.1.3): with a non-zero count, 16-byte aligned and its last
    /// byte within the physical-address width.
    fn msr_area_valid(&self, address: u64, count: u32) -> bool {
        if count == 0 {
            return true;
        }
        let last = u64::from(count)
            .checked_mul(16)
            .and_then(|bytes| address.checked_add(bytes - 1));
        address & 0xf == 0 && last.is_some_and(|last| self.within_width(last))
    }

    /// The checks on VM-execution, VM-exit and VM-entry control fields (§27.2.1), against the
    /// advertised capability MSRs; failing any is VMfail 7.
    fn controls_valid(&self, v: &VmcsImage) -> bool {
        use VmcsField as F;
        let caps = &self.caps;
        let raw_pin = v.read(F::PIN_BASED_VM_EXECUTION_CONTROLS);
        let raw_primary = v.read(F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS);
        if !caps.pin_based_settings().permits(raw_pin)
            || !caps.primary_settings().permits(raw_primary)
        {
            return false;
        }
        let c = Controls12::read(v);
        if c.primary
            .contains(ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS)
            && !caps.secondary_settings().permits(c.secondary.bits().into())
        {
            return false;
        }
        if c.primary
            .contains(ProcessorBasedControls::ACTIVATE_TERTIARY_CONTROLS)
            && !caps
                .tertiary_settings()
                .permits(v.read(F::TERTIARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS))
        {
            return false;
        }
        // §27.2.1.1.
        if v.read32(F::CR3_TARGET_COUNT) > u32::from(caps.misc().cr3_target_count) {
            return false;
        }
        if c.primary.contains(ProcessorBasedControls::USE_IO_BITMAPS)
            && !(self.valid_page_address(v.read(F::IO_BITMAP_A_ADDRESS))
                && self.valid_page_address(v.read(F::IO_BITMAP_B_ADDRESS)))
        {
            return false;
        }
        if c.primary.contains(ProcessorBasedControls::USE_MSR_BITMAPS)
            && !self.valid_page_address(v.read(F::MSR_BITMAPS_ADDRESS))
        {
            return false;
        }
        let apic_virtualization = SecondaryControls::VIRTUALIZE_X2APIC_MODE
            | SecondaryControls::APIC_REGISTER_VIRTUALIZATION
            | SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY;
        if c.primary.contains(ProcessorBasedControls::USE_TPR_SHADOW) {
            if !self.valid_page_address(v.read(F::VIRTUAL_APIC_ADDRESS)) {
                return false;
            }
        } else if c.secondary.intersects(apic_virtualization) {
            return false;
        }
        if c.pin.contains(PinBasedControls::VIRTUAL_NMIS)
            && !c.pin.contains(PinBasedControls::NMI_EXITING)
        {
            return false;
        }
        if c.primary
            .contains(ProcessorBasedControls::NMI_WINDOW_EXITING)
            && !c.pin.contains(PinBasedControls::VIRTUAL_NMIS)
        {
            return false;
        }
        if c.secondary
            .contains(SecondaryControls::VIRTUALIZE_X2APIC_MODE)
            && c.secondary
                .contains(SecondaryControls::VIRTUALIZE_APIC_ACCESSES)
        {
            return false;
        }
        if c.secondary
            .contains(SecondaryControls::VIRTUALIZE_APIC_ACCESSES)
            && !self.valid_page_address(v.read(F::APIC_ACCESS_ADDRESS))
        {
            return false;
        }
        if c.secondary
            .contains(SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY)
            && !c.pin.contains(PinBasedControls::EXTERNAL_INTERRUPT_EXITING)
        {
            return false;
        }
        if c.secondary.contains(SecondaryControls::ENABLE_VPID)
            && v.read16(F::VIRTUAL_PROCESSOR_ID) == 0
        {
            return false;
        }
        let ept = c.secondary.contains(SecondaryControls::ENABLE_EPT);
        if ept && !self.eptp_valid(v.read(F::EPT_POINTER)) {
            return false;
        }
        let need_ept = SecondaryControls::UNRESTRICTED_GUEST
            | SecondaryControls::MODE_BASED_EXECUTE_CONTROL_FOR_EPT
            | SecondaryControls::SUB_PAGE_WRITE_PERMISSIONS_FOR_EPT
            | SecondaryControls::ENABLE_PML;
        if c.secondary.intersects(need_ept) && !ept {
            return false;
        }
        // §27.2.1.2.
        if !caps.exit_settings().permits(c.exit.bits().into()) {
            return false;
        }
        if c.exit
            .contains(ExitControls::SAVE_VMX_PREEMPTION_TIMER_VALUE)
            && !c
                .pin
                .contains(PinBasedControls::ACTIVATE_VMX_PREEMPTION_TIMER)
        {
            return false;
        }
        if !self.msr_area_valid(
            v.read(F::VM_EXIT_MSR_STORE_ADDRESS),
            v.read32(F::VM_EXIT_MSR_STORE_COUNT),
        ) || !self.msr_area_valid(
            v.read(F::VM_EXIT_MSR_LOAD_ADDRESS),
            v.read32(F::VM_EXIT_MSR_LOAD_COUNT),
        ) {
            return false;
        }
        // §27.2.1.3.
        if !caps.entry_settings().permits(c.entry.bits().into())
            || c.entry.intersects(
                EntryControls::ENTRY_TO_SMM | EntryControls::DEACTIVATE_DUAL_MONITOR_TREATMENT,
            )
        {
            return false;
        }
        self.injection_valid(v, &c)
            && self.msr_area_valid(
                v.read(F::VM_ENTRY_MSR_LOAD_ADDRESS),
                v.read32(F::VM_ENTRY_MSR_LOAD_COUNT),
            )
    }

    /// The VM-entry interruption-information checks (§27.2.1.3).
    fn injection_valid(&self, v: &VmcsImage, c: &Controls12) -> bool {
        use VmcsField as F;
        let info = v.read32(F::VM_ENTRY_INTERRUPTION_INFORMATION);
        if info & EventInfo::VALID == 0 {
            return true;
        }
        let kind = (info >> 8) & 7;
        let vector = info & 0xff;
        let deliver_error_code = info & (1 << 11) != 0;
        let type_ok = match kind {
            0 | 4 | 5 | 6 => true,
            2 => vector == 2,
            3 => vector <= 31,
            7 => {
                vector == 0
                    && self.caps.primary_settings().allowed1
                        & u64::from(ProcessorBasedControls::MONITOR_TRAP_FLAG.bits())
                        != 0
            }
            _ => false,
        };
        if !type_ok || info & 0x7fff_f000 != 0 {
            return false;
        }
        let unrestricted = c.secondary.contains(SecondaryControls::UNRESTRICTED_GUEST);
        let protected = !unrestricted || v.read(F::GUEST_CR0) & CR0_PE != 0;
        let hardware = kind == 3;
        let with_code = matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21);
        let error_code_ok = if self.caps.relaxed_exception_error_code() {
            !deliver_error_code || (protected && hardware)
        } else {
            deliver_error_code == (protected && hardware && with_code)
        };
        if !error_code_ok
            || (deliver_error_code && v.read32(F::VM_ENTRY_EXCEPTION_ERROR_CODE) >> 16 != 0)
        {
            return false;
        }
        if matches!(kind, 4..=6) {
            let length = v.read32(F::VM_ENTRY_INSTRUCTION_LENGTH);
            if length > 15 || (length == 0 && !self.misc.zero_length_injection) {
                return false;
            }
        }
        true
    }

    /// The checks on the host-state area (§27.2.2-27.2.4); failing any is VMfail 8.
    fn host_state_valid(&self, v: &VmcsImage, ctx: &L1Context) -> bool {
        use VmcsField as F;
        let c = Controls12::read(v);
        let hass = c.exit.contains(ExitControls::HOST_ADDRESS_SPACE_SIZE);
        let cr4 = v.read(F::HOST_CR4);
        // §27.2.2: control registers and MSRs (CR0.NW and CD are not loaded by VM exit).
        if !self
            .caps
            .cr0_is_valid(v.read(F::HOST_CR0) & !(CR0_NW | CR0_CD), false)
            || !self.caps.cr4_is_valid(cr4)
            || v.read(F::HOST_CR3) >> self.maxphyaddr != 0
            || !canonical(v.read(F::HOST_IA32_SYSENTER_ESP))
            || !canonical(v.read(F::HOST_IA32_SYSENTER_EIP))
        {
            return false;
        }
        if c.exit.contains(ExitControls::LOAD_IA32_PAT) && !pat_valid(v.read(F::HOST_IA32_PAT)) {
            return false;
        }
        if c.exit.contains(ExitControls::LOAD_IA32_EFER) {
            let efer = v.read(F::HOST_IA32_EFER);
            if efer & !EFER_DEFINED != 0
                || (efer & EFER_LMA != 0) != hass
                || (efer & EFER_LME != 0) != hass
            {
                return false;
            }
        }
        // §27.2.3: selectors and bases.
        let selectors = [
            F::HOST_ES_SELECTOR,
            F::HOST_CS_SELECTOR,
            F::HOST_SS_SELECTOR,
            F::HOST_DS_SELECTOR,
            F::HOST_FS_SELECTOR,
            F::HOST_GS_SELECTOR,
            F::HOST_TR_SELECTOR,
        ];
        if selectors.iter().any(|&f| v.read16(f) & 7 != 0)
            || v.read16(F::HOST_CS_SELECTOR) == 0
            || v.read16(F::HOST_TR_SELECTOR) == 0
            || (!hass && v.read16(F::HOST_SS_SELECTOR) == 0)
        {
            return false;
        }
        let bases = [
            F::HOST_FS_BASE,
            F::HOST_GS_BASE,
            F::HOST_GDTR_BASE,
            F::HOST_IDTR_BASE,
            F::HOST_TR_BASE,
        ];
        if !bases.iter().all(|&f| canonical(v.read(f))) {
            return false;
        }
        // §27.2.4: address-space size.
        let rip = v.read(F::HOST_RIP);
        if ctx.efer & EFER_LMA != 0 {
            if !hass {
                return false;
            }
        } else if hass || c.entry.contains(EntryControls::IA32E_MODE_GUEST) {
            return false;
        }
        if hass {
            cr4 & CR4_PAE != 0 && canonical(rip)
        } else {
            cr4 & CR4_PCIDE == 0 && rip >> 32 == 0
        }
    }

    /// The checks on the guest-state area (§27.3.1): `Err(exit qualification)` for a VM-entry
    /// failure (0, or 2 for the PDPTEs, 4 for the VMCS link pointer); `Ok` with the PDPTEs VM
    /// entry loads from L1 memory (PAE paging without EPT), if any.
    fn guest_state_check(
        &self,
        v: &VmcsImage,
        mem: &mut impl L1Memory,
    ) -> Result<Option<[u64; 4]>, u64> {
        self.guest_registers_check(v)?;
        self.guest_hot_check(v)?;
        self.guest_link_and_pdptes_check(v, mem)
    }

    /// §27.3.1.1-27.3.1.3: control, debug and segment registers, MSRs, descriptor tables.
    fn guest_registers_check(&self, v: &VmcsImage) -> Result<(), u64> {
        use VmcsField as F;
        const INVALID: u64 = 0;
        let c = Controls12::read(v);
        let unrestricted = c.secondary.contains(SecondaryControls::UNRESTRICTED_GUEST);
        let ia32e = c.entry.contains(EntryControls::IA32E_MODE_GUEST);
        let cr0 = v.read(F::GUEST_CR0);
        let cr4 = v.read(F::GUEST_CR4);
        let check = |ok: bool| if ok { Ok(()) } else { Err(INVALID) };
        // §27.3.1.1: control registers, debug registers, MSRs.
        check(
            self.caps
                .cr0_is_valid(cr0 & !(CR0_NW | CR0_CD), unrestricted),
        )?;
        check(cr0 & CR0_PG == 0 || cr0 & CR0_PE != 0)?;
        check(self.caps.cr4_is_valid(cr4))?;
        if ia32e {
            check(cr0 & CR0_PG != 0 && cr4 & CR4_PAE != 0)?;
        } else {
            check(cr4 & CR4_PCIDE == 0)?;
        }
        check(v.read(F::GUEST_CR3) >> self.maxphyaddr == 0)?;
        if c.entry.contains(EntryControls::LOAD_DEBUG_CONTROLS) {
            check(v.read(F::GUEST_DR7) >> 32 == 0)?;
        }
        check(canonical(v.read(F::GUEST_IA32_SYSENTER_ESP)))?;
        check(canonical(v.read(F::GUEST_IA32_SYSENTER_EIP)))?;
        if c.entry.contains(EntryControls::LOAD_IA32_PAT) {
            check(pat_valid(v.read(F::GUEST_IA32_PAT)))?;
        }
        if c.entry.contains(EntryControls::LOAD_IA32_EFER) {
            let efer = v.read(F::GUEST_IA32_EFER);
            check(efer & !EFER_DEFINED == 0 && (efer & EFER_LMA != 0) == ia32e)?;
            check(cr0 & CR0_PG == 0 || (efer & EFER_LME != 0) == ia32e)?;
        }

        // §27.3.1.2-27.3.1.3: segments and descriptor tables.
        check(segments_valid(v, ia32e, unrestricted))?;
        for (base, limit) in [
            (F::GUEST_GDTR_BASE, F::GUEST_GDTR_LIMIT),
            (F::GUEST_IDTR_BASE, F::GUEST_IDTR_LIMIT),
        ] {
            check(canonical(v.read(base)) && v.read32(limit) >> 16 == 0)?;
        }

        Ok(())
    }

    /// The guest-state checks that read a field of [`SHADOW_READ_WRITE`] (§27.3.1.4 and
    /// §27.3.1.5 but the VMCS link pointer): RIP, RFLAGS, activity and interruptibility state,
    /// pending debug exceptions, with the event being injected.
    fn guest_hot_check(&self, v: &VmcsImage) -> Result<(), u64> {
        use VmcsField as F;
        const INVALID: u64 = 0;
        let c = Controls12::read(v);
        let ia32e = c.entry.contains(EntryControls::IA32E_MODE_GUEST);
        let cr0 = v.read(F::GUEST_CR0);
        let check = |ok: bool| if ok { Ok(()) } else { Err(INVALID) };
        // §27.3.1.4: RIP and RFLAGS.
        let rip = v.read(F::GUEST_RIP);
        let cs = Seg::read(v, CS);
        if ia32e && cs.ar & ar::L != 0 {
            check(canonical(rip))?;
        } else {
            check(rip >> 32 == 0)?;
        }
        let flags = v.read(F::GUEST_RFLAGS);
        check(flags & rflags::RESERVED == 0 && flags & rflags::FIXED1 != 0)?;
        if ia32e || cr0 & CR0_PE == 0 {
            check(flags & rflags::VM == 0)?;
        }
        let injection = v.read32(F::VM_ENTRY_INTERRUPTION_INFORMATION);
        let injecting = |kind: EventType| {
            injection & EventInfo::VALID != 0 && (injection >> 8) & 7 == kind as u32
        };
        if injecting(EventType::ExternalInterrupt) {
            check(flags & rflags::IF != 0)?;
        }

        // §27.3.1.5: non-register state.
        let misc = self.misc;
        let activity = v.read32(F::GUEST_ACTIVITY_STATE);
        check(match ActivityState::from_raw(activity) {
            Some(ActivityState::Active) => true,
            Some(ActivityState::Hlt) => misc.activity_hlt && ar::dpl(Seg::read(v, SS).ar) == 0,
            Some(ActivityState::Shutdown) => misc.activity_shutdown,
            Some(ActivityState::WaitForSipi) => misc.activity_wait_for_sipi,
            None => false,
        })?;
        let raw_interruptibility = v.read32(F::GUEST_INTERRUPTIBILITY_STATE);
        let interruptibility = Interruptibility::from_bits_retain(raw_interruptibility);
        let sti = interruptibility.contains(Interruptibility::BLOCKING_BY_STI);
        let mov_ss = interruptibility.contains(Interruptibility::BLOCKING_BY_MOV_SS);
        check(raw_interruptibility & !0xf == 0)?;
        check(!(sti && mov_ss))?;
        check(!sti || flags & rflags::IF != 0)?;
        check(!interruptibility.contains(Interruptibility::BLOCKING_BY_SMI))?;
        if injecting(EventType::ExternalInterrupt) {
            check(!sti && !mov_ss)?;
        }
        if injecting(EventType::Nmi) {
            check(!mov_ss)?;
            if !c.pin.contains(PinBasedControls::VIRTUAL_NMIS) {
                check(!interruptibility.contains(Interruptibility::BLOCKING_BY_NMI))?;
            }
        }
        let pending = v.read(F::GUEST_PENDING_DEBUG_EXCEPTIONS);
        const PENDING_DEFINED: u64 = 0xf | (1 << 12) | (1 << 14) | (1 << 16);
        check(pending & !PENDING_DEFINED == 0)?;
        if sti || mov_ss || activity == ActivityState::Hlt as u32 {
            let tf = flags & rflags::TF != 0;
            let btf = v.read(F::GUEST_IA32_DEBUGCTL) & 2 != 0;
            let bs = pending & (1 << 14) != 0;
            check(bs == (tf && !btf))?;
        }
        Ok(())
    }

    /// §27.3.1.5 (the VMCS link pointer) and §27.3.1.6 (PDPTEs): the PDPTEs to load, when
    /// VM entry loads them from memory.
    fn guest_link_and_pdptes_check(
        &self,
        v: &VmcsImage,
        mem: &mut impl L1Memory,
    ) -> Result<Option<[u64; 4]>, u64> {
        use VmcsField as F;
        const PDPTE: u64 = 2;
        const LINK_POINTER: u64 = 4;
        let c = Controls12::read(v);
        let ia32e = c.entry.contains(EntryControls::IA32E_MODE_GUEST);
        let cr0 = v.read(F::GUEST_CR0);
        let cr4 = v.read(F::GUEST_CR4);
        let link = v.read(F::VMCS_LINK_POINTER);
        if link != u64::MAX {
            // No VMCS shadowing: a linked VMCS must be an ordinary one (bit 31 clear).
            let ok = self.valid_page_address(link)
                && read_or_ones(mem, link) as u32 == self.caps.revision_id();
            if !ok {
                return Err(LINK_POINTER);
            }
        }

        // §27.3.1.6: PDPTEs under PAE paging (IA-32e mode guest 0, CR0.PG and CR4.PAE 1).
        if ia32e || cr0 & CR0_PG == 0 || cr4 & CR4_PAE == 0 {
            return Ok(None);
        }
        let ept = c.secondary.contains(SecondaryControls::ENABLE_EPT);
        let mut pdptes = [0; 4];
        let table = v.read(F::GUEST_CR3) & !0x1f;
        for (i, pdpte) in pdptes.iter_mut().enumerate() {
            *pdpte = if ept {
                v.read(PDPTE_FIELDS[i])
            } else {
                read_or_ones(mem, table.wrapping_add(8 * i as u64))
            };
            let reserved = 0x6 | 0x1e0 | (u64::MAX << self.maxphyaddr);
            if *pdpte & 1 != 0 && *pdpte & reserved != 0 {
                return Err(PDPTE);
            }
        }
        Ok((!ept).then_some(pdptes))
    }

    /// VM-entry MSR loading (§27.4) into L2's state: `Err(n)` names the failing entry,
    /// counting from 1, the exit qualification of reason 34. More entries than IA32_VMX_MISC
    /// recommends fail at the first one beyond.
    fn load_entry_msrs(
        &self,
        v: &VmcsImage,
        l2: &mut GuestState,
        mem: &mut impl L1Memory,
    ) -> Result<(), u32> {
        let area = v.read(VmcsField::VM_ENTRY_MSR_LOAD_ADDRESS);
        let count = v.read32(VmcsField::VM_ENTRY_MSR_LOAD_COUNT);
        let limit = self.misc.max_msr_list_entries;
        for i in 0..count {
            if i >= limit {
                return Err(i + 1);
            }
            let entry = area.wrapping_add(16 * u64::from(i));
            let head = read_or_ones(mem, entry);
            let value = read_or_ones(mem, entry.wrapping_add(8));
            if head >> 32 != 0 || !load_msr(l2, head as u32, value) {
                return Err(i + 1);
            }
        }
        Ok(())
    }

    // --- VM exits (§28) ---

    /// Loads the host-state area (§28.5) over `current`, the processor state at the exit
    /// (L2's after a VM exit, L1's after a failed VM entry): what the exit does not change
    /// (GPRs, CR2, the SYSCALL MSRs, CR0's kept bits, EFER's other bits) comes from there.
    fn host_state(v: &VmcsImage, current: &GuestState, nmi_blocking: bool) -> GuestState {
        use VmcsField as F;
        let c = Controls12::read(v);
        let hass = c.exit.contains(ExitControls::HOST_ADDRESS_SPACE_SIZE);
        let mut s = *current;

        // §28.5.1: control registers, debug registers, MSRs.
        s.cr0 = (v.read(F::HOST_CR0) & !CR0_KEPT_ON_EXIT) | (current.cr0 & CR0_KEPT_ON_EXIT);
        s.cr3 = v.read(F::HOST_CR3);
        s.cr4 = v.read(F::HOST_CR4);
        if hass {
            s.cr4 |= CR4_PAE;
        } else {
            s.cr4 &= !CR4_PCIDE;
        }
        s.dr7 = DR7_INIT;
        s.sysenter_cs = v.read32(F::HOST_IA32_SYSENTER_CS);
        s.sysenter_esp = v.read(F::HOST_IA32_SYSENTER_ESP);
        s.sysenter_eip = v.read(F::HOST_IA32_SYSENTER_EIP);
        s.efer = if c.exit.contains(ExitControls::LOAD_IA32_EFER) {
            v.read(F::HOST_IA32_EFER)
        } else if hass {
            current.efer | EFER_LMA | EFER_LME
        } else {
            current.efer & !(EFER_LMA | EFER_LME)
        };
        if c.exit.contains(ExitControls::LOAD_IA32_PAT) {
            s.pat = v.read(F::HOST_IA32_PAT);
        }

        // §28.5.2: segments and descriptor tables.
        let flat = |selector: u16, base: u64, vmx_ar: u32| Segment {
            selector,
            ar: Segment::ar_from_vmx(if selector == 0 {
                vmx_ar | ar::UNUSABLE
            } else {
                vmx_ar
            }),
            limit: 0xffff_ffff,
            base,
        };
        // Type 3 (read/write, accessed), S, P, D/B, G; CS type 11 (execute/read, accessed).
        let data_ar = 0x3 | ar::S | ar::P | ar::DB | ar::G;
        let code_ar = 0xb | ar::S | ar::P | ar::G | if hass { ar::L } else { ar::DB };
        let base_fs_gs = |field| {
            let base = v.read(field);
            if hass { base } else { base & 0xffff_ffff }
        };
        s.cs = Segment {
            selector: v.read16(F::HOST_CS_SELECTOR),
            ar: Segment::ar_from_vmx(code_ar),
            limit: 0xffff_ffff,
            base: 0,
        };
        s.ss = flat(v.read16(F::HOST_SS_SELECTOR), 0, data_ar);
        s.ds = flat(v.read16(F::HOST_DS_SELECTOR), 0, data_ar);
        s.es = flat(v.read16(F::HOST_ES_SELECTOR), 0, data_ar);
        s.fs = flat(
            v.read16(F::HOST_FS_SELECTOR),
            base_fs_gs(F::HOST_FS_BASE),
            data_ar,
        );
        s.gs = flat(
            v.read16(F::HOST_GS_SELECTOR),
            base_fs_gs(F::HOST_GS_BASE),
            data_ar,
        );
        s.tr = Segment {
            selector: v.read16(F::HOST_TR_SELECTOR),
            // Busy 64-bit TSS (type 11), P.
            ar: Segment::ar_from_vmx(0xb | ar::P),
            limit: 0x67,
            base: v.read(F::HOST_TR_BASE),
        };
        s.ldtr = Segment {
            selector: 0,
            ar: Segment::ar_from_vmx(ar::UNUSABLE),
            limit: 0,
            base: 0,
        };
        s.gdtr = DescriptorTable {
            base: v.read(F::HOST_GDTR_BASE),
            limit: 0xffff,
        };
        s.idtr = DescriptorTable {
            base: v.read(F::HOST_IDTR_BASE),
            limit: 0xffff,
        };

        // §28.5.3: RIP, RSP, RFLAGS; no blocking by STI or MOV SS, active, nothing pending.
        s.rip = v.read(F::HOST_RIP);
        s.rsp = v.read(F::HOST_RSP);
        s.rflags = rflags::FIXED1;
        s.interruptibility = if nmi_blocking {
            Interruptibility::BLOCKING_BY_NMI
        } else {
            Interruptibility::empty()
        };
        s.activity = ActivityState::Active as u32;
        s.pending_debug_exceptions = 0;
        s.injection = EventInjection::default();
        s
    }

    /// Loads host state and then the VM-exit MSR-load area (§28.6); `Err` on a VMX abort
    /// (indicator 4).
    fn load_l1(
        &self,
        v: &VmcsImage,
        current: &GuestState,
        nmi_blocking: bool,
        mem: &mut impl L1Memory,
    ) -> (GuestState, Option<u32>) {
        let mut s = Self::host_state(v, current, nmi_blocking);
        let area = v.read(VmcsField::VM_EXIT_MSR_LOAD_ADDRESS);
        let count = v.read32(VmcsField::VM_EXIT_MSR_LOAD_COUNT);
        let limit = self.misc.max_msr_list_entries;
        for i in 0..count {
            let entry = area.wrapping_add(16 * u64::from(i));
            let head = read_or_ones(mem, entry);
            let value = read_or_ones(mem, entry.wrapping_add(8));
            if i >= limit || head >> 32 != 0 || !load_msr(&mut s, head as u32, value) {
                return (s, Some(4));
            }
        }
        (s, None)
    }

    /// Writes a VMX-abort indicator into the current VMCS12's region (§28.7).
    fn abort(&self, indicator: u32, mem: &mut impl L1Memory) {
        if let Some(address) = self.current_vmcs() {
            mem.write_u32(address + REGION_ABORT_INDICATOR, indicator);
        }
    }

    /// A VM-entry failure (§27.8): exit reason and qualification recorded, no other exit
    /// information, no guest state saved, the valid bit of the VM-entry interruption
    /// information kept; host state and the VM-exit MSR-load area loaded; blocking by NMI as
    /// before the entry.
    fn entry_failure(
        &mut self,
        reason: u32,
        qualification: u64,
        l1: &GuestState,
        mem: &mut impl L1Memory,
    ) -> L1Resume {
        let nmi_blocking = l1
            .interruptibility
            .contains(Interruptibility::BLOCKING_BY_NMI);
        if let Some(v) = self.current_mut() {
            v.image.write(VmcsField::EXIT_REASON, reason.into());
            v.image.write(VmcsField::EXIT_QUALIFICATION, qualification);
            v.dirty = true;
        }
        self.entry = None;
        let Some(v) = self.vmcs12() else {
            return L1Resume {
                state: *l1,
                mask: StateMask::empty(),
                abort: None,
            };
        };
        let (state, abort) = self.load_l1(v, l1, nmi_blocking, mem);
        if let Some(indicator) = abort {
            self.abort(indicator, mem);
        }
        L1Resume {
            state,
            mask: L1_RESUME_STATE,
            abort,
        }
    }

    /// Reflects a VM-entry failure the processor reported for L2's vCPU (exit reason 33, 34 or
    /// 41 on the first entry after [`NestedVmx::l2_entry`], which this module's checks did not
    /// foresee) into L1 as its own VM-entry failure (§27.8). A VMLAUNCH's VMCS12 becomes clear
    /// again. `None` when L2 is not running.
    pub fn failed_entry_exit(
        &mut self,
        raw: &RawExit,
        mem: &mut impl L1Memory,
    ) -> Option<L1Resume> {
        let record = self.entry.take()?;
        if record.launch
            && let Some(v) = self.current_mut()
        {
            v.launched = false;
            v.dirty = true;
        }
        let basic = raw.reason_field().basic;
        let reason = if matches!(basic, 33 | 34 | 41) {
            basic
        } else {
            33
        };
        Some(self.entry_failure(
            ExitReasonField::ENTRY_FAILURE | u32::from(reason),
            raw.qualification,
            &record.l1,
            mem,
        ))
    }

    /// Reflects an exit of L2 into L1 (SDM Vol. 3C §28.2-28.6): the exit information is
    /// written into the current VMCS12 (as `raw` holds it, bit 31 of the reason clear), the
    /// valid bit of its VM-entry interruption information cleared, L2's state (`l2`, with the
    /// groups of [`L2_EXIT_STATE`]) saved into its guest-state area per the exit controls, the
    /// VM-exit MSR-store area written, and L1's state built from the host-state area and the
    /// VM-exit MSR-load area. `None` when L2 is not running.
    pub fn reflect_exit(
        &mut self,
        raw: &RawExit,
        l2: &GuestState,
        mem: &mut impl L1Memory,
    ) -> Option<L1Resume> {
        self.entry.as_ref()?;
        let maxphyaddr = self.maxphyaddr;
        let stores_lma = self.misc.stores_lma_on_exit;
        let v = self.current_mut()?;
        let c = Controls12::read(&v.image);
        let mut exit = *raw;
        exit.reason &= !ExitReasonField::ENTRY_FAILURE;
        exit.store(&mut v.image);
        // The same values as the last exit saved into this VMCS12 (no VMWRITE of them since:
        // one clears `saved`) are in the image already, and what the VM-entry checks read
        // besides the shadowed fields is unchanged.
        if v.saved.as_ref().is_some_and(|s| same_saved_state(s, l2)) {
            save_hot_guest_state(&mut v.image, l2);
        } else {
            save_guest_state(&mut v.image, &c, l2, stores_lma);
            v.stamp += 1;
            v.saved = Some(*l2);
        }
        v.dirty = true;
        let address = v.address;
        self.reflected_into = Some(address);
        let v = self.vmcs12()?;

        // §28.4: VM-exit MSR-store area.
        let area = v.read(VmcsField::VM_EXIT_MSR_STORE_ADDRESS);
        let count = v.read32(VmcsField::VM_EXIT_MSR_STORE_COUNT);
        let limit = self.misc.max_msr_list_entries;
        let mut abort = None;
        for i in 0..count {
            let entry = area.wrapping_add(16 * u64::from(i));
            let head = read_or_ones(mem, entry);
            let value = (head >> 32 == 0 && i < limit)
                .then(|| stored_msr(l2, head as u32))
                .flatten();
            match value {
                Some(value) if entry.wrapping_add(8) >> maxphyaddr == 0 => {
                    mem.write_u64(entry.wrapping_add(8), value);
                }
                _ => {
                    abort = Some(2);
                    break;
                }
            }
        }
        let nmi_exit = raw.reason_field().basic == 0
            && raw
                .interruption()
                .is_some_and(|event| event.kind == EventType::Nmi);
        let nmi_blocking = nmi_exit
            || l2
                .interruptibility
                .contains(Interruptibility::BLOCKING_BY_NMI);
        let (state, load_abort) = self.load_l1(v, l2, nmi_blocking, mem);
        let abort = abort.or(load_abort);
        if let Some(indicator) = abort {
            self.abort(indicator, mem);
        }
        // The groups whose values L1's object holds already need no writing: it holds its
        // state at the VM entry (L1 has not run since).
        let kept = self.entry.as_ref().map_or(StateMask::empty(), |record| {
            unchanged_groups(&state, &record.l1)
        }) & L1_VMX_EXIT_STATE;
        self.entry = None;
        Some(L1Resume {
            state,
            mask: L1_RESUME_STATE - kept,
            abort,
        })
    }

    /// Reflects an EPT fault of L2 that the shadow engine found in L1's EPT: an EPT violation
    /// (48) or misconfiguration (49) exit to L1 with the guest-physical address (and
    /// guest-linear address, when the qualification says it is valid) and IDT-vectoring
    /// information of `raw`, the real exit of L2's vCPU.
    pub fn reflect_ept_fault(
        &mut self,
        fault: EptFault,
        raw: &RawExit,
        l2: &GuestState,
        mem: &mut impl L1Memory,
    ) -> Option<L1Resume> {
        let (reason, qualification, gla) = match fault {
            EptFault::Violation(q) => (
                48,
                q.encode(),
                if q.gla_valid {
                    raw.guest_linear_address
                } else {
                    0
                },
            ),
            EptFault::Misconfiguration => (49, 0, 0),
        };
        let exit = RawExit {
            reason,
            instruction_length: raw.instruction_length,
            qualification,
            guest_linear_address: gla,
            guest_physical_address: raw.guest_physical_address,
            instruction_information: 0,
            interruption_information: 0,
            interruption_error_code: 0,
            idt_vectoring_information: raw.idt_vectoring_information,
            idt_vectoring_error_code: raw.idt_vectoring_error_code,
        };
        self.reflect_exit(&exit, l2, mem)
    }

    /// An external interrupt for this virtual CPU while L2 runs: the exit (reason 1) to reflect
    /// when L1 asked for external-interrupt exiting, else `None` (inject it into L2). With
    /// "acknowledge interrupt on exit" the exit carries the vector (the interrupt is taken:
    /// consume it); without, the interrupt stays pending for L1 (SDM Vol. 3C §28.2.2).
    pub fn external_interrupt_exit(&self, vector: u8) -> Option<RawExit> {
        let c = Controls12::read(self.vmcs12().filter(|_| self.in_l2())?);
        if !c.pin.contains(PinBasedControls::EXTERNAL_INTERRUPT_EXITING) {
            return None;
        }
        let acknowledge = c.exit.contains(ExitControls::ACKNOWLEDGE_INTERRUPT_ON_EXIT);
        Some(RawExit {
            reason: 1,
            interruption_information: if acknowledge {
                EventInfo::external_interrupt(vector).encode().0
            } else {
                0
            },
            ..RawExit::default()
        })
    }

    /// An NMI for this virtual CPU while L2 runs: the exit (reason 0, NMI) to reflect when L1
    /// asked for NMI exiting, else `None` (inject it into L2).
    pub fn nmi_exit(&self) -> Option<RawExit> {
        let c = Controls12::read(self.vmcs12().filter(|_| self.in_l2())?);
        c.pin
            .contains(PinBasedControls::NMI_EXITING)
            .then(|| RawExit {
                reason: 0,
                interruption_information: EventInfo::nmi().encode().0,
                ..RawExit::default()
            })
    }

    /// Whether an exit of L2 is one L1 asked for (SDM Vol. 3C §26.1-26.2, against the current
    /// VMCS12's controls): reflect it with [`NestedVmx::reflect_exit`]; otherwise L0 handles it
    /// for L2 as it would for L1.
    ///
    /// Always L1's: triple fault, INIT, SIPI, task switch, CPUID, GETSEC, INVD, XSETBV, VMCALL
    /// and the VMX instructions. Exceptions per the exception bitmap (#PF with the error-code
    /// mask and match), NMIs and external interrupts per the pin-based controls; HLT, INVLPG,
    /// RDPMC, RDTSC(P), MWAIT, MONITOR, PAUSE, MOV DR and the other instruction exits per their
    /// controls; MOV to CR0/CR4, CLTS and LMSW against L1's guest/host masks and read shadows,
    /// MOV CR3 per CR3-load/store exiting and the CR3-target values; I/O per unconditional I/O
    /// exiting or the I/O bitmaps, RDMSR/WRMSR per the MSR bitmap (both read from L1 memory;
    /// `l2` gives ECX and the MOV CR source). Never L1's here: EPT violations and
    /// misconfigurations (the shadow engine decides, see [`NestedVmx::reflect_ept_fault`]),
    /// VM-entry failures of L2's vCPU ([`NestedVmx::failed_entry_exit`]), SMIs, and exits of
    /// features L1 cannot enable.
    pub fn exit_belongs_to_l1(
        &self,
        exit: &VmExit,
        l2: &GuestState,
        mem: &mut impl L1Memory,
    ) -> bool {
        if !self.in_l2() {
            return false;
        }
        let Some(v) = self.vmcs12() else {
            return false;
        };
        let c = Controls12::read(v);
        let primary = |flag| c.primary.contains(flag);
        let secondary = |flag| c.secondary.contains(flag);
        type P = ProcessorBasedControls;
        type S = SecondaryControls;
        match *exit {
            VmExit::ExceptionOrNmi {
                vector: number,
                kind,
                error_code,
                ..
            } => match kind {
                EventType::Nmi => c.pin.contains(PinBasedControls::NMI_EXITING),
                EventType::ExternalInterrupt => {
                    c.pin.contains(PinBasedControls::EXTERNAL_INTERRUPT_EXITING)
                }
                _ => {
                    let bitmap = v.read32(VmcsField::EXCEPTION_BITMAP);
                    let hit = number < 32 && bitmap & (1 << number) != 0;
                    if number == vector::PF && kind == EventType::HardwareException {
                        let code = error_code.unwrap_or(0);
                        let mask = v.read32(VmcsField::PAGE_FAULT_ERROR_CODE_MASK);
                        let matched = v.read32(VmcsField::PAGE_FAULT_ERROR_CODE_MATCH);
                        // §26.2: with bit 14 set, a matching error code exits; with it clear,
                        // a non-matching one does.
                        hit == (code & mask == matched)
                    } else {
                        hit
                    }
                }
            },
            VmExit::ExternalInterrupt { .. } => {
                c.pin.contains(PinBasedControls::EXTERNAL_INTERRUPT_EXITING)
            }
            VmExit::TripleFault
            | VmExit::InitSignal
            | VmExit::Sipi { .. }
            | VmExit::TaskSwitch { .. }
            | VmExit::Cpuid
            | VmExit::Getsec
            | VmExit::Invd
            | VmExit::Vmcall
            | VmExit::VmxInstruction { .. }
            | VmExit::Xsetbv => true,
            VmExit::InterruptWindow => primary(P::INTERRUPT_WINDOW_EXITING),
            VmExit::NmiWindow => primary(P::NMI_WINDOW_EXITING),
            VmExit::Hlt => primary(P::HLT_EXITING),
            VmExit::Invlpg { .. } => primary(P::INVLPG_EXITING),
            VmExit::Rdpmc => primary(P::RDPMC_EXITING),
            VmExit::Rdtsc => primary(P::RDTSC_EXITING),
            VmExit::Rdtscp => primary(P::RDTSC_EXITING) && secondary(S::ENABLE_RDTSCP),
            VmExit::ControlRegisterAccess { cr, access } => cr_access_exits(v, &c, cr, access, l2),
            VmExit::MovDr { .. } => primary(P::MOV_DR_EXITING),
            VmExit::IoInstruction { port, size, .. } => io_exits(v, &c, port, size, mem),
            VmExit::Rdmsr => msr_exits(v, &c, l2.gprs.rcx as u32, false, mem),
            VmExit::Wrmsr => msr_exits(v, &c, l2.gprs.rcx as u32, true, mem),
            VmExit::Mwait => primary(P::MWAIT_EXITING),
            VmExit::Monitor => primary(P::MONITOR_EXITING),
            VmExit::Pause => primary(P::PAUSE_EXITING),
            VmExit::MonitorTrap => primary(P::MONITOR_TRAP_FLAG),
            VmExit::PreemptionTimer => c
                .pin
                .contains(PinBasedControls::ACTIVATE_VMX_PREEMPTION_TIMER),
            VmExit::GdtrIdtrAccess { .. } | VmExit::LdtrTrAccess { .. } => {
                secondary(S::DESCRIPTOR_TABLE_EXITING)
            }
            VmExit::Invpcid { .. } => primary(P::INVLPG_EXITING) && secondary(S::ENABLE_INVPCID),
            VmExit::Wbinvd => secondary(S::WBINVD_EXITING),
            VmExit::Rdrand { .. } => secondary(S::RDRAND_EXITING),
            VmExit::Rdseed { .. } => secondary(S::RDSEED_EXITING),
            VmExit::TprBelowThreshold => primary(P::USE_TPR_SHADOW),
            VmExit::ApicAccess { .. } => secondary(S::VIRTUALIZE_APIC_ACCESSES),
            VmExit::VirtualizedEoi { .. } => secondary(S::VIRTUAL_INTERRUPT_DELIVERY),
            VmExit::ApicWrite { .. } => secondary(S::APIC_REGISTER_VIRTUALIZATION),
            VmExit::Xsaves { .. } | VmExit::Xrstors { .. } => secondary(S::ENABLE_XSAVES_XRSTORS),
            VmExit::Encls => secondary(S::ENABLE_ENCLS_EXITING),
            VmExit::Enclv => secondary(S::ENABLE_ENCLV_EXITING),
            VmExit::Pconfig => secondary(S::ENABLE_PCONFIG),
            VmExit::PageModificationLogFull { .. } => secondary(S::ENABLE_PML),
            VmExit::BusLock => secondary(S::VMM_BUS_LOCK_DETECTION),
            VmExit::InstructionTimeout { .. } => secondary(S::INSTRUCTION_TIMEOUT),
            VmExit::EptViolation { .. }
            | VmExit::EptMisconfiguration { .. }
            | VmExit::InvalidGuestState { .. }
            | VmExit::MsrLoadFailure { .. }
            | VmExit::MachineCheckDuringEntry
            | VmExit::IoSmi
            | VmExit::OtherSmi
            | VmExit::Rsm
            | VmExit::SppEvent
            | VmExit::Umwait
            | VmExit::Tpause
            | VmExit::Loadiwkey
            | VmExit::EnqcmdPasidFailure
            | VmExit::EnqcmdsPasidFailure
            | VmExit::Seamcall
            | VmExit::Malformed { .. }
            | VmExit::Unknown { .. } => false,
        }
    }

    // --- L2's context ---

    /// L2's context after [`Outcome::Launch`] or [`Outcome::Resume`]: the state built at the
    /// entry, with the control fields merged from VMCS12 and `l0` (SDM Vol. 3C §25.6, the
    /// `message` module's ownership rules):
    ///
    /// * kernel-owned bits echo `l0.current`;
    /// * server-owned primary bits: L1's (HLT, CR3-load/store exiting, ...) or L0's;
    ///   "unrestricted guest" exactly L1's; "IA-32e mode guest" L1's; "load debug controls"
    ///   always 1 (the DR7 given is the one VM entry establishes);
    /// * exception bitmap: L1's or L0's; #PF error-code mask and match L1's, unless L0 takes
    ///   #PF itself (then all page faults exit and [`NestedVmx::exit_belongs_to_l1`] filters);
    /// * CR0/CR4 guest/host masks: L1's or L0's; read shadows L1's for its bits, L2's CR value
    ///   for L0's.
    ///
    /// `None` when L2 is not running.
    pub fn l2_entry(&mut self, l0: &L0Requirements) -> Option<L2Entry> {
        let last_l0 = self.last_l0.replace(*l0);
        use VmcsField as F;
        let record = self.entry.as_ref()?;
        let v = self.vmcs12()?;
        let c = Controls12::read(v);
        let current = &l0.current;
        let mut state = record.l2;

        let primary =
            (current.primary - SERVER_PRIMARY) | ((c.primary | l0.primary) & SERVER_PRIMARY);
        let l0_secondary = l0.secondary - SecondaryControls::UNRESTRICTED_GUEST;
        let l1_secondary = c.secondary & SecondaryControls::UNRESTRICTED_GUEST;
        let secondary = (current.secondary - SERVER_SECONDARY)
            | ((l1_secondary | l0_secondary) & SERVER_SECONDARY);
        let entry = (current.entry - SERVER_ENTRY)
            | (c.entry & EntryControls::IA32E_MODE_GUEST)
            | EntryControls::LOAD_DEBUG_CONTROLS;
        let l1_bitmap = v.read32(F::EXCEPTION_BITMAP);
        let l0_takes_page_faults = l0.exception_bitmap & (1 << vector::PF) != 0;
        let exception_bitmap = (current.exception_bitmap & !SERVER_EXCEPTION_BITMAP)
            | ((l1_bitmap | l0.exception_bitmap) & SERVER_EXCEPTION_BITMAP);
        let (pf_mask, pf_match) = if l0_takes_page_faults {
            (0, 0)
        } else {
            (
                v.read32(F::PAGE_FAULT_ERROR_CODE_MASK),
                v.read32(F::PAGE_FAULT_ERROR_CODE_MATCH),
            )
        };
        let shadow = |mask: VmcsField, read_shadow: VmcsField, value: u64| {
            let l1_mask = v.read(mask);
            (v.read(read_shadow) & l1_mask) | (value & !l1_mask)
        };
        state.controls = ControlState {
            pin_based: current.pin_based,
            primary,
            secondary,
            exception_bitmap,
            page_fault_error_code_mask: pf_mask,
            page_fault_error_code_match: pf_match,
            entry,
            tpr_threshold: current.tpr_threshold,
            cr0_guest_host_mask: v.read(F::CR0_GUEST_HOST_MASK) | l0.cr0_guest_host_mask,
            cr4_guest_host_mask: v.read(F::CR4_GUEST_HOST_MASK) | l0.cr4_guest_host_mask,
            cr0_read_shadow: shadow(F::CR0_GUEST_HOST_MASK, F::CR0_READ_SHADOW, state.cr0),
            cr4_read_shadow: shadow(F::CR4_GUEST_HOST_MASK, F::CR4_READ_SHADOW, state.cr4),
        };
        state.tsc_offset = l0.tsc_offset;
        let uses = |flag| c.primary.contains(flag);
        Some(L2Entry {
            state,
            mask: if record.fast && last_l0 == Some(*l0) {
                L2_ENTRY_STATE - FAST_ENTRY_KEPT
            } else {
                L2_ENTRY_STATE
            },
            launch: record.launch,
            eptp: c
                .secondary
                .contains(SecondaryControls::ENABLE_EPT)
                .then(|| v.read(F::EPT_POINTER)),
            vpid: c
                .secondary
                .contains(SecondaryControls::ENABLE_VPID)
                .then(|| v.read16(F::VIRTUAL_PROCESSOR_ID)),
            io_bitmaps: uses(ProcessorBasedControls::USE_IO_BITMAPS).then(|| {
                [
                    v.read(F::IO_BITMAP_A_ADDRESS),
                    v.read(F::IO_BITMAP_B_ADDRESS),
                ]
            }),
            msr_bitmap: uses(ProcessorBasedControls::USE_MSR_BITMAPS)
                .then(|| v.read(F::MSR_BITMAPS_ADDRESS)),
        })
    }

    // --- Cache ---

    fn find(&self, address: u64) -> Option<usize> {
        self.cache
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.address == address))
    }

    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(v) = self.cache[slot].as_mut() {
            v.last_use = clock;
        }
    }

    /// Writes a changed VMCS12 back to its region.
    fn write_back(&mut self, slot: usize, mem: &mut impl L1Memory) {
        let Some(v) = self.cache[slot].as_mut() else {
            return;
        };
        if !v.dirty {
            return;
        }
        let a = v.address;
        mem.write_u64(a + REGION_MAGIC_OFFSET, REGION_MAGIC);
        mem.write_u64(a + REGION_LAUNCH_STATE, u64::from(v.launched));
        for (i, &field) in ALL_FIELDS.iter().enumerate() {
            mem.write_u64(a + REGION_FIELDS + 8 * i as u64, v.image.read(field));
        }
        v.dirty = false;
    }

    /// Makes the VMCS at `address` active in a free slot, or in the slot of a non-current one
    /// (clear first, then least recently used), written back first.
    fn activate(&mut self, address: u64, mem: &mut impl L1Memory) -> usize {
        let slot = match self.cache.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                let victim = (0..VMCS_CACHE_SLOTS)
                    .filter(|&s| Some(s) != self.current)
                    .min_by_key(|&s| {
                        self.slot(s)
                            .map_or((false, 0), |v| (v.launched, v.last_use))
                    })
                    .unwrap_or(0);
                self.write_back(victim, mem);
                victim
            }
        };
        let mut image = VmcsImage::new();
        let mut launched = false;
        if mem.read_u64(address + REGION_MAGIC_OFFSET) == Some(REGION_MAGIC) {
            launched = mem.read_u64(address + REGION_LAUNCH_STATE).unwrap_or(0) & 1 != 0;
            for (i, &field) in ALL_FIELDS.iter().enumerate() {
                let value = mem
                    .read_u64(address + REGION_FIELDS + 8 * i as u64)
                    .unwrap_or(0);
                image.write(field, value);
            }
        }
        if self.current == Some(slot) {
            self.current = None;
        }
        self.cache[slot] = Some(Vmcs12 {
            address,
            image,
            launched,
            dirty: false,
            last_use: 0,
            stamp: 0,
            verified: None,
            saved: None,
        });
        slot
    }
}

// ---------------------------------------------------------------------------------------------
// Free functions of the entry and exit paths
// ---------------------------------------------------------------------------------------------

/// The checks on guest segment registers (§27.3.1.2).
fn segments_valid(v: &VmcsImage, ia32e: bool, unrestricted: bool) -> bool {
    let segments: [Seg; 8] = core::array::from_fn(|i| Seg::read(v, i));
    let [es, cs, ss, ds, fs, gs, ldtr, tr] = segments;
    let flags = v.read(VmcsField::GUEST_RFLAGS);
    let virtual_8086 = flags & rflags::VM != 0;
    let pe = v.read(VmcsField::GUEST_CR0) & CR0_PE != 0;

    // Selectors.
    if tr.selector & 4 != 0 || (ldtr.usable() && ldtr.selector & 4 != 0) {
        return false;
    }
    if !virtual_8086 && !unrestricted && ss.rpl() != cs.rpl() {
        return false;
    }
    // Bases.
    if !canonical(tr.base)
        || !canonical(fs.base)
        || !canonical(gs.base)
        || (ldtr.usable() && !canonical(ldtr.base))
        || cs.base >> 32 != 0
        || [ss, ds, es].iter().any(|s| s.usable() && s.base >> 32 != 0)
    {
        return false;
    }
    if virtual_8086 {
        // Base = selector * 16, limit FFFFH, access rights F3H.
        if [cs, ss, ds, es, fs, gs]
            .iter()
            .any(|s| s.base != u64::from(s.selector) << 4 || s.limit != 0xffff || s.ar != 0xf3)
        {
            return false;
        }
    } else {
        // CS.
        let cs_type = cs.kind();
        let cs_type_ok = matches!(cs_type, 9 | 11 | 13 | 15) || (unrestricted && cs_type == 3);
        let cs_dpl_ok = match cs_type {
            3 => ar::dpl(cs.ar) == 0,
            9 | 11 => ar::dpl(cs.ar) == ar::dpl(ss.ar),
            _ => ar::dpl(cs.ar) <= ar::dpl(ss.ar),
        };
        if !cs_type_ok
            || !cs_dpl_ok
            || !cs.basic_ok(false)
            || (ia32e && cs.ar & ar::L != 0 && cs.ar & ar::DB != 0)
        {
            return false;
        }
        // SS.
        if ss.usable() && (!matches!(ss.kind(), 3 | 7) || !ss.basic_ok(false)) {
            return false;
        }
        if !unrestricted && ar::dpl(ss.ar) != ss.rpl() {
            return false;
        }
        if (cs_type == 3 || !pe) && ar::dpl(ss.ar) != 0 {
            return false;
        }
        // DS, ES, FS, GS.
        for s in [ds, es, fs, gs] {
            if !s.usable() {
                continue;
            }
            let t = s.kind();
            if t & 1 == 0 || (t & 8 != 0 && t & 2 == 0) || !s.basic_ok(false) {
                return false;
            }
            if !unrestricted && t <= 11 && ar::dpl(s.ar) < s.rpl() {
                return false;
            }
        }
    }
    // TR: usable, a busy TSS (64-bit in IA-32e mode).
    let tr_type_ok = if ia32e {
        tr.kind() == 11
    } else {
        matches!(tr.kind(), 3 | 11)
    };
    if !tr_type_ok || !tr.usable() || !tr.basic_ok(true) {
        return false;
    }
    // LDTR, if usable: an LDT.
    !ldtr.usable() || (ldtr.kind() == 2 && ldtr.basic_ok(true))
}

/// L2's state as VM entry establishes it (§27.3.2) from VMCS12 and L1's state at the entry:
/// guest-state fields, plus what the entry leaves as it was (GPRs, CR2, the SYSCALL MSRs,
/// CR0's never-modified bits; DR7, EFER's other bits and PAT when not loaded).
fn build_l2_state(v: &VmcsImage, l1: &GuestState, pdptes: Option<[u64; 4]>) -> GuestState {
    use VmcsField as F;
    let c = Controls12::read(v);
    let ia32e = c.entry.contains(EntryControls::IA32E_MODE_GUEST);
    let mut s = GuestState {
        gprs: l1.gprs,
        cr2: l1.cr2,
        star: l1.star,
        lstar: l1.lstar,
        cstar: l1.cstar,
        sfmask: l1.sfmask,
        kernel_gs_base: l1.kernel_gs_base,
        ..GuestState::default()
    };
    s.rip = v.read(F::GUEST_RIP);
    s.rsp = v.read(F::GUEST_RSP);
    s.rflags = v.read(F::GUEST_RFLAGS);
    s.cr0 = (v.read(F::GUEST_CR0) & !CR0_KEPT_ON_ENTRY) | (l1.cr0 & CR0_KEPT_ON_ENTRY);
    s.cr3 = v.read(F::GUEST_CR3);
    s.cr4 = v.read(F::GUEST_CR4);
    s.dr7 = if c.entry.contains(EntryControls::LOAD_DEBUG_CONTROLS) {
        (v.read(F::GUEST_DR7) & !((1 << 12) | (3 << 14))) | DR7_INIT
    } else {
        l1.dr7
    };
    for (i, segment) in s.segments_mut().into_iter().enumerate() {
        *segment = Seg::read(v, i).message();
    }
    s.gdtr = DescriptorTable {
        base: v.read(F::GUEST_GDTR_BASE),
        limit: v.read32(F::GUEST_GDTR_LIMIT),
    };
    s.idtr = DescriptorTable {
        base: v.read(F::GUEST_IDTR_BASE),
        limit: v.read32(F::GUEST_IDTR_LIMIT),
    };
    s.efer = if c.entry.contains(EntryControls::LOAD_IA32_EFER) {
        v.read(F::GUEST_IA32_EFER)
    } else {
        let mut efer = l1.efer & !EFER_LMA;
        if ia32e {
            efer |= EFER_LMA;
        }
        if s.cr0 & CR0_PG != 0 {
            efer = (efer & !EFER_LME) | if ia32e { EFER_LME } else { 0 };
        }
        efer
    };
    s.pat = if c.entry.contains(EntryControls::LOAD_IA32_PAT) {
        v.read(F::GUEST_IA32_PAT)
    } else {
        l1.pat
    };
    s.sysenter_cs = v.read32(F::GUEST_IA32_SYSENTER_CS);
    s.sysenter_esp = v.read(F::GUEST_IA32_SYSENTER_ESP);
    s.sysenter_eip = v.read(F::GUEST_IA32_SYSENTER_EIP);
    s.interruptibility =
        Interruptibility::from_bits_retain(v.read32(F::GUEST_INTERRUPTIBILITY_STATE));
    s.activity = v.read32(F::GUEST_ACTIVITY_STATE);
    s.pending_debug_exceptions = v.read(F::GUEST_PENDING_DEBUG_EXCEPTIONS);
    let information = v.read32(F::VM_ENTRY_INTERRUPTION_INFORMATION);
    if information & EventInfo::VALID != 0 {
        s.injection = EventInjection {
            information,
            error_code: v.read32(F::VM_ENTRY_EXCEPTION_ERROR_CODE),
            instruction_length: v.read32(F::VM_ENTRY_INSTRUCTION_LENGTH),
        };
    }
    s.pdptes = match pdptes {
        Some(loaded) => loaded,
        None => PDPTE_FIELDS.map(|f| v.read(f)),
    };
    s
}

/// Saves L2's state into VMCS12's guest-state area (§28.3) and clears the valid bit of the
/// VM-entry interruption information (§25.8.3).
fn save_guest_state(v: &mut VmcsImage, c: &Controls12, l2: &GuestState, stores_lma: bool) {
    use VmcsField as F;
    v.write(F::GUEST_CR0, l2.cr0);
    v.write(F::GUEST_CR3, l2.cr3);
    v.write(F::GUEST_CR4, l2.cr4);
    if c.exit.contains(ExitControls::SAVE_DEBUG_CONTROLS) {
        v.write(F::GUEST_DR7, l2.dr7);
    }
    for (segment, [selector, base, limit, access_rights]) in
        l2.segments().into_iter().zip(GUEST_SEGMENTS)
    {
        v.write(selector, segment.selector.into());
        v.write(base, segment.base);
        v.write(limit, segment.limit.into());
        v.write(access_rights, segment.vmx_access_rights().into());
    }
    v.write(F::GUEST_GDTR_BASE, l2.gdtr.base);
    v.write(F::GUEST_GDTR_LIMIT, l2.gdtr.limit.into());
    v.write(F::GUEST_IDTR_BASE, l2.idtr.base);
    v.write(F::GUEST_IDTR_LIMIT, l2.idtr.limit.into());
    v.write(F::GUEST_IA32_SYSENTER_CS, l2.sysenter_cs.into());
    v.write(F::GUEST_IA32_SYSENTER_ESP, l2.sysenter_esp);
    v.write(F::GUEST_IA32_SYSENTER_EIP, l2.sysenter_eip);
    if c.exit.contains(ExitControls::SAVE_IA32_EFER) {
        v.write(F::GUEST_IA32_EFER, l2.efer);
    }
    if c.exit.contains(ExitControls::SAVE_IA32_PAT) {
        v.write(F::GUEST_IA32_PAT, l2.pat);
    }
    v.write(F::GUEST_ACTIVITY_STATE, l2.activity.into());
    v.write(
        F::GUEST_PENDING_DEBUG_EXCEPTIONS,
        l2.pending_debug_exceptions,
    );
    let pae_paging = l2.cr0 & CR0_PG != 0 && l2.cr4 & CR4_PAE != 0 && l2.efer & EFER_LMA == 0;
    if c.secondary.contains(SecondaryControls::ENABLE_EPT) && pae_paging {
        for (field, pdpte) in PDPTE_FIELDS.into_iter().zip(l2.pdptes) {
            v.write(field, pdpte);
        }
    }
    if stores_lma {
        let mut entry = c.entry;
        entry.set(EntryControls::IA32E_MODE_GUEST, l2.efer & EFER_LMA != 0);
        v.write(F::VM_ENTRY_CONTROLS, entry.bits().into());
    }
    save_hot_guest_state(v, l2);
}

/// The part of [`save_guest_state`] in fields of [`SHADOW_READ_WRITE`]: RIP, RSP, RFLAGS,
/// the interruptibility state, and the VM-entry interruption information's valid bit
/// cleared (VM exits clear it, SDM Vol. 3C §28.2).
fn save_hot_guest_state(v: &mut VmcsImage, l2: &GuestState) {
    use VmcsField as F;
    v.write(F::GUEST_RSP, l2.rsp);
    v.write(F::GUEST_RIP, l2.rip);
    v.write(F::GUEST_RFLAGS, l2.rflags);
    v.write(
        F::GUEST_INTERRUPTIBILITY_STATE,
        l2.interruptibility.bits().into(),
    );
    let information = v.read(F::VM_ENTRY_INTERRUPTION_INFORMATION);
    v.write(
        F::VM_ENTRY_INTERRUPTION_INFORMATION,
        information & !u64::from(EventInfo::VALID),
    );
}

/// The groups of `load` with the same values as in `held` among CR, DR7, segments, EFER and
/// PAT, the SYSCALL MSRs and the interruptibility and activity state.
fn unchanged_groups(load: &GuestState, held: &GuestState) -> StateMask {
    let mut same = StateMask::empty();
    for group in [
        StateMask::CR,
        StateMask::DR7,
        StateMask::SEGMENTS,
        StateMask::EFER_PAT,
        StateMask::SYSCALL_MSRS,
        StateMask::INTERRUPTIBILITY_ACTIVITY,
    ] {
        if load.same_group(held, group) {
            same |= group;
        }
    }
    same
}

/// Whether [`save_guest_state`] of `a` and of `b` write the same values into the fields
/// outside [`SHADOW_READ_WRITE`] (the guest-state area but RIP, RSP, RFLAGS and the
/// interruptibility state; the VM-entry controls' IA-32e mode guest bit follows EFER.LMA).
fn same_saved_state(a: &GuestState, b: &GuestState) -> bool {
    // CR2 and the interruptibility state are not among them (a VM exit does not save CR2;
    // interruptibility is shadowed).
    (a.cr0, a.cr3, a.cr4) == (b.cr0, b.cr3, b.cr4)
        && (a.activity, a.pending_debug_exceptions) == (b.activity, b.pending_debug_exceptions)
        && [
            StateMask::DR7,
            StateMask::SEGMENTS,
            StateMask::DESCRIPTOR_TABLES,
            StateMask::EFER_PAT,
            StateMask::SYSENTER,
            StateMask::PDPTES,
        ]
        .into_iter()
        .all(|group| a.same_group(b, group))
}

/// Whether a control-register access of L2 exits to L1 (§26.1.3).
fn cr_access_exits(
    v: &VmcsImage,
    c: &Controls12,
    cr: u8,
    access: CrAccess,
    l2: &GuestState,
) -> bool {
    use VmcsField as F;
    type P = ProcessorBasedControls;
    let against = |mask: VmcsField, shadow: VmcsField, value: u64| {
        (value ^ v.read(shadow)) & v.read(mask) != 0
    };
    match (cr, access) {
        (0, CrAccess::MovToCr { gpr }) => {
            against(F::CR0_GUEST_HOST_MASK, F::CR0_READ_SHADOW, l2.gpr(gpr))
        }
        (4, CrAccess::MovToCr { gpr }) => {
            against(F::CR4_GUEST_HOST_MASK, F::CR4_READ_SHADOW, l2.gpr(gpr))
        }
        (0, CrAccess::Clts) => {
            v.read(F::CR0_GUEST_HOST_MASK) & CR0_TS != 0 && v.read(F::CR0_READ_SHADOW) & CR0_TS != 0
        }
        (0, CrAccess::Lmsw { source_data, .. }) => {
            let mask = v.read(F::CR0_GUEST_HOST_MASK) & 0xf;
            let shadow = v.read(F::CR0_READ_SHADOW);
            let source = u64::from(source_data);
            // PE can only be set by LMSW; MP, EM and TS can change either way.
            (mask & CR0_PE != 0 && shadow & CR0_PE == 0 && source & CR0_PE != 0)
                || (source ^ shadow) & mask & 0xe != 0
        }
        (3, CrAccess::MovToCr { gpr }) => {
            if !c.primary.contains(P::CR3_LOAD_EXITING) {
                return false;
            }
            let value = l2.gpr(gpr);
            let targets = [
                F::CR3_TARGET_VALUE_0,
                F::CR3_TARGET_VALUE_1,
                F::CR3_TARGET_VALUE_2,
                F::CR3_TARGET_VALUE_3,
            ];
            let count = (v.read32(F::CR3_TARGET_COUNT) as usize).min(targets.len());
            !targets[..count].iter().any(|&t| v.read(t) == value)
        }
        (3, CrAccess::MovFromCr { .. }) => c.primary.contains(P::CR3_STORE_EXITING),
        (8, CrAccess::MovToCr { .. }) => c.primary.contains(P::CR8_LOAD_EXITING),
        (8, CrAccess::MovFromCr { .. }) => c.primary.contains(P::CR8_STORE_EXITING),
        _ => false,
    }
}

/// Whether an I/O access of L2 exits to L1 (§26.1.3): per the I/O bitmaps when used (an
/// access wrapping past port FFFFH always exits), else per unconditional I/O exiting.
fn io_exits(v: &VmcsImage, c: &Controls12, port: u16, size: u8, mem: &mut impl L1Memory) -> bool {
    if !c.primary.contains(ProcessorBasedControls::USE_IO_BITMAPS) {
        return c
            .primary
            .contains(ProcessorBasedControls::UNCONDITIONAL_IO_EXITING);
    }
    (0..u32::from(size)).any(|i| {
        let port = u32::from(port) + i;
        if port > 0xffff {
            return true;
        }
        let (bitmap, bit) = if port < 0x8000 {
            (VmcsField::IO_BITMAP_A_ADDRESS, port)
        } else {
            (VmcsField::IO_BITMAP_B_ADDRESS, port - 0x8000)
        };
        let word = read_or_ones(mem, v.read(bitmap).wrapping_add(u64::from(bit / 64) * 8));
        word >> (bit % 64) & 1 != 0
    })
}

/// Whether RDMSR/WRMSR of `index` by L2 exits to L1 (§26.1.3, §25.6.9): always without MSR
/// bitmaps or outside the two ranges they cover, else per the bitmap's bit.
fn msr_exits(
    v: &VmcsImage,
    c: &Controls12,
    index: u32,
    write: bool,
    mem: &mut impl L1Memory,
) -> bool {
    if !c.primary.contains(ProcessorBasedControls::USE_MSR_BITMAPS) {
        return true;
    }
    let (offset, bit) = match index {
        0..=0x1fff => (0, index),
        0xc000_0000..=0xc000_1fff => (0x400, index - 0xc000_0000),
        _ => return true,
    };
    let offset = offset + if write { 0x800 } else { 0 };
    let address = v
        .read(VmcsField::MSR_BITMAPS_ADDRESS)
        .wrapping_add(offset + u64::from(bit / 64) * 8);
    read_or_ones(mem, address) >> (bit % 64) & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controls::ControlSet;
    use crate::exit::{ExitReason, decode};
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::vec::Vec;

    type E = VmInstructionError;
    type F = VmcsField;

    /// L1 memory: sparse bytes, backed below `limit`.
    #[derive(Debug, Clone, Default)]
    struct Memory {
        bytes: HashMap<u64, u8>,
        limit: u64,
    }

    impl Memory {
        fn new() -> Memory {
            Memory {
                bytes: HashMap::new(),
                limit: 64 << 20,
            }
        }
    }

    impl L1Memory for Memory {
        fn read_u64(&mut self, gpa: u64) -> Option<u64> {
            if gpa.checked_add(8)? > self.limit {
                return None;
            }
            let bytes = core::array::from_fn(|i| *self.bytes.get(&(gpa + i as u64)).unwrap_or(&0));
            Some(u64::from_le_bytes(bytes))
        }

        fn write_u64(&mut self, gpa: u64, value: u64) -> bool {
            if gpa.checked_add(8).is_none_or(|end| end > self.limit) {
                return false;
            }
            for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
                self.bytes.insert(gpa + i as u64, byte);
            }
            true
        }
    }

    /// The `controls` tests' Bochs 2.7 `corei7_skylake_x`-like capability MSRs, with four
    /// CR3-target values in IA32_VMX_MISC (bits 24:16; SDM Vol. 3D §A.6).
    fn host() -> VmxCapabilities {
        VmxCapabilities {
            misc: 0x0000_0000_0004_01e5,
            ..crate::controls::tests::bochs()
        }
    }

    const MAXPHYADDR: u8 = 40;
    const VMXON_REGION: u64 = 0x1000;
    const VMCS_A: u64 = 0x2000;
    const VMCS_B: u64 = 0x3000;
    /// Where the tests keep a VMX instruction's 64-bit pointer operand.
    const OPERAND: u64 = 0x100;
    const DESCRIPTOR: u64 = 0x200;
    const IO_BITMAP_A: u64 = 0x6000;
    const IO_BITMAP_B: u64 = 0x7000;
    const MSR_BITMAP: u64 = 0x8000;
    const EPT_PML4: u64 = 0x9000;
    const EPTP: u64 = EPT_PML4 | 6 | (3 << 3);
    const HOST_RIP: u64 = 0x10_2000;
    const HOST_RSP: u64 = 0x7_0000;
    const L2_RIP: u64 = 0x40_0000;
    const PAT: u64 = 0x0007_0406_0007_0406;

    fn revision() -> u64 {
        u64::from(host().revision_id())
    }

    fn l1_state() -> GuestState {
        let mut s = GuestState {
            rip: 0x10_1000,
            rsp: 0x8_0000,
            rflags: rflags::FIXED1 | rflags::ZF | rflags::CF,
            cr0: 0x8000_0031,
            cr2: 0xdead_0000,
            cr3: 0x4000,
            cr4: CR4_VMXE | CR4_PAE,
            dr7: 0x400,
            efer: EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE,
            pat: PAT,
            lstar: 0xffff_8000_0000_1000,
            ..GuestState::default()
        };
        s.cs = Segment {
            selector: 8,
            ar: Segment::ar_from_vmx(0xa09b),
            limit: 0xffff_ffff,
            base: 0,
        };
        s.ss = Segment {
            selector: 0x10,
            ar: Segment::ar_from_vmx(0xc093),
            limit: 0xffff_ffff,
            base: 0,
        };
        s.gprs.rbx = 0x1111;
        s.gprs.r15 = 0xf00f;
        s
    }

    /// The control values of a typical L1 (the l1hv test hypervisor's), negotiated against
    /// what L1 is told.
    fn l1_controls(caps: &VmxCapabilities) -> ControlSet {
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
        caps.negotiate_all(&required, &ControlSet::default())
            .expect("the advertised MSRs allow a typical L1")
    }

    /// A valid VMCS12 for a 64-bit L2 with EPT, VPID, I/O and MSR bitmaps.
    fn valid_vmcs12(caps: &VmxCapabilities) -> Vec<(VmcsField, u64)> {
        let c = l1_controls(caps);
        vec![
            (
                F::PIN_BASED_VM_EXECUTION_CONTROLS,
                c.pin_based.bits().into(),
            ),
            (
                F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                c.primary.bits().into(),
            ),
            (
                F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                c.secondary.bits().into(),
            ),
            (F::PRIMARY_VM_EXIT_CONTROLS, c.exit.bits().into()),
            (F::VM_ENTRY_CONTROLS, c.entry.bits().into()),
            (F::EXCEPTION_BITMAP, 1 << vector::UD),
            (F::IO_BITMAP_A_ADDRESS, IO_BITMAP_A),
            (F::IO_BITMAP_B_ADDRESS, IO_BITMAP_B),
            (F::MSR_BITMAPS_ADDRESS, MSR_BITMAP),
            (F::TSC_OFFSET, 0),
            (F::CR0_GUEST_HOST_MASK, 0x8000_0021),
            (F::CR0_READ_SHADOW, 0x8000_0031),
            (F::CR4_GUEST_HOST_MASK, CR4_VMXE),
            (F::CR4_READ_SHADOW, CR4_PAE),
            (F::EPT_POINTER, EPTP),
            (F::VIRTUAL_PROCESSOR_ID, 1),
            (F::VMCS_LINK_POINTER, u64::MAX),
            // Host state.
            (F::HOST_CR0, 0x8000_0031),
            (F::HOST_CR3, 0x4000),
            (F::HOST_CR4, CR4_VMXE | CR4_PAE),
            (F::HOST_CS_SELECTOR, 8),
            (F::HOST_SS_SELECTOR, 0x10),
            (F::HOST_DS_SELECTOR, 0x10),
            (F::HOST_ES_SELECTOR, 0x10),
            (F::HOST_FS_SELECTOR, 0),
            (F::HOST_GS_SELECTOR, 0),
            (F::HOST_TR_SELECTOR, 0x18),
            (F::HOST_TR_BASE, 0x5000),
            (F::HOST_GDTR_BASE, 0x5100),
            (F::HOST_IDTR_BASE, 0x5200),
            (F::HOST_IA32_PAT, PAT),
            (F::HOST_IA32_EFER, EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE),
            (F::HOST_RSP, HOST_RSP),
            (F::HOST_RIP, HOST_RIP),
            // Guest state.
            (F::GUEST_CR0, 0x8000_0031),
            (F::GUEST_CR3, 0xa000),
            (F::GUEST_CR4, CR4_VMXE | CR4_PAE),
            (F::GUEST_DR7, 0x400),
            (F::GUEST_IA32_PAT, 0x0606_0606_0606_0606),
            (F::GUEST_IA32_EFER, EFER_LME | EFER_LMA),
            (F::GUEST_CS_SELECTOR, 8),
            (F::GUEST_CS_LIMIT, 0xffff_ffff),
            (F::GUEST_CS_ACCESS_RIGHTS, 0xa09b),
            (F::GUEST_SS_SELECTOR, 0x10),
            (F::GUEST_SS_LIMIT, 0xffff_ffff),
            (F::GUEST_SS_ACCESS_RIGHTS, 0xc093),
            (F::GUEST_DS_SELECTOR, 0x10),
            (F::GUEST_DS_LIMIT, 0xffff_ffff),
            (F::GUEST_DS_ACCESS_RIGHTS, 0xc093),
            (F::GUEST_ES_SELECTOR, 0x10),
            (F::GUEST_ES_LIMIT, 0xffff_ffff),
            (F::GUEST_ES_ACCESS_RIGHTS, 0xc093),
            (F::GUEST_FS_SELECTOR, 0x10),
            (F::GUEST_FS_LIMIT, 0xffff_ffff),
            (F::GUEST_FS_ACCESS_RIGHTS, 0xc093),
            (F::GUEST_GS_SELECTOR, 0x10),
            (F::GUEST_GS_BASE, 0x1234_0000),
            (F::GUEST_GS_LIMIT, 0xffff_ffff),
            (F::GUEST_GS_ACCESS_RIGHTS, 0xc093),
            (F::GUEST_LDTR_ACCESS_RIGHTS, 0x1_0000),
            (F::GUEST_TR_SELECTOR, 0x18),
            (F::GUEST_TR_BASE, 0xb000),
            (F::GUEST_TR_LIMIT, 0x67),
            (F::GUEST_TR_ACCESS_RIGHTS, 0x8b),
            (F::GUEST_GDTR_BASE, 0xc000),
            (F::GUEST_GDTR_LIMIT, 0x27),
            (F::GUEST_IDTR_BASE, 0xd000),
            (F::GUEST_IDTR_LIMIT, 0xfff),
            (F::GUEST_RSP, 0x20_0000),
            (F::GUEST_RIP, L2_RIP),
            (F::GUEST_RFLAGS, rflags::FIXED1 | rflags::IF),
        ]
    }

    /// One virtual CPU of L1 with its memory and state.
    struct Fixture {
        vmx: NestedVmx,
        mem: Memory,
        l1: GuestState,
    }

    impl Fixture {
        /// Outside VMX operation; VMXON and VMCS regions stamped with the revision.
        fn off() -> Fixture {
            let mut mem = Memory::new();
            for region in [VMXON_REGION, VMCS_A, VMCS_B] {
                mem.write_u64(region, revision());
            }
            Fixture {
                vmx: NestedVmx::new(advertised(&host()), MAXPHYADDR),
                mem,
                l1: l1_state(),
            }
        }

        /// The memory operand holding `pointer`.
        fn pointer(&mut self, pointer: u64) -> Place {
            self.mem.write_u64(OPERAND, pointer);
            Place::Memory { gpa: OPERAND }
        }

        fn vmxon(&mut self, region: u64) -> Outcome {
            let operand = self.pointer(region);
            self.vmx.vmxon(&self.l1, operand, &mut self.mem)
        }

        fn vmclear(&mut self, vmcs: u64) -> Outcome {
            let operand = self.pointer(vmcs);
            self.vmx.vmclear(&self.l1, operand, &mut self.mem)
        }

        fn vmptrld(&mut self, vmcs: u64) -> Outcome {
            let operand = self.pointer(vmcs);
            self.vmx.vmptrld(&self.l1, operand, &mut self.mem)
        }

        fn vmread(&mut self, encoding: u64) -> Outcome {
            let destination = Place::Register {
                gpr: Gpr::Rax,
                value: 0,
            };
            self.vmx
                .vmread(&self.l1, encoding, destination, &mut self.mem)
        }

        fn read(&mut self, field: VmcsField) -> u64 {
            match self.vmread(field.encoding().into()) {
                Outcome::OkRead { value, .. } => value,
                other => panic!("VMREAD {field:?}: {other:?}"),
            }
        }

        fn vmwrite(&mut self, encoding: u64, value: u64) -> Outcome {
            let source = Place::Register {
                gpr: Gpr::Rax,
                value,
            };
            self.vmx.vmwrite(&self.l1, encoding, source, &mut self.mem)
        }

        fn write(&mut self, field: VmcsField, value: u64) {
            assert_eq!(
                self.vmwrite(field.encoding().into(), value),
                Outcome::Ok,
                "VMWRITE {field:?}"
            );
        }

        fn vmlaunch(&mut self) -> Outcome {
            self.vmx.vmlaunch(&self.l1, &mut self.mem)
        }

        fn vmresume(&mut self) -> Outcome {
            self.vmx.vmresume(&self.l1, &mut self.mem)
        }

        fn invept(&mut self, kind: u64, eptp: u64) -> Outcome {
            self.mem.write_u64(DESCRIPTOR, eptp);
            self.mem.write_u64(DESCRIPTOR + 8, 0);
            let descriptor = Place::Memory { gpa: DESCRIPTOR };
            self.vmx.invept(&self.l1, kind, descriptor, &mut self.mem)
        }

        fn invvpid(&mut self, kind: u64, vpid: u64, linear: u64) -> Outcome {
            self.mem.write_u64(DESCRIPTOR, vpid);
            self.mem.write_u64(DESCRIPTOR + 8, linear);
            let descriptor = Place::Memory { gpa: DESCRIPTOR };
            self.vmx.invvpid(&self.l1, kind, descriptor, &mut self.mem)
        }

        /// VMXON, VMCLEAR and VMPTRLD of VMCS A, filled with a valid 64-bit L2.
        fn ready() -> Fixture {
            let mut f = Fixture::off();
            assert_eq!(f.vmxon(VMXON_REGION), Outcome::Ok);
            assert_eq!(f.vmclear(VMCS_A), Outcome::Ok);
            assert_eq!(f.vmptrld(VMCS_A), Outcome::Ok);
            for (field, value) in valid_vmcs12(f.vmx.capabilities()) {
                f.write(field, value);
            }
            f
        }

        /// [`Fixture::ready`] and launched: L2 runs.
        fn launched() -> Fixture {
            let mut f = Fixture::ready();
            assert_eq!(f.vmlaunch(), Outcome::Launch);
            f
        }
    }

    /// The L2 vCPU's controls as a kernel like capvisor's reports them.
    fn kernel_controls() -> ControlState {
        ControlState {
            pin_based: PinBasedControls::from_bits_retain(0x16)
                | PinBasedControls::EXTERNAL_INTERRUPT_EXITING
                | PinBasedControls::NMI_EXITING
                | PinBasedControls::VIRTUAL_NMIS,
            primary: ProcessorBasedControls::from_bits_retain(0x0400_6172)
                | ProcessorBasedControls::HLT_EXITING
                | ProcessorBasedControls::UNCONDITIONAL_IO_EXITING
                | ProcessorBasedControls::MOV_DR_EXITING
                | ProcessorBasedControls::RDPMC_EXITING
                | ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS,
            secondary: SecondaryControls::ENABLE_EPT
                | SecondaryControls::ENABLE_VPID
                | SecondaryControls::UNRESTRICTED_GUEST,
            exception_bitmap: (1 << vector::DB) | (1 << vector::AC),
            entry: EntryControls::from_bits_retain(0x11fb) | EntryControls::LOAD_IA32_EFER,
            cr4_guest_host_mask: CR4_VMXE,
            ..ControlState::default()
        }
    }

    // --- Advertised capabilities ---

    #[test]
    fn advertised_msrs_offer_exactly_the_features_of_docs_nested_md() {
        let host = host();
        let caps = advertised(&host);
        let pin = PinBasedControls::from_bits_retain(caps.pin_based_settings().allowed1 as u32);
        assert!(pin.contains(
            PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING
        ));
        assert!(!pin.intersects(
            PinBasedControls::VIRTUAL_NMIS
                | PinBasedControls::ACTIVATE_VMX_PREEMPTION_TIMER
                | PinBasedControls::PROCESS_POSTED_INTERRUPTS
        ));
        let primary =
            ProcessorBasedControls::from_bits_retain(caps.primary_settings().allowed1 as u32);
        assert!(primary.contains(
            ProcessorBasedControls::HLT_EXITING
                | ProcessorBasedControls::USE_IO_BITMAPS
                | ProcessorBasedControls::UNCONDITIONAL_IO_EXITING
                | ProcessorBasedControls::USE_MSR_BITMAPS
                | ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS
        ));
        assert!(!primary.intersects(
            ProcessorBasedControls::USE_TPR_SHADOW
                | ProcessorBasedControls::MONITOR_TRAP_FLAG
                | ProcessorBasedControls::ACTIVATE_TERTIARY_CONTROLS
                | ProcessorBasedControls::RDTSC_EXITING
        ));
        let secondary =
            SecondaryControls::from_bits_retain(caps.secondary_settings().allowed1 as u32);
        assert_eq!(
            secondary,
            SecondaryControls::ENABLE_EPT
                | SecondaryControls::ENABLE_VPID
                | SecondaryControls::UNRESTRICTED_GUEST
        );
        let ept = caps.ept_vpid();
        use EptVpidCapabilities as C;
        assert_eq!(
            ept,
            C::PAGE_WALK_LENGTH_4
                | C::MEMORY_TYPE_UC
                | C::MEMORY_TYPE_WB
                | C::PAGES_2M
                | C::PAGES_1G
                | C::INVEPT
                | C::INVEPT_SINGLE_CONTEXT
                | C::INVEPT_ALL_CONTEXT
                | C::INVVPID
                | C::INVVPID_SINGLE_CONTEXT
                | C::INVVPID_ALL_CONTEXT
        );
        assert_eq!(caps.vmfunc, None);
        let misc = caps.misc();
        assert!(misc.stores_lma_on_exit);
        assert!(!misc.activity_hlt && !misc.vmwrite_any_field && !misc.zero_length_injection);
        assert_eq!(caps.vmcs_region_size(), 4096);
        assert!(!caps.dual_monitor());
        assert_eq!(caps.revision_id(), host.revision_id());
        let vmx = NestedVmx::new(caps, MAXPHYADDR);
        assert_eq!(vmx.read_msr(IA32_FEATURE_CONTROL), Some(Ok(0x5)));
        assert_eq!(vmx.read_msr(0x491), Some(Err(gp0())), "no VM functions");
        assert_eq!(vmx.read_msr(0x480), Some(Ok(caps.basic)));
        assert_eq!(vmx.read_msr(0x10), None);
        assert_eq!(vmx.write_msr(IA32_FEATURE_CONTROL), Some(gp0()));
    }

    #[test]
    fn true_msrs_allow_what_the_plain_msrs_demand_a2() {
        let caps = advertised(&host());
        for (plain, true_msr) in [
            (caps.pinbased_ctls, caps.true_pinbased_ctls),
            (caps.procbased_ctls, caps.true_procbased_ctls),
            (caps.exit_ctls, caps.true_exit_ctls),
            (caps.entry_ctls, caps.true_entry_ctls),
        ] {
            let must_be_one = plain & 0xffff_ffff;
            assert_eq!(true_msr.unwrap() >> 32 & must_be_one, must_be_one);
        }
        // A hypervisor that negotiates with the plain MSRs only can still enter.
        let mut plain_only = caps;
        plain_only.basic &= !VmxCapabilities::BASIC_TRUE_CONTROLS;
        let set = l1_controls(&plain_only);
        assert!(caps.primary_settings().permits(set.primary.bits().into()));
        assert!(caps.exit_settings().permits(set.exit.bits().into()));
        assert!(caps.entry_settings().permits(set.entry.bits().into()));
    }

    // --- SDM 31.2 conventions ---

    #[test]
    fn rflags_follow_vmsucceed_vmfailinvalid_vmfailvalid_31_2() {
        let all = rflags::FIXED1 | rflags::ARITHMETIC | rflags::IF;
        assert_eq!(Outcome::Ok.rflags(all), rflags::FIXED1 | rflags::IF);
        assert_eq!(
            Outcome::VmFailInvalid.rflags(all),
            rflags::FIXED1 | rflags::IF | rflags::CF
        );
        assert_eq!(
            Outcome::VmFailValid(E::VmxonInVmxRoot).rflags(all),
            rflags::FIXED1 | rflags::IF | rflags::ZF
        );
        assert_eq!(Outcome::Inject(ud()).rflags(all), all);
        assert!(Outcome::VmFailInvalid.advances_rip());
        assert!(!Outcome::Launch.advances_rip());
        assert!(!Outcome::Inject(ud()).advances_rip());
    }

    // --- The malformed cases of issue 6 item 7, and the other VMfail numbers ---

    #[derive(Debug)]
    enum Expect {
        FailValid(VmInstructionError),
        FailInvalid,
        Fault(u8),
        /// A VM-entry failure: exit reason (bit 31 set) and qualification in VMCS12, L1 at the
        /// host RIP.
        EntryFailure(u32, u64),
        /// A VM exit to L1 with this basic reason.
        Exit(u32),
    }

    struct Case {
        name: &'static str,
        sdm: &'static str,
        start: fn() -> Fixture,
        run: fn(&mut Fixture) -> Outcome,
        expect: Expect,
    }

    fn set(f: &mut Fixture, field: VmcsField, value: u64) {
        f.write(field, value);
    }

    const MALFORMED: &[Case] = &[
        Case {
            name: "VMXON twice (a VMCS is current)",
            sdm: "31.3 VMXON",
            start: Fixture::ready,
            run: |f| f.vmxon(VMXON_REGION),
            expect: Expect::FailValid(E::VmxonInVmxRoot),
        },
        Case {
            name: "VMXON twice (no current VMCS)",
            sdm: "31.3 VMXON, 31.2 VMfail",
            start: || {
                let mut f = Fixture::off();
                f.vmxon(VMXON_REGION);
                f
            },
            run: |f| f.vmxon(VMXON_REGION),
            expect: Expect::FailInvalid,
        },
        Case {
            name: "VMXON with a region of the wrong revision",
            sdm: "31.3 VMXON",
            start: Fixture::off,
            run: |f| f.vmxon(0x4000),
            expect: Expect::FailInvalid,
        },
        Case {
            name: "VMXON with CR4.VMXE = 0",
            sdm: "31.3 VMXON",
            start: Fixture::off,
            run: |f| {
                f.l1.cr4 &= !CR4_VMXE;
                f.vmxon(VMXON_REGION)
            },
            expect: Expect::Fault(vector::UD),
        },
        Case {
            name: "VMPTRLD outside VMX operation",
            sdm: "31.3 VMPTRLD",
            start: Fixture::off,
            run: |f| f.vmptrld(VMCS_A),
            expect: Expect::Fault(vector::UD),
        },
        Case {
            name: "VMREAD at CPL 3",
            sdm: "31.3 VMREAD",
            start: Fixture::ready,
            run: |f| {
                f.l1.ss.ar = Segment::ar_from_vmx(0xc0f3);
                f.vmread(F::GUEST_RIP.encoding().into())
            },
            expect: Expect::Fault(vector::GP),
        },
        Case {
            name: "VMPTRLD of an unaligned address",
            sdm: "31.3 VMPTRLD",
            start: Fixture::ready,
            run: |f| f.vmptrld(VMCS_B + 0x800),
            expect: Expect::FailValid(E::VmptrldInvalidAddress),
        },
        Case {
            name: "VMPTRLD beyond MAXPHYADDR",
            sdm: "31.3 VMPTRLD",
            start: Fixture::ready,
            run: |f| f.vmptrld(1 << MAXPHYADDR),
            expect: Expect::FailValid(E::VmptrldInvalidAddress),
        },
        Case {
            name: "VMPTRLD of the VMXON pointer",
            sdm: "31.3 VMPTRLD",
            start: Fixture::ready,
            run: |f| f.vmptrld(VMXON_REGION),
            expect: Expect::FailValid(E::VmptrldVmxonPointer),
        },
        Case {
            name: "VMPTRLD of a region with the wrong revision",
            sdm: "31.3 VMPTRLD",
            start: Fixture::ready,
            run: |f| {
                f.mem.write_u64(VMCS_B, revision() + 1);
                f.vmptrld(VMCS_B)
            },
            expect: Expect::FailValid(E::VmptrldIncorrectRevision),
        },
        Case {
            name: "VMPTRLD of a shadow VMCS (revision bit 31) without VMCS shadowing",
            sdm: "31.3 VMPTRLD",
            start: Fixture::ready,
            run: |f| {
                f.mem.write_u64(VMCS_B, revision() | 1 << 31);
                f.vmptrld(VMCS_B)
            },
            expect: Expect::FailValid(E::VmptrldIncorrectRevision),
        },
        Case {
            name: "VMCLEAR of an unaligned address",
            sdm: "31.3 VMCLEAR",
            start: Fixture::ready,
            run: |f| f.vmclear(VMCS_B + 8),
            expect: Expect::FailValid(E::VmclearInvalidAddress),
        },
        Case {
            name: "VMCLEAR of the VMXON pointer",
            sdm: "31.3 VMCLEAR",
            start: Fixture::ready,
            run: |f| f.vmclear(VMXON_REGION),
            expect: Expect::FailValid(E::VmclearVmxonPointer),
        },
        Case {
            name: "VMREAD with no current VMCS",
            sdm: "31.3 VMREAD",
            start: || {
                let mut f = Fixture::off();
                f.vmxon(VMXON_REGION);
                f
            },
            run: |f| f.vmread(F::GUEST_RIP.encoding().into()),
            expect: Expect::FailInvalid,
        },
        Case {
            name: "VMWRITE with no current VMCS",
            sdm: "31.3 VMWRITE",
            start: || {
                let mut f = Fixture::ready();
                f.vmclear(VMCS_A);
                f
            },
            run: |f| f.vmwrite(F::GUEST_RIP.encoding().into(), 0),
            expect: Expect::FailInvalid,
        },
        Case {
            name: "VMREAD of an unsupported field (reserved encoding bit 16)",
            sdm: "31.3 VMREAD, 25.11.2",
            start: Fixture::ready,
            run: |f| f.vmread(0x1_0000 | u64::from(F::GUEST_CR0.encoding())),
            expect: Expect::FailValid(E::UnsupportedVmcsComponent),
        },
        Case {
            name: "VMREAD with encoding bits 63:32 set",
            sdm: "31.3 VMREAD",
            start: Fixture::ready,
            run: |f| f.vmread(1 << 32 | u64::from(F::GUEST_CR0.encoding())),
            expect: Expect::FailValid(E::UnsupportedVmcsComponent),
        },
        Case {
            name: "VMWRITE of an unsupported field",
            sdm: "31.3 VMWRITE",
            start: Fixture::ready,
            run: |f| f.vmwrite(0x482c, 0),
            expect: Expect::FailValid(E::UnsupportedVmcsComponent),
        },
        Case {
            name: "VMWRITE of a field of a feature not offered (PML address)",
            sdm: "31.3 VMWRITE, 25.6.19",
            start: Fixture::ready,
            run: |f| f.vmwrite(F::PML_ADDRESS.encoding().into(), 0x1000),
            expect: Expect::FailValid(E::UnsupportedVmcsComponent),
        },
        Case {
            name: "VMWRITE of a read-only field (exit qualification)",
            sdm: "31.3 VMWRITE, A.6 (IA32_VMX_MISC[29] = 0)",
            start: Fixture::ready,
            run: |f| f.vmwrite(F::EXIT_QUALIFICATION.encoding().into(), 0),
            expect: Expect::FailValid(E::VmwriteReadOnlyComponent),
        },
        Case {
            name: "INVEPT type 0 (reserved)",
            sdm: "31.3 INVEPT, A.10",
            start: Fixture::ready,
            run: |f| f.invept(0, EPTP),
            expect: Expect::FailValid(E::InvalidInveptInvvpidOperand),
        },
        Case {
            name: "INVEPT type 3 (reserved)",
            sdm: "31.3 INVEPT, A.10",
            start: Fixture::ready,
            run: |f| f.invept(3, EPTP),
            expect: Expect::FailValid(E::InvalidInveptInvvpidOperand),
        },
        Case {
            name: "INVEPT single-context of an invalid EPTP (walk length 2)",
            sdm: "31.3 INVEPT, 27.2.1.1",
            start: Fixture::ready,
            run: |f| f.invept(1, EPT_PML4 | 6 | (1 << 3)),
            expect: Expect::FailValid(E::InvalidInveptInvvpidOperand),
        },
        Case {
            name: "INVVPID type 0 (individual address, not offered)",
            sdm: "31.3 INVVPID, A.10",
            start: Fixture::ready,
            run: |f| f.invvpid(0, 1, 0x1000),
            expect: Expect::FailValid(E::InvalidInveptInvvpidOperand),
        },
        Case {
            name: "INVVPID type 4 (reserved)",
            sdm: "31.3 INVVPID, A.10",
            start: Fixture::ready,
            run: |f| f.invvpid(4, 1, 0),
            expect: Expect::FailValid(E::InvalidInveptInvvpidOperand),
        },
        Case {
            name: "INVVPID single-context of VPID 0",
            sdm: "31.3 INVVPID",
            start: Fixture::ready,
            run: |f| f.invvpid(1, 0, 0),
            expect: Expect::FailValid(E::InvalidInveptInvvpidOperand),
        },
        Case {
            name: "INVVPID with descriptor bits 63:16 set",
            sdm: "31.3 INVVPID",
            start: Fixture::ready,
            run: |f| f.invvpid(2, 1 << 16, 0),
            expect: Expect::FailValid(E::InvalidInveptInvvpidOperand),
        },
        Case {
            name: "VMLAUNCH with no current VMCS",
            sdm: "31.3 VMLAUNCH",
            start: || {
                let mut f = Fixture::off();
                f.vmxon(VMXON_REGION);
                f
            },
            run: |f| f.vmlaunch(),
            expect: Expect::FailInvalid,
        },
        Case {
            name: "VMLAUNCH of a launched (not clear) VMCS",
            sdm: "31.3 VMLAUNCH",
            start: Fixture::launched,
            run: |f| {
                let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
                f.vmx
                    .reflect_exit(
                        &RawExit {
                            reason: 10,
                            ..RawExit::default()
                        },
                        &l2,
                        &mut f.mem,
                    )
                    .unwrap();
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::VmlaunchNonClearVmcs),
        },
        Case {
            name: "VMRESUME of a clear VMCS",
            sdm: "31.3 VMRESUME",
            start: Fixture::ready,
            run: |f| f.vmresume(),
            expect: Expect::FailValid(E::VmresumeNonLaunchedVmcs),
        },
        Case {
            name: "VMLAUNCH with events blocked by MOV SS",
            sdm: "31.3 VMLAUNCH",
            start: Fixture::ready,
            run: |f| {
                f.l1.interruptibility = Interruptibility::BLOCKING_BY_MOV_SS;
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryEventsBlockedByMovSs),
        },
        Case {
            name: "VMLAUNCH with a pin-based control not offered (posted interrupts)",
            sdm: "27.2.1.1, A.3.1",
            start: Fixture::ready,
            run: |f| {
                let pin = f.read(F::PIN_BASED_VM_EXECUTION_CONTROLS);
                set(f, F::PIN_BASED_VM_EXECUTION_CONTROLS, pin | 1 << 7);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with a default1 pin-based control cleared",
            sdm: "27.2.1.1, A.3.1",
            start: Fixture::ready,
            run: |f| {
                let pin = f.read(F::PIN_BASED_VM_EXECUTION_CONTROLS);
                set(f, F::PIN_BASED_VM_EXECUTION_CONTROLS, pin & !0x16);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with a secondary control not offered (PML)",
            sdm: "27.2.1.1, A.3.3",
            start: Fixture::ready,
            run: |f| {
                let secondary = f.read(F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS);
                set(
                    f,
                    F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                    secondary | 1 << 17,
                );
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with VPID 0 and \"enable VPID\"",
            sdm: "27.2.1.1",
            start: Fixture::ready,
            run: |f| {
                set(f, F::VIRTUAL_PROCESSOR_ID, 0);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with an EPTP of page-walk length 5 (not offered)",
            sdm: "27.2.1.1, A.10",
            start: Fixture::ready,
            run: |f| {
                set(f, F::EPT_POINTER, EPT_PML4 | 6 | (4 << 3));
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with an EPTP of memory type WT",
            sdm: "27.2.1.1, A.10",
            start: Fixture::ready,
            run: |f| {
                set(f, F::EPT_POINTER, EPT_PML4 | 4 | (3 << 3));
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with EPTP A/D enable (not offered)",
            sdm: "27.2.1.1, A.10",
            start: Fixture::ready,
            run: |f| {
                set(f, F::EPT_POINTER, EPTP | 1 << 6);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with EPTP reserved bits 11:8",
            sdm: "27.2.1.1",
            start: Fixture::ready,
            run: |f| {
                set(f, F::EPT_POINTER, EPTP | 1 << 9);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with unrestricted guest but no EPT",
            sdm: "27.2.1.1",
            start: Fixture::ready,
            run: |f| {
                let ug = SecondaryControls::UNRESTRICTED_GUEST.bits();
                set(
                    f,
                    F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                    ug.into(),
                );
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with an unaligned I/O bitmap",
            sdm: "27.2.1.1",
            start: Fixture::ready,
            run: |f| {
                set(f, F::IO_BITMAP_B_ADDRESS, IO_BITMAP_B + 0x10);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with an MSR bitmap beyond MAXPHYADDR",
            sdm: "27.2.1.1",
            start: Fixture::ready,
            run: |f| {
                set(f, F::MSR_BITMAPS_ADDRESS, 1 << MAXPHYADDR);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with a CR3-target count above IA32_VMX_MISC's",
            sdm: "27.2.1.1, A.6",
            start: Fixture::ready,
            run: |f| {
                set(f, F::CR3_TARGET_COUNT, 5);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with an unaligned VM-exit MSR-store area",
            sdm: "27.2.1.2",
            start: Fixture::ready,
            run: |f| {
                set(f, F::VM_EXIT_MSR_STORE_COUNT, 1);
                set(f, F::VM_EXIT_MSR_STORE_ADDRESS, 0x5008);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH injecting #GP without its error code",
            sdm: "27.2.1.3",
            start: Fixture::ready,
            run: |f| {
                set(f, F::VM_ENTRY_INTERRUPTION_INFORMATION, 0x8000_030d);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH injecting a software interrupt of length 0",
            sdm: "27.2.1.3, A.6 (IA32_VMX_MISC[30] = 0)",
            start: Fixture::ready,
            run: |f| {
                set(f, F::VM_ENTRY_INTERRUPTION_INFORMATION, 0x8000_0480);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidControlFields),
        },
        Case {
            name: "VMLAUNCH with host CR0.PE = 0",
            sdm: "27.2.2, A.7",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_CR0, 0x8000_0030);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with host CR4.VMXE = 0",
            sdm: "27.2.2, A.8",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_CR4, CR4_PAE);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with host CS selector RPL 1",
            sdm: "27.2.3",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_CS_SELECTOR, 9);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with host TR selector 0",
            sdm: "27.2.3",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_TR_SELECTOR, 0);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with a non-canonical host GS base",
            sdm: "27.2.3",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_GS_BASE, 1 << 47);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with a non-canonical host RIP",
            sdm: "27.2.4",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_RIP, 0x0000_8000_0000_0000);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH from IA-32e mode with host address-space size 0",
            sdm: "27.2.4",
            start: Fixture::ready,
            run: |f| {
                let exit = f.read(F::PRIMARY_VM_EXIT_CONTROLS);
                let hass = u64::from(ExitControls::HOST_ADDRESS_SPACE_SIZE.bits());
                set(f, F::PRIMARY_VM_EXIT_CONTROLS, exit & !hass);
                set(f, F::HOST_IA32_EFER, EFER_SCE | EFER_NXE);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with host EFER.LMA = 0 and host address-space size 1",
            sdm: "27.2.2",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_IA32_EFER, EFER_LME);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with host PAT memory type 2",
            sdm: "27.2.2",
            start: Fixture::ready,
            run: |f| {
                set(f, F::HOST_IA32_PAT, 0x0606_0606_0606_0602);
                f.vmlaunch()
            },
            expect: Expect::FailValid(E::EntryInvalidHostStateFields),
        },
        Case {
            name: "VMLAUNCH with guest RFLAGS bit 1 clear",
            sdm: "27.3.1.4, 27.8",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_RFLAGS, 0);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with guest CR0.PG = 0 without unrestricted guest",
            sdm: "27.3.1.1, A.7",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_CR0, 0x31);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with guest CR4.VMXE = 0",
            sdm: "27.3.1.1, A.8",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_CR4, CR4_PAE);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with IA-32e mode guest but EFER.LMA = 0",
            sdm: "27.3.1.1",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_IA32_EFER, EFER_LME);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with a 64-bit guest CS with D = 1",
            sdm: "27.3.1.2",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_CS_ACCESS_RIGHTS, 0xe09b);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with a guest SS of type 11 (code)",
            sdm: "27.3.1.2",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_SS_ACCESS_RIGHTS, 0xc09b);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with an unusable guest TR",
            sdm: "27.3.1.2",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_TR_ACCESS_RIGHTS, 0x1_008b);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with guest activity state HLT (not offered)",
            sdm: "27.3.1.5, A.6",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_ACTIVITY_STATE, 1);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with STI blocking and RFLAGS.IF = 0",
            sdm: "27.3.1.5",
            start: Fixture::ready,
            run: |f| {
                set(f, F::GUEST_RFLAGS, rflags::FIXED1);
                set(f, F::GUEST_INTERRUPTIBILITY_STATE, 1);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 0),
        },
        Case {
            name: "VMLAUNCH with an invalid VMCS link pointer",
            sdm: "27.3.1.5, 27.8",
            start: Fixture::ready,
            run: |f| {
                set(f, F::VMCS_LINK_POINTER, 0x5123);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0021, 4),
        },
        Case {
            name: "VMLAUNCH loading an MSR the entry cannot load (IA32_FS_BASE)",
            sdm: "27.4, 27.8",
            start: Fixture::ready,
            run: |f| {
                f.mem.write_u64(0x5400, u64::from(msr_index::IA32_LSTAR));
                f.mem.write_u64(0x5408, 0xffff_8000_0000_2000);
                f.mem.write_u64(0x5410, u64::from(msr_index::IA32_FS_BASE));
                set(f, F::VM_ENTRY_MSR_LOAD_ADDRESS, 0x5400);
                set(f, F::VM_ENTRY_MSR_LOAD_COUNT, 2);
                f.vmlaunch()
            },
            expect: Expect::EntryFailure(0x8000_0022, 2),
        },
        Case {
            name: "L2 reads through an L1 EPT entry with reserved bits set",
            sdm: "29.3.3.1, 28.2.1",
            start: Fixture::launched,
            run: |f| {
                let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
                let raw = RawExit {
                    reason: 48,
                    guest_physical_address: 0x20_0000,
                    ..RawExit::default()
                };
                let resume = f
                    .vmx
                    .reflect_ept_fault(EptFault::Misconfiguration, &raw, &l2, &mut f.mem)
                    .unwrap();
                f.l1 = resume.state;
                Outcome::EntryFailed(resume)
            },
            expect: Expect::Exit(49),
        },
    ];

    #[test]
    fn malformed_vmx_from_l1_gets_the_sdm_outcome_31_4() {
        for case in MALFORMED {
            let mut f = (case.start)();
            let outcome = (case.run)(&mut f);
            let what = format!("{} (SDM {})", case.name, case.sdm);
            match case.expect {
                Expect::FailValid(error) => {
                    assert_eq!(outcome, Outcome::VmFailValid(error), "{what}");
                    assert_eq!(
                        f.read(F::VM_INSTRUCTION_ERROR),
                        u64::from(error.number()),
                        "{what}: the VM-instruction error field"
                    );
                }
                Expect::FailInvalid => assert_eq!(outcome, Outcome::VmFailInvalid, "{what}"),
                Expect::Fault(number) => match outcome {
                    Outcome::Inject(event) => assert_eq!(event.vector, number, "{what}"),
                    other => panic!("{what}: {other:?}"),
                },
                Expect::EntryFailure(reason, qualification) => {
                    let Outcome::EntryFailed(resume) = outcome else {
                        panic!("{what}: {outcome:?}");
                    };
                    assert_eq!(resume.state.rip, HOST_RIP, "{what}");
                    assert!(!f.vmx.in_l2(), "{what}");
                    assert_eq!(f.read(F::EXIT_REASON), u64::from(reason), "{what}");
                    assert_eq!(f.read(F::EXIT_QUALIFICATION), qualification, "{what}");
                    // A failed VMLAUNCH leaves the VMCS clear: VMRESUME is refused.
                    assert_eq!(
                        f.vmresume(),
                        Outcome::VmFailValid(E::VmresumeNonLaunchedVmcs),
                        "{what}"
                    );
                }
                Expect::Exit(reason) => {
                    let Outcome::EntryFailed(resume) = outcome else {
                        panic!("{what}: {outcome:?}");
                    };
                    assert_eq!(resume.state.rip, HOST_RIP, "{what}");
                    assert_eq!(f.read(F::EXIT_REASON), u64::from(reason), "{what}");
                    assert_eq!(f.read(F::GUEST_PHYSICAL_ADDRESS), 0x20_0000, "{what}");
                }
            }
        }
    }

    // --- Positive paths ---

    #[test]
    fn vmxon_vmclear_vmptrld_vmwrite_vmlaunch_builds_l2_from_the_guest_state_area_27_3_2() {
        let mut f = Fixture::ready();
        assert_eq!(f.vmx.current_vmcs(), Some(VMCS_A));
        // VMPTRST stores the current pointer.
        let out = Place::Memory { gpa: 0x300 };
        assert_eq!(f.vmx.vmptrst(&f.l1, out, &mut f.mem), Outcome::Ok);
        assert_eq!(f.mem.read_u64(0x300), Some(VMCS_A));
        // VMREAD truncates to the field width; memory destinations take 64 bits in 64-bit mode.
        f.write(F::GUEST_CS_SELECTOR, 0xdead_0008);
        assert_eq!(f.read(F::GUEST_CS_SELECTOR), 0x0008);
        let to_memory = Place::Memory { gpa: 0x308 };
        assert_eq!(
            f.vmx
                .vmread(&f.l1, F::GUEST_RIP.encoding().into(), to_memory, &mut f.mem),
            Outcome::Ok
        );
        assert_eq!(f.mem.read_u64(0x308), Some(L2_RIP));

        assert_eq!(f.vmlaunch(), Outcome::Launch);
        assert!(f.vmx.in_l2());
        let l0 = L0Requirements {
            current: kernel_controls(),
            tsc_offset: 77,
            ..L0Requirements::default()
        };
        let entry = f.vmx.l2_entry(&l0).unwrap();
        let s = &entry.state;
        assert!(entry.launch);
        assert_eq!(entry.mask, L2_ENTRY_STATE);
        assert_eq!(entry.eptp, Some(EPTP));
        assert_eq!(entry.vpid, Some(1));
        assert_eq!(entry.io_bitmaps, Some([IO_BITMAP_A, IO_BITMAP_B]));
        assert_eq!(entry.msr_bitmap, Some(MSR_BITMAP));
        assert_eq!((s.rip, s.rsp, s.rflags), (L2_RIP, 0x20_0000, 0x202));
        assert_eq!(
            (s.cr0, s.cr3, s.cr4),
            (0x8000_0031, 0xa000, CR4_VMXE | CR4_PAE)
        );
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.pat, 0x0606_0606_0606_0606);
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.cs.vmx_access_rights(), 0xa09b);
        assert!(s.cs.long_mode());
        assert_eq!(s.gs.base, 0x1234_0000);
        assert_eq!(s.ldtr.ar & Segment::UNUSABLE, Segment::UNUSABLE);
        assert_eq!((s.tr.selector, s.tr.base, s.tr.limit), (0x18, 0xb000, 0x67));
        assert_eq!((s.gdtr.base, s.gdtr.limit), (0xc000, 0x27));
        assert_eq!((s.idtr.base, s.idtr.limit), (0xd000, 0xfff));
        // What VM entry does not touch comes from L1.
        assert_eq!(s.gprs, f.l1.gprs);
        assert_eq!(s.cr2, f.l1.cr2);
        assert_eq!(s.lstar, f.l1.lstar);
        assert_eq!(s.tsc_offset, 77);
        assert_eq!(s.injection.information & EventInfo::VALID, 0);
        // Controls: L1's server-owned requests on top of the kernel's bits.
        let c = &s.controls;
        assert!(c.primary.contains(ProcessorBasedControls::HLT_EXITING));
        assert!(
            c.primary
                .contains(ProcessorBasedControls::UNCONDITIONAL_IO_EXITING)
        );
        assert!(!c.secondary.contains(SecondaryControls::UNRESTRICTED_GUEST));
        assert!(
            c.secondary
                .contains(SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID)
        );
        assert!(
            c.entry
                .contains(EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER)
        );
        assert_eq!(
            c.exception_bitmap,
            (1 << vector::UD) | (1 << vector::DB) | (1 << vector::AC)
        );
        assert_eq!(c.cr0_guest_host_mask, 0x8000_0021);
        assert_eq!(c.cr0_read_shadow, 0x8000_0031);
        assert_eq!(c.cr4_guest_host_mask, CR4_VMXE);
        assert_eq!(c.cr4_read_shadow, CR4_PAE);
        // The merged controls pass the host-isolation rule against the kernel's.
        let mut kernel = VmcsImage::new();
        let k = kernel_controls();
        kernel.write(
            F::PIN_BASED_VM_EXECUTION_CONTROLS,
            k.pin_based.bits().into(),
        );
        kernel.write(
            F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            k.primary.bits().into(),
        );
        kernel.write(
            F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            k.secondary.bits().into(),
        );
        kernel.write(F::VM_ENTRY_CONTROLS, k.entry.bits().into());
        kernel.write(F::EXCEPTION_BITMAP, k.exception_bitmap.into());
        assert_eq!(crate::message::validate(&kernel, entry.mask, s), Ok(()));
    }

    #[test]
    fn reflected_exit_saves_l2_and_loads_host_state_28_3_28_5_then_vmresume_runs_l2() {
        let mut f = Fixture::launched();
        let entry = f.vmx.l2_entry(&L0Requirements::default()).unwrap();
        let mut l2 = entry.state;
        l2.rip = L2_RIP + 0x40;
        l2.gprs.rax = 0xcafe;
        l2.cr2 = 0x7777;
        l2.efer = EFER_LME | EFER_LMA | EFER_NXE;
        let raw = RawExit {
            reason: ExitReason::Cpuid as u32,
            instruction_length: 2,
            ..RawExit::default()
        };
        assert!(f.vmx.exit_belongs_to_l1(&decode(&raw), &l2, &mut f.mem));
        let resume = f.vmx.reflect_exit(&raw, &l2, &mut f.mem).unwrap();
        assert!(!f.vmx.in_l2());
        assert_eq!(resume.abort, None);
        let s = &resume.state;
        assert_eq!((s.rip, s.rsp, s.rflags), (HOST_RIP, HOST_RSP, 2));
        assert_eq!(
            (s.cr0, s.cr3, s.cr4),
            (0x8000_0031, 0x4000, CR4_VMXE | CR4_PAE)
        );
        assert_eq!(s.dr7, 0x400);
        assert_eq!(s.efer, EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE);
        assert_eq!(s.pat, PAT);
        assert_eq!(s.cs.selector, 8);
        assert!(s.cs.long_mode());
        assert_eq!(s.cs.vmx_access_rights(), 0xa09b);
        assert_eq!(s.ss.vmx_access_rights(), 0xc093);
        assert_eq!(s.fs.vmx_access_rights() & ar::UNUSABLE, ar::UNUSABLE);
        assert_eq!((s.tr.selector, s.tr.base, s.tr.limit), (0x18, 0x5000, 0x67));
        assert_eq!(s.tr.vmx_access_rights(), 0x8b);
        assert_eq!((s.gdtr.base, s.idtr.base), (0x5100, 0x5200));
        assert_eq!(s.gprs.rax, 0xcafe, "GPRs are L2's");
        assert_eq!(s.cr2, 0x7777, "CR2 is L2's");
        assert_eq!(s.interruptibility, Interruptibility::empty());
        // L1 reads the exit and L2's saved state.
        f.l1 = resume.state;
        assert_eq!(f.read(F::EXIT_REASON), 10);
        assert_eq!(f.read(F::VM_EXIT_INSTRUCTION_LENGTH), 2);
        assert_eq!(f.read(F::GUEST_RIP), L2_RIP + 0x40);
        assert_eq!(f.read(F::GUEST_IA32_EFER), EFER_LME | EFER_LMA | EFER_NXE);
        // L1 completes CPUID and resumes L2.
        f.write(F::GUEST_RIP, L2_RIP + 0x42);
        assert_eq!(f.vmresume(), Outcome::Resume);
        let again = f.vmx.l2_entry(&L0Requirements::default()).unwrap();
        assert!(!again.launch);
        assert_eq!(again.state.rip, L2_RIP + 0x42);
        assert_eq!(again.state.gprs.rax, 0xcafe);
    }

    /// A launched L2 that took CPUID exits reflected to L1, twice (L1 now runs its handler):
    /// the second exit saves what the first did, so VMCS12 is as the last check found it.
    fn after_reflected_cpuid() -> Fixture {
        let mut f = Fixture::launched();
        for round in 0..2 {
            if round > 0 {
                assert_eq!(f.vmresume(), Outcome::Resume);
            }
            let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
            let raw = RawExit {
                reason: ExitReason::Cpuid as u32,
                instruction_length: 2,
                ..RawExit::default()
            };
            let resume = f.vmx.reflect_exit(&raw, &l2, &mut f.mem).unwrap();
            f.l1 = resume.state;
        }
        f
    }

    const FAST_MASK: StateMask = L2_ENTRY_STATE.difference(FAST_ENTRY_KEPT);

    #[test]
    fn vmresume_after_a_reflected_exit_with_only_shadowed_fields_changed_writes_less() {
        let mut f = after_reflected_cpuid();
        let full = f.vmx.entry.is_none();
        assert!(full, "L1 runs");
        f.vmx.pull_shadow(&[(F::GUEST_RIP, L2_RIP + 2)]);
        assert_eq!(f.vmresume(), Outcome::Resume);
        let fast = f.vmx.l2_entry(&L0Requirements::default()).unwrap();
        assert_eq!(fast.mask, FAST_MASK);
        assert_eq!(fast.state.rip, L2_RIP + 2);
        // The state is computed whole either way: only the groups written differ.
        let mut g = after_reflected_cpuid();
        let bitmap = g.read(F::EXCEPTION_BITMAP);
        g.write(F::EXCEPTION_BITMAP, bitmap ^ (1 << vector::BP));
        g.write(F::EXCEPTION_BITMAP, bitmap);
        g.vmx.pull_shadow(&[(F::GUEST_RIP, L2_RIP + 2)]);
        assert_eq!(g.vmresume(), Outcome::Resume);
        let slow = g.vmx.l2_entry(&L0Requirements::default()).unwrap();
        assert_eq!(
            slow.mask, L2_ENTRY_STATE,
            "a VMWRITE of a control: complete checks"
        );
        assert_eq!(slow.state, fast.state);
    }

    #[test]
    fn an_exit_that_saves_other_segment_state_makes_the_next_entry_check_everything() {
        let mut f = after_reflected_cpuid();
        assert_eq!(f.vmresume(), Outcome::Resume);
        let mut l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        l2.gs.base += 0x1000;
        let raw = RawExit {
            reason: ExitReason::Cpuid as u32,
            instruction_length: 2,
            ..RawExit::default()
        };
        f.l1 = f.vmx.reflect_exit(&raw, &l2, &mut f.mem).unwrap().state;
        assert_eq!(f.vmresume(), Outcome::Resume);
        let entry = f.vmx.l2_entry(&L0Requirements::default()).unwrap();
        assert_eq!(entry.mask, L2_ENTRY_STATE);
        assert_eq!(entry.state.gs.base, l2.gs.base);
    }

    #[test]
    fn the_fast_path_still_checks_what_l1_wrote_through_the_shadow_27_3_1_4() {
        let mut f = after_reflected_cpuid();
        // RFLAGS bit 3 is reserved: the entry fails with invalid guest state (reason 33).
        f.vmx.pull_shadow(&[(F::GUEST_RFLAGS, 0x2 | (1 << 3))]);
        match f.vmresume() {
            Outcome::EntryFailed(resume) => {
                assert_eq!(resume.abort, None);
                f.l1 = resume.state;
                assert_eq!(
                    f.read(F::EXIT_REASON),
                    u64::from(ExitReasonField::ENTRY_FAILURE | 33)
                );
            }
            other => panic!("{other:?}"),
        }
        // RFLAGS.VM through the shadow: a 64-bit L2 may not set it (§27.3.1.4). (Where the
        // segment checks depend on it, a changed VM flag also voids the fast path: `Verified`
        // records it.)
        let mut f = after_reflected_cpuid();
        f.vmx.pull_shadow(&[(F::GUEST_RFLAGS, 0x2 | rflags::VM)]);
        assert!(matches!(f.vmresume(), Outcome::EntryFailed(_)));
        // An invalid event to inject is VMfail 7, as on the complete path.
        let mut f = after_reflected_cpuid();
        f.vmx
            .pull_shadow(&[(F::VM_ENTRY_INTERRUPTION_INFORMATION, 0x8000_0300 | 32)]);
        assert_eq!(
            f.vmresume(),
            Outcome::VmFailValid(VmInstructionError::EntryInvalidControlFields)
        );
    }

    #[test]
    fn other_l0_requirements_or_another_vmcs12_in_between_write_everything() {
        let mut f = after_reflected_cpuid();
        assert_eq!(f.vmresume(), Outcome::Resume);
        let l0 = L0Requirements {
            tsc_offset: 5,
            ..L0Requirements::default()
        };
        assert_eq!(f.vmx.l2_entry(&l0).unwrap().mask, L2_ENTRY_STATE);
        // Without a reflected exit in between (a VM-entry failure, say), no fast path.
        let mut f = after_reflected_cpuid();
        f.vmx.pull_shadow(&[(F::GUEST_RFLAGS, 0x2 | (1 << 3))]);
        assert!(matches!(f.vmresume(), Outcome::EntryFailed(_)));
        f.vmx.pull_shadow(&[(F::GUEST_RFLAGS, 0x2)]);
        assert_eq!(f.vmresume(), Outcome::Resume);
        let entry = f.vmx.l2_entry(&L0Requirements::default()).unwrap();
        assert_eq!(entry.mask, L2_ENTRY_STATE);
    }

    #[test]
    fn an_l1_resume_leaves_out_only_groups_l1s_object_still_holds() {
        let raw = RawExit {
            reason: ExitReason::Cpuid as u32,
            instruction_length: 2,
            ..RawExit::default()
        };
        // L2 changed nothing L1 gets back but its GPRs, RIP, RSP, RFLAGS.
        let mut f = Fixture::launched();
        let held = f.l1;
        let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        let resume = f.vmx.reflect_exit(&raw, &l2, &mut f.mem).unwrap();
        let left_out = L1_RESUME_STATE - resume.mask;
        assert!(!left_out.is_empty());
        assert!(!left_out.intersects(StateMask::GPRS | StateMask::RIP_RSP_RFLAGS));
        assert!(L1_VMX_EXIT_STATE.contains(left_out));
        assert_eq!(unchanged_groups(&resume.state, &held) & left_out, left_out);
        // L2 took a page fault: CR2, which VM exits carry to L1, differs, so CR is written.
        let mut f = Fixture::launched();
        let mut l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        l2.cr2 = f.l1.cr2 ^ 0x7000;
        let resume = f.vmx.reflect_exit(&raw, &l2, &mut f.mem).unwrap();
        assert!(resume.mask.contains(StateMask::CR));
        assert_eq!(resume.state.cr2, l2.cr2);
    }

    #[test]
    fn injection_from_vmcs12_reaches_l2_and_exits_clear_its_valid_bit_25_8_3() {
        let mut f = Fixture::ready();
        // #PF with error code 2.
        f.write(F::VM_ENTRY_INTERRUPTION_INFORMATION, 0x8000_0b0e);
        f.write(F::VM_ENTRY_EXCEPTION_ERROR_CODE, 2);
        assert_eq!(f.vmlaunch(), Outcome::Launch);
        let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        assert_eq!(l2.injection.information, 0x8000_0b0e);
        assert_eq!(l2.injection.error_code, 2);
        let raw = RawExit {
            reason: 12,
            ..RawExit::default()
        };
        let resume = f.vmx.reflect_exit(&raw, &l2, &mut f.mem).unwrap();
        f.l1 = resume.state;
        assert_eq!(f.read(F::VM_ENTRY_INTERRUPTION_INFORMATION), 0xb0e);
    }

    #[test]
    fn exits_belong_to_l1_per_its_controls_bitmaps_and_masks_26_1_26_2() {
        let mut f = Fixture::launched();
        let mut l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        // I/O bitmap A: port 0x60 exits, 0x61 does not; a 2-byte access at 0x5f reaches 0x60.
        f.mem.write_u64(IO_BITMAP_A + 8, 1 << 32);
        let io = |port: u16, size: u8| VmExit::IoInstruction {
            port,
            size,
            direction: crate::exit::IoDirection::In,
            immediate: true,
            string: None,
        };
        // MSR bitmap: read of 0x10 and write of 0xc000_0080 exit.
        f.mem.write_u64(MSR_BITMAP, 1 << 0x10);
        f.mem.write_u64(MSR_BITMAP + 0xc00 + 0x80 / 8, 1);
        let mut msr = |f: &mut Fixture, index: u32, write: bool| {
            l2.gprs.rcx = index.into();
            let exit = if write { VmExit::Wrmsr } else { VmExit::Rdmsr };
            f.vmx.exit_belongs_to_l1(&exit, &l2, &mut f.mem)
        };
        assert!(msr(&mut f, 0x10, false));
        assert!(!msr(&mut f, 0x10, true));
        assert!(msr(&mut f, 0xc000_0080, true));
        assert!(!msr(&mut f, 0xc000_0080, false));
        assert!(
            msr(&mut f, 0x4000_0000, false),
            "outside the bitmap's ranges"
        );
        let belongs = |f: &mut Fixture, exit: VmExit, l2: &GuestState| {
            f.vmx.exit_belongs_to_l1(&exit, l2, &mut f.mem)
        };
        let l2 = l2;
        assert!(belongs(&mut f, io(0x60, 1), &l2));
        assert!(!belongs(&mut f, io(0x61, 1), &l2));
        assert!(belongs(&mut f, io(0x5f, 2), &l2));
        assert!(belongs(&mut f, io(0xffff, 2), &l2), "wraps past FFFFH");
        assert!(!belongs(&mut f, io(0x8000, 4), &l2));
        assert!(belongs(&mut f, VmExit::Hlt, &l2));
        assert!(belongs(&mut f, VmExit::Cpuid, &l2));
        assert!(belongs(&mut f, VmExit::Xsetbv, &l2));
        assert!(!belongs(&mut f, VmExit::Rdtsc, &l2));
        assert!(!belongs(
            &mut f,
            VmExit::MovDr {
                dr: 7,
                direction: crate::exit::MovDrDirection::ToDr,
                gpr: Gpr::Rax
            },
            &l2
        ));
        assert!(!belongs(
            &mut f,
            VmExit::EptMisconfiguration { gpa: 0 },
            &l2
        ));
        assert!(belongs(
            &mut f,
            VmExit::ExternalInterrupt { vector: Some(0x30) },
            &l2
        ));
        // Exceptions: #UD in the bitmap, #GP not; #PF per mask and match.
        let exception = |number: u8, error_code: Option<u32>| VmExit::ExceptionOrNmi {
            vector: number,
            kind: EventType::HardwareException,
            error_code,
            nmi_unblocking: false,
            detail: crate::exit::ExceptionDetail::None,
        };
        assert!(belongs(&mut f, exception(vector::UD, None), &l2));
        assert!(!belongs(&mut f, exception(vector::GP, Some(0)), &l2));
        assert!(!belongs(&mut f, exception(vector::PF, Some(2)), &l2));
        f.write(F::EXCEPTION_BITMAP, 1 << vector::PF);
        f.write(F::PAGE_FAULT_ERROR_CODE_MASK, 1);
        f.write(F::PAGE_FAULT_ERROR_CODE_MATCH, 1);
        assert!(
            belongs(&mut f, exception(vector::PF, Some(3)), &l2),
            "present: matches"
        );
        assert!(
            !belongs(&mut f, exception(vector::PF, Some(2)), &l2),
            "not present"
        );
        // CR0 writes against L1's mask (PE, NE, PG) and read shadow.
        let mut l2 = l2;
        let mov_cr0 = VmExit::ControlRegisterAccess {
            cr: 0,
            access: CrAccess::MovToCr { gpr: Gpr::Rbx },
        };
        l2.gprs.rbx = 0x8000_0031 | (1 << 16);
        assert!(!belongs(&mut f, mov_cr0, &l2), "WP is L2's");
        l2.gprs.rbx = 0x11;
        assert!(belongs(&mut f, mov_cr0, &l2), "clearing PG is L1's");
        // CR3 loads exit with CR3-load exiting unless the value is a CR3-target value.
        let mov_cr3 = VmExit::ControlRegisterAccess {
            cr: 3,
            access: CrAccess::MovToCr { gpr: Gpr::Rbx },
        };
        assert!(!belongs(&mut f, mov_cr3, &l2));
        let primary = f.read(F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS);
        f.write(
            F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            primary | u64::from(ProcessorBasedControls::CR3_LOAD_EXITING.bits()),
        );
        f.write(F::CR3_TARGET_COUNT, 1);
        f.write(F::CR3_TARGET_VALUE_0, 0x11);
        assert!(!belongs(&mut f, mov_cr3, &l2));
        l2.gprs.rbx = 0x12;
        assert!(belongs(&mut f, mov_cr3, &l2));
    }

    #[test]
    fn interrupts_and_nmis_exit_to_l1_with_acknowledge_interrupt_on_exit_28_2_2() {
        let f = Fixture::launched();
        let raw = f.vmx.external_interrupt_exit(0x30).unwrap();
        assert_eq!(raw.reason, 1);
        assert_eq!(raw.interruption().unwrap().vector, 0x30);
        let nmi = f.vmx.nmi_exit().unwrap();
        assert_eq!(nmi.interruption().unwrap().kind, EventType::Nmi);
        let idle = Fixture::ready();
        assert_eq!(
            idle.vmx.external_interrupt_exit(0x30),
            None,
            "L2 is not running"
        );
    }

    #[test]
    fn nmi_exit_leaves_l1_blocking_nmis_28_5() {
        let mut f = Fixture::launched();
        let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        let raw = f.vmx.nmi_exit().unwrap();
        let resume = f.vmx.reflect_exit(&raw, &l2, &mut f.mem).unwrap();
        assert!(
            resume
                .state
                .interruptibility
                .contains(Interruptibility::BLOCKING_BY_NMI)
        );
    }

    #[test]
    fn ept_violation_reflection_carries_l1_permissions_and_addresses_28_2_1() {
        let mut f = Fixture::launched();
        let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        let raw = RawExit {
            reason: 48,
            qualification: 0x181,
            guest_linear_address: 0x7000_1000,
            guest_physical_address: 0x30_1000,
            ..RawExit::default()
        };
        let q = EptViolationQualification {
            read: true,
            gla_valid: true,
            gla_is_translation: true,
            ..EptViolationQualification::default()
        };
        let resume = f
            .vmx
            .reflect_ept_fault(EptFault::Violation(q), &raw, &l2, &mut f.mem)
            .unwrap();
        f.l1 = resume.state;
        assert_eq!(f.read(F::EXIT_REASON), 48);
        assert_eq!(f.read(F::EXIT_QUALIFICATION), q.encode());
        assert_eq!(f.read(F::GUEST_PHYSICAL_ADDRESS), 0x30_1000);
        assert_eq!(f.read(F::GUEST_LINEAR_ADDRESS), 0x7000_1000);
    }

    #[test]
    fn invept_and_invvpid_name_what_to_invalidate_31_3() {
        let mut f = Fixture::ready();
        assert_eq!(
            f.invept(1, EPTP),
            Outcome::InvalidateEpt(EptInvalidation::SingleContext { eptp: EPTP })
        );
        assert_eq!(
            f.invept(2, 0),
            Outcome::InvalidateEpt(EptInvalidation::AllContext)
        );
        assert_eq!(
            f.invvpid(1, 5, 0),
            Outcome::InvalidateVpid(VpidInvalidation::SingleContext { vpid: 5 })
        );
        assert_eq!(
            f.invvpid(2, 0, 0),
            Outcome::InvalidateVpid(VpidInvalidation::AllContext)
        );
    }

    #[test]
    fn vmclear_writes_the_vmcs_back_and_vmptrld_restores_it_25_11_3() {
        let mut f = Fixture::launched();
        let l2 = f.vmx.l2_entry(&L0Requirements::default()).unwrap().state;
        let resume = f
            .vmx
            .reflect_exit(
                &RawExit {
                    reason: 12,
                    ..RawExit::default()
                },
                &l2,
                &mut f.mem,
            )
            .unwrap();
        f.l1 = resume.state;
        assert_eq!(f.vmclear(VMCS_A), Outcome::Ok);
        assert_eq!(f.vmx.current_vmcs(), None);
        assert_eq!(f.mem.read_u64(VMCS_A + 8), Some(REGION_MAGIC));
        assert_eq!(f.vmptrld(VMCS_A), Outcome::Ok);
        assert_eq!(f.read(F::GUEST_RIP), L2_RIP);
        assert_eq!(f.read(F::EXIT_REASON), 12);
        // VMCLEAR made it clear: VMRESUME refused, VMLAUNCH runs it.
        assert_eq!(
            f.vmresume(),
            Outcome::VmFailValid(E::VmresumeNonLaunchedVmcs)
        );
        assert_eq!(f.vmlaunch(), Outcome::Launch);
    }

    #[test]
    fn a_ninth_vmcs_evicts_a_clear_non_current_one_and_keeps_its_data() {
        let mut f = Fixture::ready();
        let region = |i: u64| 0x10_0000 + i * 0x1000;
        for i in 0..VMCS_CACHE_SLOTS as u64 + 1 {
            f.mem.write_u64(region(i), revision());
            assert_eq!(f.vmptrld(region(i)), Outcome::Ok);
            f.write(F::GUEST_RIP, 0x1000 + i);
        }
        // Every VMCS still reads back what was written, through eviction and reload.
        for i in 0..VMCS_CACHE_SLOTS as u64 + 1 {
            assert_eq!(f.vmptrld(region(i)), Outcome::Ok);
            assert_eq!(f.read(F::GUEST_RIP), 0x1000 + i);
        }
        // The launched VMCS A survives too, with its launch state.
        assert_eq!(f.vmptrld(VMCS_A), Outcome::Ok);
        assert_eq!(f.read(F::GUEST_RIP), L2_RIP);
    }

    #[test]
    fn vmread_and_vmwrite_outside_64_bit_mode_use_32_bit_operands() {
        let mut f = Fixture::ready();
        f.l1.efer &= !(EFER_LMA | EFER_LME);
        f.l1.cs.ar = Segment::ar_from_vmx(0xc09b);
        assert_eq!(
            f.vmwrite(F::GUEST_RIP.encoding().into(), 0x1234_5678_9abc_def0),
            Outcome::Ok
        );
        assert_eq!(f.read(F::GUEST_RIP), 0x9abc_def0);
        // Compatibility mode (LMA, CS.L = 0) is #UD.
        f.l1.efer |= EFER_LMA | EFER_LME;
        assert!(
            matches!(f.vmread(F::GUEST_RIP.encoding().into()), Outcome::Inject(e) if e.vector == vector::UD)
        );
    }

    #[test]
    fn resolve_computes_the_operand_address_and_register_values_28_2_5() {
        let mut l1 = l1_state();
        l1.gprs.rbx = 0x4000;
        l1.gprs.rsi = 3;
        // VMPTRLD [rbx + rsi*8 + 0x10]: scale 3, 64-bit address, DS, index RSI, base RBX.
        let info = 3 | (2 << 7) | (3 << 15) | (6 << 18) | (3 << 23);
        let raw = RawExit {
            reason: 21,
            qualification: 0x10,
            instruction_information: info,
            ..RawExit::default()
        };
        let resolved = resolve(&decode(&raw), &l1, |linear| Ok(linear + 0x100_0000))
            .unwrap()
            .unwrap();
        assert_eq!(resolved.kind, VmxInstr::Vmptrld);
        assert_eq!(resolved.operand, Some(Place::Memory { gpa: 0x100_4028 }));
        // VMWRITE rax, rcx: register operand (bit 10), Reg1 = RCX, Reg2 = RAX.
        l1.gprs.rax = F::GUEST_RIP.encoding().into();
        l1.gprs.rcx = 0x5555;
        let raw = RawExit {
            reason: 25,
            instruction_information: (1 << 10) | (1 << 3),
            ..RawExit::default()
        };
        let resolved = resolve(&decode(&raw), &l1, |_| unreachable!())
            .unwrap()
            .unwrap();
        assert_eq!(
            resolved.operand,
            Some(Place::Register {
                gpr: Gpr::Rcx,
                value: 0x5555
            })
        );
        assert_eq!(resolved.reg2, Some(F::GUEST_RIP.encoding().into()));
        assert!(resolve(&VmExit::Hlt, &l1, Ok).is_none());
    }

    // --- No input panics ---

    fn any_place() -> impl Strategy<Value = Place> {
        prop_oneof![
            (0u64..16, any::<u64>()).prop_map(|(g, value)| Place::Register {
                gpr: Gpr::from_number(g as u32),
                value
            }),
            prop_oneof![
                4 => Just(OPERAND),
                1 => Just(DESCRIPTOR),
                1 => Just(VMCS_A),
                1 => 0u64..0x20_0000,
                1 => any::<u64>()
            ]
            .prop_map(|gpa| Place::Memory { gpa }),
        ]
    }

    fn any_kind() -> impl Strategy<Value = VmxInstr> {
        prop::sample::select(vec![
            VmxInstr::Vmclear,
            VmxInstr::Vmlaunch,
            VmxInstr::Vmptrld,
            VmxInstr::Vmptrst,
            VmxInstr::Vmread,
            VmxInstr::Vmresume,
            VmxInstr::Vmwrite,
            VmxInstr::Vmxoff,
            VmxInstr::Vmxon,
            VmxInstr::Invept,
            VmxInstr::Invvpid,
            VmxInstr::Vmfunc,
        ])
    }

    #[derive(Debug, Clone)]
    enum Step {
        Instruction(Instruction, u8, bool),
        Poke(u64, u64),
        Write(u64, u64),
        Exit(RawExit, u64),
        Ept(bool, u64),
        FailedEntry(u32, u64),
    }

    fn any_step() -> impl Strategy<Value = Step> {
        let encoding = prop_oneof![
            prop::sample::select(
                ALL_FIELDS
                    .iter()
                    .map(|f| u64::from(f.encoding()))
                    .collect::<Vec<_>>()
            ),
            any::<u64>(),
        ];
        let pointer = prop_oneof![
            Just(VMXON_REGION),
            Just(VMCS_A),
            Just(VMCS_B),
            (0u64..64).prop_map(|i| 0x10_0000 + i * 0x1000),
            any::<u64>()
        ];
        let cpl = prop_oneof![8 => Just(0u8), 1 => 1u8..4];
        prop_oneof![
            6 => (
                any_kind(),
                prop::option::weighted(0.9, any_place()),
                prop::option::weighted(0.9, encoding.clone()),
                cpl,
                prop::bool::weighted(0.9),
            )
                .prop_map(|(kind, operand, reg2, cpl, long)| {
                    Step::Instruction(Instruction { kind, operand, reg2 }, cpl, long)
                }),
            2 => pointer.clone().prop_map(|p| Step::Poke(OPERAND, p)),
            2 => (pointer, any::<u64>()).prop_map(|(a, v)| Step::Poke(a, v)),
            3 => (encoding, any::<u64>()).prop_map(|(e, v)| Step::Write(e, v)),
            2 => (any::<u32>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>())
                .prop_map(|(reason, q, info, int, rcx)| Step::Exit(RawExit {
                    reason: (reason % 80) | (reason & 0x8000_0000),
                    qualification: q,
                    instruction_information: info,
                    interruption_information: int,
                    ..RawExit::default()
                }, rcx)),
            1 => (any::<bool>(), any::<u64>()).prop_map(|(m, q)| Step::Ept(m, q)),
            1 => (any::<u32>(), any::<u64>()).prop_map(|(r, q)| Step::FailedEntry(r, q)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        #[test]
        fn no_sequence_of_instructions_operands_or_memory_panics(
            start in 0u8..3,
            steps in prop::collection::vec(any_step(), 0..40),
        ) {
            let mut f = match start {
                0 => Fixture::off(),
                1 => Fixture::ready(),
                _ => Fixture::launched(),
            };
            for step in steps {
                match step {
                    Step::Instruction(instruction, cpl, long) => {
                        let mut l1 = f.l1;
                        l1.ss.ar = Segment::ar_from_vmx(0xc093 | (u32::from(cpl) << 5));
                        if !long {
                            l1.cs.ar = Segment::ar_from_vmx(0xc09b);
                        }
                        let before = f.vmx.current_vmcs();
                        let outcome = f.vmx.execute(&instruction, &l1, &mut f.mem);
                        if let Outcome::VmFailValid(error) = &outcome {
                            prop_assert!(f.vmx.vmcs12().is_some() || before.is_none());
                            if let Some(v) = f.vmx.vmcs12() {
                                prop_assert_eq!(v.read(F::VM_INSTRUCTION_ERROR), u64::from(error.number()));
                            }
                        }
                        if let Outcome::EntryFailed(resume) = &outcome {
                            f.l1 = resume.state;
                        }
                        let _ = outcome.rflags(l1.rflags);
                        if matches!(outcome, Outcome::Launch | Outcome::Resume) {
                            let entry = f.vmx.l2_entry(&L0Requirements {
                                current: kernel_controls(),
                                ..L0Requirements::default()
                            });
                            prop_assert!(entry.is_some());
                        }
                    }
                    Step::Poke(address, value) => {
                        f.mem.write_u64(address, value);
                    }
                    Step::Write(encoding, value) => {
                        let _ = f.vmwrite(encoding, value);
                    }
                    Step::Exit(raw, rcx) => {
                        let mut l2 = f.vmx.l2_entry(&L0Requirements::default()).map(|e| e.state).unwrap_or_default();
                        l2.gprs.rcx = rcx;
                        l2.rbx_like_noise();
                        let exit = decode(&raw);
                        if f.vmx.exit_belongs_to_l1(&exit, &l2, &mut f.mem)
                            && let Some(resume) = f.vmx.reflect_exit(&raw, &l2, &mut f.mem)
                        {
                            f.l1 = resume.state;
                            let _ = resume.reply();
                        }
                        let _ = f.vmx.external_interrupt_exit(raw.qualification as u8);
                        let _ = f.vmx.nmi_exit();
                    }
                    Step::Ept(misconfiguration, q) => {
                        let l2 = GuestState::default();
                        let fault = if misconfiguration {
                            EptFault::Misconfiguration
                        } else {
                            EptFault::Violation(EptViolationQualification::decode(q))
                        };
                        let raw = RawExit { guest_physical_address: q, ..RawExit::default() };
                        if let Some(resume) = f.vmx.reflect_ept_fault(fault, &raw, &l2, &mut f.mem) {
                            f.l1 = resume.state;
                        }
                    }
                    Step::FailedEntry(reason, q) => {
                        let raw = RawExit { reason, qualification: q, ..RawExit::default() };
                        if let Some(resume) = f.vmx.failed_entry_exit(&raw, &mut f.mem) {
                            f.l1 = resume.state;
                        }
                    }
                }
                // Keep L1 able to execute VMX instructions most of the time.
                if f.l1.cr0 & CR0_PE == 0 || f.l1.cs.ar == 0 {
                    f.l1 = l1_state();
                }
            }
        }
    }

    /// Test-only noise so the proptest exercises register-dependent exits.
    trait Noise {
        fn rbx_like_noise(&mut self);
    }

    impl Noise for GuestState {
        fn rbx_like_noise(&mut self) {
            self.gprs.rbx = self.gprs.rcx.rotate_left(7);
        }
    }
}
