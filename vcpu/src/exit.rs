//! The one VM-exit decoder: raw VMCS exit-information fields in, a typed [`VmExit`] out.
//!
//! The kernel reads the exit-information fields once into a [`RawExit`] (SDM Vol. 3C §25.9);
//! [`decode`] turns them into a [`VmExit`] whose variants carry decoded fields, following
//! SDM Vol. 3C §28.2 ("Recording VM-Exit Information"): exit qualifications (§28.2.1),
//! interruption information (§28.2.2), IDT-vectoring information (§28.2.4) and instruction
//! information (§28.2.5). Basic exit reasons are listed in SDM Vol. 3D Appendix C. Every raw
//! bit of an exit is read in this file, and nowhere else; handlers match on [`VmExit`].

use crate::qualification::EptViolationQualification;
use crate::vmcs::{VmcsAccess, VmcsField};

macro_rules! exit_reasons {
    ($( $(#[$doc:meta])* $name:ident = $number:literal; )*) => {
        /// Basic exit reasons, bits 15:0 of the exit-reason field (SDM Vol. 3D Appendix C).
        /// Unused numbers (35, 38, 42, 71) and numbers above 76 have no variant.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ExitReason {
            $( $(#[$doc])* $name = $number, )*
        }

        impl ExitReason {
            /// Every basic exit reason, ascending.
            pub const ALL: &'static [ExitReason] = &[$(ExitReason::$name,)*];

            /// The exit reason with this number, if the SDM defines it.
            pub const fn from_basic(number: u16) -> Option<ExitReason> {
                match number {
                    $( $number => Some(ExitReason::$name), )*
                    _ => None,
                }
            }
        }
    };
}

exit_reasons! {
    /// 0: exception or non-maskable interrupt (NMI).
    ExceptionOrNmi = 0;
    /// 1: external interrupt.
    ExternalInterrupt = 1;
    /// 2: triple fault.
    TripleFault = 2;
    /// 3: INIT signal.
    InitSignal = 3;
    /// 4: start-up IPI (SIPI).
    StartupIpi = 4;
    /// 5: I/O system-management interrupt (SMI).
    IoSmi = 5;
    /// 6: other SMI.
    OtherSmi = 6;
    /// 7: interrupt window.
    InterruptWindow = 7;
    /// 8: NMI window.
    NmiWindow = 8;
    /// 9: task switch.
    TaskSwitch = 9;
    /// 10: CPUID.
    Cpuid = 10;
    /// 11: GETSEC.
    Getsec = 11;
    /// 12: HLT.
    Hlt = 12;
    /// 13: INVD.
    Invd = 13;
    /// 14: INVLPG.
    Invlpg = 14;
    /// 15: RDPMC.
    Rdpmc = 15;
    /// 16: RDTSC.
    Rdtsc = 16;
    /// 17: RSM.
    Rsm = 17;
    /// 18: VMCALL.
    Vmcall = 18;
    /// 19: VMCLEAR.
    Vmclear = 19;
    /// 20: VMLAUNCH.
    Vmlaunch = 20;
    /// 21: VMPTRLD.
    Vmptrld = 21;
    /// 22: VMPTRST.
    Vmptrst = 22;
    /// 23: VMREAD.
    Vmread = 23;
    /// 24: VMRESUME.
    Vmresume = 24;
    /// 25: VMWRITE.
    Vmwrite = 25;
    /// 26: VMXOFF.
    Vmxoff = 26;
    /// 27: VMXON.
    Vmxon = 27;
    /// 28: control-register accesses.
    ControlRegisterAccess = 28;
    /// 29: MOV DR.
    MovDr = 29;
    /// 30: I/O instruction.
    IoInstruction = 30;
    /// 31: RDMSR.
    Rdmsr = 31;
    /// 32: WRMSR.
    Wrmsr = 32;
    /// 33: VM-entry failure due to invalid guest state.
    InvalidGuestState = 33;
    /// 34: VM-entry failure due to MSR loading.
    MsrLoading = 34;
    /// 36: MWAIT.
    Mwait = 36;
    /// 37: monitor trap flag.
    MonitorTrapFlag = 37;
    /// 39: MONITOR.
    Monitor = 39;
    /// 40: PAUSE.
    Pause = 40;
    /// 41: VM-entry failure due to machine-check event.
    MachineCheckDuringEntry = 41;
    /// 43: TPR below threshold.
    TprBelowThreshold = 43;
    /// 44: APIC access.
    ApicAccess = 44;
    /// 45: virtualized EOI.
    VirtualizedEoi = 45;
    /// 46: access to GDTR or IDTR.
    GdtrIdtrAccess = 46;
    /// 47: access to LDTR or TR.
    LdtrTrAccess = 47;
    /// 48: EPT violation.
    EptViolation = 48;
    /// 49: EPT misconfiguration.
    EptMisconfiguration = 49;
    /// 50: INVEPT.
    Invept = 50;
    /// 51: RDTSCP.
    Rdtscp = 51;
    /// 52: VMX-preemption timer expired.
    PreemptionTimer = 52;
    /// 53: INVVPID.
    Invvpid = 53;
    /// 54: WBINVD or WBNOINVD.
    Wbinvd = 54;
    /// 55: XSETBV.
    Xsetbv = 55;
    /// 56: APIC write.
    ApicWrite = 56;
    /// 57: RDRAND.
    Rdrand = 57;
    /// 58: INVPCID.
    Invpcid = 58;
    /// 59: VMFUNC.
    Vmfunc = 59;
    /// 60: ENCLS.
    Encls = 60;
    /// 61: RDSEED.
    Rdseed = 61;
    /// 62: page-modification log full.
    PageModificationLogFull = 62;
    /// 63: XSAVES.
    Xsaves = 63;
    /// 64: XRSTORS.
    Xrstors = 64;
    /// 65: PCONFIG.
    Pconfig = 65;
    /// 66: SPP-related event.
    SppEvent = 66;
    /// 67: UMWAIT.
    Umwait = 67;
    /// 68: TPAUSE.
    Tpause = 68;
    /// 69: LOADIWKEY.
    Loadiwkey = 69;
    /// 70: ENCLV.
    Enclv = 70;
    /// 72: ENQCMD PASID translation failure.
    EnqcmdPasidFailure = 72;
    /// 73: ENQCMDS PASID translation failure.
    EnqcmdsPasidFailure = 73;
    /// 74: bus lock.
    BusLock = 74;
    /// 75: instruction timeout.
    InstructionTimeout = 75;
    /// 76: SEAMCALL.
    Seamcall = 76;
}

impl ExitReason {
    /// The basic exit reason number.
    pub const fn number(self) -> u16 {
        self as u16
    }
}

/// The 32-bit exit-reason field decoded (SDM Vol. 3C §25.9.1, "Basic VM-Exit Information").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReasonField {
    /// Bits 15:0: basic exit reason.
    pub basic: u16,
    /// Bit 25: a shadow stack was prematurely busy.
    pub shadow_stack_busy: bool,
    /// Bit 26: a bus lock was asserted (with VMM bus-lock detection).
    pub bus_lock: bool,
    /// Bit 27: the VM exit was incident to enclave mode.
    pub enclave_mode: bool,
    /// Bit 28: pending MTF VM exit.
    pub pending_mtf: bool,
    /// Bit 29: VM exit from VMX root operation (SMM VM exits).
    pub from_vmx_root: bool,
    /// Bit 31: VM-entry failure (basic reasons 33, 34, 41).
    pub entry_failure: bool,
}

impl ExitReasonField {
    /// Bit 31 of the exit-reason field: VM-entry failure.
    pub const ENTRY_FAILURE: u32 = 1 << 31;

    /// Decodes the field.
    pub const fn decode(raw: u32) -> ExitReasonField {
        ExitReasonField {
            basic: raw as u16,
            shadow_stack_busy: raw & (1 << 25) != 0,
            bus_lock: raw & (1 << 26) != 0,
            enclave_mode: raw & (1 << 27) != 0,
            pending_mtf: raw & (1 << 28) != 0,
            from_vmx_root: raw & (1 << 29) != 0,
            entry_failure: raw & Self::ENTRY_FAILURE != 0,
        }
    }

    /// The basic exit reason, if the SDM defines it.
    pub const fn reason(&self) -> Option<ExitReason> {
        ExitReason::from_basic(self.basic)
    }
}

/// Exception vectors (SDM Vol. 3A §6.3.1, Table 6-1) as used in event information and the
/// exception bitmap.
pub mod vector {
    /// #DE divide error.
    pub const DE: u8 = 0;
    /// #DB debug.
    pub const DB: u8 = 1;
    /// NMI.
    pub const NMI: u8 = 2;
    /// #BP breakpoint.
    pub const BP: u8 = 3;
    /// #OF overflow.
    pub const OF: u8 = 4;
    /// #BR BOUND range exceeded.
    pub const BR: u8 = 5;
    /// #UD invalid opcode.
    pub const UD: u8 = 6;
    /// #NM device not available.
    pub const NM: u8 = 7;
    /// #DF double fault.
    pub const DF: u8 = 8;
    /// #TS invalid TSS.
    pub const TS: u8 = 10;
    /// #NP segment not present.
    pub const NP: u8 = 11;
    /// #SS stack-segment fault.
    pub const SS: u8 = 12;
    /// #GP general protection.
    pub const GP: u8 = 13;
    /// #PF page fault.
    pub const PF: u8 = 14;
    /// #MF x87 floating-point error.
    pub const MF: u8 = 16;
    /// #AC alignment check.
    pub const AC: u8 = 17;
    /// #MC machine check.
    pub const MC: u8 = 18;
    /// #XM SIMD floating-point exception.
    pub const XM: u8 = 19;
    /// #VE virtualization exception.
    pub const VE: u8 = 20;
    /// #CP control protection.
    pub const CP: u8 = 21;
}

/// Interruption type, bits 10:8 of the interruption-information formats (SDM Vol. 3C §25.8.3,
/// §25.9.2, §25.9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// 0: external interrupt.
    ExternalInterrupt = 0,
    /// 1: not used.
    Reserved = 1,
    /// 2: non-maskable interrupt.
    Nmi = 2,
    /// 3: hardware exception.
    HardwareException = 3,
    /// 4: software interrupt (INT n).
    SoftwareInterrupt = 4,
    /// 5: privileged software exception (INT1).
    PrivilegedSoftwareException = 5,
    /// 6: software exception (INT3, INTO).
    SoftwareException = 6,
    /// 7: other event (VM entry: pending MTF VM exit).
    OtherEvent = 7,
}

impl EventType {
    const fn from_bits(bits: u32) -> EventType {
        match bits & 7 {
            0 => EventType::ExternalInterrupt,
            1 => EventType::Reserved,
            2 => EventType::Nmi,
            3 => EventType::HardwareException,
            4 => EventType::SoftwareInterrupt,
            5 => EventType::PrivilegedSoftwareException,
            6 => EventType::SoftwareException,
            _ => EventType::OtherEvent,
        }
    }

    /// Whether VM entry takes an instruction length for this type (types 4, 5, 6).
    pub const fn uses_instruction_length(self) -> bool {
        matches!(
            self,
            EventType::SoftwareInterrupt
                | EventType::PrivilegedSoftwareException
                | EventType::SoftwareException
        )
    }
}

/// An event in the interruption-information format shared by the VM-exit interruption
/// information, the IDT-vectoring information and the VM-entry interruption information
/// (SDM Vol. 3C §25.8.3, §25.9.2, §25.9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventInfo {
    /// Bits 7:0: vector.
    pub vector: u8,
    /// Bits 10:8: interruption type.
    pub kind: EventType,
    /// Bit 11 and the matching error-code field.
    pub error_code: Option<u32>,
    /// Bit 12 (exit formats only): NMI unblocking due to IRET.
    pub nmi_unblocking: bool,
}

