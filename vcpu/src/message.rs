//! The exit message and its reply: the IPC ABI between the kernel and a VMM server.
//!
//! On a VM exit the kernel sends the vCPU's VMM server an [`ExitMessage`]: the exit
//! information plus the guest state groups selected by a [`StateMask`] (chosen per exit reason
//! when the server bound its exit portals). The server answers with a [`Reply`]: the groups it
//! changed (again a mask), the state to write, and a [`ResumeAction`].
//!
//! # Host-isolation rule
//!
//! A server controls its guest's state, never the host's. [`load`] (and [`Reply::apply`]) is
//! the only path from a reply into the VMCS, and it enforces, before writing anything:
//!
//! 1. Only guest state can be named. [`GuestState`] has no host-state field, no VMCS link
//!    pointer, EPTP, VPID, posted-interrupt, bitmap, MSR-area or PML address, no VM-exit
//!    control and no MSR-load count: those stay the kernel's (EPT bindings change through the
//!    [`ResumeAction::ResumeWithEptBinding`] capability, which the kernel checks).
//! 2. The exit information is read-only: a reply naming [`StateMask::EXIT_INFO`] is refused.
//! 3. In the control fields a server may change only the *server-owned* bits
//!    ([`SERVER_PIN_BASED`], [`SERVER_PRIMARY`], [`SERVER_SECONDARY`], [`SERVER_ENTRY`],
//!    [`SERVER_EXCEPTION_BITMAP`]); every other bit must be echoed exactly as the exit message
//!    reported it. Kernel-owned bits are those whose change would give the guest host
//!    resources or take the host's control away: I/O and MSR bitmaps (direct port or MSR
//!    access), EPT and VPID, the TPR shadow and APIC virtualization (host-physical pages), CR8
//!    exiting (the physical TPR), MOV-DR and RDPMC exiting (debug registers and counters the
//!    kernel does not switch), external-interrupt and NMI exiting and the preemption timer
//!    (host interrupts and scheduling), VMCS shadowing, PML, VM functions and #VE (addresses
//!    the kernel owns), the "load IA32_EFER/PAT" entry controls, entry to SMM, and the
//!    exception-bitmap bits #DB, #AC and #MC (benign-exception loops and machine checks).
//!    The CR0/CR4 guest/host masks and read shadows, the page-fault error-code mask/match and
//!    the TPR threshold are the server's.
//! 4. MSRs the kernel loads with WRMSR (LSTAR, CSTAR, KERNEL_GS_BASE, SFMASK) must hold values
//!    WRMSR accepts (canonical addresses, SFMASK bits 63:32 clear), so a reply cannot make
//!    the kernel fault.
//!
//! Any other bad value (reserved bits, inconsistent state) only makes VM entry fail, which the
//! kernel reports to the server as exit reason 33, 34 or 41 (SDM Vol. 3C §27.8): the guest's
//! problem, not the host's.
//!
//! # Word encoding
//!
//! IPC carries message registers (u64 words). The encodings are fixed-size; a group not in the
//! mask still has its words (zero when sent, ignored when received).
//!
//! [`ExitMessage`], [`EXIT_MESSAGE_WORDS`] = 78 words:
//!
//! | word | content |
//! |------|---------|
//! | 0    | bits 31:0 state mask, 63:32 reserved (0) |
//! | 1    | exit reason (31:0), VM-exit instruction length (63:32) |
//! | 2    | exit qualification |
//! | 3    | guest-linear address |
//! | 4    | guest-physical address |
//! | 5    | VM-exit instruction information (31:0), VM-exit interruption information (63:32) |
//! | 6    | VM-exit interruption error code (31:0), IDT-vectoring information (63:32) |
//! | 7    | IDT-vectoring error code (31:0), reserved (63:32) |
//! | 8-77 | guest state, [`GUEST_STATE_WORDS`] words (below) |
//!
//! With [`StateMask::EXIT_INFO`] clear only the exit reason (word 1, bits 31:0) is meaningful.
//!
//! [`Reply`], [`REPLY_WORDS`] = 72 words:
//!
//! | word | content |
//! |------|---------|
//! | 0    | bits 31:0 state mask, 39:32 action code (0 resume, 1 advance, 2 resume with EPT binding, 3 stop), 63:40 reserved |
//! | 1    | action argument: EPT capability selector for code 2, else 0 |
//! | 2-71 | guest state, [`GUEST_STATE_WORDS`] words (below) |
//!
//! Guest state, [`GUEST_STATE_WORDS`] = 70 words, offsets relative to its first word, with the
//! group that selects them:
//!
//! | word  | content | group |
//! |-------|---------|-------|
//! | 0-14  | RAX, RCX, RDX, RBX, RBP, RSI, RDI, R8-R15 | `GPRS` |
//! | 15-17 | RIP, RSP, RFLAGS | `RIP_RSP_RFLAGS` |
//! | 18-21 | CR0, CR2, CR3, CR4 | `CR` |
//! | 22    | DR7 | `DR7` |
//! | 23-38 | ES, CS, SS, DS, FS, GS, LDTR, TR: two words each, selector (15:0) \| access rights (31:16) \| limit (63:32), then base | `SEGMENTS` |
//! | 39-41 | GDTR base, IDTR base, GDTR limit (31:0) \| IDTR limit (63:32) | `DESCRIPTOR_TABLES` |
//! | 42-43 | IA32_EFER, IA32_PAT | `EFER_PAT` |
//! | 44-46 | IA32_SYSENTER_CS (31:0, 63:32 reserved), _ESP, _EIP | `SYSENTER` |
//! | 47-51 | IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK, IA32_KERNEL_GS_BASE | `SYSCALL_MSRS` |
//! | 52-53 | interruptibility (31:0) \| activity state (63:32), pending debug exceptions | `INTERRUPTIBILITY_ACTIVITY` |
//! | 54-55 | VM-entry interruption information (31:0) \| exception error code (63:32), instruction length (31:0, 63:32 reserved) | `EVENT_INJECTION` |
//! | 56    | TSC offset | `TSC` |
//! | 57    | VMX-preemption timer value (31:0, 63:32 reserved) | `PREEMPTION_TIMER` |
//! | 58-65 | pin-based \| primary, secondary \| exception bitmap, PF error-code mask \| match, VM-entry controls \| TPR threshold, CR0 mask, CR4 mask, CR0 read shadow, CR4 read shadow | `CONTROLS` |
//! | 66-69 | PDPTE0-3 | `PDPTES` |

use crate::controls::{EntryControls, PinBasedControls, ProcessorBasedControls, SecondaryControls};
use crate::exit::{EventInfo, Gpr, RawExit, vector};
use crate::vmcs::{Interruptibility, VmcsAccess, VmcsField};

bitflags::bitflags! {
    /// Groups of guest state an exit message carries or a reply writes back.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct StateMask: u32 {
        /// RAX, RCX, RDX, RBX, RBP, RSI, RDI, R8-R15 (RSP is in `RIP_RSP_RFLAGS`).
        const GPRS = 1 << 0;
        /// RIP, RSP, RFLAGS.
        const RIP_RSP_RFLAGS = 1 << 1;
        /// CR0, CR2, CR3, CR4.
        const CR = 1 << 2;
        /// DR7.
        const DR7 = 1 << 3;
        /// ES, CS, SS, DS, FS, GS, LDTR, TR: selector, base, limit, access rights.
        const SEGMENTS = 1 << 4;
        /// GDTR, IDTR: base and limit.
        const DESCRIPTOR_TABLES = 1 << 5;
        /// IA32_EFER, IA32_PAT.
        const EFER_PAT = 1 << 6;
        /// IA32_SYSENTER_CS, _ESP, _EIP.
        const SYSENTER = 1 << 7;
        /// IA32_STAR, IA32_LSTAR, IA32_CSTAR, IA32_FMASK, IA32_KERNEL_GS_BASE.
        const SYSCALL_MSRS = 1 << 8;
        /// Interruptibility state, activity state, pending debug exceptions.
        const INTERRUPTIBILITY_ACTIVITY = 1 << 9;
        /// VM-entry interruption information, exception error code, instruction length.
        const EVENT_INJECTION = 1 << 10;
        /// The full exit information (read-only: exit messages only).
        const EXIT_INFO = 1 << 11;
        /// TSC offset.
        const TSC = 1 << 12;
        /// VMX-preemption timer value.
        const PREEMPTION_TIMER = 1 << 13;
        /// Pin-based, primary and secondary processor-based and VM-entry controls, exception
        /// bitmap, page-fault error-code mask and match, TPR threshold, CR0/CR4 guest/host
        /// masks and read shadows.
        const CONTROLS = 1 << 14;
        /// Guest PDPTE0-3 (PAE paging under EPT).
        const PDPTES = 1 << 15;
    }
}

/// Words of an encoded [`GuestState`].
pub const GUEST_STATE_WORDS: usize = 70;
/// Words of an encoded [`ExitMessage`].
pub const EXIT_MESSAGE_WORDS: usize = 8 + GUEST_STATE_WORDS;
/// Words of an encoded [`Reply`].
pub const REPLY_WORDS: usize = 2 + GUEST_STATE_WORDS;

/// First word of each group within the encoded guest state (see the module table).
pub mod word {
    /// RAX..R15 (15 words).
    pub const GPRS: usize = 0;
    /// RIP, RSP, RFLAGS.
    pub const RIP_RSP_RFLAGS: usize = 15;
    /// CR0, CR2, CR3, CR4.
    pub const CR: usize = 18;
    /// DR7.
    pub const DR7: usize = 22;
    /// Eight segments, two words each.
    pub const SEGMENTS: usize = 23;
    /// GDTR base, IDTR base, limits.
    pub const DESCRIPTOR_TABLES: usize = 39;
    /// EFER, PAT.
    pub const EFER_PAT: usize = 42;
    /// SYSENTER CS, ESP, EIP.
    pub const SYSENTER: usize = 44;
    /// STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE.
    pub const SYSCALL_MSRS: usize = 47;
    /// Interruptibility | activity, pending debug exceptions.
    pub const INTERRUPTIBILITY_ACTIVITY: usize = 52;
    /// Entry interruption information | error code, instruction length.
    pub const EVENT_INJECTION: usize = 54;
    /// TSC offset.
    pub const TSC: usize = 56;
    /// Preemption timer value.
    pub const PREEMPTION_TIMER: usize = 57;
    /// Control fields (8 words).
    pub const CONTROLS: usize = 58;
    /// PDPTE0-3.
    pub const PDPTES: usize = 66;
}

/// Pin-based controls a server may change (rule 3 of the module documentation).
pub const SERVER_PIN_BASED: PinBasedControls = PinBasedControls::VIRTUAL_NMIS;

/// Primary processor-based controls a server may change.
pub const SERVER_PRIMARY: ProcessorBasedControls = ProcessorBasedControls::INTERRUPT_WINDOW_EXITING
    .union(ProcessorBasedControls::USE_TSC_OFFSETTING)
    .union(ProcessorBasedControls::HLT_EXITING)
    .union(ProcessorBasedControls::INVLPG_EXITING)
    .union(ProcessorBasedControls::MWAIT_EXITING)
    .union(ProcessorBasedControls::RDTSC_EXITING)
    .union(ProcessorBasedControls::CR3_LOAD_EXITING)
    .union(ProcessorBasedControls::CR3_STORE_EXITING)
    .union(ProcessorBasedControls::NMI_WINDOW_EXITING)
    .union(ProcessorBasedControls::MONITOR_TRAP_FLAG)
    .union(ProcessorBasedControls::MONITOR_EXITING)
    .union(ProcessorBasedControls::PAUSE_EXITING);

/// Secondary processor-based controls a server may change.
pub const SERVER_SECONDARY: SecondaryControls = SecondaryControls::DESCRIPTOR_TABLE_EXITING
    .union(SecondaryControls::WBINVD_EXITING)
    .union(SecondaryControls::UNRESTRICTED_GUEST)
    .union(SecondaryControls::PAUSE_LOOP_EXITING)
    .union(SecondaryControls::RDRAND_EXITING)
    .union(SecondaryControls::RDSEED_EXITING);

/// VM-entry controls a server may change: the guest's long mode and debug-state loading.
pub const SERVER_ENTRY: EntryControls =
    EntryControls::IA32E_MODE_GUEST.union(EntryControls::LOAD_DEBUG_CONTROLS);

/// Exception-bitmap bits a server may change: all but #DB, #AC and #MC.
pub const SERVER_EXCEPTION_BITMAP: u32 =
    !((1 << vector::DB) | (1 << vector::AC) | (1 << vector::MC));

