//! Typed wrappers for every system call of `docs/abi.md`: selectors in, `Result<_, Status>` out.
//!
//! The wrappers are safe functions: the kernel validates every argument and answers a bad one
//! with a status code. (A program can still unmap its own code or stack through `MemUnmap`, as a
//! Unix program can write to `/proc/self/mem`; the result is a fault reported to its fault
//! endpoint, never a kernel failure.)

use crate::syscall::{Returned, syscall};
use abi::{MessageInfo, ObjectKind, Status, Syscall};
use bitflags::bitflags;

/// A slot index in the caller's capability space (0 to [`crate::layout::SLOTS`] - 1).
pub type Selector = u64;

/// A system call's outcome.
pub type Result<T> = core::result::Result<T, Status>;

/// A message: the info word and the four words that travel in registers. Extra words travel in
/// the UTCB (see [`crate::utcb`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub info: MessageInfo,
    pub words: [u64; 4],
}

impl Message {
    /// A message with `label`, the register words and no extra words.
    pub const fn new(label: u16, words: [u64; 4]) -> Self {
        Self {
            info: MessageInfo::new(label, 0),
            words,
        }
    }

    /// A message with `label`, the register words and `extra` words already in the UTCB.
    pub const fn with_extra(label: u16, words: [u64; 4], extra: usize) -> Self {
        Self {
            info: MessageInfo::new(label, extra),
            words,
        }
    }

    /// The same message, transferring the capability at `selector` (needs GRANT on the endpoint).
    pub const fn with_capability(self, selector: Selector) -> Self {
        Self {
            info: self.info.with_capability(selector as u32),
            words: self.words,
        }
    }

    pub const fn label(&self) -> u16 {
        self.info.label()
    }
}

bitflags! {
    /// The rights a mapping gets (`MemMap` a4 bits 0..=2); readable is implied by any mapping.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MapRights: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXECUTE = 1 << 2;
    }
}

/// What `CapInfo` reports about a capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapInfo {
    /// The object kind's code (`abi::ObjectKind`).
    pub kind_code: u64,
    /// The rights bits (their meaning depends on the kind).
    pub rights: u32,
    /// Kind-specific detail (memory: the order, log2 of its size in 4 KiB pages).
    pub detail: u64,
}

impl CapInfo {
    pub fn kind(&self) -> Option<ObjectKind> {
        u8::try_from(self.kind_code)
            .ok()
            .and_then(ObjectKind::from_code)
    }
}

/// The status a raw status code stands for (unknown codes read as `Inconsistent`).
pub fn status_of(code: u64) -> Status {
    Status::from_code(code).unwrap_or(Status::Inconsistent)
}

#[inline(always)]
fn check(r: Returned) -> Result<[u64; 6]> {
    if r.status == Status::Ok.code() {
        Ok(r.results)
    } else {
        Err(status_of(r.status))
    }
}

#[inline(always)]
fn invoke(call: Syscall, args: [u64; 6]) -> Result<[u64; 6]> {
    check(syscall(call as u64, args))
}

#[inline(always)]
fn message_args(first: u64, msg: &Message) -> [u64; 6] {
    let [w0, w1, w2, w3] = msg.words;
    [first, msg.info.0, w0, w1, w2, w3]
}

#[inline(always)]
fn message_of(r: [u64; 6]) -> Message {
    Message {
        info: MessageInfo(r[1]),
        words: [r[2], r[3], r[4], r[5]],
    }
}

/// Any system call by number, with the raw status: for tests of malformed calls.
pub fn raw_syscall(number: u64, args: [u64; 6]) -> Returned {
    syscall(number, args)
}

// ---- Debug ----

/// `Print`: writes UTF-8 text (at most 4096 bytes) to the kernel console.
pub fn print(text: &str) -> Result<()> {
    print_raw(text.as_ptr() as u64, text.len() as u64)
}

/// `Print` with an arbitrary address and length (the kernel checks both).
pub fn print_raw(address: u64, length: u64) -> Result<()> {
    invoke(Syscall::Print, [address, length, 0, 0, 0, 0]).map(|_| ())
}

/// `DebugExit`: ends the run (root PD only). Returns only on failure, with the status.
pub fn debug_exit(code: u64) -> Status {
    match invoke(Syscall::DebugExit, [code, 0, 0, 0, 0, 0]) {
        Ok(_) => Status::Inconsistent,
        Err(s) => s,
    }
}