impl EventInfo {
    /// Bit 31: the information is valid.
    pub const VALID: u32 = 1 << 31;
    const ERROR_CODE_VALID: u32 = 1 << 11;
    const NMI_UNBLOCKING: u32 = 1 << 12;

    /// Decodes an information field and its error-code field; `None` if bit 31 is clear.
    pub const fn decode(information: u32, error_code: u32) -> Option<EventInfo> {
        if information & Self::VALID == 0 {
            return None;
        }
        Some(EventInfo {
            vector: information as u8,
            kind: EventType::from_bits(information >> 8),
            error_code: if information & Self::ERROR_CODE_VALID != 0 {
                Some(error_code)
            } else {
                None
            },
            nmi_unblocking: information & Self::NMI_UNBLOCKING != 0,
        })
    }

    /// Encodes the event as VM-entry interruption information and exception error code
    /// (§25.8.3). Bit 12 is reserved in the entry format, so `nmi_unblocking` is not encoded.
    pub const fn encode(&self) -> (u32, u32) {
        let mut info = Self::VALID | ((self.kind as u32) << 8) | self.vector as u32;
        let code = match self.error_code {
            Some(code) => {
                info |= Self::ERROR_CODE_VALID;
                code
            }
            None => 0,
        };
        (info, code)
    }

    /// A hardware exception, with its error code if it delivers one.
    pub const fn hardware_exception(vector: u8, error_code: Option<u32>) -> EventInfo {
        EventInfo {
            vector,
            kind: EventType::HardwareException,
            error_code,
            nmi_unblocking: false,
        }
    }

    /// An external interrupt.
    pub const fn external_interrupt(vector: u8) -> EventInfo {
        EventInfo {
            vector,
            kind: EventType::ExternalInterrupt,
            error_code: None,
            nmi_unblocking: false,
        }
    }

    /// A non-maskable interrupt (vector 2).
    pub const fn nmi() -> EventInfo {
        EventInfo {
            vector: vector::NMI,
            kind: EventType::Nmi,
            error_code: None,
            nmi_unblocking: false,
        }
    }
}

/// A general-purpose register as encoded in instruction information and exit qualifications
/// (0 = RAX ... 15 = R15, SDM Vol. 3C §28.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// All registers by number.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    /// The register with number `n & 15`.
    pub const fn from_number(n: u32) -> Gpr {
        Self::ALL[(n & 15) as usize]
    }

    /// The register number.
    pub const fn number(self) -> usize {
        self as usize
    }
}

/// A segment register as encoded in instruction information (SDM Vol. 3C §28.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum SegmentRegister {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

impl SegmentRegister {
    const fn from_bits(bits: u32) -> Option<SegmentRegister> {
        match bits & 7 {
            0 => Some(SegmentRegister::Es),
            1 => Some(SegmentRegister::Cs),
            2 => Some(SegmentRegister::Ss),
            3 => Some(SegmentRegister::Ds),
            4 => Some(SegmentRegister::Fs),
            5 => Some(SegmentRegister::Gs),
            _ => None,
        }
    }
}

/// Address size of a memory operand (instruction information bits 9:7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSize {
    /// 0: 16-bit.
    Bits16,
    /// 1: 32-bit.
    Bits32,
    /// 2: 64-bit.
    Bits64,
}

impl AddressSize {
    const fn from_bits(bits: u32) -> Option<AddressSize> {
        match bits & 7 {
            0 => Some(AddressSize::Bits16),
            1 => Some(AddressSize::Bits32),
            2 => Some(AddressSize::Bits64),
            _ => None,
        }
    }

    /// Mask an effective address of this size is truncated to.
    pub const fn mask(self) -> u64 {
        match self {
            AddressSize::Bits16 => 0xffff,
            AddressSize::Bits32 => 0xffff_ffff,
            AddressSize::Bits64 => u64::MAX,
        }
    }
}

/// Operand size of RDRAND/RDSEED (instruction information bits 12:11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperandSize {
    /// 16-bit.
    Bits16,
    /// 32-bit.
    Bits32,
    /// 64-bit.
    Bits64,
}

/// A memory operand reconstructed from instruction information and the exit qualification
/// (which holds the displacement, sign-extended to 64 bits; SDM Vol. 3C §28.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryOperand {
    /// Bits 17:15: segment register.
    pub segment: SegmentRegister,
    /// Bits 9:7: address size.
    pub address_size: AddressSize,
    /// Bits 26:23 unless bit 27 (invalid) is set: base register.
    pub base: Option<Gpr>,
    /// Bits 21:18 unless bit 22 (invalid) is set: index register.
    pub index: Option<Gpr>,
    /// Bits 1:0: scale factor 1, 2, 4 or 8 (meaningful with an index register).
    pub scale: u8,
    /// The exit qualification: the displacement.
    pub displacement: u64,
}

impl MemoryOperand {
    /// The effective address (offset within the segment): base + index * scale + displacement,
    /// truncated to the address size. `gpr` supplies guest register values.
    pub fn offset(&self, gpr: impl Fn(Gpr) -> u64) -> u64 {
        let base = self.base.map_or(0, &gpr);
        let index = self.index.map_or(0, &gpr);
        base.wrapping_add(index.wrapping_mul(self.scale as u64))
            .wrapping_add(self.displacement)
            & self.address_size.mask()
    }

    /// The linear address: the segment base plus [`MemoryOperand::offset`]. In 64-bit mode only
    /// FS and GS bases apply; outside it the sum wraps at 32 bits (SDM Vol. 3A §3.4).
    pub fn linear_address(
        &self,
        gpr: impl Fn(Gpr) -> u64,
        segment_base: u64,
        long_mode: bool,
    ) -> u64 {
        let offset = self.offset(gpr);
        if long_mode {
            match self.segment {
                SegmentRegister::Fs | SegmentRegister::Gs => segment_base.wrapping_add(offset),
                _ => offset,
            }
        } else {
            segment_base.wrapping_add(offset) & 0xffff_ffff
        }
    }
}

/// A register-or-memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operand {
    /// Register operand (Reg1, bits 6:3).
    Register(Gpr),
    /// Memory operand.
    Memory(MemoryOperand),
}