/// Guest general-purpose registers other than RSP, in instruction-encoding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct Gprs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl Gprs {
    /// The registers in encoding order (RAX, RCX, RDX, RBX, RBP, RSI, RDI, R8-R15): the
    /// words of the `GPRS` group.
    pub fn to_words(&self) -> [u64; 15] {
        self.slots().map(|r| *r)
    }

    /// The registers from the words of the `GPRS` group ([`Gprs::to_words`]).
    pub fn from_words(words: [u64; 15]) -> Gprs {
        let mut g = Gprs::default();
        for (slot, w) in g.slots_mut().into_iter().zip(words) {
            *slot = w;
        }
        g
    }

    fn slots(&self) -> [&u64; 15] {
        [
            &self.rax, &self.rcx, &self.rdx, &self.rbx, &self.rbp, &self.rsi, &self.rdi, &self.r8,
            &self.r9, &self.r10, &self.r11, &self.r12, &self.r13, &self.r14, &self.r15,
        ]
    }

    fn slots_mut(&mut self) -> [&mut u64; 15] {
        [
            &mut self.rax,
            &mut self.rcx,
            &mut self.rdx,
            &mut self.rbx,
            &mut self.rbp,
            &mut self.rsi,
            &mut self.rdi,
            &mut self.r8,
            &mut self.r9,
            &mut self.r10,
            &mut self.r11,
            &mut self.r12,
            &mut self.r13,
            &mut self.r14,
            &mut self.r15,
        ]
    }

    /// Slot of `gpr` in [`Gprs::slots`]; `None` for RSP.
    const fn slot(gpr: Gpr) -> Option<usize> {
        match gpr.number() {
            4 => None,
            n if n < 4 => Some(n),
            n => Some(n - 1),
        }
    }
}

/// A segment register as carried in messages.
///
/// `ar` is the VMX access-rights format (SDM Vol. 3C §25.4.1: type 3:0, S 4, DPL 6:5, P 7,
/// AVL 12, L 13, D/B 14, G 15) with the "unusable" bit (VMX bit 16) moved to bit 8, which is
/// reserved in the VMX format; bits 11:9 are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Access rights, compressed as described above.
    pub ar: u16,
    /// Limit (byte granular, as in the VMCS).
    pub limit: u32,
    /// Base address.
    pub base: u64,
}

impl Segment {
    /// The "segment unusable" bit of [`Segment::ar`].
    pub const UNUSABLE: u16 = 1 << 8;

    /// Compresses a VMX access-rights field.
    pub const fn ar_from_vmx(vmx: u32) -> u16 {
        ((vmx & 0xf0ff) | (((vmx >> 16) & 1) << 8)) as u16
    }

    /// The VMX access-rights field of this segment.
    pub const fn vmx_access_rights(&self) -> u32 {
        let ar = self.ar as u32;
        (ar & 0xf0ff) | (((ar >> 8) & 1) << 16)
    }

    /// The L bit (64-bit code segment).
    pub const fn long_mode(&self) -> bool {
        self.ar & (1 << 13) != 0
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct DescriptorTable {
    /// Base address.
    pub base: u64,
    /// Limit (the VMCS field is 32 bits; bits 31:16 must be 0 for VM entry).
    pub limit: u32,
}

/// The VM-entry event-injection fields (SDM Vol. 3C §25.8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct EventInjection {
    /// VM-entry interruption information (build it with [`EventInfo::encode`]).
    pub information: u32,
    /// VM-entry exception error code.
    pub error_code: u32,
    /// VM-entry instruction length (software interrupts and exceptions).
    pub instruction_length: u32,
}

/// The control fields a message carries (group [`StateMask::CONTROLS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct ControlState {
    /// Pin-based VM-execution controls.
    pub pin_based: PinBasedControls,
    /// Primary processor-based VM-execution controls.
    pub primary: ProcessorBasedControls,
    /// Secondary processor-based VM-execution controls.
    pub secondary: SecondaryControls,
    /// Exception bitmap.
    pub exception_bitmap: u32,
    /// Page-fault error-code mask.
    pub page_fault_error_code_mask: u32,
    /// Page-fault error-code match.
    pub page_fault_error_code_match: u32,
    /// VM-entry controls.
    pub entry: EntryControls,
    /// TPR threshold.
    pub tpr_threshold: u32,
    /// CR0 guest/host mask.
    pub cr0_guest_host_mask: u64,
    /// CR4 guest/host mask.
    pub cr4_guest_host_mask: u64,
    /// CR0 read shadow.
    pub cr0_read_shadow: u64,
    /// CR4 read shadow.
    pub cr4_read_shadow: u64,
}

/// Guest state transferred between kernel and server; which fields are meaningful is given by
/// the accompanying [`StateMask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct GuestState {
    /// `GPRS`.
    pub gprs: Gprs,
    /// `RIP_RSP_RFLAGS`: RIP.
    pub rip: u64,
    /// `RIP_RSP_RFLAGS`: RSP.
    pub rsp: u64,
    /// `RIP_RSP_RFLAGS`: RFLAGS.
    pub rflags: u64,
    /// `CR`: CR0.
    pub cr0: u64,
    /// `CR`: CR2.
    pub cr2: u64,
    /// `CR`: CR3.
    pub cr3: u64,
    /// `CR`: CR4.
    pub cr4: u64,
    /// `DR7`.
    pub dr7: u64,
    /// `SEGMENTS`: ES.
    pub es: Segment,
    /// `SEGMENTS`: CS.
    pub cs: Segment,
    /// `SEGMENTS`: SS.
    pub ss: Segment,
    /// `SEGMENTS`: DS.
    pub ds: Segment,
    /// `SEGMENTS`: FS.
    pub fs: Segment,
    /// `SEGMENTS`: GS.
    pub gs: Segment,
    /// `SEGMENTS`: LDTR.
    pub ldtr: Segment,
    /// `SEGMENTS`: TR.
    pub tr: Segment,
    /// `DESCRIPTOR_TABLES`: GDTR.
    pub gdtr: DescriptorTable,
    /// `DESCRIPTOR_TABLES`: IDTR.
    pub idtr: DescriptorTable,
    /// `EFER_PAT`: IA32_EFER.
    pub efer: u64,
    /// `EFER_PAT`: IA32_PAT.
    pub pat: u64,
    /// `SYSENTER`: IA32_SYSENTER_CS.
    pub sysenter_cs: u32,
    /// `SYSENTER`: IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// `SYSENTER`: IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// `SYSCALL_MSRS`: IA32_STAR.
    pub star: u64,
    /// `SYSCALL_MSRS`: IA32_LSTAR.
    pub lstar: u64,
    /// `SYSCALL_MSRS`: IA32_CSTAR.
    pub cstar: u64,
    /// `SYSCALL_MSRS`: IA32_FMASK.
    pub sfmask: u64,
    /// `SYSCALL_MSRS`: IA32_KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
    /// `INTERRUPTIBILITY_ACTIVITY`: interruptibility state.
    pub interruptibility: Interruptibility,
    /// `INTERRUPTIBILITY_ACTIVITY`: activity state (see [`crate::vmcs::ActivityState`]).
    pub activity: u32,
    /// `INTERRUPTIBILITY_ACTIVITY`: pending debug exceptions.
    pub pending_debug_exceptions: u64,
    /// `EVENT_INJECTION`.
    pub injection: EventInjection,
    /// `TSC`: TSC offset.
    pub tsc_offset: u64,
    /// `PREEMPTION_TIMER`: VMX-preemption timer value.
    pub preemption_timer: u32,
    /// `CONTROLS`.
    pub controls: ControlState,
    /// `PDPTES`: PDPTE0-3.
    pub pdptes: [u64; 4],
}

impl GuestState {
    /// The value of a general-purpose register (RSP from `rsp`).
    pub fn gpr(&self, gpr: Gpr) -> u64 {
        match Gprs::slot(gpr) {
            Some(slot) => *self.gprs.slots()[slot],
            None => self.rsp,
        }
    }

    /// Sets a general-purpose register (RSP into `rsp`).
    pub fn set_gpr(&mut self, gpr: Gpr, value: u64) {
        match Gprs::slot(gpr) {
            Some(slot) => *self.gprs.slots_mut()[slot] = value,
            None => self.rsp = value,
        }
    }

    /// Whether `self` and `other` hold the same values in `group`, one group of
    /// [`StateMask`] (false for anything else: several groups, none, exit information).
    #[inline]
    pub fn same_group(&self, other: &GuestState, group: StateMask) -> bool {
        let (a, b) = (self, other);
        match group {
            StateMask::GPRS => a.gprs == b.gprs,
            StateMask::RIP_RSP_RFLAGS => (a.rip, a.rsp, a.rflags) == (b.rip, b.rsp, b.rflags),
            StateMask::CR => (a.cr0, a.cr2, a.cr3, a.cr4) == (b.cr0, b.cr2, b.cr3, b.cr4),
            StateMask::DR7 => a.dr7 == b.dr7,
            StateMask::SEGMENTS => a.segments() == b.segments(),
            StateMask::DESCRIPTOR_TABLES => (a.gdtr, a.idtr) == (b.gdtr, b.idtr),
            StateMask::EFER_PAT => (a.efer, a.pat) == (b.efer, b.pat),
            StateMask::SYSENTER => {
                (a.sysenter_cs, a.sysenter_esp, a.sysenter_eip)
                    == (b.sysenter_cs, b.sysenter_esp, b.sysenter_eip)
            }
            StateMask::SYSCALL_MSRS => {
                (a.star, a.lstar, a.cstar, a.sfmask, a.kernel_gs_base)
                    == (b.star, b.lstar, b.cstar, b.sfmask, b.kernel_gs_base)
            }
            StateMask::INTERRUPTIBILITY_ACTIVITY => {
                (a.interruptibility, a.activity, a.pending_debug_exceptions)
                    == (b.interruptibility, b.activity, b.pending_debug_exceptions)
            }
            StateMask::EVENT_INJECTION => a.injection == b.injection,
            StateMask::TSC => a.tsc_offset == b.tsc_offset,
            StateMask::PREEMPTION_TIMER => a.preemption_timer == b.preemption_timer,
            StateMask::CONTROLS => a.controls == b.controls,
            StateMask::PDPTES => a.pdptes == b.pdptes,
            _ => false,
        }
    }

    /// The segments in VMCS order: ES, CS, SS, DS, FS, GS, LDTR, TR.
    pub fn segments(&self) -> [&Segment; 8] {
        [
            &self.es, &self.cs, &self.ss, &self.ds, &self.fs, &self.gs, &self.ldtr, &self.tr,
        ]
    }

    /// The segments in VMCS order, mutable.
    pub fn segments_mut(&mut self) -> [&mut Segment; 8] {
        [
            &mut self.es,
            &mut self.cs,
            &mut self.ss,
            &mut self.ds,
            &mut self.fs,
            &mut self.gs,
            &mut self.ldtr,
            &mut self.tr,
        ]
    }
}

/// Guest registers the VMCS does not hold, which the kernel keeps in its per-vCPU save area
/// across VM exits: the general-purpose registers other than RSP (saved by the exit path),
/// CR2, and the SYSCALL MSRs it switches with RDMSR/WRMSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct SavedRegisters {
    /// RAX..R15 without RSP.
    pub gprs: Gprs,
    /// CR2.
    pub cr2: u64,
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_CSTAR.
    pub cstar: u64,
    /// IA32_FMASK.
    pub sfmask: u64,
    /// IA32_KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
}

/// MSR indices of the SYSCALL MSRs (SDM Vol. 4 Table 2-2), for [`LoadError::InvalidMsrValue`].
pub mod msr {
    /// IA32_STAR.
    pub const IA32_STAR: u32 = 0xC000_0081;
    /// IA32_LSTAR.
    pub const IA32_LSTAR: u32 = 0xC000_0082;
    /// IA32_CSTAR.
    pub const IA32_CSTAR: u32 = 0xC000_0083;
    /// IA32_FMASK.
    pub const IA32_FMASK: u32 = 0xC000_0084;
    /// IA32_KERNEL_GS_BASE.
    pub const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;
}

/// Linear-address width assumed for canonical checks (4-level paging).
pub const LINEAR_ADDRESS_BITS: u32 = 48;

const fn is_canonical(value: u64) -> bool {
    let shift = 64 - LINEAR_ADDRESS_BITS;
    (((value << shift) as i64) >> shift) as u64 == value
}

