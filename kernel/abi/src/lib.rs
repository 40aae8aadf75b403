//! capvisor's system-call and message ABI, shared by the kernel and every user-level program.
//!
//! `docs/abi.md` is the specification; this crate is its machine-readable half: call numbers,
//! status codes, the message-info word, the UTCB layout and the root task's boot information.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod elf;

pub use caps::{
    CapError, EndpointRights, EptRights, InterruptRights, IoPortRights, MemoryRights,
    NotificationRights, ObjectKind, ProtectionDomainRights, ThreadRights, VcpuRights,
};

/// System-call numbers, passed in RAX. Arguments go in RDI, RSI, RDX, R10, R8, R9; results come
/// back in RAX (status) and RDI, RSI, RDX, R10, R8, R9. RCX and R11 are clobbered (SYSCALL).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u64)]
pub enum Syscall {
    Print = 0,
    Call = 1,
    ReplyRecv = 2,
    Recv = 3,
    Reply = 4,
    Signal = 5,
    Wait = 6,
    Yield = 7,
    PdCreate = 10,
    ThreadCreate = 11,
    ThreadResume = 12,
    ThreadSuspend = 13,
    ThreadSetAffinity = 14,
    EndpointCreate = 15,
    NotificationCreate = 16,
    CurrentCpu = 17,
    CapDelegate = 20,
    CapRevoke = 21,
    CapDelete = 22,
    CapInfo = 23,
    MemMap = 30,
    MemUnmap = 31,
    MemSplit = 32,
    DebugExit = 40,
    EptCreate = 50,
    EptDonate = 51,
    EptReclaim = 52,
    EptMap = 53,
    EptUnmap = 54,
    EptInvalidate = 55,
    EptRead = 56,
    EptWrite = 57,
    EptUnmapRange = 58,
    VcpuCreate = 60,
    VcpuRun = 61,
    VcpuRecall = 62,
    VcpuWriteState = 63,
    VcpuReadState = 64,
    VcpuSetMask = 65,
    VcpuBind = 66,
    VcpuSetAffinity = 67,
    VmxCapability = 68,
    VcpuShadowVmcs = 69,
    IoPortMap = 70,
    IoPortSplit = 71,
    IrqBind = 72,
    IrqAck = 73,
    VcpuShadowFields = 74,
    VcpuShadowAccess = 75,
    VcpuSwitch = 76,
}

impl Syscall {
    /// The call with number `n`, if any.
    pub const fn from_number(n: u64) -> Option<Self> {
        use Syscall::*;
        Some(match n {
            0 => Print,
            1 => Call,
            2 => ReplyRecv,
            3 => Recv,
            4 => Reply,
            5 => Signal,
            6 => Wait,
            7 => Yield,
            10 => PdCreate,
            11 => ThreadCreate,
            12 => ThreadResume,
            13 => ThreadSuspend,
            14 => ThreadSetAffinity,
            15 => EndpointCreate,
            16 => NotificationCreate,
            17 => CurrentCpu,
            20 => CapDelegate,
            21 => CapRevoke,
            22 => CapDelete,
            23 => CapInfo,
            30 => MemMap,
            31 => MemUnmap,
            32 => MemSplit,
            40 => DebugExit,
            50 => EptCreate,
            51 => EptDonate,
            52 => EptReclaim,
            53 => EptMap,
            54 => EptUnmap,
            55 => EptInvalidate,
            56 => EptRead,
            57 => EptWrite,
            58 => EptUnmapRange,
            60 => VcpuCreate,
            61 => VcpuRun,
            62 => VcpuRecall,
            63 => VcpuWriteState,
            64 => VcpuReadState,
            65 => VcpuSetMask,
            66 => VcpuBind,
            67 => VcpuSetAffinity,
            68 => VmxCapability,
            69 => VcpuShadowVmcs,
            70 => IoPortMap,
            71 => IoPortSplit,
            72 => IrqBind,
            73 => IrqAck,
            74 => VcpuShadowFields,
            75 => VcpuShadowAccess,
            76 => VcpuSwitch,
            _ => return None,
        })
    }
}