/// The VMX instructions that exit unconditionally in VMX non-root operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum VmxInstr {
    Vmclear,
    Vmlaunch,
    Vmptrld,
    Vmptrst,
    Vmread,
    Vmresume,
    Vmwrite,
    Vmxoff,
    Vmxon,
    Invept,
    Invvpid,
    Vmfunc,
}

/// Source of a task switch (exit qualification bits 31:30, SDM Vol. 3C §28.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskSwitchSource {
    /// 0: CALL instruction.
    Call,
    /// 1: IRET instruction.
    Iret,
    /// 2: JMP instruction.
    Jmp,
    /// 3: task gate in the IDT.
    TaskGate,
}

/// Details of an exception exit carried in the exit qualification (SDM Vol. 3C §28.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExceptionDetail {
    /// No qualification for this exception.
    None,
    /// #PF: the faulting linear address (CR2 is not loaded).
    PageFault {
        /// The linear address that caused the page fault.
        linear_address: u64,
    },
    /// #DB: what DR6 would have recorded.
    Debug(DebugQualification),
}

/// Exit qualification of debug exceptions (SDM Vol. 3C §28.2.1, table "Exit Qualification
/// for Debug Exceptions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DebugQualification {
    /// Bits 3:0: B3-B0, breakpoint conditions met.
    pub breakpoints: u8,
    /// Bit 11: BLD, bus lock detected.
    pub bus_lock: bool,
    /// Bit 13: BD, debug-register access detected.
    pub debug_register_access: bool,
    /// Bit 14: BS, single step.
    pub single_step: bool,
    /// Bit 16: RTM, in an RTM region.
    pub rtm: bool,
}

/// The access of a control-register exit (exit qualification bits 5:4, SDM Vol. 3C §28.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrAccess {
    /// 0: MOV to CR from `gpr`.
    MovToCr {
        /// Bits 11:8: source register.
        gpr: Gpr,
    },
    /// 1: MOV from CR to `gpr`.
    MovFromCr {
        /// Bits 11:8: destination register.
        gpr: Gpr,
    },
    /// 2: CLTS.
    Clts,
    /// 3: LMSW.
    Lmsw {
        /// Bits 31:16: the LMSW source data.
        source_data: u16,
        /// Bit 6 set (memory operand): its linear address, from the guest-linear address.
        memory: Option<u64>,
    },
}

/// Direction of MOV DR (bit 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MovDrDirection {
    /// 0: MOV to DR.
    ToDr,
    /// 1: MOV from DR.
    FromDr,
}

/// Direction of an I/O instruction (bit 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoDirection {
    /// 0: OUT, OUTS.
    Out,
    /// 1: IN, INS.
    In,
}

/// String I/O details: INS/OUTS (exit qualification bit 4 set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StringIo {
    /// Bit 5: REP prefixed.
    pub rep: bool,
    /// The guest-linear address of the memory operand.
    pub linear_address: u64,
    /// Instruction information bits 9:7, if the processor reports INS/OUTS information
    /// (IA32_VMX_BASIC\[54\]) and the value is defined.
    pub address_size: Option<AddressSize>,
    /// Instruction information bits 17:15 (OUTS; INS always uses ES), under the same condition.
    pub segment: Option<SegmentRegister>,
}

/// Why VM entry failed with basic exit reason 33 (exit qualification, SDM Vol. 3C §27.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryFailureDetail {
    /// 0 (or 1): no further information.
    Unspecified,
    /// 2: failure loading the PDPTEs.
    PdpteLoading,
    /// 3: injecting an NMI into a guest blocking events by STI.
    NmiBlockedBySti,
    /// 4: invalid VMCS link pointer.
    InvalidVmcsLinkPointer,
    /// Another value.
    Other(u64),
}

/// APIC-access type (exit qualification bits 15:12, SDM Vol. 3C §28.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApicAccessType {
    /// 0: linear access for a data read during instruction execution.
    LinearRead,
    /// 1: linear access for a data write during instruction execution.
    LinearWrite,
    /// 2: linear access for an instruction fetch.
    LinearFetch,
    /// 3: linear access (read or write) during event delivery.
    LinearEventDelivery,
    /// 10: guest-physical access during event delivery.
    PhysicalEventDelivery,
    /// 15: guest-physical access for an instruction fetch or during instruction execution.
    PhysicalInstruction,
}

/// SGDT/SIDT/LGDT/LIDT (instruction identity, bits 29:28).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DescriptorTableInstr {
    Sgdt,
    Sidt,
    Lgdt,
    Lidt,
}

/// SLDT/STR/LLDT/LTR (instruction identity, bits 29:28).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum LdtrTrInstr {
    Sldt,
    Str,
    Lldt,
    Ltr,
}

/// A decoded VM exit. Each variant carries what SDM Vol. 3C §28.2 records for its basic exit
/// reason; the IDT-vectoring information, exit-reason flags and instruction length are on
/// [`RawExit`] ([`RawExit::idt_vectoring`], [`RawExit::reason_field`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmExit {
    /// 0: an exception hit the exception bitmap, or an NMI arrived with NMI exiting.
    ExceptionOrNmi {
        /// Vector.
        vector: u8,
        /// Interruption type (NMI, hardware, software or privileged software exception).
        kind: EventType,
        /// Error code, when the exception delivers one.
        error_code: Option<u32>,
        /// NMI unblocking due to IRET.
        nmi_unblocking: bool,
        /// The exit qualification of #PF and #DB.
        detail: ExceptionDetail,
    },
    /// 1: external interrupt; the vector when "acknowledge interrupt on exit" is 1.
    ExternalInterrupt {
        /// The acknowledged vector.
        vector: Option<u8>,
    },
    /// 2: triple fault.
    TripleFault,
    /// 3: INIT signal.
    InitSignal,
    /// 4: SIPI in wait-for-SIPI state.
    Sipi {
        /// SIPI vector (qualification bits 7:0).
        vector: u8,
    },
    /// 5: I/O SMI.
    IoSmi,
    /// 6: other SMI.
    OtherSmi,
    /// 7: interrupt window open.
    InterruptWindow,
    /// 8: NMI window open.
    NmiWindow,
    /// 9: task switch.
    TaskSwitch {
        /// Bits 15:0: selector of the target TSS.
        selector: u16,
        /// Bits 31:30: source.
        source: TaskSwitchSource,
    },
    /// 10: CPUID.
    Cpuid,
    /// 11: GETSEC.
    Getsec,
    /// 12: HLT.
    Hlt,
    /// 13: INVD.
    Invd,
    /// 14: INVLPG.
    Invlpg {
        /// The linear-address operand.
        linear: u64,
    },
    /// 15: RDPMC.
    Rdpmc,
    /// 16: RDTSC.
    Rdtsc,
    /// 17: RSM in SMM.
    Rsm,
    /// 18: VMCALL.
    Vmcall,
    /// 19-27, 50, 53, 59: a VMX instruction.
    VmxInstruction {
        /// Which instruction.
        instruction: VmxInstr,
        /// The r/m operand: VMCLEAR/VMPTRLD/VMPTRST/VMXON pointer, VMREAD destination, VMWRITE
        /// source, INVEPT/INVVPID descriptor; `None` for VMLAUNCH/VMRESUME/VMXOFF/VMFUNC.
        operand: Option<Operand>,
        /// Reg2: the field-encoding register of VMREAD/VMWRITE, the type register of
        /// INVEPT/INVVPID; `None` for the others.
        reg2: Option<Gpr>,
    },
    /// 28: MOV CR, CLTS or LMSW.
    ControlRegisterAccess {
        /// Bits 3:0: control register number (0, 3, 4, 8).
        cr: u8,
        /// Bits 5:4 with their operands.
        access: CrAccess,
    },
    /// 29: MOV DR.
    MovDr {
        /// Bits 2:0: debug register number.
        dr: u8,
        /// Bit 4: direction.
        direction: MovDrDirection,
        /// Bits 11:8: the general-purpose register.
        gpr: Gpr,
    },
    /// 30: IN, INS, OUT, OUTS.
    IoInstruction {
        /// Bits 31:16: port number.
        port: u16,
        /// Bits 2:0: access size in bytes (1, 2 or 4).
        size: u8,
        /// Bit 3: direction.
        direction: IoDirection,
        /// Bit 6: the port was an immediate operand (else DX).
        immediate: bool,
        /// Bit 4: INS/OUTS, with REP and memory-operand details.
        string: Option<StringIo>,
    },
    /// 31: RDMSR (the MSR index is in guest ECX).
    Rdmsr,
    /// 32: WRMSR (index in ECX, value in EDX:EAX).
    Wrmsr,
    /// 33: VM entry failed on invalid guest state.
    InvalidGuestState {
        /// The exit qualification.
        detail: EntryFailureDetail,
    },
    /// 34: VM entry failed loading MSRs.
    MsrLoadFailure {
        /// The failing entry of the VM-entry MSR-load area, counting from 1.
        index: u32,
    },
    /// 36: MWAIT.
    Mwait,
    /// 37: monitor trap flag.
    MonitorTrap,
    /// 39: MONITOR.
    Monitor,
    /// 40: PAUSE.
    Pause,
    /// 41: VM entry failed on a machine-check event.
    MachineCheckDuringEntry,
    /// 43: TPR below threshold.
    TprBelowThreshold,
    /// 44: access to the APIC-access page.
    ApicAccess {
        /// Bits 15:12: access type.
        access: ApicAccessType,
        /// Bits 11:0 for linear accesses: offset within the APIC page.
        offset: Option<u16>,
        /// For guest-physical accesses: the guest-physical address field.
        guest_physical: Option<u64>,
        /// Bit 16: asynchronous to instruction execution.
        asynchronous: bool,
    },
    /// 45: EOI virtualization of a vector set in the EOI-exit bitmap.
    VirtualizedEoi {
        /// Bits 7:0: the vector.
        vector: u8,
    },
    /// 46: SGDT, SIDT, LGDT, LIDT.
    GdtrIdtrAccess {
        /// Bits 29:28: which instruction.
        instruction: DescriptorTableInstr,
        /// The memory operand.
        operand: MemoryOperand,
        /// Bit 11: 32-bit operand size (else 16-bit); undefined in 64-bit mode.
        operand_size_32: bool,
    },
    /// 47: SLDT, STR, LLDT, LTR.
    LdtrTrAccess {
        /// Bits 29:28: which instruction.
        instruction: LdtrTrInstr,
        /// The operand.
        operand: Operand,
    },
    /// 48: EPT violation.
    EptViolation {
        /// The guest-physical address accessed.
        gpa: u64,
        /// The guest-linear address, when the qualification says it is valid.
        gla: Option<u64>,
        /// The exit qualification.
        qualification: EptViolationQualification,
    },
    /// 49: EPT misconfiguration.
    EptMisconfiguration {
        /// The guest-physical address accessed.
        gpa: u64,
    },
    /// 51: RDTSCP.
    Rdtscp,
    /// 52: VMX-preemption timer expired.
    PreemptionTimer,
    /// 54: WBINVD or WBNOINVD.
    Wbinvd,
    /// 55: XSETBV.
    Xsetbv,
    /// 56: trap-like write to the virtual-APIC page.
    ApicWrite {
        /// Bits 11:0: offset of the register written.
        offset: u16,
    },
    /// 57: RDRAND.
    Rdrand {
        /// Bits 6:3: destination register.
        destination: Gpr,
        /// Bits 12:11: operand size.
        operand_size: OperandSize,
    },
    /// 58: INVPCID.
    Invpcid {
        /// The descriptor operand.
        descriptor: MemoryOperand,
        /// Reg2: the type register.
        reg2: Gpr,
    },
    /// 60: ENCLS.
    Encls,
    /// 61: RDSEED.
    Rdseed {
        /// Bits 6:3: destination register.
        destination: Gpr,
        /// Bits 12:11: operand size.
        operand_size: OperandSize,
    },
    /// 62: page-modification log full.
    PageModificationLogFull {
        /// Bit 12: NMI unblocking due to IRET.
        nmi_unblocking: bool,
    },
    /// 63: XSAVES.
    Xsaves {
        /// The memory operand.
        operand: MemoryOperand,
    },
    /// 64: XRSTORS.
    Xrstors {
        /// The memory operand.
        operand: MemoryOperand,
    },
    /// 65: PCONFIG.
    Pconfig,
    /// 66: SPP-related event.
    SppEvent,
    /// 67: UMWAIT.
    Umwait,
    /// 68: TPAUSE.
    Tpause,
    /// 69: LOADIWKEY.
    Loadiwkey,
    /// 70: ENCLV.
    Enclv,
    /// 72: ENQCMD PASID translation failure.
    EnqcmdPasidFailure,
    /// 73: ENQCMDS PASID translation failure.
    EnqcmdsPasidFailure,
    /// 74: bus lock.
    BusLock,
    /// 75: instruction timeout.
    InstructionTimeout {
        /// Bit 0: the VM context is invalid; the guest cannot be resumed.
        context_invalid: bool,
        /// Bit 12: NMI unblocking due to IRET.
        nmi_unblocking: bool,
    },
    /// 76: SEAMCALL.
    Seamcall,
    /// A known exit reason whose raw fields hold values the SDM leaves undefined (e.g. an
    /// address size of 3 or an I/O size of 3); the raw fields are still in the [`RawExit`].
    Malformed {
        /// The basic exit reason.
        reason: ExitReason,
    },
    /// A basic exit reason the SDM does not define.
    Unknown {
        /// The basic exit reason number.
        reason: u16,
    },
}