/// Guest segment fields in the order of [`GuestState::segments`] (ES, CS, SS, DS, FS, GS,
/// LDTR, TR): selector, base, limit, access rights.
pub const SEGMENT_FIELDS: [[VmcsField; 4]; 8] = {
    use VmcsField as F;
    [
        [
            F::GUEST_ES_SELECTOR,
            F::GUEST_ES_BASE,
            F::GUEST_ES_LIMIT,
            F::GUEST_ES_ACCESS_RIGHTS,
        ],
        [
            F::GUEST_CS_SELECTOR,
            F::GUEST_CS_BASE,
            F::GUEST_CS_LIMIT,
            F::GUEST_CS_ACCESS_RIGHTS,
        ],
        [
            F::GUEST_SS_SELECTOR,
            F::GUEST_SS_BASE,
            F::GUEST_SS_LIMIT,
            F::GUEST_SS_ACCESS_RIGHTS,
        ],
        [
            F::GUEST_DS_SELECTOR,
            F::GUEST_DS_BASE,
            F::GUEST_DS_LIMIT,
            F::GUEST_DS_ACCESS_RIGHTS,
        ],
        [
            F::GUEST_FS_SELECTOR,
            F::GUEST_FS_BASE,
            F::GUEST_FS_LIMIT,
            F::GUEST_FS_ACCESS_RIGHTS,
        ],
        [
            F::GUEST_GS_SELECTOR,
            F::GUEST_GS_BASE,
            F::GUEST_GS_LIMIT,
            F::GUEST_GS_ACCESS_RIGHTS,
        ],
        [
            F::GUEST_LDTR_SELECTOR,
            F::GUEST_LDTR_BASE,
            F::GUEST_LDTR_LIMIT,
            F::GUEST_LDTR_ACCESS_RIGHTS,
        ],
        [
            F::GUEST_TR_SELECTOR,
            F::GUEST_TR_BASE,
            F::GUEST_TR_LIMIT,
            F::GUEST_TR_ACCESS_RIGHTS,
        ],
    ]
};

const PDPTE_FIELDS: [VmcsField; 4] = [
    VmcsField::GUEST_PDPTE0,
    VmcsField::GUEST_PDPTE1,
    VmcsField::GUEST_PDPTE2,
    VmcsField::GUEST_PDPTE3,
];

/// Copies the groups in `mask` from the VMCS (and the kernel's [`SavedRegisters`]) into `out`.
/// Groups outside the mask are left as they are; [`StateMask::EXIT_INFO`] is not guest state
/// and is handled by [`ExitMessage::capture`].
pub fn save(vmcs: &impl VmcsAccess, regs: &SavedRegisters, mask: StateMask, out: &mut GuestState) {
    use VmcsField as F;
    if mask.contains(StateMask::GPRS) {
        out.gprs = regs.gprs;
    }
    if mask.contains(StateMask::RIP_RSP_RFLAGS) {
        out.rip = vmcs.read(F::GUEST_RIP);
        out.rsp = vmcs.read(F::GUEST_RSP);
        out.rflags = vmcs.read(F::GUEST_RFLAGS);
    }
    if mask.contains(StateMask::CR) {
        out.cr0 = vmcs.read(F::GUEST_CR0);
        out.cr2 = regs.cr2;
        out.cr3 = vmcs.read(F::GUEST_CR3);
        out.cr4 = vmcs.read(F::GUEST_CR4);
    }
    if mask.contains(StateMask::DR7) {
        out.dr7 = vmcs.read(F::GUEST_DR7);
    }
    if mask.contains(StateMask::SEGMENTS) {
        for (segment, [selector, base, limit, ar]) in
            out.segments_mut().into_iter().zip(SEGMENT_FIELDS)
        {
            *segment = Segment {
                selector: vmcs.read16(selector),
                ar: Segment::ar_from_vmx(vmcs.read32(ar)),
                limit: vmcs.read32(limit),
                base: vmcs.read(base),
            };
        }
    }
    if mask.contains(StateMask::DESCRIPTOR_TABLES) {
        out.gdtr = DescriptorTable {
            base: vmcs.read(F::GUEST_GDTR_BASE),
            limit: vmcs.read32(F::GUEST_GDTR_LIMIT),
        };
        out.idtr = DescriptorTable {
            base: vmcs.read(F::GUEST_IDTR_BASE),
            limit: vmcs.read32(F::GUEST_IDTR_LIMIT),
        };
    }
    if mask.contains(StateMask::EFER_PAT) {
        out.efer = vmcs.read(F::GUEST_IA32_EFER);
        out.pat = vmcs.read(F::GUEST_IA32_PAT);
    }
    if mask.contains(StateMask::SYSENTER) {
        out.sysenter_cs = vmcs.read32(F::GUEST_IA32_SYSENTER_CS);
        out.sysenter_esp = vmcs.read(F::GUEST_IA32_SYSENTER_ESP);
        out.sysenter_eip = vmcs.read(F::GUEST_IA32_SYSENTER_EIP);
    }
    if mask.contains(StateMask::SYSCALL_MSRS) {
        out.star = regs.star;
        out.lstar = regs.lstar;
        out.cstar = regs.cstar;
        out.sfmask = regs.sfmask;
        out.kernel_gs_base = regs.kernel_gs_base;
    }
    if mask.contains(StateMask::INTERRUPTIBILITY_ACTIVITY) {
        out.interruptibility =
            Interruptibility::from_bits_retain(vmcs.read32(F::GUEST_INTERRUPTIBILITY_STATE));
        out.activity = vmcs.read32(F::GUEST_ACTIVITY_STATE);
        out.pending_debug_exceptions = vmcs.read(F::GUEST_PENDING_DEBUG_EXCEPTIONS);
    }
    if mask.contains(StateMask::EVENT_INJECTION) {
        out.injection = EventInjection {
            information: vmcs.read32(F::VM_ENTRY_INTERRUPTION_INFORMATION),
            error_code: vmcs.read32(F::VM_ENTRY_EXCEPTION_ERROR_CODE),
            instruction_length: vmcs.read32(F::VM_ENTRY_INSTRUCTION_LENGTH),
        };
    }
    if mask.contains(StateMask::TSC) {
        out.tsc_offset = vmcs.read(F::TSC_OFFSET);
    }
    if mask.contains(StateMask::PREEMPTION_TIMER) {
        out.preemption_timer = vmcs.read32(F::VMX_PREEMPTION_TIMER_VALUE);
    }
    if mask.contains(StateMask::CONTROLS) {
        out.controls = ControlState {
            pin_based: PinBasedControls::from_bits_retain(
                vmcs.read32(F::PIN_BASED_VM_EXECUTION_CONTROLS),
            ),
            primary: ProcessorBasedControls::from_bits_retain(
                vmcs.read32(F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS),
            ),
            secondary: SecondaryControls::from_bits_retain(
                vmcs.read32(F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS),
            ),
            exception_bitmap: vmcs.read32(F::EXCEPTION_BITMAP),
            page_fault_error_code_mask: vmcs.read32(F::PAGE_FAULT_ERROR_CODE_MASK),
            page_fault_error_code_match: vmcs.read32(F::PAGE_FAULT_ERROR_CODE_MATCH),
            entry: EntryControls::from_bits_retain(vmcs.read32(F::VM_ENTRY_CONTROLS)),
            tpr_threshold: vmcs.read32(F::TPR_THRESHOLD),
            cr0_guest_host_mask: vmcs.read(F::CR0_GUEST_HOST_MASK),
            cr4_guest_host_mask: vmcs.read(F::CR4_GUEST_HOST_MASK),
            cr0_read_shadow: vmcs.read(F::CR0_READ_SHADOW),
            cr4_read_shadow: vmcs.read(F::CR4_READ_SHADOW),
        };
    }
    if mask.contains(StateMask::PDPTES) {
        for (pdpte, field) in out.pdptes.iter_mut().zip(PDPTE_FIELDS) {
            *pdpte = vmcs.read(field);
        }
    }
}

/// [`save`] straight into the word encoding ([`GuestState::to_words`]) of the `mask` groups
/// but GPRs and RIP RSP RFLAGS (which [`ExitMessage::capture_words`] writes itself).
fn save_words(
    vmcs: &impl VmcsAccess,
    regs: &SavedRegisters,
    mask: StateMask,
    s: &mut [u64; GUEST_STATE_WORDS],
) {
    use VmcsField as F;
    let pair = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    if mask.contains(StateMask::CR) {
        s[word::CR] = vmcs.read(F::GUEST_CR0);
        s[word::CR + 1] = regs.cr2;
        s[word::CR + 2] = vmcs.read(F::GUEST_CR3);
        s[word::CR + 3] = vmcs.read(F::GUEST_CR4);
    }
    if mask.contains(StateMask::DR7) {
        s[word::DR7] = vmcs.read(F::GUEST_DR7);
    }
    if mask.contains(StateMask::SEGMENTS) {
        for (i, [selector, base, limit, ar]) in SEGMENT_FIELDS.into_iter().enumerate() {
            let ar = Segment::ar_from_vmx(vmcs.read32(ar));
            s[word::SEGMENTS + 2 * i] = u64::from(vmcs.read16(selector))
                | (u64::from(ar) << 16)
                | (u64::from(vmcs.read32(limit)) << 32);
            s[word::SEGMENTS + 2 * i + 1] = vmcs.read(base);
        }
    }
    if mask.contains(StateMask::DESCRIPTOR_TABLES) {
        s[word::DESCRIPTOR_TABLES] = vmcs.read(F::GUEST_GDTR_BASE);
        s[word::DESCRIPTOR_TABLES + 1] = vmcs.read(F::GUEST_IDTR_BASE);
        s[word::DESCRIPTOR_TABLES + 2] = pair(
            vmcs.read32(F::GUEST_GDTR_LIMIT),
            vmcs.read32(F::GUEST_IDTR_LIMIT),
        );
    }
    if mask.contains(StateMask::EFER_PAT) {
        s[word::EFER_PAT] = vmcs.read(F::GUEST_IA32_EFER);
        s[word::EFER_PAT + 1] = vmcs.read(F::GUEST_IA32_PAT);
    }
    if mask.contains(StateMask::SYSENTER) {
        s[word::SYSENTER] = vmcs.read32(F::GUEST_IA32_SYSENTER_CS).into();
        s[word::SYSENTER + 1] = vmcs.read(F::GUEST_IA32_SYSENTER_ESP);
        s[word::SYSENTER + 2] = vmcs.read(F::GUEST_IA32_SYSENTER_EIP);
    }
    if mask.contains(StateMask::SYSCALL_MSRS) {
        s[word::SYSCALL_MSRS..word::SYSCALL_MSRS + 5].copy_from_slice(&[
            regs.star,
            regs.lstar,
            regs.cstar,
            regs.sfmask,
            regs.kernel_gs_base,
        ]);
    }
    if mask.contains(StateMask::INTERRUPTIBILITY_ACTIVITY) {
        s[word::INTERRUPTIBILITY_ACTIVITY] = pair(
            vmcs.read32(F::GUEST_INTERRUPTIBILITY_STATE),
            vmcs.read32(F::GUEST_ACTIVITY_STATE),
        );
        s[word::INTERRUPTIBILITY_ACTIVITY + 1] = vmcs.read(F::GUEST_PENDING_DEBUG_EXCEPTIONS);
    }
    if mask.contains(StateMask::EVENT_INJECTION) {
        s[word::EVENT_INJECTION] = pair(
            vmcs.read32(F::VM_ENTRY_INTERRUPTION_INFORMATION),
            vmcs.read32(F::VM_ENTRY_EXCEPTION_ERROR_CODE),
        );
        s[word::EVENT_INJECTION + 1] = vmcs.read32(F::VM_ENTRY_INSTRUCTION_LENGTH).into();
    }
    if mask.contains(StateMask::TSC) {
        s[word::TSC] = vmcs.read(F::TSC_OFFSET);
    }
    if mask.contains(StateMask::PREEMPTION_TIMER) {
        s[word::PREEMPTION_TIMER] = vmcs.read32(F::VMX_PREEMPTION_TIMER_VALUE).into();
    }
    if mask.contains(StateMask::CONTROLS) {
        let c = word::CONTROLS;
        s[c] = pair(
            vmcs.read32(F::PIN_BASED_VM_EXECUTION_CONTROLS),
            vmcs.read32(F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS),
        );
        s[c + 1] = pair(
            vmcs.read32(F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS),
            vmcs.read32(F::EXCEPTION_BITMAP),
        );
        s[c + 2] = pair(
            vmcs.read32(F::PAGE_FAULT_ERROR_CODE_MASK),
            vmcs.read32(F::PAGE_FAULT_ERROR_CODE_MATCH),
        );
        s[c + 3] = pair(
            vmcs.read32(F::VM_ENTRY_CONTROLS),
            vmcs.read32(F::TPR_THRESHOLD),
        );
        s[c + 4] = vmcs.read(F::CR0_GUEST_HOST_MASK);
        s[c + 5] = vmcs.read(F::CR4_GUEST_HOST_MASK);
        s[c + 6] = vmcs.read(F::CR0_READ_SHADOW);
        s[c + 7] = vmcs.read(F::CR4_READ_SHADOW);
    }
    if mask.contains(StateMask::PDPTES) {
        for (i, field) in PDPTE_FIELDS.into_iter().enumerate() {
            s[word::PDPTES + i] = vmcs.read(field);
        }
    }
}