// ---- IPC ----

/// `Call`: sends `msg` through `endpoint` (CALL) and waits for the reply.
#[inline(always)]
pub fn call(endpoint: Selector, msg: &Message) -> Result<Message> {
    invoke(Syscall::Call, message_args(endpoint, msg)).map(message_of)
}

/// `ReplyRecv`: replies `msg` to the outstanding caller (if any), then waits on `endpoint`
/// (RECEIVE) for the next call.
#[inline(always)]
pub fn reply_recv(endpoint: Selector, msg: &Message) -> Result<Message> {
    invoke(Syscall::ReplyRecv, message_args(endpoint, msg)).map(message_of)
}

/// `Recv`: waits on `endpoint` (RECEIVE) for a call.
#[inline(always)]
pub fn recv(endpoint: Selector) -> Result<Message> {
    invoke(Syscall::Recv, [endpoint, 0, 0, 0, 0, 0]).map(message_of)
}

/// `Reply`: answers the outstanding caller and goes on.
#[inline(always)]
pub fn reply(msg: &Message) -> Result<()> {
    invoke(Syscall::Reply, message_args(0, msg)).map(|_| ())
}

// ---- Notifications ----

/// `Signal` on `notification` (SIGNAL).
pub fn signal(notification: Selector) -> Result<()> {
    invoke(Syscall::Signal, [notification, 0, 0, 0, 0, 0]).map(|_| ())
}

/// `Wait` on `notification` (WAIT); returns the number of signals consumed.
pub fn wait(notification: Selector) -> Result<u64> {
    invoke(Syscall::Wait, [notification, 0, 0, 0, 0, 0]).map(|r| r[0])
}

// ---- Scheduling and threads ----

/// `Yield` the CPU to another thread of the same priority.
pub fn yield_now() -> Result<()> {
    invoke(Syscall::Yield, [0; 6]).map(|_| ())
}

/// `ThreadCreate`: a suspended thread in `pd` (CREATE_THREAD), its capability in the caller's
/// slot `dest`. `config` comes from `abi::thread_config`.
pub fn thread_create(
    pd: Selector,
    dest: Selector,
    entry: u64,
    stack: u64,
    utcb: u64,
    config: u64,
) -> Result<()> {
    invoke(
        Syscall::ThreadCreate,
        [pd, dest, entry, stack, utcb, config],
    )
    .map(|_| ())
}

/// `ThreadResume` (CONTROL).
pub fn thread_resume(thread: Selector) -> Result<()> {
    invoke(Syscall::ThreadResume, [thread, 0, 0, 0, 0, 0]).map(|_| ())
}

/// `ThreadSuspend` (CONTROL).
pub fn thread_suspend(thread: Selector) -> Result<()> {
    invoke(Syscall::ThreadSuspend, [thread, 0, 0, 0, 0, 0]).map(|_| ())
}

/// `ThreadSetAffinity` (SET_AFFINITY): moves the thread to CPU `cpu`.
pub fn thread_set_affinity(thread: Selector, cpu: u64) -> Result<()> {
    invoke(Syscall::ThreadSetAffinity, [thread, cpu, 0, 0, 0, 0]).map(|_| ())
}

/// `CurrentCpu`: the index of the CPU the caller runs on.
pub fn current_cpu() -> Result<u64> {
    invoke(Syscall::CurrentCpu, [0; 6]).map(|r| r[0])
}

// ---- Objects and capabilities ----

/// `PdCreate`: a new protection domain paid by `pd` (CREATE_DOMAIN), its capability in `dest`.
pub fn pd_create(pd: Selector, dest: Selector) -> Result<()> {
    invoke(Syscall::PdCreate, [pd, dest, 0, 0, 0, 0]).map(|_| ())
}

/// `EndpointCreate` (CREATE_ENDPOINT on `pd`).
pub fn endpoint_create(pd: Selector, dest: Selector) -> Result<()> {
    invoke(Syscall::EndpointCreate, [pd, dest, 0, 0, 0, 0]).map(|_| ())
}

/// `NotificationCreate` (CREATE_NOTIFICATION on `pd`).
pub fn notification_create(pd: Selector, dest: Selector) -> Result<()> {
    invoke(Syscall::NotificationCreate, [pd, dest, 0, 0, 0, 0]).map(|_| ())
}