/// The exit-information fields of one VM exit, read from the VMCS once (SDM Vol. 3C §25.9).
/// Also part of the exit message (see `message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct RawExit {
    /// Exit reason.
    pub reason: u32,
    /// VM-exit instruction length.
    pub instruction_length: u32,
    /// Exit qualification.
    pub qualification: u64,
    /// Guest-linear address.
    pub guest_linear_address: u64,
    /// Guest-physical address.
    pub guest_physical_address: u64,
    /// VM-exit instruction information.
    pub instruction_information: u32,
    /// VM-exit interruption information.
    pub interruption_information: u32,
    /// VM-exit interruption error code.
    pub interruption_error_code: u32,
    /// IDT-vectoring information.
    pub idt_vectoring_information: u32,
    /// IDT-vectoring error code.
    pub idt_vectoring_error_code: u32,
}

impl RawExit {
    /// Reads every exit-information field.
    pub fn read(vmcs: &impl VmcsAccess) -> RawExit {
        RawExit {
            reason: vmcs.read32(VmcsField::EXIT_REASON),
            instruction_length: vmcs.read32(VmcsField::VM_EXIT_INSTRUCTION_LENGTH),
            qualification: vmcs.read(VmcsField::EXIT_QUALIFICATION),
            guest_linear_address: vmcs.read(VmcsField::GUEST_LINEAR_ADDRESS),
            guest_physical_address: vmcs.read(VmcsField::GUEST_PHYSICAL_ADDRESS),
            instruction_information: vmcs.read32(VmcsField::VM_EXIT_INSTRUCTION_INFORMATION),
            interruption_information: vmcs.read32(VmcsField::VM_EXIT_INTERRUPTION_INFORMATION),
            interruption_error_code: vmcs.read32(VmcsField::VM_EXIT_INTERRUPTION_ERROR_CODE),
            idt_vectoring_information: vmcs.read32(VmcsField::IDT_VECTORING_INFORMATION),
            idt_vectoring_error_code: vmcs.read32(VmcsField::IDT_VECTORING_ERROR_CODE),
        }
    }

    /// Writes every exit-information field: how the nested server reflects an exit into an L1
    /// hypervisor's [`VmcsImage`](crate::vmcs::VmcsImage) (a real VMCS refuses these writes
    /// unless IA32_VMX_MISC\[29\]).
    pub fn store(&self, vmcs: &mut impl VmcsAccess) {
        let fields: [(VmcsField, u64); 10] = [
            (VmcsField::EXIT_REASON, self.reason.into()),
            (
                VmcsField::VM_EXIT_INSTRUCTION_LENGTH,
                self.instruction_length.into(),
            ),
            (VmcsField::EXIT_QUALIFICATION, self.qualification),
            (VmcsField::GUEST_LINEAR_ADDRESS, self.guest_linear_address),
            (
                VmcsField::GUEST_PHYSICAL_ADDRESS,
                self.guest_physical_address,
            ),
            (
                VmcsField::VM_EXIT_INSTRUCTION_INFORMATION,
                self.instruction_information.into(),
            ),
            (
                VmcsField::VM_EXIT_INTERRUPTION_INFORMATION,
                self.interruption_information.into(),
            ),
            (
                VmcsField::VM_EXIT_INTERRUPTION_ERROR_CODE,
                self.interruption_error_code.into(),
            ),
            (
                VmcsField::IDT_VECTORING_INFORMATION,
                self.idt_vectoring_information.into(),
            ),
            (
                VmcsField::IDT_VECTORING_ERROR_CODE,
                self.idt_vectoring_error_code.into(),
            ),
        ];
        for (field, value) in fields {
            vmcs.write(field, value);
        }
    }

    /// The exit-reason field decoded.
    pub const fn reason_field(&self) -> ExitReasonField {
        ExitReasonField::decode(self.reason)
    }

    /// The event that was being delivered when the exit occurred (IDT-vectoring information,
    /// SDM Vol. 3C §28.2.4), which the VMM must usually re-inject.
    pub const fn idt_vectoring(&self) -> Option<EventInfo> {
        EventInfo::decode(
            self.idt_vectoring_information,
            self.idt_vectoring_error_code,
        )
    }

    /// The event that caused the exit (VM-exit interruption information, §28.2.2).
    pub const fn interruption(&self) -> Option<EventInfo> {
        EventInfo::decode(self.interruption_information, self.interruption_error_code)
    }

    /// Decodes the exit; see [`decode`].
    pub fn decode(&self) -> VmExit {
        decode(self)
    }
}

const fn bits(value: u64, low: u32, width: u32) -> u64 {
    (value >> low) & ((1 << width) - 1)
}

const fn flag(value: u64, n: u32) -> bool {
    value & (1 << n) != 0
}