/// A reply [`load`] refused; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadError {
    /// The mask names groups this ABI does not define.
    UnknownGroups(u32),
    /// The mask names read-only groups ([`StateMask::EXIT_INFO`]).
    ReadOnly(StateMask),
    /// A kernel-owned bit of a control field differs from the VMCS.
    KernelOwnedControl {
        /// The control field.
        field: VmcsField,
        /// The kernel-owned bits that would change.
        bits: u64,
    },
    /// WRMSR would refuse this value for a SYSCALL MSR the kernel loads.
    InvalidMsrValue {
        /// The MSR index.
        msr: u32,
        /// The refused value.
        value: u64,
    },
}

fn check_owned(
    vmcs: &impl VmcsAccess,
    field: VmcsField,
    requested: u32,
    server_owned: u32,
) -> Result<(), LoadError> {
    let changed = (vmcs.read32(field) ^ requested) & !server_owned;
    if changed != 0 {
        return Err(LoadError::KernelOwnedControl {
            field,
            bits: changed.into(),
        });
    }
    Ok(())
}

/// Checks a reply against the host-isolation rule (module documentation) without writing.
pub fn validate(
    vmcs: &impl VmcsAccess,
    mask: StateMask,
    state: &GuestState,
) -> Result<(), LoadError> {
    use VmcsField as F;
    let unknown = mask.bits() & !StateMask::all().bits();
    if unknown != 0 {
        return Err(LoadError::UnknownGroups(unknown));
    }
    if mask.contains(StateMask::EXIT_INFO) {
        return Err(LoadError::ReadOnly(StateMask::EXIT_INFO));
    }
    if mask.contains(StateMask::SYSCALL_MSRS) {
        for (msr, value, valid) in [
            (msr::IA32_LSTAR, state.lstar, is_canonical(state.lstar)),
            (msr::IA32_CSTAR, state.cstar, is_canonical(state.cstar)),
            (
                msr::IA32_KERNEL_GS_BASE,
                state.kernel_gs_base,
                is_canonical(state.kernel_gs_base),
            ),
            (msr::IA32_FMASK, state.sfmask, state.sfmask >> 32 == 0),
        ] {
            if !valid {
                return Err(LoadError::InvalidMsrValue { msr, value });
            }
        }
    }
    if mask.contains(StateMask::CONTROLS) {
        let c = &state.controls;
        check_owned(
            vmcs,
            F::PIN_BASED_VM_EXECUTION_CONTROLS,
            c.pin_based.bits(),
            SERVER_PIN_BASED.bits(),
        )?;
        check_owned(
            vmcs,
            F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            c.primary.bits(),
            SERVER_PRIMARY.bits(),
        )?;
        check_owned(
            vmcs,
            F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            c.secondary.bits(),
            SERVER_SECONDARY.bits(),
        )?;
        check_owned(
            vmcs,
            F::VM_ENTRY_CONTROLS,
            c.entry.bits(),
            SERVER_ENTRY.bits(),
        )?;
        check_owned(
            vmcs,
            F::EXCEPTION_BITMAP,
            c.exception_bitmap,
            SERVER_EXCEPTION_BITMAP,
        )?;
    }
    Ok(())
}

/// Writes the groups in `mask` from `state` into the VMCS (and the kernel's
/// [`SavedRegisters`]), after [`validate`] passed; on error nothing is written.
pub fn load(
    vmcs: &mut impl VmcsAccess,
    regs: &mut SavedRegisters,
    mask: StateMask,
    state: &GuestState,
) -> Result<(), LoadError> {
    use VmcsField as F;
    validate(vmcs, mask, state)?;
    if mask.contains(StateMask::GPRS) {
        regs.gprs = state.gprs;
    }
    if mask.contains(StateMask::RIP_RSP_RFLAGS) {
        vmcs.write(F::GUEST_RIP, state.rip);
        vmcs.write(F::GUEST_RSP, state.rsp);
        vmcs.write(F::GUEST_RFLAGS, state.rflags);
    }
    if mask.contains(StateMask::CR) {
        vmcs.write(F::GUEST_CR0, state.cr0);
        regs.cr2 = state.cr2;
        vmcs.write(F::GUEST_CR3, state.cr3);
        vmcs.write(F::GUEST_CR4, state.cr4);
    }
    if mask.contains(StateMask::DR7) {
        vmcs.write(F::GUEST_DR7, state.dr7);
    }
    if mask.contains(StateMask::SEGMENTS) {
        for (segment, [selector, base, limit, ar]) in
            state.segments().into_iter().zip(SEGMENT_FIELDS)
        {
            vmcs.write(selector, segment.selector.into());
            vmcs.write(base, segment.base);
            vmcs.write(limit, segment.limit.into());
            vmcs.write(ar, segment.vmx_access_rights().into());
        }
    }
    if mask.contains(StateMask::DESCRIPTOR_TABLES) {
        vmcs.write(F::GUEST_GDTR_BASE, state.gdtr.base);
        vmcs.write(F::GUEST_GDTR_LIMIT, state.gdtr.limit.into());
        vmcs.write(F::GUEST_IDTR_BASE, state.idtr.base);
        vmcs.write(F::GUEST_IDTR_LIMIT, state.idtr.limit.into());
    }
    if mask.contains(StateMask::EFER_PAT) {
        vmcs.write(F::GUEST_IA32_EFER, state.efer);
        vmcs.write(F::GUEST_IA32_PAT, state.pat);
    }
    if mask.contains(StateMask::SYSENTER) {
        vmcs.write(F::GUEST_IA32_SYSENTER_CS, state.sysenter_cs.into());
        vmcs.write(F::GUEST_IA32_SYSENTER_ESP, state.sysenter_esp);
        vmcs.write(F::GUEST_IA32_SYSENTER_EIP, state.sysenter_eip);
    }
    if mask.contains(StateMask::SYSCALL_MSRS) {
        regs.star = state.star;
        regs.lstar = state.lstar;
        regs.cstar = state.cstar;
        regs.sfmask = state.sfmask;
        regs.kernel_gs_base = state.kernel_gs_base;
    }
    if mask.contains(StateMask::INTERRUPTIBILITY_ACTIVITY) {
        vmcs.write(
            F::GUEST_INTERRUPTIBILITY_STATE,
            state.interruptibility.bits().into(),
        );
        vmcs.write(F::GUEST_ACTIVITY_STATE, state.activity.into());
        vmcs.write(
            F::GUEST_PENDING_DEBUG_EXCEPTIONS,
            state.pending_debug_exceptions,
        );
    }
    if mask.contains(StateMask::EVENT_INJECTION) {
        vmcs.write(
            F::VM_ENTRY_INTERRUPTION_INFORMATION,
            state.injection.information.into(),
        );
        vmcs.write(
            F::VM_ENTRY_EXCEPTION_ERROR_CODE,
            state.injection.error_code.into(),
        );
        vmcs.write(
            F::VM_ENTRY_INSTRUCTION_LENGTH,
            state.injection.instruction_length.into(),
        );
    }
    if mask.contains(StateMask::TSC) {
        vmcs.write(F::TSC_OFFSET, state.tsc_offset);
    }
    if mask.contains(StateMask::PREEMPTION_TIMER) {
        vmcs.write(F::VMX_PREEMPTION_TIMER_VALUE, state.preemption_timer.into());
    }
    if mask.contains(StateMask::CONTROLS) {
        let c = &state.controls;
        vmcs.write(
            F::PIN_BASED_VM_EXECUTION_CONTROLS,
            c.pin_based.bits().into(),
        );
        vmcs.write(
            F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            c.primary.bits().into(),
        );
        vmcs.write(
            F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            c.secondary.bits().into(),
        );
        vmcs.write(F::EXCEPTION_BITMAP, c.exception_bitmap.into());
        vmcs.write(
            F::PAGE_FAULT_ERROR_CODE_MASK,
            c.page_fault_error_code_mask.into(),
        );
        vmcs.write(
            F::PAGE_FAULT_ERROR_CODE_MATCH,
            c.page_fault_error_code_match.into(),
        );
        vmcs.write(F::VM_ENTRY_CONTROLS, c.entry.bits().into());
        vmcs.write(F::TPR_THRESHOLD, c.tpr_threshold.into());
        vmcs.write(F::CR0_GUEST_HOST_MASK, c.cr0_guest_host_mask);
        vmcs.write(F::CR4_GUEST_HOST_MASK, c.cr4_guest_host_mask);
        vmcs.write(F::CR0_READ_SHADOW, c.cr0_read_shadow);
        vmcs.write(F::CR4_READ_SHADOW, c.cr4_read_shadow);
    }
    if mask.contains(StateMask::PDPTES) {
        for (pdpte, field) in state.pdptes.iter().zip(PDPTE_FIELDS) {
            vmcs.write(field, *pdpte);
        }
    }
    Ok(())
}

/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
/// Pending debug exceptions BS (single step), SDM Vol. 3C §25.4.2.
const PENDING_DEBUG_BS: u64 = 1 << 14;

/// Completes an emulated instruction: RIP += VM-exit instruction length (wrapping at 32 bits
/// outside 64-bit mode), blocking by STI and MOV SS cleared, and a single-step #DB made pending
/// if RFLAGS.TF is set (SDM Vol. 3C §25.4.2, §27.3.1.5). This is [`ResumeAction::Advance`].
pub fn skip_instruction(vmcs: &mut impl VmcsAccess) {
    use VmcsField as F;
    let length = vmcs.read(F::VM_EXIT_INSTRUCTION_LENGTH);
    let long_mode = EntryControls::from_bits_retain(vmcs.read32(F::VM_ENTRY_CONTROLS))
        .contains(EntryControls::IA32E_MODE_GUEST)
        && Segment {
            ar: Segment::ar_from_vmx(vmcs.read32(F::GUEST_CS_ACCESS_RIGHTS)),
            ..Segment::default()
        }
        .long_mode();
    let mut rip = vmcs.read(F::GUEST_RIP).wrapping_add(length);
    if !long_mode {
        rip &= 0xffff_ffff;
    }
    vmcs.write(F::GUEST_RIP, rip);
    let blocking = Interruptibility::BLOCKING_BY_STI | Interruptibility::BLOCKING_BY_MOV_SS;
    let state = Interruptibility::from_bits_retain(vmcs.read32(F::GUEST_INTERRUPTIBILITY_STATE));
    if state.intersects(blocking) {
        vmcs.write(
            F::GUEST_INTERRUPTIBILITY_STATE,
            (state - blocking).bits().into(),
        );
    }
    if vmcs.read(F::GUEST_RFLAGS) & RFLAGS_TF != 0 {
        let pending = vmcs.read(F::GUEST_PENDING_DEBUG_EXCEPTIONS);
        vmcs.write(
            F::GUEST_PENDING_DEBUG_EXCEPTIONS,
            pending | PENDING_DEBUG_BS,
        );
    }
}

/// A capability selector naming an EPT object in the server's capability space.
pub type CapSelector = u64;

/// What the kernel does with the vCPU after applying a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResumeAction {
    /// Code 0: resume the guest.
    Resume,
    /// Code 1: complete the exiting instruction ([`skip_instruction`], after the state writes)
    /// and resume.
    Advance,
    /// Code 2: bind the EPT named by the capability selector to the vCPU, then resume; the
    /// kernel checks the capability's kind and rights.
    ResumeWithEptBinding(CapSelector),
    /// Code 3: stop the vCPU; it runs again only when restarted.
    Stop,
}

impl ResumeAction {
    const fn code(self) -> (u64, u64) {
        match self {
            ResumeAction::Resume => (0, 0),
            ResumeAction::Advance => (1, 0),
            ResumeAction::ResumeWithEptBinding(selector) => (2, selector),
            ResumeAction::Stop => (3, 0),
        }
    }

    const fn from_code(code: u64, argument: u64) -> Option<ResumeAction> {
        match (code, argument) {
            (0, 0) => Some(ResumeAction::Resume),
            (1, 0) => Some(ResumeAction::Advance),
            (2, selector) => Some(ResumeAction::ResumeWithEptBinding(selector)),
            (3, 0) => Some(ResumeAction::Stop),
            _ => None,
        }
    }
}

/// Why [`Reply::apply_words`] refused a reply (nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyError {
    /// The words are not a valid encoding.
    Decode(DecodeError),
    /// The reply breaks the host-isolation rule.
    Load(LoadError),
}

/// A word array that is not a valid encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    /// Index of the first offending word (unknown mask bits, reserved bits set, unknown
    /// action).
    pub word: usize,
}