/// `CapDelegate`: copies `source` into slot `dest` of the PD `dest_pd`, with rights
/// `source AND mask`.
pub fn cap_delegate(source: Selector, dest_pd: Selector, dest: Selector, mask: u32) -> Result<()> {
    invoke(
        Syscall::CapDelegate,
        [source, dest_pd, dest, u64::from(mask), 0, 0],
    )
    .map(|_| ())
}

/// `CapRevoke`: removes everything derived from `selector`; returns how many capabilities and
/// mappings went.
pub fn cap_revoke(selector: Selector) -> Result<u64> {
    invoke(Syscall::CapRevoke, [selector, 0, 0, 0, 0, 0]).map(|r| r[0])
}

/// `CapDelete`: as `cap_revoke`, and the capability itself.
pub fn cap_delete(selector: Selector) -> Result<u64> {
    invoke(Syscall::CapDelete, [selector, 0, 0, 0, 0, 0]).map(|r| r[0])
}

/// `CapInfo`: kind, rights and detail of the capability at `selector`.
pub fn cap_info(selector: Selector) -> Result<CapInfo> {
    invoke(Syscall::CapInfo, [selector, 0, 0, 0, 0, 0]).map(|r| CapInfo {
        kind_code: r[0],
        rights: r[1] as u32,
        detail: r[2],
    })
}

// ---- Memory ----

/// `MemMap`: maps `2^order` pages of `memory` (MAP plus the rights mapped), from page `offset`,
/// into `pd` at `vaddr`.
pub fn mem_map(
    memory: Selector,
    offset: u64,
    pd: Selector,
    vaddr: u64,
    rights: MapRights,
    order: u64,
) -> Result<()> {
    mem_map_raw(memory, offset, pd, vaddr, rights.bits() | (order << 8))
}

/// `MemMap` with the rights-and-order word as given (for tests of malformed calls).
pub fn mem_map_raw(
    memory: Selector,
    offset: u64,
    pd: Selector,
    vaddr: u64,
    rights_and_order: u64,
) -> Result<()> {
    invoke(
        Syscall::MemMap,
        [memory, offset, pd, vaddr, rights_and_order, 0],
    )
    .map(|_| ())
}

/// `MemUnmap`: removes the `2^order`-page mapping at `vaddr` in `pd`.
pub fn mem_unmap(pd: Selector, vaddr: u64, order: u64) -> Result<()> {
    invoke(Syscall::MemUnmap, [pd, vaddr, order, 0, 0, 0]).map(|_| ())
}

/// `IrqBind`: routes interrupt line `line` of `lines` (BIND) — an ISA IRQ with
/// `abi::IRQ_ISA` in `flags`, else a GSI — to `notification` (SIGNAL); returns the GSI.
pub fn irq_bind(lines: Selector, line: u64, notification: Selector, flags: u64) -> Result<u64> {
    invoke(Syscall::IrqBind, [lines, line, notification, flags, 0, 0]).map(|r| r[0])
}

/// `IrqAck`: unmasks level-triggered line `gsi` after its interrupt was handled.
pub fn irq_ack(lines: Selector, gsi: u64) -> Result<()> {
    invoke(Syscall::IrqAck, [lines, gsi, 0, 0, 0, 0]).map(|_| ())
}

/// `IoPortMap`: lets `pd`'s threads use ports `[first, first + count)` of `ports` (USE).
pub fn io_port_map(ports: Selector, pd: Selector, first: u64, count: u64) -> Result<()> {
    invoke(Syscall::IoPortMap, [ports, pd, first, count, 0, 0]).map(|_| ())
}

/// `IoPortSplit`: a new I/O-port object for `[first, first + count)` of `ports` (DELEGATE), a
/// child of `ports`, in slot `dest`.
pub fn io_port_split(ports: Selector, first: u64, count: u64, dest: Selector) -> Result<()> {
    invoke(Syscall::IoPortSplit, [ports, first, count, dest, 0, 0]).map(|_| ())
}

/// `MemSplit`: a new memory object for the `2^order` pages of `memory` (DELEGATE) from page
/// `offset`, a child of `memory`, in slot `dest`.
pub fn mem_split(memory: Selector, offset: u64, order: u64, dest: Selector) -> Result<()> {
    invoke(Syscall::MemSplit, [memory, offset, order, dest, 0, 0]).map(|_| ())
}