/// Instruction-information fields common to every memory-operand format (SDM Vol. 3C
/// §28.2.5): scaling 1:0, address size 9:7, segment 17:15, index 21:18 (+22 invalid), base
/// 26:23 (+27 invalid); the displacement is the exit qualification.
const fn memory_operand(info: u32, qualification: u64) -> Option<MemoryOperand> {
    let info = info as u64;
    let Some(address_size) = AddressSize::from_bits(bits(info, 7, 3) as u32) else {
        return None;
    };
    let Some(segment) = SegmentRegister::from_bits(bits(info, 15, 3) as u32) else {
        return None;
    };
    Some(MemoryOperand {
        segment,
        address_size,
        base: if flag(info, 27) {
            None
        } else {
            Some(Gpr::from_number(bits(info, 23, 4) as u32))
        },
        index: if flag(info, 22) {
            None
        } else {
            Some(Gpr::from_number(bits(info, 18, 4) as u32))
        },
        scale: 1 << bits(info, 0, 2),
        displacement: qualification,
    })
}

/// Register (bit 10 set, Reg1 in 6:3) or memory operand.
const fn register_or_memory(info: u32, qualification: u64) -> Option<Operand> {
    if flag(info as u64, 10) {
        Some(Operand::Register(Gpr::from_number(
            bits(info as u64, 3, 4) as u32
        )))
    } else {
        match memory_operand(info, qualification) {
            Some(m) => Some(Operand::Memory(m)),
            None => None,
        }
    }
}

const fn reg2(info: u32) -> Gpr {
    Gpr::from_number(bits(info as u64, 28, 4) as u32)
}

fn random_destination(info: u32) -> Option<(Gpr, OperandSize)> {
    let size = match bits(info.into(), 11, 2) {
        0 => OperandSize::Bits16,
        1 => OperandSize::Bits32,
        2 => OperandSize::Bits64,
        _ => return None,
    };
    Some((Gpr::from_number(bits(info.into(), 3, 4) as u32), size))
}

fn vmx_instruction(instruction: VmxInstr, raw: &RawExit) -> Option<VmExit> {
    let info = raw.instruction_information;
    let q = raw.qualification;
    let (operand, reg2) = match instruction {
        VmxInstr::Vmclear | VmxInstr::Vmptrld | VmxInstr::Vmptrst | VmxInstr::Vmxon => {
            (Some(Operand::Memory(memory_operand(info, q)?)), None)
        }
        VmxInstr::Vmread | VmxInstr::Vmwrite => {
            (Some(register_or_memory(info, q)?), Some(reg2(info)))
        }
        VmxInstr::Invept | VmxInstr::Invvpid => (
            Some(Operand::Memory(memory_operand(info, q)?)),
            Some(reg2(info)),
        ),
        VmxInstr::Vmlaunch | VmxInstr::Vmresume | VmxInstr::Vmxoff | VmxInstr::Vmfunc => {
            (None, None)
        }
    };
    Some(VmExit::VmxInstruction {
        instruction,
        operand,
        reg2,
    })
}

fn exception_or_nmi(raw: &RawExit) -> Option<VmExit> {
    let event = raw.interruption()?;
    let q = raw.qualification;
    let detail = match (event.kind, event.vector) {
        (EventType::HardwareException, vector::PF) => {
            ExceptionDetail::PageFault { linear_address: q }
        }
        (EventType::HardwareException, vector::DB) => ExceptionDetail::Debug(DebugQualification {
            breakpoints: bits(q, 0, 4) as u8,
            bus_lock: flag(q, 11),
            debug_register_access: flag(q, 13),
            single_step: flag(q, 14),
            rtm: flag(q, 16),
        }),
        _ => ExceptionDetail::None,
    };
    Some(VmExit::ExceptionOrNmi {
        vector: event.vector,
        kind: event.kind,
        error_code: event.error_code,
        nmi_unblocking: event.nmi_unblocking,
        detail,
    })
}

fn control_register_access(raw: &RawExit) -> VmExit {
    let q = raw.qualification;
    let gpr = Gpr::from_number(bits(q, 8, 4) as u32);
    let access = match bits(q, 4, 2) {
        0 => CrAccess::MovToCr { gpr },
        1 => CrAccess::MovFromCr { gpr },
        2 => CrAccess::Clts,
        _ => CrAccess::Lmsw {
            source_data: bits(q, 16, 16) as u16,
            memory: if flag(q, 6) {
                Some(raw.guest_linear_address)
            } else {
                None
            },
        },
    };
    VmExit::ControlRegisterAccess {
        cr: bits(q, 0, 4) as u8,
        access,
    }
}

fn io_instruction(raw: &RawExit) -> Option<VmExit> {
    let q = raw.qualification;
    let size = match bits(q, 0, 3) {
        0 => 1,
        1 => 2,
        3 => 4,
        _ => return None,
    };
    let info = u64::from(raw.instruction_information);
    let string = flag(q, 4).then(|| StringIo {
        rep: flag(q, 5),
        linear_address: raw.guest_linear_address,
        address_size: AddressSize::from_bits(bits(info, 7, 3) as u32),
        segment: SegmentRegister::from_bits(bits(info, 15, 3) as u32),
    });
    Some(VmExit::IoInstruction {
        port: bits(q, 16, 16) as u16,
        size,
        direction: if flag(q, 3) {
            IoDirection::In
        } else {
            IoDirection::Out
        },
        immediate: flag(q, 6),
        string,
    })
}

fn apic_access(raw: &RawExit) -> Option<VmExit> {
    let q = raw.qualification;
    let access = match bits(q, 12, 4) {
        0 => ApicAccessType::LinearRead,
        1 => ApicAccessType::LinearWrite,
        2 => ApicAccessType::LinearFetch,
        3 => ApicAccessType::LinearEventDelivery,
        10 => ApicAccessType::PhysicalEventDelivery,
        15 => ApicAccessType::PhysicalInstruction,
        _ => return None,
    };
    let linear = bits(q, 12, 4) <= 3;
    Some(VmExit::ApicAccess {
        access,
        offset: linear.then_some(bits(q, 0, 12) as u16),
        guest_physical: (!linear).then_some(raw.guest_physical_address),
        asynchronous: flag(q, 16),
    })
}