struct Writer<'a> {
    words: &'a mut [u64],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, value: u64) {
        self.words[self.at] = value;
        self.at += 1;
    }

    fn pair(&mut self, low: u32, high: u32) {
        self.put(u64::from(low) | (u64::from(high) << 32));
    }
}

struct Reader<'a> {
    words: &'a [u64],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self) -> u64 {
        let value = self.words[self.at];
        self.at += 1;
        value
    }

    fn pair(&mut self) -> (u32, u32) {
        let value = self.take();
        (value as u32, (value >> 32) as u32)
    }

    /// A word whose bits 63:32 are reserved.
    fn low(&mut self) -> Result<u32, DecodeError> {
        let (low, high) = self.pair();
        if high != 0 {
            return Err(DecodeError { word: self.at - 1 });
        }
        Ok(low)
    }
}

impl GuestState {
    /// Encodes the state as [`GUEST_STATE_WORDS`] words (module table).
    pub fn to_words(&self, words: &mut [u64; GUEST_STATE_WORDS]) {
        let mut w = Writer { words, at: 0 };
        for gpr in self.gprs.slots() {
            w.put(*gpr);
        }
        for value in [
            self.rip,
            self.rsp,
            self.rflags,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.dr7,
        ] {
            w.put(value);
        }
        for segment in self.segments() {
            w.put(
                u64::from(segment.selector)
                    | (u64::from(segment.ar) << 16)
                    | (u64::from(segment.limit) << 32),
            );
            w.put(segment.base);
        }
        w.put(self.gdtr.base);
        w.put(self.idtr.base);
        w.pair(self.gdtr.limit, self.idtr.limit);
        w.put(self.efer);
        w.put(self.pat);
        w.put(self.sysenter_cs.into());
        w.put(self.sysenter_esp);
        w.put(self.sysenter_eip);
        for value in [
            self.star,
            self.lstar,
            self.cstar,
            self.sfmask,
            self.kernel_gs_base,
        ] {
            w.put(value);
        }
        w.pair(self.interruptibility.bits(), self.activity);
        w.put(self.pending_debug_exceptions);
        w.pair(self.injection.information, self.injection.error_code);
        w.put(self.injection.instruction_length.into());
        w.put(self.tsc_offset);
        w.put(self.preemption_timer.into());
        let c = &self.controls;
        w.pair(c.pin_based.bits(), c.primary.bits());
        w.pair(c.secondary.bits(), c.exception_bitmap);
        w.pair(c.page_fault_error_code_mask, c.page_fault_error_code_match);
        w.pair(c.entry.bits(), c.tpr_threshold);
        for value in [
            c.cr0_guest_host_mask,
            c.cr4_guest_host_mask,
            c.cr0_read_shadow,
            c.cr4_read_shadow,
        ] {
            w.put(value);
        }
        for pdpte in self.pdptes {
            w.put(pdpte);
        }
        debug_assert_eq!(w.at, GUEST_STATE_WORDS);
    }

    /// Decodes [`GUEST_STATE_WORDS`] words; word indices in errors are relative to the state.
    pub fn from_words(words: &[u64; GUEST_STATE_WORDS]) -> Result<GuestState, DecodeError> {
        let mut r = Reader { words, at: 0 };
        let mut s = GuestState::default();
        for gpr in s.gprs.slots_mut() {
            *gpr = r.take();
        }
        for value in [
            &mut s.rip,
            &mut s.rsp,
            &mut s.rflags,
            &mut s.cr0,
            &mut s.cr2,
            &mut s.cr3,
            &mut s.cr4,
            &mut s.dr7,
        ] {
            *value = r.take();
        }
        for segment in s.segments_mut() {
            let packed = r.take();
            *segment = Segment {
                selector: packed as u16,
                ar: (packed >> 16) as u16,
                limit: (packed >> 32) as u32,
                base: r.take(),
            };
        }
        s.gdtr.base = r.take();
        s.idtr.base = r.take();
        (s.gdtr.limit, s.idtr.limit) = r.pair();
        s.efer = r.take();
        s.pat = r.take();
        s.sysenter_cs = r.low()?;
        s.sysenter_esp = r.take();
        s.sysenter_eip = r.take();
        for value in [
            &mut s.star,
            &mut s.lstar,
            &mut s.cstar,
            &mut s.sfmask,
            &mut s.kernel_gs_base,
        ] {
            *value = r.take();
        }
        let (interruptibility, activity) = r.pair();
        s.interruptibility = Interruptibility::from_bits_retain(interruptibility);
        s.activity = activity;
        s.pending_debug_exceptions = r.take();
        (s.injection.information, s.injection.error_code) = r.pair();
        s.injection.instruction_length = r.low()?;
        s.tsc_offset = r.take();
        s.preemption_timer = r.low()?;
        let c = &mut s.controls;
        let (pin, primary) = r.pair();
        let (secondary, exception_bitmap) = r.pair();
        (c.page_fault_error_code_mask, c.page_fault_error_code_match) = r.pair();
        let (entry, tpr_threshold) = r.pair();
        c.pin_based = PinBasedControls::from_bits_retain(pin);
        c.primary = ProcessorBasedControls::from_bits_retain(primary);
        c.secondary = SecondaryControls::from_bits_retain(secondary);
        c.exception_bitmap = exception_bitmap;
        c.entry = EntryControls::from_bits_retain(entry);
        c.tpr_threshold = tpr_threshold;
        for value in [
            &mut c.cr0_guest_host_mask,
            &mut c.cr4_guest_host_mask,
            &mut c.cr0_read_shadow,
            &mut c.cr4_read_shadow,
        ] {
            *value = r.take();
        }
        for pdpte in &mut s.pdptes {
            *pdpte = r.take();
        }
        debug_assert_eq!(r.at, GUEST_STATE_WORDS);
        Ok(s)
    }
}

/// Words 0-7 of an exit message (module table).
fn encode_header(mask: StateMask, e: &RawExit, words: &mut [u64; EXIT_MESSAGE_WORDS]) {
    let mut w = Writer { words, at: 0 };
    w.put(mask.bits().into());
    w.pair(e.reason, e.instruction_length);
    w.put(e.qualification);
    w.put(e.guest_linear_address);
    w.put(e.guest_physical_address);
    w.pair(e.instruction_information, e.interruption_information);
    w.pair(e.interruption_error_code, e.idt_vectoring_information);
    w.put(e.idt_vectoring_error_code.into());
}

/// The words one state group occupies within the encoded guest state.
pub fn group_words(group: StateMask) -> Option<core::ops::Range<usize>> {
    let (start, len) = match group {
        StateMask::GPRS => (word::GPRS, 15),
        StateMask::RIP_RSP_RFLAGS => (word::RIP_RSP_RFLAGS, 3),
        StateMask::CR => (word::CR, 4),
        StateMask::DR7 => (word::DR7, 1),
        StateMask::SEGMENTS => (word::SEGMENTS, 16),
        StateMask::DESCRIPTOR_TABLES => (word::DESCRIPTOR_TABLES, 3),
        StateMask::EFER_PAT => (word::EFER_PAT, 2),
        StateMask::SYSENTER => (word::SYSENTER, 3),
        StateMask::SYSCALL_MSRS => (word::SYSCALL_MSRS, 5),
        StateMask::INTERRUPTIBILITY_ACTIVITY => (word::INTERRUPTIBILITY_ACTIVITY, 2),
        StateMask::EVENT_INJECTION => (word::EVENT_INJECTION, 2),
        StateMask::TSC => (word::TSC, 1),
        StateMask::PREEMPTION_TIMER => (word::PREEMPTION_TIMER, 1),
        StateMask::CONTROLS => (word::CONTROLS, 8),
        StateMask::PDPTES => (word::PDPTES, 4),
        _ => return None,
    };
    Some(start..start + len)
}

fn mask_from_word(word: u64, at: usize) -> Result<StateMask, DecodeError> {
    StateMask::from_bits(word as u32).ok_or(DecodeError { word: at })
}

fn state_block<const OFFSET: usize, const N: usize>(words: &[u64; N]) -> &[u64; GUEST_STATE_WORDS] {
    words[OFFSET..OFFSET + GUEST_STATE_WORDS]
        .try_into()
        .expect("message sizes are header + GUEST_STATE_WORDS")
}

fn relative(offset: usize) -> impl Fn(DecodeError) -> DecodeError {
    move |e| DecodeError {
        word: e.word + offset,
    }
}

/// The message the kernel sends a VMM server on a VM exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ExitMessage {
    /// The groups carried.
    pub mask: StateMask,
    /// Exit information: the reason always, the other fields with [`StateMask::EXIT_INFO`].
    pub exit: RawExit,
    /// Guest state; meaningful for the groups in `mask`.
    pub state: GuestState,
}

impl ExitMessage {
    /// Builds the message for the current VM exit: reads the exit reason (and with
    /// [`StateMask::EXIT_INFO`] every exit-information field), then [`save`]s the groups.
    pub fn capture(vmcs: &impl VmcsAccess, regs: &SavedRegisters, mask: StateMask) -> ExitMessage {
        let exit = if mask.contains(StateMask::EXIT_INFO) {
            RawExit::read(vmcs)
        } else {
            RawExit {
                reason: vmcs.read32(VmcsField::EXIT_REASON),
                ..RawExit::default()
            }
        };
        let mut state = GuestState::default();
        save(vmcs, regs, mask, &mut state);
        ExitMessage { mask, exit, state }
    }

    /// Encodes the message as [`EXIT_MESSAGE_WORDS`] words (module table).
    pub fn to_words(&self) -> [u64; EXIT_MESSAGE_WORDS] {
        let mut words = [0; EXIT_MESSAGE_WORDS];
        encode_header(self.mask, &self.exit, &mut words);
        let state: &mut [u64; GUEST_STATE_WORDS] =
            (&mut words[8..]).try_into().expect("78 = 8 + 70");
        self.state.to_words(state);
        words
    }

    /// Captures the current exit straight into its word encoding, without building an
    /// [`ExitMessage`]: the words of `capture(vmcs, regs, mask).to_words()` for the header and
    /// the groups in `mask`. Words of the groups in `stale` but not in `mask` (what the buffer
    /// held from an earlier message) are zeroed; other words are left as they are. The
    /// kernel's exit path uses this: for the common small masks (exit information, GPRs, RIP
    /// RSP RFLAGS) it reads and writes only those words.
    pub fn capture_words(
        vmcs: &impl VmcsAccess,
        regs: &SavedRegisters,
        mask: StateMask,
        stale: StateMask,
        out: &mut [u64; EXIT_MESSAGE_WORDS],
    ) {
        let exit = if mask.contains(StateMask::EXIT_INFO) {
            RawExit::read(vmcs)
        } else {
            RawExit {
                reason: vmcs.read32(VmcsField::EXIT_REASON),
                ..RawExit::default()
            }
        };
        encode_header(mask, &exit, out);
        for group in (stale - mask).iter() {
            if let Some(range) = group_words(group) {
                out[8 + range.start..8 + range.end].fill(0);
            }
        }
        if mask.contains(StateMask::GPRS) {
            for (slot, value) in out[8 + word::GPRS..].iter_mut().zip(regs.gprs.slots()) {
                *slot = *value;
            }
        }
        if mask.contains(StateMask::RIP_RSP_RFLAGS) {
            let at = 8 + word::RIP_RSP_RFLAGS;
            out[at] = vmcs.read(VmcsField::GUEST_RIP);
            out[at + 1] = vmcs.read(VmcsField::GUEST_RSP);
            out[at + 2] = vmcs.read(VmcsField::GUEST_RFLAGS);
        }
        let rest = mask - (StateMask::EXIT_INFO | StateMask::GPRS | StateMask::RIP_RSP_RFLAGS);
        if !rest.is_empty() {
            let state: &mut [u64; GUEST_STATE_WORDS] =
                (&mut out[8..]).try_into().expect("78 = 8 + 70");
            save_words(vmcs, regs, rest, state);
        }
    }

    /// Decodes [`EXIT_MESSAGE_WORDS`] words.
    pub fn from_words(words: &[u64; EXIT_MESSAGE_WORDS]) -> Result<ExitMessage, DecodeError> {
        let mut r = Reader { words, at: 0 };
        let mask = mask_from_word(r.low()?.into(), 0)?;
        let (reason, instruction_length) = r.pair();
        let qualification = r.take();
        let guest_linear_address = r.take();
        let guest_physical_address = r.take();
        let (instruction_information, interruption_information) = r.pair();
        let (interruption_error_code, idt_vectoring_information) = r.pair();
        let idt_vectoring_error_code = r.low()?;
        let exit = RawExit {
            reason,
            instruction_length,
            qualification,
            guest_linear_address,
            guest_physical_address,
            instruction_information,
            interruption_information,
            interruption_error_code,
            idt_vectoring_information,
            idt_vectoring_error_code,
        };
        let state = GuestState::from_words(state_block::<8, EXIT_MESSAGE_WORDS>(words))
            .map_err(relative(8))?;
        Ok(ExitMessage { mask, exit, state })
    }
}