/// Status codes returned in RAX. Codes 1 to 9 are the capability errors of `caps::CapError`
/// (same numbers); 10 and up are the kernel's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u64)]
pub enum Status {
    Ok = 0,
    /// The PD's capability space does not exist (internal; should not be seen).
    InvalidSpace = 1,
    /// The selector is beyond the capability space.
    InvalidSelector = 2,
    /// The selector names an empty slot.
    EmptySlot = 3,
    /// The capability names an object of another kind.
    WrongType = 4,
    /// The capability lacks a right the call needs.
    InsufficientRights = 5,
    /// The destination slot is occupied.
    SlotOccupied = 6,
    /// The kernel's derivation-tree nodes are exhausted.
    OutOfNodes = 7,
    /// Rights bits that the object kind does not define.
    InvalidRights = 8,
    /// The capability system found an internal inconsistency (a kernel bug; reported, not hidden).
    Inconsistent = 9,
    /// The system-call number is unknown.
    InvalidSyscall = 10,
    /// An argument is out of its documented range (a bad CPU number, priority, order, flag).
    InvalidArgument = 11,
    /// An address or offset is not aligned as the call requires.
    Unaligned = 12,
    /// An address lies outside user space, or an offset outside the object.
    OutOfRange = 13,
    /// The kernel (or the memory donated for the purpose) is out of memory.
    OutOfMemory = 14,
    /// Nothing is mapped there.
    NotMapped = 15,
    /// Something is already mapped there.
    AlreadyMapped = 16,
    /// `Reply` with no caller waiting for a reply.
    NoCaller = 17,
    /// The IPC partner disappeared (its thread or endpoint was deleted).
    Aborted = 18,
    /// The hardware lacks the feature (e.g. VMX).
    Unsupported = 19,
    /// The source of a mapping has nothing there (an EPT source page that is not backed).
    NotBacked = 20,
    /// The object is busy (a vCPU's state cannot be written while it runs).
    Busy = 21,
}

impl Status {
    pub const fn code(self) -> u64 {
        self as u64
    }

    /// The status with code `code`, if any.
    pub fn from_code(code: u64) -> Option<Self> {
        use Status::*;
        const ALL: [Status; 22] = [
            Ok,
            InvalidSpace,
            InvalidSelector,
            EmptySlot,
            WrongType,
            InsufficientRights,
            SlotOccupied,
            OutOfNodes,
            InvalidRights,
            Inconsistent,
            InvalidSyscall,
            InvalidArgument,
            Unaligned,
            OutOfRange,
            OutOfMemory,
            NotMapped,
            AlreadyMapped,
            NoCaller,
            Aborted,
            Unsupported,
            NotBacked,
            Busy,
        ];
        ALL.iter().copied().find(|s| s.code() == code)
    }
}

impl From<CapError> for Status {
    fn from(e: CapError) -> Self {
        Status::from_code(e.code()).unwrap_or(Status::Inconsistent)
    }
}

/// The message-info word: in RSI for `Call`, `ReplyRecv`, `Reply` (and returned in RSI).
///
/// | bits | field |
/// |---|---|
/// | 0..=9 | number of extra message words in the UTCB (`Utcb::words`), at most `UTCB_WORDS` |
/// | 10 | a capability is transferred |
/// | 11..=15 | reserved, zero |
/// | 16..=31 | label (free for user protocols; kernel messages use the `LABEL_*` values) |
/// | 32..=63 | sender: the selector of the capability to transfer; receiver: the slot it landed in |
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MessageInfo(pub u64);

pub const UTCB_WORDS: usize = 500;

impl MessageInfo {
    pub const fn new(label: u16, extra_words: usize) -> Self {
        Self(((label as u64) << 16) | (extra_words as u64 & 0x3ff))
    }

    pub const fn with_capability(self, selector: u32) -> Self {
        Self((self.0 & 0xffff_ffff) | (1 << 10) | ((selector as u64) << 32))
    }

    pub const fn extra_words(self) -> usize {
        (self.0 & 0x3ff) as usize
    }

    pub const fn transfers_capability(self) -> bool {
        self.0 & (1 << 10) != 0
    }

    pub const fn label(self) -> u16 {
        (self.0 >> 16) as u16
    }