fn decode_known(reason: ExitReason, raw: &RawExit) -> Option<VmExit> {
    use ExitReason as R;
    let q = raw.qualification;
    let info = raw.instruction_information;
    Some(match reason {
        R::ExceptionOrNmi => return exception_or_nmi(raw),
        R::ExternalInterrupt => VmExit::ExternalInterrupt {
            vector: raw.interruption().map(|event| event.vector),
        },
        R::TripleFault => VmExit::TripleFault,
        R::InitSignal => VmExit::InitSignal,
        R::StartupIpi => VmExit::Sipi { vector: q as u8 },
        R::IoSmi => VmExit::IoSmi,
        R::OtherSmi => VmExit::OtherSmi,
        R::InterruptWindow => VmExit::InterruptWindow,
        R::NmiWindow => VmExit::NmiWindow,
        R::TaskSwitch => VmExit::TaskSwitch {
            selector: q as u16,
            source: match bits(q, 30, 2) {
                0 => TaskSwitchSource::Call,
                1 => TaskSwitchSource::Iret,
                2 => TaskSwitchSource::Jmp,
                _ => TaskSwitchSource::TaskGate,
            },
        },
        R::Cpuid => VmExit::Cpuid,
        R::Getsec => VmExit::Getsec,
        R::Hlt => VmExit::Hlt,
        R::Invd => VmExit::Invd,
        R::Invlpg => VmExit::Invlpg { linear: q },
        R::Rdpmc => VmExit::Rdpmc,
        R::Rdtsc => VmExit::Rdtsc,
        R::Rsm => VmExit::Rsm,
        R::Vmcall => VmExit::Vmcall,
        R::Vmclear => return vmx_instruction(VmxInstr::Vmclear, raw),
        R::Vmlaunch => return vmx_instruction(VmxInstr::Vmlaunch, raw),
        R::Vmptrld => return vmx_instruction(VmxInstr::Vmptrld, raw),
        R::Vmptrst => return vmx_instruction(VmxInstr::Vmptrst, raw),
        R::Vmread => return vmx_instruction(VmxInstr::Vmread, raw),
        R::Vmresume => return vmx_instruction(VmxInstr::Vmresume, raw),
        R::Vmwrite => return vmx_instruction(VmxInstr::Vmwrite, raw),
        R::Vmxoff => return vmx_instruction(VmxInstr::Vmxoff, raw),
        R::Vmxon => return vmx_instruction(VmxInstr::Vmxon, raw),
        R::Invept => return vmx_instruction(VmxInstr::Invept, raw),
        R::Invvpid => return vmx_instruction(VmxInstr::Invvpid, raw),
        R::Vmfunc => return vmx_instruction(VmxInstr::Vmfunc, raw),
        R::ControlRegisterAccess => control_register_access(raw),
        R::MovDr => VmExit::MovDr {
            dr: bits(q, 0, 3) as u8,
            direction: if flag(q, 4) {
                MovDrDirection::FromDr
            } else {
                MovDrDirection::ToDr
            },
            gpr: Gpr::from_number(bits(q, 8, 4) as u32),
        },
        R::IoInstruction => return io_instruction(raw),
        R::Rdmsr => VmExit::Rdmsr,
        R::Wrmsr => VmExit::Wrmsr,
        R::InvalidGuestState => VmExit::InvalidGuestState {
            detail: match q {
                0 | 1 => EntryFailureDetail::Unspecified,
                2 => EntryFailureDetail::PdpteLoading,
                3 => EntryFailureDetail::NmiBlockedBySti,
                4 => EntryFailureDetail::InvalidVmcsLinkPointer,
                other => EntryFailureDetail::Other(other),
            },
        },
        R::MsrLoading => VmExit::MsrLoadFailure { index: q as u32 },
        R::Mwait => VmExit::Mwait,
        R::MonitorTrapFlag => VmExit::MonitorTrap,
        R::Monitor => VmExit::Monitor,
        R::Pause => VmExit::Pause,
        R::MachineCheckDuringEntry => VmExit::MachineCheckDuringEntry,
        R::TprBelowThreshold => VmExit::TprBelowThreshold,
        R::ApicAccess => return apic_access(raw),
        R::VirtualizedEoi => VmExit::VirtualizedEoi { vector: q as u8 },
        R::GdtrIdtrAccess => VmExit::GdtrIdtrAccess {
            instruction: match bits(info.into(), 28, 2) {
                0 => DescriptorTableInstr::Sgdt,
                1 => DescriptorTableInstr::Sidt,
                2 => DescriptorTableInstr::Lgdt,
                _ => DescriptorTableInstr::Lidt,
            },
            operand: memory_operand(info, q)?,
            operand_size_32: flag(info.into(), 11),
        },
        R::LdtrTrAccess => VmExit::LdtrTrAccess {
            instruction: match bits(info.into(), 28, 2) {
                0 => LdtrTrInstr::Sldt,
                1 => LdtrTrInstr::Str,
                2 => LdtrTrInstr::Lldt,
                _ => LdtrTrInstr::Ltr,
            },
            operand: register_or_memory(info, q)?,
        },
        R::EptViolation => {
            let qualification = EptViolationQualification::decode(q);
            VmExit::EptViolation {
                gpa: raw.guest_physical_address,
                gla: qualification.gla_valid.then_some(raw.guest_linear_address),
                qualification,
            }
        }
        R::EptMisconfiguration => VmExit::EptMisconfiguration {
            gpa: raw.guest_physical_address,
        },
        R::Rdtscp => VmExit::Rdtscp,
        R::PreemptionTimer => VmExit::PreemptionTimer,
        R::Wbinvd => VmExit::Wbinvd,
        R::Xsetbv => VmExit::Xsetbv,
        R::ApicWrite => VmExit::ApicWrite {
            offset: bits(q, 0, 12) as u16,
        },
        R::Rdrand => {
            let (destination, operand_size) = random_destination(info)?;
            VmExit::Rdrand {
                destination,
                operand_size,
            }
        }
        R::Invpcid => VmExit::Invpcid {
            descriptor: memory_operand(info, q)?,
            reg2: reg2(info),
        },
        R::Encls => VmExit::Encls,
        R::Rdseed => {
            let (destination, operand_size) = random_destination(info)?;
            VmExit::Rdseed {
                destination,
                operand_size,
            }
        }
        R::PageModificationLogFull => VmExit::PageModificationLogFull {
            nmi_unblocking: flag(q, 12),
        },
        R::Xsaves => VmExit::Xsaves {
            operand: memory_operand(info, q)?,
        },
        R::Xrstors => VmExit::Xrstors {
            operand: memory_operand(info, q)?,
        },
        R::Pconfig => VmExit::Pconfig,
        R::SppEvent => VmExit::SppEvent,
        R::Umwait => VmExit::Umwait,
        R::Tpause => VmExit::Tpause,
        R::Loadiwkey => VmExit::Loadiwkey,
        R::Enclv => VmExit::Enclv,
        R::EnqcmdPasidFailure => VmExit::EnqcmdPasidFailure,
        R::EnqcmdsPasidFailure => VmExit::EnqcmdsPasidFailure,
        R::BusLock => VmExit::BusLock,
        R::InstructionTimeout => VmExit::InstructionTimeout {
            context_invalid: flag(q, 0),
            nmi_unblocking: flag(q, 12),
        },
        R::Seamcall => VmExit::Seamcall,
    })
}