/// A VMM server's answer to an [`ExitMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reply {
    /// The groups to write back (never [`StateMask::EXIT_INFO`]).
    pub mask: StateMask,
    /// What to do after writing.
    pub action: ResumeAction,
    /// The state to write; meaningful for the groups in `mask`.
    pub state: GuestState,
}

impl Reply {
    /// A reply that writes nothing and takes `action`.
    pub fn new(action: ResumeAction) -> Reply {
        Reply {
            mask: StateMask::empty(),
            action,
            state: GuestState::default(),
        }
    }

    /// A reply writing the `mask` groups of `state`, then taking `action`.
    pub fn with_state(action: ResumeAction, mask: StateMask, state: GuestState) -> Reply {
        Reply {
            mask,
            action,
            state,
        }
    }

    /// Adds an event to inject at the next VM entry (group [`StateMask::EVENT_INJECTION`]);
    /// `instruction_length` matters for software interrupts and exceptions.
    pub fn inject(mut self, event: EventInfo, instruction_length: u32) -> Reply {
        let (information, error_code) = event.encode();
        self.state.injection = EventInjection {
            information,
            error_code,
            instruction_length,
        };
        self.mask |= StateMask::EVENT_INJECTION;
        self
    }

    /// Applies the reply in the kernel: [`load`] (refusing it whole if it breaks the
    /// host-isolation rule), then [`skip_instruction`] for [`ResumeAction::Advance`]. Returns
    /// the action for the kernel to carry out (EPT binding, stop).
    pub fn apply(
        &self,
        vmcs: &mut impl VmcsAccess,
        regs: &mut SavedRegisters,
    ) -> Result<ResumeAction, LoadError> {
        load(vmcs, regs, self.mask, &self.state)?;
        if self.action == ResumeAction::Advance {
            skip_instruction(vmcs);
        }
        Ok(self.action)
    }

    /// Decodes and applies a reply in one step, as `from_words` then `apply` do, reading
    /// only the words of the groups in its mask (the others are ignored, as the encoding
    /// says). For replies that write only GPRs and RIP RSP RFLAGS (which carry no
    /// host-isolation constraint) with action resume or advance, nothing else is built.
    pub fn apply_words(
        words: &[u64; REPLY_WORDS],
        vmcs: &mut impl VmcsAccess,
        regs: &mut SavedRegisters,
    ) -> Result<ResumeAction, ApplyError> {
        if words[0] >> 40 != 0 {
            return Err(ApplyError::Decode(DecodeError { word: 0 }));
        }
        let mask = mask_from_word(words[0], 0).map_err(ApplyError::Decode)?;
        let action = ResumeAction::from_code((words[0] >> 32) & 0xff, words[1])
            .ok_or(ApplyError::Decode(DecodeError { word: 0 }))?;
        if mask.is_empty() && action == ResumeAction::Stop {
            // A stop writes nothing: only what decoding would refuse is checked.
            for at in [
                word::SYSENTER,
                word::EVENT_INJECTION + 1,
                word::PREEMPTION_TIMER,
            ] {
                if words[2 + at] >> 32 != 0 {
                    return Err(ApplyError::Decode(DecodeError { word: 2 + at }));
                }
            }
            return Ok(action);
        }
        let fast = StateMask::GPRS | StateMask::RIP_RSP_RFLAGS;
        if !fast.contains(mask) || !matches!(action, ResumeAction::Resume | ResumeAction::Advance) {
            let reply = Reply::from_words(words).map_err(ApplyError::Decode)?;
            return reply.apply(vmcs, regs).map_err(ApplyError::Load);
        }
        if mask.contains(StateMask::GPRS) {
            for (slot, value) in regs
                .gprs
                .slots_mut()
                .into_iter()
                .zip(&words[2 + word::GPRS..])
            {
                *slot = *value;
            }
        }
        if mask.contains(StateMask::RIP_RSP_RFLAGS) {
            let at = 2 + word::RIP_RSP_RFLAGS;
            vmcs.write(VmcsField::GUEST_RIP, words[at]);
            vmcs.write(VmcsField::GUEST_RSP, words[at + 1]);
            vmcs.write(VmcsField::GUEST_RFLAGS, words[at + 2]);
        }
        if action == ResumeAction::Advance {
            skip_instruction(vmcs);
        }
        Ok(action)
    }

    /// Encodes the reply as [`REPLY_WORDS`] words (module table).
    pub fn to_words(&self) -> [u64; REPLY_WORDS] {
        let mut words = [0; REPLY_WORDS];
        [words[0], words[1]] = self.header_words();
        let state: &mut [u64; GUEST_STATE_WORDS] =
            (&mut words[2..]).try_into().expect("72 = 2 + 70");
        self.state.to_words(state);
        words
    }

    /// The first two words of [`Reply::to_words`]: the mask and the action.
    pub fn header_words(&self) -> [u64; 2] {
        Self::header(self.mask, self.action)
    }

    /// The header words of a reply with `mask` and `action`.
    pub const fn header(mask: StateMask, action: ResumeAction) -> [u64; 2] {
        let (code, argument) = action.code();
        [mask.bits() as u64 | (code << 32), argument]
    }