    pub const fn selector(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Whether reserved bits are clear and the word count fits the UTCB.
    pub const fn is_valid(self) -> bool {
        self.0 & 0xf800 == 0 && self.extra_words() <= UTCB_WORDS
    }
}

/// Label of the message the kernel sends to a thread's fault endpoint when the thread takes an
/// exception: words = [vector, error code, faulting address (CR2 for #PF), RIP].
pub const LABEL_FAULT: u16 = 0xfff0;
/// Reply label to a fault message: resume the thread (it retries the faulting instruction).
pub const FAULT_RESUME: u16 = 0;
/// Reply label to a fault message: leave the thread suspended for good.
pub const FAULT_KILL: u16 = 1;

/// Labels of VM-exit messages: `LABEL_VM_EXIT + basic exit reason` (SDM Vol. 3D, Appendix C).
pub const LABEL_VM_EXIT: u16 = 0x8000;
/// Label of the message a recalled vCPU sends (`VcpuRecall`).
pub const LABEL_RECALL: u16 = 0xffe1;

/// `VcpuCreate` configuration word (A4): priority, CPU and the badge exit messages carry.
pub const fn vcpu_config(priority: u8, cpu: u8, badge: u32) -> u64 {
    (priority as u64) | ((cpu as u64) << 8) | ((badge as u64) << 32)
}

/// `EptMap` flags word (A4): rights (bit 0 R, 1 W, 2 X), page order, EPT memory type (0 UC,
/// 6 WB; SDM Vol. 3C 29.3.7) and ignore-PAT.
pub const fn ept_map_flags(rights: u8, order: u64, memtype: u8, ignore_pat: bool) -> u64 {
    (rights as u64 & 7) | (order << 8) | ((memtype as u64 & 7) << 16) | ((ignore_pat as u64) << 19)
}

/// `VcpuShadowFields` word: a VMCS field encoding (bits 31:0) whose VMREADs (bit 32) and
/// VMWRITEs (bit 33) the shadow VMCS serves without an exit.
pub const SHADOW_READ: u64 = 1 << 32;
pub const SHADOW_WRITE: u64 = 1 << 33;

/// `VcpuSetMask` exit-reason argument that sets the mask of every exit reason.
pub const ALL_EXITS: u64 = u64::MAX;

/// The user thread control block: one 4 KiB page per thread, mapped where `ThreadCreate` says.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Utcb {
    /// Where a received capability goes: a slot in the receiver's space, or `NO_SLOT`.
    pub receive_slot: u64,
    pub reserved: [u64; 11],
    /// Message words beyond the four in registers.
    pub words: [u64; UTCB_WORDS],
}

pub const NO_SLOT: u64 = u64::MAX;
const _: () = assert!(core::mem::size_of::<Utcb>() == 4096);

/// Lowest and highest user virtual addresses (PML4 entries 1 to 255; entry 0 is the kernel's).
pub const USER_BASE: u64 = 0x0000_0080_0000_0000;
pub const USER_END: u64 = 0x0000_8000_0000_0000;

/// Page orders accepted by `MemMap`, `MemUnmap` and `MemSplit`: 4 KiB, 2 MiB, 1 GiB.
pub const ORDER_4K: u64 = 0;
pub const ORDER_2M: u64 = 9;
pub const ORDER_1G: u64 = 18;

/// `ThreadCreate` configuration word (R9): priority, CPU and fault endpoint.
pub const fn thread_config(priority: u8, cpu: u8, fault_endpoint: Option<u32>) -> u64 {
    let fault = match fault_endpoint {
        Some(s) => s as u64 + 1,
        None => 0,
    };
    (priority as u64) | ((cpu as u64) << 8) | (fault << 32)
}

/// Highest thread priority (0 is lowest).
pub const MAX_PRIORITY: u8 = 255;

/// The root task's boot information, mapped read-only at `ROOT_BOOT_INFO`.
pub const ROOT_BOOT_INFO: u64 = 0x0000_0080_0000_0000;
/// The root task's UTCB.
pub const ROOT_UTCB: u64 = 0x0000_0080_0000_1000;
/// Top of the root task's stack (the stack is `ROOT_STACK_PAGES` pages below it).
pub const ROOT_STACK_TOP: u64 = 0x0000_0080_0010_0000;
pub const ROOT_STACK_PAGES: u64 = 16;