/// Decodes a VM exit. Total: every input gives a [`VmExit`], never a panic; undefined
/// encodings give [`VmExit::Malformed`] and unknown reasons [`VmExit::Unknown`].
pub fn decode(raw: &RawExit) -> VmExit {
    let basic = raw.reason_field().basic;
    match ExitReason::from_basic(basic) {
        Some(reason) => decode_known(reason, raw).unwrap_or(VmExit::Malformed { reason }),
        None => VmExit::Unknown { reason: basic },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmcs::VmcsImage;
    use proptest::prelude::*;

    fn exit(reason: ExitReason, qualification: u64) -> RawExit {
        RawExit {
            reason: reason.number().into(),
            qualification,
            ..RawExit::default()
        }
    }

    #[test]
    fn exit_reasons_cover_appendix_c_0_to_76_except_unused_numbers() {
        let defined: Vec<u16> = (0..=u16::MAX)
            .filter(|&n| ExitReason::from_basic(n).is_some())
            .collect();
        let expected: Vec<u16> = (0..=76).filter(|n| ![35, 38, 42, 71].contains(n)).collect();
        assert_eq!(defined, expected);
        for &r in ExitReason::ALL {
            assert_eq!(ExitReason::from_basic(r.number()), Some(r));
        }
        assert_eq!(ExitReason::EptViolation.number(), 48);
        assert_eq!(ExitReason::Xsetbv.number(), 55);
        assert_eq!(ExitReason::PageModificationLogFull.number(), 62);
    }

    #[test]
    fn entry_failure_bit_31_is_decoded_with_the_basic_reason() {
        let raw = RawExit {
            reason: ExitReasonField::ENTRY_FAILURE | 33,
            qualification: 4,
            ..RawExit::default()
        };
        let field = raw.reason_field();
        assert!(field.entry_failure);
        assert_eq!(field.reason(), Some(ExitReason::InvalidGuestState));
        assert_eq!(
            decode(&raw),
            VmExit::InvalidGuestState {
                detail: EntryFailureDetail::InvalidVmcsLinkPointer
            }
        );
        let raw = RawExit {
            reason: ExitReasonField::ENTRY_FAILURE | 34,
            qualification: 3,
            ..raw
        };
        assert_eq!(decode(&raw), VmExit::MsrLoadFailure { index: 3 });
        let flags = ExitReasonField::decode((1 << 28) | (1 << 27) | 37);
        assert!(flags.pending_mtf && flags.enclave_mode && !flags.entry_failure);
    }

    #[test]
    fn io_qualification_for_out_dx_al_to_0x3f8_is_one_byte_out_via_dx() {
        assert_eq!(
            decode(&exit(ExitReason::IoInstruction, 0x03f8_0000)),
            VmExit::IoInstruction {
                port: 0x3f8,
                size: 1,
                direction: IoDirection::Out,
                immediate: false,
                string: None,
            }
        );
    }

    #[test]
    fn io_qualification_decodes_in_immediate_and_rep_ins() {
        // IN EAX, 0x71: size 4 (3), IN (bit 3), immediate (bit 6).
        assert_eq!(
            decode(&exit(
                ExitReason::IoInstruction,
                0x0071_0000 | 0x40 | 0x8 | 3
            )),
            VmExit::IoInstruction {
                port: 0x71,
                size: 4,
                direction: IoDirection::In,
                immediate: true,
                string: None
            }
        );
        // REP INSW from port DX=0x1f0 into ES:[RDI], 64-bit address size.
        let raw = RawExit {
            guest_linear_address: 0x8000,
            instruction_information: 2 << 7,
            ..exit(
                ExitReason::IoInstruction,
                0x01f0_0000 | 0x20 | 0x10 | 0x8 | 1,
            )
        };
        assert_eq!(
            decode(&raw),
            VmExit::IoInstruction {
                port: 0x1f0,
                size: 2,
                direction: IoDirection::In,
                immediate: false,
                string: Some(StringIo {
                    rep: true,
                    linear_address: 0x8000,
                    address_size: Some(AddressSize::Bits64),
                    segment: Some(SegmentRegister::Es),
                }),
            }
        );
        // Size encoding 2 is undefined.
        assert_eq!(
            decode(&exit(ExitReason::IoInstruction, 2)),
            VmExit::Malformed {
                reason: ExitReason::IoInstruction
            }
        );
    }

    #[test]
    fn ept_violation_read_of_not_present_entry_reports_gpa_and_valid_gla() {
        let raw = RawExit {
            guest_physical_address: 0x1234_5678,
            guest_linear_address: 0xffff_8000_0000_1678,
            ..exit(ExitReason::EptViolation, 0x181)
        };
        let VmExit::EptViolation {
            gpa,
            gla,
            qualification,
        } = decode(&raw)
        else {
            panic!("not an EPT violation");
        };
        assert_eq!(gpa, 0x1234_5678);
        assert_eq!(gla, Some(0xffff_8000_0000_1678));
        assert!(qualification.read && !qualification.write && !qualification.fetch);
        assert!(qualification.entry_not_present());
        assert!(qualification.gla_is_translation);
        // Without bit 7 the linear address is not reported.
        let raw = RawExit {
            qualification: 0x1,
            ..raw
        };
        assert!(matches!(
            decode(&raw),
            VmExit::EptViolation { gla: None, .. }
        ));
    }

    #[test]
    fn instruction_information_for_vmptrld_rax_plus_rbx_times_8_plus_0x10() {
        // Scaling 3 (x8), address size 2 (64-bit), memory, segment DS (3), index RBX (3)
        // valid, base RAX (0) valid; the displacement is the exit qualification.
        let info = 3 | (2 << 7) | (3 << 15) | (3 << 18);
        assert_eq!(info, 0xd_8103);
        let raw = RawExit {
            instruction_information: info,
            ..exit(ExitReason::Vmptrld, 0x10)
        };
        let memory = MemoryOperand {
            segment: SegmentRegister::Ds,
            address_size: AddressSize::Bits64,
            base: Some(Gpr::Rax),
            index: Some(Gpr::Rbx),
            scale: 8,
            displacement: 0x10,
        };
        assert_eq!(
            decode(&raw),
            VmExit::VmxInstruction {
                instruction: VmxInstr::Vmptrld,
                operand: Some(Operand::Memory(memory)),
                reg2: None,
            }
        );
        let regs = |r: Gpr| match r {
            Gpr::Rax => 0x1000,
            Gpr::Rbx => 2,
            _ => 0,
        };
        assert_eq!(memory.offset(regs), 0x1000 + 16 + 0x10);
        assert_eq!(memory.linear_address(regs, 0xdead_0000, true), 0x1020);
    }

    #[test]
    fn vmread_register_form_reports_reg1_and_reg2() {
        // vmread rcx, rdx: reg1 = RCX (bits 6:3 = 1), register (bit 10), reg2 = RDX (2).
        let raw = RawExit {
            instruction_information: (1 << 3) | (1 << 10) | (2 << 28),
            ..exit(ExitReason::Vmread, 0)
        };
        assert_eq!(
            decode(&raw),
            VmExit::VmxInstruction {
                instruction: VmxInstr::Vmread,
                operand: Some(Operand::Register(Gpr::Rcx)),
                reg2: Some(Gpr::Rdx),
            }
        );
    }

    #[test]
    fn invept_with_negative_displacement_and_no_base_wraps_at_address_size() {
        // invept r8, [ebp-8]-like 32-bit form with no index: base RBP, index invalid.
        let info = (1 << 7) | (2 << 15) | (1 << 22) | (5 << 23) | (8 << 28);
        let raw = RawExit {
            instruction_information: info,
            ..exit(ExitReason::Invept, (-8i64) as u64)
        };
        let VmExit::VmxInstruction {
            instruction: VmxInstr::Invept,
            operand: Some(Operand::Memory(m)),
            reg2,
        } = decode(&raw)
        else {
            panic!("not INVEPT");
        };
        assert_eq!(reg2, Some(Gpr::R8));
        assert_eq!(
            (m.base, m.index, m.segment),
            (Some(Gpr::Rbp), None, SegmentRegister::Ss)
        );
        assert_eq!(m.offset(|_| 0x1000), 0xff8);
        assert_eq!(m.offset(|_| 4), 0xffff_fffc);
        assert_eq!(m.linear_address(|_| 0x1000, 0x1_0000, false), 0x1_0ff8);
    }

    #[test]
    fn vmx_instructions_without_operands_decode_without_instruction_information() {
        for (reason, instruction) in [
            (ExitReason::Vmlaunch, VmxInstr::Vmlaunch),
            (ExitReason::Vmresume, VmxInstr::Vmresume),
            (ExitReason::Vmxoff, VmxInstr::Vmxoff),
            (ExitReason::Vmfunc, VmxInstr::Vmfunc),
        ] {
            let raw = RawExit {
                instruction_information: u32::MAX,
                ..exit(reason, u64::MAX)
            };
            assert_eq!(
                decode(&raw),
                VmExit::VmxInstruction {
                    instruction,
                    operand: None,
                    reg2: None
                }
            );
        }
    }

    #[test]
    fn undefined_address_size_or_segment_is_malformed() {
        for info in [3 << 7, 6 << 15] {
            let raw = RawExit {
                instruction_information: info,
                ..exit(ExitReason::Vmclear, 0)
            };
            assert_eq!(
                decode(&raw),
                VmExit::Malformed {
                    reason: ExitReason::Vmclear
                }
            );
        }
    }

    #[test]
    fn control_register_qualifications_decode_mov_clts_and_lmsw() {
        // mov cr3, rbx: CR 3, type 0, GPR 3.
        assert_eq!(
            decode(&exit(ExitReason::ControlRegisterAccess, 0x303)),
            VmExit::ControlRegisterAccess {
                cr: 3,
                access: CrAccess::MovToCr { gpr: Gpr::Rbx }
            }
        );
        // mov r12, cr8.
        assert_eq!(
            decode(&exit(ExitReason::ControlRegisterAccess, 0xc18)),
            VmExit::ControlRegisterAccess {
                cr: 8,
                access: CrAccess::MovFromCr { gpr: Gpr::R12 }
            }
        );
        assert_eq!(
            decode(&exit(ExitReason::ControlRegisterAccess, 0x20)),
            VmExit::ControlRegisterAccess {
                cr: 0,
                access: CrAccess::Clts
            }
        );
        // lmsw [mem] with source 0x0011.
        let raw = RawExit {
            guest_linear_address: 0x7000,
            ..exit(ExitReason::ControlRegisterAccess, 0x0011_0000 | 0x40 | 0x30)
        };
        assert_eq!(
            decode(&raw),
            VmExit::ControlRegisterAccess {
                cr: 0,
                access: CrAccess::Lmsw {
                    source_data: 0x11,
                    memory: Some(0x7000)
                },
            }
        );
    }

    #[test]
    fn mov_dr_qualification_decodes_register_direction_and_gpr() {
        // mov rax, dr7 (from DR): DR 7, bit 4, GPR 0.
        assert_eq!(
            decode(&exit(ExitReason::MovDr, 0x17)),
            VmExit::MovDr {
                dr: 7,
                direction: MovDrDirection::FromDr,
                gpr: Gpr::Rax
            }
        );
    }

    #[test]
    fn exceptions_carry_vector_type_error_code_and_page_fault_address() {
        let raw = RawExit {
            interruption_information: EventInfo::VALID | (3 << 8) | (1 << 11) | 14,
            interruption_error_code: 0x6,
            ..exit(ExitReason::ExceptionOrNmi, 0xdead_b000)
        };
        assert_eq!(
            decode(&raw),
            VmExit::ExceptionOrNmi {
                vector: 14,
                kind: EventType::HardwareException,
                error_code: Some(6),
                nmi_unblocking: false,
                detail: ExceptionDetail::PageFault {
                    linear_address: 0xdead_b000
                },
            }
        );
        let raw = RawExit {
            interruption_information: EventInfo::VALID | (3 << 8) | 1,
            ..exit(ExitReason::ExceptionOrNmi, (1 << 14) | 0b0101)
        };
        assert_eq!(
            decode(&raw),
            VmExit::ExceptionOrNmi {
                vector: 1,
                kind: EventType::HardwareException,
                error_code: None,
                nmi_unblocking: false,
                detail: ExceptionDetail::Debug(DebugQualification {
                    breakpoints: 0b0101,
                    bus_lock: false,
                    debug_register_access: false,
                    single_step: true,
                    rtm: false,
                }),
            }
        );
        let raw = RawExit {
            interruption_information: EventInfo::VALID | (2 << 8) | 2 | (1 << 12),
            ..exit(ExitReason::ExceptionOrNmi, 0)
        };
        assert!(matches!(
            decode(&raw),
            VmExit::ExceptionOrNmi {
                vector: 2,
                kind: EventType::Nmi,
                nmi_unblocking: true,
                ..
            }
        ));
        // An exception exit without valid interruption information is malformed.
        assert_eq!(
            decode(&exit(ExitReason::ExceptionOrNmi, 0)),
            VmExit::Malformed {
                reason: ExitReason::ExceptionOrNmi
            }
        );
    }

    #[test]
    fn external_interrupt_vector_is_reported_only_when_acknowledged() {
        assert_eq!(
            decode(&exit(ExitReason::ExternalInterrupt, 0)),
            VmExit::ExternalInterrupt { vector: None }
        );
        let raw = RawExit {
            interruption_information: EventInfo::VALID | 0x30,
            ..exit(ExitReason::ExternalInterrupt, 0)
        };
        assert_eq!(
            decode(&raw),
            VmExit::ExternalInterrupt { vector: Some(0x30) }
        );
    }

    #[test]
    fn simple_exits_and_qualification_fields_decode() {
        assert_eq!(decode(&exit(ExitReason::Cpuid, 0)), VmExit::Cpuid);
        assert_eq!(decode(&exit(ExitReason::Hlt, 0)), VmExit::Hlt);
        assert_eq!(
            decode(&exit(ExitReason::TripleFault, 0)),
            VmExit::TripleFault
        );
        assert_eq!(
            decode(&exit(ExitReason::StartupIpi, 0x9a)),
            VmExit::Sipi { vector: 0x9a }
        );
        assert_eq!(
            decode(&exit(ExitReason::Invlpg, 0xffff_f000)),
            VmExit::Invlpg {
                linear: 0xffff_f000
            }
        );
        assert_eq!(
            decode(&exit(ExitReason::VirtualizedEoi, 0x41)),
            VmExit::VirtualizedEoi { vector: 0x41 }
        );
        assert_eq!(
            decode(&exit(ExitReason::ApicWrite, 0x380)),
            VmExit::ApicWrite { offset: 0x380 }
        );
        assert_eq!(
            decode(&exit(ExitReason::TaskSwitch, (3 << 30) | 0x28)),
            VmExit::TaskSwitch {
                selector: 0x28,
                source: TaskSwitchSource::TaskGate
            }
        );
        assert_eq!(
            decode(&exit(ExitReason::PageModificationLogFull, 1 << 12)),
            VmExit::PageModificationLogFull {
                nmi_unblocking: true
            }
        );
        assert_eq!(
            decode(&exit(ExitReason::InstructionTimeout, 1)),
            VmExit::InstructionTimeout {
                context_invalid: true,
                nmi_unblocking: false
            }
        );
        assert_eq!(
            decode(&RawExit {
                guest_physical_address: 0xfee0_0000,
                ..exit(ExitReason::EptMisconfiguration, 0)
            }),
            VmExit::EptMisconfiguration { gpa: 0xfee0_0000 }
        );
        assert_eq!(decode(&exit(ExitReason::Xsetbv, 0)), VmExit::Xsetbv);
        assert_eq!(
            decode(&exit(ExitReason::PreemptionTimer, 0)),
            VmExit::PreemptionTimer
        );
        assert_eq!(
            decode(&RawExit {
                reason: 35,
                ..RawExit::default()
            }),
            VmExit::Unknown { reason: 35 }
        );
        assert_eq!(
            decode(&RawExit {
                reason: 200,
                ..RawExit::default()
            }),
            VmExit::Unknown { reason: 200 }
        );
    }

    #[test]
    fn apic_access_reports_offset_for_linear_and_gpa_for_physical_accesses() {
        assert_eq!(
            decode(&exit(ExitReason::ApicAccess, (1 << 12) | 0x0b0)),
            VmExit::ApicAccess {
                access: ApicAccessType::LinearWrite,
                offset: Some(0xb0),
                guest_physical: None,
                asynchronous: false,
            }
        );
        let raw = RawExit {
            guest_physical_address: 0xfee0_0300,
            ..exit(ExitReason::ApicAccess, 15 << 12)
        };
        assert_eq!(
            decode(&raw),
            VmExit::ApicAccess {
                access: ApicAccessType::PhysicalInstruction,
                offset: None,
                guest_physical: Some(0xfee0_0300),
                asynchronous: false,
            }
        );
        assert_eq!(
            decode(&exit(ExitReason::ApicAccess, 5 << 12)),
            VmExit::Malformed {
                reason: ExitReason::ApicAccess
            }
        );
    }

    #[test]
    fn descriptor_table_exits_decode_identity_and_operand() {
        // lidt [rsi] (64-bit): identity 3, base RSI, no index.
        let info = (2 << 7) | (3 << 15) | (1 << 22) | (6 << 23) | (3 << 28);
        let raw = RawExit {
            instruction_information: info,
            ..exit(ExitReason::GdtrIdtrAccess, 0)
        };
        let VmExit::GdtrIdtrAccess {
            instruction,
            operand,
            ..
        } = decode(&raw)
        else {
            panic!("not a GDTR/IDTR access");
        };
        assert_eq!(instruction, DescriptorTableInstr::Lidt);
        assert_eq!((operand.base, operand.index), (Some(Gpr::Rsi), None));
        // ltr ax: register form, reg1 RAX, identity 3.
        let raw = RawExit {
            instruction_information: (1 << 10) | (3 << 28),
            ..exit(ExitReason::LdtrTrAccess, 0)
        };
        assert_eq!(
            decode(&raw),
            VmExit::LdtrTrAccess {
                instruction: LdtrTrInstr::Ltr,
                operand: Operand::Register(Gpr::Rax)
            }
        );
    }

    #[test]
    fn rdrand_reports_destination_and_operand_size() {
        let raw = RawExit {
            instruction_information: (9 << 3) | (2 << 11),
            ..exit(ExitReason::Rdrand, 0)
        };
        assert_eq!(
            decode(&raw),
            VmExit::Rdrand {
                destination: Gpr::R9,
                operand_size: OperandSize::Bits64
            }
        );
        let raw = RawExit {
            instruction_information: 3 << 11,
            ..exit(ExitReason::Rdseed, 0)
        };
        assert_eq!(
            decode(&raw),
            VmExit::Malformed {
                reason: ExitReason::Rdseed
            }
        );
    }

    #[test]
    fn idt_vectoring_information_is_decoded_for_reinjection() {
        let raw = RawExit {
            idt_vectoring_information: EventInfo::VALID | (3 << 8) | (1 << 11) | 13,
            idt_vectoring_error_code: 0x18,
            ..exit(ExitReason::EptViolation, 0x2)
        };
        assert_eq!(
            raw.idt_vectoring(),
            Some(EventInfo::hardware_exception(13, Some(0x18)))
        );
        assert_eq!(RawExit::default().idt_vectoring(), None);
    }

    #[test]
    fn event_info_encodes_the_vm_entry_interruption_format() {
        let (info, code) = EventInfo::hardware_exception(vector::GP, Some(0)).encode();
        assert_eq!(info, 0x8000_0b0d);
        assert_eq!(code, 0);
        assert_eq!(
            EventInfo::external_interrupt(0x20).encode(),
            (0x8000_0020, 0)
        );
        assert_eq!(EventInfo::nmi().encode(), (0x8000_0202, 0));
        let e = EventInfo::hardware_exception(vector::PF, Some(7));
        let (i, c) = e.encode();
        assert_eq!(EventInfo::decode(i, c), Some(e));
    }

    #[test]
    fn raw_exit_read_and_store_round_trip_through_a_vmcs_image() {
        let raw = RawExit {
            reason: 48,
            instruction_length: 3,
            qualification: 0x181,
            guest_linear_address: 0x1000,
            guest_physical_address: 0x2000,
            instruction_information: 5,
            interruption_information: 6,
            interruption_error_code: 7,
            idt_vectoring_information: 8,
            idt_vectoring_error_code: 9,
        };
        let mut vmcs = VmcsImage::new();
        raw.store(&mut vmcs);
        assert_eq!(RawExit::read(&vmcs), raw);
    }

    fn any_raw_exit() -> impl Strategy<Value = RawExit> {
        (
            prop_oneof![
                any::<u32>(),
                (0u32..=80),
                (0u32..=80).prop_map(|r| r | (1 << 31))
            ],
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(
                |(reason, len, q, gla, gpa, info, ii, iec, iv, ivec)| RawExit {
                    reason,
                    instruction_length: len,
                    qualification: q,
                    guest_linear_address: gla,
                    guest_physical_address: gpa,
                    instruction_information: info,
                    interruption_information: ii,
                    interruption_error_code: iec,
                    idt_vectoring_information: iv,
                    idt_vectoring_error_code: ivec,
                },
            )
    }

    proptest! {
        #[test]
        fn decode_is_total_on_arbitrary_raw_input(raw in any_raw_exit()) {
            let exit = decode(&raw);
            let basic = raw.reason as u16;
            match ExitReason::from_basic(basic) {
                None => prop_assert_eq!(exit, VmExit::Unknown { reason: basic }),
                Some(reason) => {
                    if let VmExit::Malformed { reason: r } = exit {
                        prop_assert_eq!(r, reason);
                    }
                }
            }
            let _ = raw.idt_vectoring();
            let _ = raw.reason_field();
            if let VmExit::VmxInstruction { operand: Some(Operand::Memory(m)), .. } = exit {
                let _ = m.linear_address(|_| u64::MAX, u64::MAX, false);
                let _ = m.linear_address(|_| u64::MAX, u64::MAX, true);
            }
        }

        #[test]
        fn event_info_encode_decode_round_trips(vector in any::<u8>(), kind in 0u32..8, code in proptest::option::of(any::<u32>())) {
            let e = EventInfo { vector, kind: EventType::from_bits(kind), error_code: code, nmi_unblocking: false };
            let (info, c) = e.encode();
            prop_assert_eq!(EventInfo::decode(info, c), Some(e));
        }
    }
}