    /// Decodes [`REPLY_WORDS`] words.
    pub fn from_words(words: &[u64; REPLY_WORDS]) -> Result<Reply, DecodeError> {
        if words[0] >> 40 != 0 {
            return Err(DecodeError { word: 0 });
        }
        let mask = mask_from_word(words[0], 0)?;
        let action = ResumeAction::from_code((words[0] >> 32) & 0xff, words[1])
            .ok_or(DecodeError { word: 0 })?;
        let state =
            GuestState::from_words(state_block::<2, REPLY_WORDS>(words)).map_err(relative(2))?;
        Ok(Reply {
            mask,
            action,
            state,
        })
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;
    use crate::vmcs::VmcsImage;
    use proptest::prelude::*;

    fn vmcs_with(seed: u64) -> VmcsImage {
        let mut v = VmcsImage::default();
        for (i, f) in crate::vmcs::ALL_FIELDS.iter().enumerate() {
            v.write(
                *f,
                seed.rotate_left(i as u32 % 64) ^ (i as u64 * 0x9e37_79b9),
            );
        }
        v
    }

    fn regs_with(seed: u64) -> SavedRegisters {
        let mut r = SavedRegisters::default();
        for (i, g) in r.gprs.slots_mut().into_iter().enumerate() {
            *g = seed.wrapping_mul(i as u64 + 3);
        }
        r
    }

    proptest! {
        #[test]
        fn capture_words_matches_capture_then_to_words(seed: u64, bits in 0u32..0x8000, stale_bits in 0u32..0x8000) {
            let mask = StateMask::from_bits_truncate(bits);
            let stale = StateMask::from_bits_truncate(stale_bits);
            let vmcs = vmcs_with(seed);
            let regs = regs_with(seed);
            let expected = ExitMessage::capture(&vmcs, &regs, mask).to_words();
            // A buffer holding an older message of the `stale` groups, zero elsewhere.
            let mut out = [0u64; EXIT_MESSAGE_WORDS];
            let mut older = ExitMessage::capture(&vmcs_with(!seed), &regs_with(!seed), stale).to_words();
            older[..8].fill(0xdead);
            out.copy_from_slice(&older);
            ExitMessage::capture_words(&vmcs, &regs, mask, stale, &mut out);
            prop_assert_eq!(out.to_vec(), expected.to_vec());
        }

        #[test]
        fn apply_words_matches_from_words_then_apply(seed: u64, bits in 0u32..0x8000, action in 0u64..4, words in proptest::collection::vec(any::<u64>(), REPLY_WORDS)) {
            let mut w: [u64; REPLY_WORDS] = words.try_into().unwrap();
            let mask = StateMask::from_bits_truncate(bits) - StateMask::EXIT_INFO;
            w[0] = u64::from(mask.bits()) | (action << 32);
            w[1] = if action == 2 { seed } else { 0 };
            let (mut v1, mut r1) = (vmcs_with(seed), regs_with(seed));
            let (mut v2, mut r2) = (vmcs_with(seed), regs_with(seed));
            let general = Reply::from_words(&w).map(|r| r.apply(&mut v1, &mut r1));
            let fast = Reply::apply_words(&w, &mut v2, &mut r2);
            // Where the general decoder accepts the words, both agree on the outcome and state.
            if let Ok(general) = general {
                prop_assert_eq!(fast.map_err(|_| ()), general.map_err(|_| ()));
                prop_assert_eq!(r1, r2);
                for f in crate::vmcs::ALL_FIELDS {
                    prop_assert_eq!(v1.read(*f), v2.read(*f));
                }
            }
        }

        #[test]
        fn same_group_tells_exactly_the_group_whose_words_differ(seed: u64, at in 0usize..GUEST_STATE_WORDS) {
            let vmcs = vmcs_with(seed);
            let state = ExitMessage::capture(&vmcs, &regs_with(seed), StateMask::all()).state;
            let mut words = [0; GUEST_STATE_WORDS];
            state.to_words(&mut words);
            words[at] ^= 1;
            let other = GuestState::from_words(&words).unwrap();
            for group in (StateMask::all() - StateMask::EXIT_INFO).iter() {
                let holds = group_words(group).unwrap().contains(&at);
                prop_assert_eq!(state.same_group(&other, group), !holds, "{:?}", group);
                prop_assert!(state.same_group(&state, group));
            }
        }

        #[test]
        fn a_stop_that_writes_nothing_is_accepted_and_refused_as_decoding_would(seed: u64, high in 0u64..8, words in proptest::collection::vec(any::<u64>(), REPLY_WORDS)) {
            let mut w: [u64; REPLY_WORDS] = words.try_into().unwrap();
            w[0] = 3 << 32;
            w[1] = 0;
            // Mostly clean reserved halves (else nearly every case is refused).
            for (bit, at) in [word::SYSENTER, word::EVENT_INJECTION + 1, word::PREEMPTION_TIMER].into_iter().enumerate() {
                if high & (1 << bit) == 0 {
                    w[2 + at] &= 0xffff_ffff;
                }
            }
            let (mut v1, mut r1) = (vmcs_with(seed), regs_with(seed));
            let (mut v2, mut r2) = (vmcs_with(seed), regs_with(seed));
            let general = Reply::from_words(&w).map(|r| r.apply(&mut v1, &mut r1));
            let fast = Reply::apply_words(&w, &mut v2, &mut r2);
            prop_assert_eq!(general.is_ok(), fast.is_ok());
            if let (Ok(general), Ok(fast)) = (general, fast) {
                prop_assert_eq!(general.map_err(|_| ()), Ok(fast));
            }
            prop_assert_eq!(r1, r2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmcs::{FieldType, VmcsImage};
    use proptest::prelude::*;

    /// A VMCS as the kernel would set it up: kernel-owned controls in place.
    fn kernel_vmcs() -> VmcsImage {
        use VmcsField as F;
        let mut vmcs = VmcsImage::new();
        let pin = PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING;
        let primary = ProcessorBasedControls::USE_IO_BITMAPS
            | ProcessorBasedControls::USE_MSR_BITMAPS
            | ProcessorBasedControls::ACTIVATE_SECONDARY_CONTROLS
            | ProcessorBasedControls::HLT_EXITING;
        let secondary = SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID;
        vmcs.write(F::PIN_BASED_VM_EXECUTION_CONTROLS, pin.bits().into());
        vmcs.write(
            F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            primary.bits().into(),
        );
        vmcs.write(
            F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
            secondary.bits().into(),
        );
        vmcs.write(
            F::VM_ENTRY_CONTROLS,
            EntryControls::LOAD_IA32_EFER.bits().into(),
        );
        vmcs.write(
            F::EXCEPTION_BITMAP,
            (1 << vector::DB) | (1 << vector::AC) | (1 << vector::MC),
        );
        vmcs.write(F::EPT_POINTER, 0x1234_501e);
        vmcs.write(F::VIRTUAL_PROCESSOR_ID, 7);
        vmcs.write(F::HOST_RIP, 0xffff_8000_0010_0000);
        vmcs.write(F::VMCS_LINK_POINTER, u64::MAX);
        vmcs
    }

    fn sample_state() -> GuestState {
        let mut s = GuestState::default();
        for (n, gpr) in Gpr::ALL.into_iter().enumerate() {
            s.set_gpr(gpr, 0x100 + n as u64);
        }
        s.rip = 0xfff0;
        s.rflags = 0x2;
        s.cr0 = 0x6000_0010;
        s.cr2 = 0xdead;
        s.cr3 = 0x1000;
        s.cr4 = 0x2000;
        s.dr7 = 0x400;
        for (n, segment) in s.segments_mut().into_iter().enumerate() {
            *segment = Segment {
                selector: 8 * n as u16,
                ar: 0x93 | if n == 6 { Segment::UNUSABLE } else { 0 },
                limit: 0xffff,
                base: 0x1_0000 * n as u64,
            };
        }
        s.gdtr = DescriptorTable {
            base: 0x5000,
            limit: 0x27,
        };
        s.idtr = DescriptorTable {
            base: 0x6000,
            limit: 0xfff,
        };
        s.efer = 0x500;
        s.pat = 0x0007_0406_0007_0406;
        s.sysenter_cs = 0x10;
        s.sysenter_esp = 0x7000;
        s.sysenter_eip = 0x8000;
        s.star = 0x0023_0010_0000_0000;
        s.lstar = 0xffff_ffff_8100_0000;
        s.cstar = 0xffff_ffff_8100_1000;
        s.sfmask = 0x4_7700;
        s.kernel_gs_base = 0xffff_8880_0000_0000;
        s.interruptibility = Interruptibility::BLOCKING_BY_STI;
        s.activity = 1;
        s.pending_debug_exceptions = 0x4000;
        s.injection = EventInjection {
            information: 0x8000_0b0e,
            error_code: 2,
            instruction_length: 0,
        };
        s.tsc_offset = (-5000i64) as u64;
        s.preemption_timer = 12345;
        s.pdptes = [0x1001, 0x2001, 0x3001, 0x4001];
        s
    }

    /// The sample state with the control fields of `vmcs` (so kernel-owned bits are echoed)
    /// plus server-owned changes.
    fn sample_with_controls(vmcs: &VmcsImage) -> GuestState {
        let mut s = sample_state();
        save(
            vmcs,
            &SavedRegisters::default(),
            StateMask::CONTROLS,
            &mut s,
        );
        s.controls.primary |=
            ProcessorBasedControls::RDTSC_EXITING | ProcessorBasedControls::MONITOR_TRAP_FLAG;
        s.controls.primary -= ProcessorBasedControls::HLT_EXITING;
        s.controls.secondary |= SecondaryControls::UNRESTRICTED_GUEST;
        s.controls.entry |= EntryControls::IA32E_MODE_GUEST;
        s.controls.exception_bitmap |= 1 << vector::PF;
        s.controls.cr0_guest_host_mask = 0x8000_0001;
        s.controls.cr0_read_shadow = 0x10;
        s.controls.tpr_threshold = 3;
        s
    }

    const WRITABLE: StateMask = StateMask::all().difference(StateMask::EXIT_INFO);

    #[test]
    fn load_then_save_round_trips_every_writable_group() {
        let mut vmcs = kernel_vmcs();
        let mut regs = SavedRegisters::default();
        let state = sample_with_controls(&vmcs);
        load(&mut vmcs, &mut regs, WRITABLE, &state).unwrap();
        let mut back = GuestState::default();
        save(&vmcs, &regs, WRITABLE, &mut back);
        assert_eq!(back, state);
        assert_eq!(vmcs.read(VmcsField::GUEST_LDTR_ACCESS_RIGHTS), 0x1_0093);
        assert_eq!(regs.cr2, 0xdead);
        assert_eq!(regs.gprs.r15, 0x10f);
    }

    #[test]
    fn save_copies_only_the_masked_groups() {
        let mut vmcs = kernel_vmcs();
        let mut regs = SavedRegisters::default();
        let state = sample_with_controls(&vmcs);
        load(&mut vmcs, &mut regs, WRITABLE, &state).unwrap();
        let mut out = GuestState::default();
        save(
            &vmcs,
            &regs,
            StateMask::RIP_RSP_RFLAGS | StateMask::CR,
            &mut out,
        );
        assert_eq!((out.rip, out.cr2, out.cr3), (0xfff0, 0xdead, 0x1000));
        assert_eq!(out.gprs, Gprs::default());
        assert_eq!(out.cs, Segment::default());
        assert_eq!(out.controls, ControlState::default());
    }

    #[test]
    fn reply_naming_exit_info_is_refused_as_read_only() {
        let mut vmcs = kernel_vmcs();
        let before = vmcs.clone();
        let result = load(
            &mut vmcs,
            &mut SavedRegisters::default(),
            StateMask::EXIT_INFO | StateMask::GPRS,
            &sample_state(),
        );
        assert_eq!(result, Err(LoadError::ReadOnly(StateMask::EXIT_INFO)));
        assert_eq!(vmcs, before);
        let unknown = StateMask::from_bits_retain(1 << 20);
        assert_eq!(
            validate(&vmcs, unknown, &sample_state()),
            Err(LoadError::UnknownGroups(1 << 20))
        );
    }

    #[test]
    fn kernel_owned_control_bits_cannot_change_and_nothing_is_written() {
        let vmcs = kernel_vmcs();
        let allowed = sample_with_controls(&vmcs);
        type Tweak = fn(&mut ControlState);
        let cases: [(Tweak, VmcsField, u64); 8] = [
            (
                |c| c.primary -= ProcessorBasedControls::USE_IO_BITMAPS,
                VmcsField::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                1 << 25,
            ),
            (
                |c| c.primary |= ProcessorBasedControls::UNCONDITIONAL_IO_EXITING,
                VmcsField::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                1 << 24,
            ),
            (
                |c| c.primary |= ProcessorBasedControls::CR8_LOAD_EXITING,
                VmcsField::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                1 << 19,
            ),
            (
                |c| c.secondary -= SecondaryControls::ENABLE_EPT,
                VmcsField::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                1 << 1,
            ),
            (
                |c| c.secondary |= SecondaryControls::VMCS_SHADOWING,
                VmcsField::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                1 << 14,
            ),
            (
                |c| c.pin_based -= PinBasedControls::EXTERNAL_INTERRUPT_EXITING,
                VmcsField::PIN_BASED_VM_EXECUTION_CONTROLS,
                1,
            ),
            (
                |c| c.entry |= EntryControls::ENTRY_TO_SMM,
                VmcsField::VM_ENTRY_CONTROLS,
                1 << 10,
            ),
            (
                |c| c.exception_bitmap &= !(1 << vector::MC),
                VmcsField::EXCEPTION_BITMAP,
                1 << 18,
            ),
        ];
        for (tweak, field, bits) in cases {
            let mut state = allowed;
            tweak(&mut state.controls);
            let mut target = vmcs.clone();
            let result = load(
                &mut target,
                &mut SavedRegisters::default(),
                WRITABLE,
                &state,
            );
            assert_eq!(result, Err(LoadError::KernelOwnedControl { field, bits }));
            assert_eq!(target, vmcs, "a refused reply wrote something");
        }
    }

    #[test]
    fn server_owned_control_bits_may_change() {
        let mut vmcs = kernel_vmcs();
        let state = sample_with_controls(&vmcs);
        load(
            &mut vmcs,
            &mut SavedRegisters::default(),
            StateMask::CONTROLS,
            &state,
        )
        .unwrap();
        let primary = vmcs.read32(VmcsField::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS);
        let primary = ProcessorBasedControls::from_bits_retain(primary);
        assert!(primary.contains(
            ProcessorBasedControls::RDTSC_EXITING | ProcessorBasedControls::USE_IO_BITMAPS
        ));
        assert!(!primary.contains(ProcessorBasedControls::HLT_EXITING));
    }

    #[test]
    fn syscall_msrs_that_wrmsr_would_refuse_are_refused() {
        let vmcs = kernel_vmcs();
        let mut state = sample_state();
        state.lstar = 0x0000_8000_0000_0000;
        assert_eq!(
            validate(&vmcs, StateMask::SYSCALL_MSRS, &state),
            Err(LoadError::InvalidMsrValue {
                msr: msr::IA32_LSTAR,
                value: 0x0000_8000_0000_0000
            })
        );
        let mut state = sample_state();
        state.sfmask = 1 << 32;
        assert!(matches!(
            validate(&vmcs, StateMask::SYSCALL_MSRS, &state),
            Err(LoadError::InvalidMsrValue {
                msr: msr::IA32_FMASK,
                ..
            })
        ));
        // Outside the mask the values do not matter.
        assert_eq!(validate(&vmcs, StateMask::GPRS, &state), Ok(()));
    }

    /// Records every field written, over a VMCS image.
    struct Recording {
        vmcs: VmcsImage,
        written: Vec<VmcsField>,
    }

    impl VmcsAccess for Recording {
        fn read(&self, field: VmcsField) -> u64 {
            self.vmcs.read(field)
        }
        fn write(&mut self, field: VmcsField, value: u64) {
            self.written.push(field);
            self.vmcs.write(field, value);
        }
    }

    fn any_words<const N: usize>() -> impl Strategy<Value = [u64; N]> {
        proptest::collection::vec(any::<u64>(), N).prop_map(|v| v.try_into().unwrap())
    }

    /// Clears the reserved halves of the guest-state words so they decode.
    fn canonical_state_words(mut words: [u64; GUEST_STATE_WORDS]) -> [u64; GUEST_STATE_WORDS] {
        for at in [
            word::SYSENTER,
            word::EVENT_INJECTION + 1,
            word::PREEMPTION_TIMER,
        ] {
            words[at] &= 0xffff_ffff;
        }
        words
    }

    proptest! {
        #[test]
        fn load_never_writes_host_state_or_kernel_owned_fields(
            words in any_words::<GUEST_STATE_WORDS>(),
            mask in any::<u16>(),
            exit_info in proptest::bool::weighted(0.1),
        ) {
            let mut state = GuestState::from_words(&canonical_state_words(words)).unwrap();
            // Values WRMSR accepts, so that only EXIT_INFO can make the reply fail.
            let canonical = |v: u64| (((v << 16) as i64) >> 16) as u64;
            state.lstar = canonical(state.lstar);
            state.cstar = canonical(state.cstar);
            state.kernel_gs_base = canonical(state.kernel_gs_base);
            state.sfmask &= 0xffff_ffff;
            let kernel = kernel_vmcs();
            // Echo the kernel-owned control bits so the reply can pass.
            let mut current = GuestState::default();
            save(&kernel, &SavedRegisters::default(), StateMask::CONTROLS, &mut current);
            let c = &mut state.controls;
            c.pin_based = (c.pin_based & SERVER_PIN_BASED) | (current.controls.pin_based - SERVER_PIN_BASED);
            c.primary = (c.primary & SERVER_PRIMARY) | (current.controls.primary - SERVER_PRIMARY);
            c.secondary = (c.secondary & SERVER_SECONDARY) | (current.controls.secondary - SERVER_SECONDARY);
            c.entry = (c.entry & SERVER_ENTRY) | (current.controls.entry - SERVER_ENTRY);
            c.exception_bitmap = (c.exception_bitmap & SERVER_EXCEPTION_BITMAP)
                | (current.controls.exception_bitmap & !SERVER_EXCEPTION_BITMAP);
            let mut mask = StateMask::from_bits_truncate(mask.into());
            mask.set(StateMask::EXIT_INFO, exit_info);
            let mut vmcs = Recording { vmcs: kernel.clone(), written: Vec::new() };
            let result = load(&mut vmcs, &mut SavedRegisters::default(), mask, &state);
            prop_assert_eq!(result.is_err(), exit_info);
            if result.is_err() {
                prop_assert!(vmcs.written.is_empty());
                prop_assert_eq!(&vmcs.vmcs, &kernel);
            }
            let server_controls = [
                VmcsField::PIN_BASED_VM_EXECUTION_CONTROLS,
                VmcsField::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                VmcsField::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                VmcsField::EXCEPTION_BITMAP,
                VmcsField::PAGE_FAULT_ERROR_CODE_MASK,
                VmcsField::PAGE_FAULT_ERROR_CODE_MATCH,
                VmcsField::VM_ENTRY_CONTROLS,
                VmcsField::TPR_THRESHOLD,
                VmcsField::CR0_GUEST_HOST_MASK,
                VmcsField::CR4_GUEST_HOST_MASK,
                VmcsField::CR0_READ_SHADOW,
                VmcsField::CR4_READ_SHADOW,
                VmcsField::VM_ENTRY_INTERRUPTION_INFORMATION,
                VmcsField::VM_ENTRY_EXCEPTION_ERROR_CODE,
                VmcsField::VM_ENTRY_INSTRUCTION_LENGTH,
                VmcsField::TSC_OFFSET,
            ];
            for field in &vmcs.written {
                let guest = field.field_type() == FieldType::GuestState && *field != VmcsField::VMCS_LINK_POINTER;
                prop_assert!(guest || server_controls.contains(field), "wrote {:?}", field);
            }
            // Kernel-owned bits are where the kernel put them.
            for (field, owned) in [
                (VmcsField::PIN_BASED_VM_EXECUTION_CONTROLS, SERVER_PIN_BASED.bits()),
                (VmcsField::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS, SERVER_PRIMARY.bits()),
                (VmcsField::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS, SERVER_SECONDARY.bits()),
                (VmcsField::VM_ENTRY_CONTROLS, SERVER_ENTRY.bits()),
                (VmcsField::EXCEPTION_BITMAP, SERVER_EXCEPTION_BITMAP),
            ] {
                prop_assert_eq!(vmcs.read32(field) & !owned, kernel.read32(field) & !owned);
            }
            for field in [VmcsField::EPT_POINTER, VmcsField::VIRTUAL_PROCESSOR_ID, VmcsField::HOST_RIP, VmcsField::VMCS_LINK_POINTER] {
                prop_assert_eq!(vmcs.read(field), kernel.read(field));
            }
        }

        #[test]
        fn exit_message_words_round_trip(words in any_words::<EXIT_MESSAGE_WORDS>(), mask in any::<u32>()) {
            let mut words = words;
            words[0] = u64::from(mask & StateMask::all().bits());
            words[7] &= 0xffff_ffff;
            let state: [u64; GUEST_STATE_WORDS] = words[8..].try_into().unwrap();
            words[8..].copy_from_slice(&canonical_state_words(state));
            let message = ExitMessage::from_words(&words).unwrap();
            prop_assert_eq!(message.to_words(), words);
            prop_assert_eq!(ExitMessage::from_words(&message.to_words()), Ok(message));
        }

        #[test]
        fn from_words_never_panics_and_accepts_only_what_it_reencodes(
            exit in any_words::<EXIT_MESSAGE_WORDS>(),
            reply in any_words::<REPLY_WORDS>(),
        ) {
            if let Ok(m) = ExitMessage::from_words(&exit) {
                prop_assert_eq!(m.to_words(), exit);
            }
            if let Ok(r) = Reply::from_words(&reply) {
                prop_assert_eq!(r.to_words(), reply);
            }
        }

        #[test]
        fn reply_words_round_trip(words in any_words::<GUEST_STATE_WORDS>(), mask in any::<u32>(), code in 0u64..4, selector in any::<u64>()) {
            let action = match code {
                0 => ResumeAction::Resume,
                1 => ResumeAction::Advance,
                2 => ResumeAction::ResumeWithEptBinding(selector),
                _ => ResumeAction::Stop,
            };
            let state = GuestState::from_words(&canonical_state_words(words)).unwrap();
            let reply = Reply::with_state(action, StateMask::from_bits_truncate(mask), state);
            prop_assert_eq!(Reply::from_words(&reply.to_words()), Ok(reply));
        }
    }

    #[test]
    fn word_offsets_match_the_documented_layout() {
        let s = sample_state();
        let mut words = [0; GUEST_STATE_WORDS];
        s.to_words(&mut words);
        assert_eq!(words[word::GPRS], s.gprs.rax);
        assert_eq!(words[word::GPRS + 4], s.gprs.rbp);
        assert_eq!(words[word::GPRS + 14], s.gprs.r15);
        assert_eq!(
            words[word::RIP_RSP_RFLAGS..word::RIP_RSP_RFLAGS + 3],
            [s.rip, s.rsp, s.rflags]
        );
        assert_eq!(words[word::CR..word::CR + 4], [s.cr0, s.cr2, s.cr3, s.cr4]);
        assert_eq!(words[word::DR7], s.dr7);
        // CS is the second segment: selector 8, AR 0x93, limit 0xffff, base 0x10000.
        assert_eq!(words[word::SEGMENTS + 2], 0x0000_ffff_0093_0008);
        assert_eq!(words[word::SEGMENTS + 3], 0x1_0000);
        // LDTR (seventh) carries the unusable bit in AR bit 8.
        assert_eq!(words[word::SEGMENTS + 12] >> 16 & 0xffff, 0x193);
        assert_eq!(
            words[word::DESCRIPTOR_TABLES..word::DESCRIPTOR_TABLES + 3],
            [0x5000, 0x6000, 0x0fff_0000_0027]
        );
        assert_eq!(words[word::EFER_PAT..word::EFER_PAT + 2], [s.efer, s.pat]);
        assert_eq!(
            words[word::SYSENTER..word::SYSENTER + 3],
            [0x10, 0x7000, 0x8000]
        );
        assert_eq!(words[word::SYSCALL_MSRS + 1], s.lstar);
        assert_eq!(words[word::SYSCALL_MSRS + 4], s.kernel_gs_base);
        assert_eq!(words[word::INTERRUPTIBILITY_ACTIVITY], 0x1_0000_0001);
        assert_eq!(words[word::INTERRUPTIBILITY_ACTIVITY + 1], 0x4000);
        assert_eq!(words[word::EVENT_INJECTION], 0x2_8000_0b0e);
        assert_eq!(words[word::TSC], s.tsc_offset);
        assert_eq!(words[word::PREEMPTION_TIMER], 12345);
        assert_eq!(words[word::PDPTES..], [0x1001, 0x2001, 0x3001, 0x4001]);
        assert_eq!(EXIT_MESSAGE_WORDS, 78);
        assert_eq!(REPLY_WORDS, 72);
    }

    #[test]
    fn control_words_pack_pin_primary_secondary_and_bitmap() {
        let mut s = GuestState::default();
        s.controls.pin_based = PinBasedControls::NMI_EXITING;
        s.controls.primary = ProcessorBasedControls::HLT_EXITING;
        s.controls.secondary = SecondaryControls::ENABLE_EPT;
        s.controls.exception_bitmap = 1 << 14;
        s.controls.cr4_read_shadow = 0x20;
        let mut words = [0; GUEST_STATE_WORDS];
        s.to_words(&mut words);
        assert_eq!(words[word::CONTROLS], (0x80 << 32) | 0x8);
        assert_eq!(words[word::CONTROLS + 1], (0x4000 << 32) | 0x2);
        assert_eq!(words[word::CONTROLS + 7], 0x20);
    }

    #[test]
    fn exit_message_capture_reads_reason_always_and_exit_info_on_request() {
        let mut vmcs = kernel_vmcs();
        let raw = RawExit {
            reason: 30,
            qualification: 0x03f8_0000,
            instruction_length: 1,
            ..RawExit::default()
        };
        raw.store(&mut vmcs);
        vmcs.write(VmcsField::GUEST_RIP, 0x7c00);
        let regs = SavedRegisters {
            gprs: Gprs {
                rax: 0x41,
                ..Gprs::default()
            },
            ..SavedRegisters::default()
        };
        let m = ExitMessage::capture(
            &vmcs,
            &regs,
            StateMask::EXIT_INFO | StateMask::GPRS | StateMask::RIP_RSP_RFLAGS,
        );
        assert_eq!(m.exit, raw);
        assert_eq!((m.state.gprs.rax, m.state.rip), (0x41, 0x7c00));
        let words = m.to_words();
        assert_eq!(words[1], (1 << 32) | 30);
        assert_eq!(words[2], 0x03f8_0000);
        assert_eq!(ExitMessage::from_words(&words), Ok(m));
        let m = ExitMessage::capture(&vmcs, &regs, StateMask::empty());
        assert_eq!(
            m.exit,
            RawExit {
                reason: 30,
                ..RawExit::default()
            }
        );
        assert_eq!(m.state, GuestState::default());
    }

    #[test]
    fn from_words_rejects_unknown_groups_reserved_bits_and_actions() {
        let mut words = ExitMessage::default().to_words();
        words[0] = 1 << 31;
        assert_eq!(
            ExitMessage::from_words(&words),
            Err(DecodeError { word: 0 })
        );
        let mut words = ExitMessage::default().to_words();
        words[7] = 1 << 32;
        assert_eq!(
            ExitMessage::from_words(&words),
            Err(DecodeError { word: 7 })
        );
        let mut words = ExitMessage::default().to_words();
        words[8 + word::PREEMPTION_TIMER] = 1 << 40;
        assert_eq!(
            ExitMessage::from_words(&words),
            Err(DecodeError {
                word: 8 + word::PREEMPTION_TIMER
            })
        );

        let mut words = Reply::new(ResumeAction::Resume).to_words();
        words[0] = 7 << 32;
        assert_eq!(Reply::from_words(&words), Err(DecodeError { word: 0 }));
        words[0] = 1 << 45;
        assert_eq!(Reply::from_words(&words), Err(DecodeError { word: 0 }));
        let mut words = Reply::new(ResumeAction::Stop).to_words();
        words[1] = 5;
        assert_eq!(Reply::from_words(&words), Err(DecodeError { word: 0 }));
        let reply = Reply::new(ResumeAction::ResumeWithEptBinding(0x42));
        assert_eq!(reply.to_words()[..2], [2 << 32, 0x42]);
        assert_eq!(Reply::from_words(&reply.to_words()), Ok(reply));
    }

    #[test]
    fn advance_skips_the_instruction_and_clears_sti_blocking() {
        use VmcsField as F;
        let mut vmcs = kernel_vmcs();
        vmcs.write(F::VM_EXIT_INSTRUCTION_LENGTH, 2);
        vmcs.write(F::GUEST_RIP, 0xffff_ffff);
        vmcs.write(
            F::GUEST_INTERRUPTIBILITY_STATE,
            (Interruptibility::BLOCKING_BY_STI | Interruptibility::BLOCKING_BY_NMI)
                .bits()
                .into(),
        );
        let action =
            Reply::new(ResumeAction::Advance).apply(&mut vmcs, &mut SavedRegisters::default());
        assert_eq!(action, Ok(ResumeAction::Advance));
        // Not in 64-bit mode: RIP wraps at 32 bits.
        assert_eq!(vmcs.read(F::GUEST_RIP), 1);
        assert_eq!(
            vmcs.read32(F::GUEST_INTERRUPTIBILITY_STATE),
            Interruptibility::BLOCKING_BY_NMI.bits()
        );
        assert_eq!(vmcs.read(F::GUEST_PENDING_DEBUG_EXCEPTIONS), 0);

        // 64-bit code segment in an IA-32e guest, single-stepping.
        vmcs.write(
            F::VM_ENTRY_CONTROLS,
            (EntryControls::LOAD_IA32_EFER | EntryControls::IA32E_MODE_GUEST)
                .bits()
                .into(),
        );
        vmcs.write(F::GUEST_CS_ACCESS_RIGHTS, 0xa09b);
        vmcs.write(F::GUEST_RIP, 0xffff_ffff);
        vmcs.write(F::GUEST_RFLAGS, 0x102);
        skip_instruction(&mut vmcs);
        assert_eq!(vmcs.read(F::GUEST_RIP), 0x1_0000_0001);
        assert_eq!(
            vmcs.read(F::GUEST_PENDING_DEBUG_EXCEPTIONS),
            PENDING_DEBUG_BS
        );
    }

    #[test]
    fn inject_writes_the_vm_entry_event_fields() {
        let mut vmcs = kernel_vmcs();
        let reply = Reply::new(ResumeAction::Resume)
            .inject(EventInfo::hardware_exception(vector::GP, Some(0)), 0);
        assert_eq!(reply.mask, StateMask::EVENT_INJECTION);
        reply
            .apply(&mut vmcs, &mut SavedRegisters::default())
            .unwrap();
        assert_eq!(
            vmcs.read(VmcsField::VM_ENTRY_INTERRUPTION_INFORMATION),
            0x8000_0b0d
        );
        assert_eq!(vmcs.read(VmcsField::VM_ENTRY_EXCEPTION_ERROR_CODE), 0);
    }

    #[test]
    fn gpr_accessors_map_instruction_encodings_including_rsp() {
        let mut s = GuestState::default();
        s.set_gpr(Gpr::Rsp, 0x8000);
        s.set_gpr(Gpr::Rbp, 0x9000);
        s.set_gpr(Gpr::R8, 0x10);
        assert_eq!((s.rsp, s.gprs.rbp, s.gprs.r8), (0x8000, 0x9000, 0x10));
        assert_eq!(s.gpr(Gpr::Rsp), 0x8000);
        assert_eq!(s.gpr(Gpr::Rbp), 0x9000);
    }

    #[test]
    fn segment_access_rights_move_the_unusable_bit_to_bit_8() {
        assert_eq!(Segment::ar_from_vmx(0x1_0000), Segment::UNUSABLE);
        assert_eq!(Segment::ar_from_vmx(0xc093), 0xc093);
        let s = Segment {
            ar: 0xa09b,
            ..Segment::default()
        };
        assert!(s.long_mode());
        assert_eq!(s.vmx_access_rights(), 0xa09b);
        assert_eq!(
            Segment {
                ar: Segment::UNUSABLE | 0x0e00,
                ..s
            }
            .vmx_access_rights(),
            0x1_0000
        );
    }
}