/// Fixed selectors in the root task's capability space.
pub const ROOT_PD: u64 = 0;
pub const ROOT_THREAD: u64 = 1;
/// Every I/O port (0 to 0xffff), rights USE | DELEGATE.
pub const ROOT_IO_PORTS: u64 = 2;
/// Every interrupt line (global system interrupts 0 to 191), right BIND.
pub const ROOT_INTERRUPTS: u64 = 3;
/// `IrqBind` flag: the line number is an ISA IRQ (the kernel applies the MADT's override).
pub const IRQ_ISA: u64 = 1;
/// First selector of the memory capabilities (`BootInfo::memory`).
pub const ROOT_FIRST_MEMORY: u64 = 16;

pub const MAX_BOOT_MODULES: usize = 15;
pub const MAX_BOOT_MEMORY: usize = 160;

/// One boot module handed to the root task: a read-only memory capability over its bytes.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BootModule {
    /// Memory capability covering the module's pages (rights READ | MAP).
    pub selector: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where the kernel mapped it in the root task (read-only).
    pub vaddr: u64,
    /// Its command line (`module2 /boot/FILE NAME args`): UTF-8, `name_len` bytes.
    pub name: [u8; 64],
    pub name_len: u64,
}

/// One block of free memory handed to the root task.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BootMemory {
    pub selector: u64,
    /// log2 of its size in 4 KiB pages (a naturally aligned block).
    pub order: u64,
}

/// What the kernel tells the root task, at `ROOT_BOOT_INFO`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BootInfo {
    pub magic: u64,
    pub cpus: u64,
    /// Whether VMX root operation is available on every CPU.
    pub vmx: u64,
    /// The kernel command line's scenario name: UTF-8, `scenario_len` bytes.
    pub scenario: [u8; 32],
    pub scenario_len: u64,
    pub module_count: u64,
    pub modules: [BootModule; MAX_BOOT_MODULES],
    pub memory_count: u64,
    pub memory: [BootMemory; MAX_BOOT_MEMORY],
}

pub const BOOT_INFO_MAGIC: u64 = 0x6361_7076_6973_6f72; // "capvisor"
const _: () = assert!(core::mem::size_of::<BootInfo>() <= 4096);

impl BootInfo {
    pub fn scenario(&self) -> &str {
        let n = (self.scenario_len as usize).min(self.scenario.len());
        core::str::from_utf8(&self.scenario[..n]).unwrap_or("")
    }

    pub fn modules(&self) -> &[BootModule] {
        &self.modules[..(self.module_count as usize).min(MAX_BOOT_MODULES)]
    }

    pub fn memory(&self) -> &[BootMemory] {
        &self.memory[..(self.memory_count as usize).min(MAX_BOOT_MEMORY)]
    }
}

impl BootModule {
    pub fn name(&self) -> &str {
        let n = (self.name_len as usize).min(self.name.len());
        core::str::from_utf8(&self.name[..n]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_match_capability_error_codes() {
        for e in CapError::ALL {
            assert_eq!(Status::from(e).code(), e.code());
        }
    }

    #[test]
    fn message_info_fields_round_trip() {
        let m = MessageInfo::new(0x1234, 7).with_capability(42);
        assert_eq!(m.label(), 0x1234);
        assert_eq!(m.extra_words(), 7);
        assert!(m.transfers_capability());
        assert_eq!(m.selector(), 42);
        assert!(m.is_valid());
        assert!(!MessageInfo(1 << 11).is_valid());
        assert!(!MessageInfo::new(0, UTCB_WORDS + 1).is_valid());
    }

    #[test]
    fn every_syscall_number_round_trips() {
        for n in 0..64 {
            if let Some(s) = Syscall::from_number(n) {
                assert_eq!(s as u64, n);
            }
        }
        assert_eq!(Syscall::from_number(9), None);
    }

    #[test]
    fn thread_config_packs_fields() {
        let c = thread_config(7, 1, Some(5));
        assert_eq!(c & 0xff, 7);
        assert_eq!((c >> 8) & 0xff, 1);
        assert_eq!(c >> 32, 6);
        assert_eq!(thread_config(0, 0, None) >> 32, 0);
    }
}
