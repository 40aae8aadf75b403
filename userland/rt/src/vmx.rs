//! The vCPU and EPT system calls (`docs/abi.md`, "EPT objects" and "vCPUs"), VM exits as IPC
//! calls, and the root task's protocol with the VMM server.
//!
//! - EPT objects: [`ept_create`], [`ept_donate`], [`ept_reclaim`], [`ept_map`], [`ept_unmap`],
//!   [`ept_invalidate`];
//! - vCPUs: [`vcpu_create`], [`vcpu_run`], [`vcpu_recall`], [`vcpu_write_state`],
//!   [`vcpu_read_state`], [`vcpu_set_mask`], [`vcpu_bind`], [`vcpu_set_affinity`];
//! - exits: [`exit_recv`], [`exit_reply_recv`] and [`exit_reply`] receive an exit as an
//!   [`ExitCall`] (with the badge, which [`crate::sys`]'s IPC wrappers drop) and answer it with an
//!   [`ExitReply`]; [`read_exit_message`] and [`write_reply`] move the `vcpu::message` images
//!   through the UTCB, touching only the words of the groups the mask names; on a VMM's hot
//!   path, [`ExitHeader`], [`read_gprs_from`] and [`write_gprs_reply_to`] move only the header
//!   and the general-purpose registers, through any [`MessageWords`] (a faster UTCB access);
//! - [`protocol`]: the root task's slots and labels for the VMM server.

use crate::sys::{Message, Result, Selector, status_of};
use crate::syscall::syscall;
use crate::utcb;
use abi::{LABEL_RECALL, LABEL_VM_EXIT, MessageInfo, Status, Syscall};
use vcpu::exit::RawExit;
use vcpu::message::{
    DecodeError, EXIT_MESSAGE_WORDS, ExitMessage, Gprs, REPLY_WORDS, Reply, ResumeAction,
    StateMask, word,
};

#[inline(always)]
fn invoke(call: Syscall, args: [u64; 6]) -> Result<[u64; 6]> {
    let r = syscall(call as u64, args);
    if r.status == Status::Ok.code() {
        Ok(r.results)
    } else {
        Err(status_of(r.status))
    }
}

// ---- EPT objects ----

/// `EptCreate`: a new EPT object paid by `pd` (CREATE_EPT), its capability in `dest`; `memory`
/// (WRITE, DELEGATE) is donated as its pool and consumed.
pub fn ept_create(pd: Selector, dest: Selector, memory: Selector) -> Result<()> {
    invoke(Syscall::EptCreate, [pd, dest, memory, 0, 0, 0]).map(|_| ())
}

/// `EptDonate`: adds `memory` (WRITE, DELEGATE, consumed) to the pool of `ept` (MAP); returns
/// the pool's free pages.
pub fn ept_donate(ept: Selector, memory: Selector) -> Result<u64> {
    invoke(Syscall::EptDonate, [ept, memory, 0, 0, 0, 0]).map(|r| r[0])
}

/// `EptReclaim`: returns at most `most` free pool pages of `ept` (MAP) as order-0 memory
/// capabilities in the slots from `first_dest`; returns how many.
pub fn ept_reclaim(ept: Selector, first_dest: Selector, most: u64) -> Result<u64> {
    invoke(Syscall::EptReclaim, [ept, first_dest, most, 0, 0, 0]).map(|r| r[0])
}

/// `EptMap`: maps into `ept` (MAP) at `gpa` the page(s) of `source` at `source_offset`: pages of
/// a memory capability, or the guest-physical address in another EPT object (MAP_SOURCE).
/// `flags` come from `abi::ept_map_flags`. Returns what was mapped after the kernel's clamping:
/// (order, rights: bit 0 R, 1 W, 2 X, EPT memory type).
#[inline(always)]
pub fn ept_map(
    ept: Selector,
    source: Selector,
    source_offset: u64,
    gpa: u64,
    flags: u64,
) -> Result<(u64, u64, u64)> {
    invoke(Syscall::EptMap, [ept, source, source_offset, gpa, flags, 0]).map(|r| (r[0], r[1], r[2]))
}

/// `EptUnmap`: removes the `2^order`-page entry at `gpa` from `ept` (UNMAP); returns how many
/// entries went, derived ones included.
pub fn ept_unmap(ept: Selector, gpa: u64, order: u64) -> Result<u64> {
    invoke(Syscall::EptUnmap, [ept, gpa, order, 0, 0, 0]).map(|r| r[0])
}

/// `EptUnmapRange` (UNMAP): removes every leaf of `ept` overlapping `[gpa, gpa + length)` (4
/// KiB aligned; a leaf reaching beyond the range goes whole) with its derived mappings, and
/// invalidates once. Returns the mappings removed (derived ones included).
pub fn ept_unmap_range(ept: Selector, gpa: u64, length: u64) -> Result<u64> {
    invoke(Syscall::EptUnmapRange, [ept, gpa, length, 0, 0, 0]).map(|r| r[0])
}

/// `EptInvalidate` (INVALIDATE): INVEPT for `ept` on every CPU that may cache it.
pub fn ept_invalidate(ept: Selector) -> Result<()> {
    invoke(Syscall::EptInvalidate, [ept, 0, 0, 0, 0, 0]).map(|_| ())
}

// ---- vCPUs ----

/// `VcpuCreate`: a suspended vCPU paid by `pd` (CREATE_VCPU), bound to `ept` (MAP) and sending
/// its exits to `exit_endpoint` (CALL), its capability in `dest`. `config` comes from
/// `abi::vcpu_config` (priority, CPU, badge).
pub fn vcpu_create(
    pd: Selector,
    dest: Selector,
    ept: Selector,
    exit_endpoint: Selector,
    config: u64,
) -> Result<()> {
    invoke(
        Syscall::VcpuCreate,
        [pd, dest, ept, exit_endpoint, config, 0],
    )
    .map(|_| ())
}

/// `VcpuRun` (RUN).
pub fn vcpu_run(vcpu: Selector) -> Result<()> {
    invoke(Syscall::VcpuRun, [vcpu, 0, 0, 0, 0, 0]).map(|_| ())
}

/// `VcpuRecall` (RECALL): forces an exit (label `LABEL_RECALL`).
pub fn vcpu_recall(vcpu: Selector) -> Result<()> {
    invoke(Syscall::VcpuRecall, [vcpu, 0, 0, 0, 0, 0]).map(|_| ())
}

/// `VcpuWriteState` (WRITE_STATE): writes the groups of `reply.mask` (all 72 reply words go to
/// the caller's UTCB first). Only while the vCPU does not run (`Busy`).
pub fn vcpu_write_state(vcpu: Selector, reply: &Reply) -> Result<()> {
    utcb::write_words(&reply.to_words());
    invoke(Syscall::VcpuWriteState, [vcpu, 0, 0, 0, 0, 0]).map(|_| ())
}

/// [`vcpu_write_state`] with the reply image written through `destination` (the caller's
/// UTCB): its header, the groups of its mask and the reserved-half words only.
pub fn vcpu_write_state_with(
    vcpu: Selector,
    reply: &Reply,
    destination: &mut impl MessageWords,
) -> Result<()> {
    write_reply_to(destination, reply);
    invoke(Syscall::VcpuWriteState, [vcpu, 0, 0, 0, 0, 0]).map(|_| ())
}

/// [`vcpu_write_state_with`], then `VcpuRun` (RUN), in one system call; with `shadow`
/// (field, value) pairs (at most [`SHADOW_PAIRS_WITH_STATE`]) also written into the vCPU's
/// shadow VMCS first.
pub fn vcpu_write_state_and_run(
    vcpu: Selector,
    reply: &Reply,
    shadow: &[(vcpu::vmcs::VmcsField, u64)],
    destination: &mut impl MessageWords,
) -> Result<()> {
    let flags = 1 | write_state_image(reply, shadow, destination)?;
    invoke(Syscall::VcpuWriteState, [vcpu, flags, 0, 0, 0, 0]).map(|_| ())
}

/// Writes `reply` (and, if any, the `shadow` pairs after it) into the UTCB through
/// `destination` for [`vcpu_write_state_and_run`] or [`vcpu_switch`]; returns the flags that
/// say whether pairs follow.
pub fn write_state_image(
    reply: &Reply,
    shadow: &[(vcpu::vmcs::VmcsField, u64)],
    destination: &mut impl MessageWords,
) -> Result<u64> {
    if shadow.len() > SHADOW_PAIRS_WITH_STATE {
        return Err(Status::InvalidArgument);
    }
    write_reply_to(destination, reply);
    if shadow.is_empty() {
        return Ok(0);
    }
    let mut words = [0u64; 1 + 2 * SHADOW_PAIRS_WITH_STATE];
    words[0] = shadow.len() as u64;
    encode_pairs(shadow, &mut words[1..]);
    destination.write(REPLY_WORDS, &words[..1 + 2 * shadow.len()]);
    Ok(2)
}

/// `VcpuSwitch`: the exit being answered stops, `vcpu` (WRITE_STATE, RUN) takes the state
/// image already in the UTCB ([`write_state_image`]; `flags` as it returned) and runs, and
/// the caller waits on `endpoint` (RECEIVE) for the next call, keeping its badge. On an
/// error nothing happened: the exit is still to be answered.
#[inline(always)]
pub fn vcpu_switch(endpoint: Selector, vcpu: Selector, flags: u64) -> Result<ExitCall> {
    invoke(Syscall::VcpuSwitch, [endpoint, vcpu, flags, 0, 0, 0]).map(exit_call_of)
}

/// The most shadow pairs [`vcpu_write_state_and_run`] takes.
pub const SHADOW_PAIRS_WITH_STATE: usize = 32;

/// `VcpuReadState` (READ_STATE): the groups of `mask`, as an exit-message image.
pub fn vcpu_read_state(vcpu: Selector, mask: StateMask) -> Result<ExitMessage> {
    invoke(
        Syscall::VcpuReadState,
        [vcpu, u64::from(mask.bits()), 0, 0, 0, 0],
    )?;
    let mut words = [0; EXIT_MESSAGE_WORDS];
    utcb::read_words(&mut words);
    ExitMessage::from_words(&words).map_err(|_| Status::Inconsistent)
}

/// `VcpuShadowVmcs`: gives `vcpu` a shadow VMCS and links it (`link`), or links or unlinks
/// the one it has. `Unsupported` without VMCS shadowing.
pub fn vcpu_shadow_vmcs(vcpu: Selector, link: bool) -> Result<()> {
    invoke(
        Syscall::VcpuShadowVmcs,
        [vcpu, u64::from(!link), 0, 0, 0, 0],
    )
    .map(|_| ())
}

/// `VcpuShadowFields`: the guest's VMREADs (`read`) and VMWRITEs (`write`) of `fields` go to
/// the shadow VMCS without a VM exit.
pub fn vcpu_shadow_fields(
    vcpu: Selector,
    fields: &[vcpu::vmcs::VmcsField],
    read: bool,
    write: bool,
) -> Result<()> {
    let flags = if read { abi::SHADOW_READ } else { 0 } | if write { abi::SHADOW_WRITE } else { 0 };
    let mut words = [0u64; 64];
    for chunk in fields.chunks(words.len()) {
        for (w, f) in words.iter_mut().zip(chunk) {
            *w = u64::from(f.encoding()) | flags;
        }
        utcb::write_words(&words[..chunk.len()]);
        invoke(
            Syscall::VcpuShadowFields,
            [vcpu, chunk.len() as u64, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// The most field-value pairs one `VcpuShadowAccess` moves.
pub const SHADOW_PAIRS: usize = abi::UTCB_WORDS / 2;

/// `VcpuShadowAccess`: writes `(field, value)` pairs (1 to [`SHADOW_PAIRS`]) into `vcpu`'s
/// shadow VMCS.
pub fn vcpu_shadow_write(vcpu: Selector, pairs: &[(vcpu::vmcs::VmcsField, u64)]) -> Result<()> {
    if pairs.is_empty() || pairs.len() > SHADOW_PAIRS {
        return Err(Status::InvalidArgument);
    }
    let mut words = [0u64; 2 * 32];
    for chunk in pairs.chunks(32) {
        encode_pairs(chunk, &mut words);
        utcb::write_words(&words[..2 * chunk.len()]);
        invoke(
            Syscall::VcpuShadowAccess,
            [vcpu, chunk.len() as u64, 1, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// (field encoding, value) word pairs, as `VcpuShadowAccess` and `VcpuSwitch` take them.
fn encode_pairs(pairs: &[(vcpu::vmcs::VmcsField, u64)], words: &mut [u64]) {
    for (w, &(field, value)) in words.chunks_mut(2).zip(pairs) {
        w[0] = u64::from(field.encoding());
        w[1] = value;
    }
}

/// `VcpuShadowAccess`: reads the values of the fields of `pairs` (up to 32) from `vcpu`'s
/// shadow VMCS into the pairs.
pub fn vcpu_shadow_read(vcpu: Selector, pairs: &mut [(vcpu::vmcs::VmcsField, u64)]) -> Result<()> {
    if pairs.is_empty() || pairs.len() > 32 {
        return Err(Status::InvalidArgument);
    }
    let mut words = [0u64; 2 * 32];
    for (w, (f, _)) in words.chunks_mut(2).zip(pairs.iter()) {
        w[0] = u64::from(f.encoding());
    }
    let n = 2 * pairs.len();
    utcb::write_words(&words[..n]);
    invoke(
        Syscall::VcpuShadowAccess,
        [vcpu, pairs.len() as u64, 0, 0, 0, 0],
    )?;
    utcb::read_words(&mut words[..n]);
    for (w, (_, v)) in words.chunks(2).zip(pairs.iter_mut()) {
        *v = w[1];
    }
    Ok(())
}

/// `VcpuSetMask` (WRITE_STATE): the state groups exits with basic reason `reason` carry
/// (`abi::ALL_EXITS` for every reason).
pub fn vcpu_set_mask(vcpu: Selector, reason: u64, mask: StateMask) -> Result<()> {
    invoke(
        Syscall::VcpuSetMask,
        [vcpu, reason, u64::from(mask.bits()), 0, 0, 0],
    )
    .map(|_| ())
}

/// `VcpuBind` (BIND): binds the vCPU to `ept` (MAP).
pub fn vcpu_bind(vcpu: Selector, ept: Selector) -> Result<()> {
    invoke(Syscall::VcpuBind, [vcpu, ept, 0, 0, 0, 0]).map(|_| ())
}

/// `VcpuSetAffinity` (RUN): moves the vCPU to CPU `cpu`.
pub fn vcpu_set_affinity(vcpu: Selector, cpu: u64) -> Result<()> {
    invoke(Syscall::VcpuSetAffinity, [vcpu, cpu, 0, 0, 0, 0]).map(|_| ())
}

/// `VmxCapability`: the value of the VMX capability MSR `msr` (IA32_VMX_BASIC 0x480 to
/// IA32_VMX_VMFUNC 0x491) as the kernel read it (`InvalidArgument` for an MSR the CPU lacks,
/// `Unsupported` without VMX).
pub fn vmx_capability(msr: u32) -> Result<u64> {
    invoke(Syscall::VmxCapability, [u64::from(msr), 0, 0, 0, 0, 0]).map(|r| r[0])
}

// ---- Exits as IPC ----

/// A call received on an exit endpoint (or any call, with its badge): the badge (r0), the
/// info word and the four register words. A VM exit carries [exit reason, qualification,
/// guest-physical address, guest RIP] and its `ExitMessage` image in the UTCB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCall {
    pub badge: u64,
    pub info: MessageInfo,
    pub words: [u64; 4],
}

impl ExitCall {
    pub const fn label(&self) -> u16 {
        self.info.label()
    }

    /// The basic exit reason of a VM-exit message (`LABEL_VM_EXIT + reason`).
    pub const fn exit_reason(&self) -> Option<u16> {
        match self.info.label().checked_sub(LABEL_VM_EXIT) {
            Some(reason) if self.info.label() != LABEL_RECALL => Some(reason),
            _ => None,
        }
    }

    /// Whether this is the exit a `VcpuRecall` forced.
    pub const fn is_recall(&self) -> bool {
        self.info.label() == LABEL_RECALL
    }

    /// The call as a plain [`Message`] (without the badge).
    pub const fn message(&self) -> Message {
        Message {
            info: self.info,
            words: self.words,
        }
    }
}

/// The answer to an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReply {
    /// No UTCB words: resume the guest unchanged.
    Resume,
    /// A `Reply` image (72 words) already in the UTCB ([`write_reply`]).
    Written,
}

impl ExitReply {
    const fn info(self) -> u64 {
        match self {
            ExitReply::Resume => MessageInfo::new(0, 0).0,
            ExitReply::Written => MessageInfo::new(0, REPLY_WORDS).0,
        }
    }
}

#[inline(always)]
fn exit_call_of(r: [u64; 6]) -> ExitCall {
    ExitCall {
        badge: r[0],
        info: MessageInfo(r[1]),
        words: [r[2], r[3], r[4], r[5]],
    }
}

/// `Recv` on `endpoint` (RECEIVE), keeping the badge.
#[inline(always)]
pub fn exit_recv(endpoint: Selector) -> Result<ExitCall> {
    invoke(Syscall::Recv, [endpoint, 0, 0, 0, 0, 0]).map(exit_call_of)
}

/// `ReplyRecv`: answers the outstanding exit with `reply`, then waits on `endpoint` for the next
/// call, keeping its badge.
#[inline(always)]
pub fn exit_reply_recv(endpoint: Selector, reply: ExitReply) -> Result<ExitCall> {
    invoke(Syscall::ReplyRecv, [endpoint, reply.info(), 0, 0, 0, 0]).map(exit_call_of)
}

/// `Reply`: answers the outstanding exit with `reply` and goes on.
pub fn exit_reply(reply: ExitReply) -> Result<()> {
    invoke(Syscall::Reply, [0, reply.info(), 0, 0, 0, 0]).map(|_| ())
}

/// First word and length of each state group in the encoded guest state (`vcpu::message`).
const GROUPS: [(StateMask, usize, usize); 15] = [
    (StateMask::GPRS, word::GPRS, GPRS_WORDS),
    (StateMask::RIP_RSP_RFLAGS, word::RIP_RSP_RFLAGS, 3),
    (StateMask::CR, word::CR, 4),
    (StateMask::DR7, word::DR7, 1),
    (StateMask::SEGMENTS, word::SEGMENTS, 16),
    (StateMask::DESCRIPTOR_TABLES, word::DESCRIPTOR_TABLES, 3),
    (StateMask::EFER_PAT, word::EFER_PAT, 2),
    (StateMask::SYSENTER, word::SYSENTER, 3),
    (StateMask::SYSCALL_MSRS, word::SYSCALL_MSRS, 5),
    (
        StateMask::INTERRUPTIBILITY_ACTIVITY,
        word::INTERRUPTIBILITY_ACTIVITY,
        2,
    ),
    (StateMask::EVENT_INJECTION, word::EVENT_INJECTION, 2),
    (StateMask::TSC, word::TSC, 1),
    (StateMask::PREEMPTION_TIMER, word::PREEMPTION_TIMER, 1),
    (StateMask::CONTROLS, word::CONTROLS, 8),
    (StateMask::PDPTES, word::PDPTES, 4),
];

/// Guest-state words whose high halves are reserved: a decoder refuses them when nonzero
/// whatever the mask, so [`write_reply`] always writes them.
const RESERVED_HIGH: [usize; 3] = [
    word::SYSENTER,
    word::EVENT_INJECTION + 1,
    word::PREEMPTION_TIMER,
];

/// Words of the general-purpose registers group.
const GPRS_WORDS: usize = 15;
/// Header words of an exit message before the guest state.
pub const EXIT_HEADER_WORDS: usize = EXIT_MESSAGE_WORDS - vcpu::message::GUEST_STATE_WORDS;
/// Header words of a reply before the guest state.
pub const REPLY_HEADER_WORDS: usize = REPLY_WORDS - vcpu::message::GUEST_STATE_WORDS;

/// Bulk access to the extra message words of the caller's UTCB (`abi::Utcb::words`): the
/// exit-message and reply images travel there. [`Utcb`] goes through [`crate::utcb`]; a program
/// with a faster way to its own UTCB (a VMM on its hot path) passes its own.
pub trait MessageWords {
    /// Copies words `first..first + out.len()` into `out`.
    fn read(&mut self, first: usize, out: &mut [u64]);
    /// Copies `words` to words `first..first + words.len()`.
    fn write(&mut self, first: usize, words: &[u64]);
}

/// The main thread's UTCB through [`crate::utcb`], one checked word at a time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utcb;

impl MessageWords for Utcb {
    fn read(&mut self, first: usize, out: &mut [u64]) {
        for (i, w) in out.iter_mut().enumerate() {
            *w = utcb::word(first + i);
        }
    }

    fn write(&mut self, first: usize, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            utcb::set_word(first + i, *w);
        }
    }
}

/// Reads the exit message a VM exit left in the UTCB. Only the words the message's mask (its
/// word 0) makes meaningful are read: the exit reason, the exit information with `EXIT_INFO`,
/// and the named groups; the others decode as zero.
pub fn read_exit_message() -> core::result::Result<ExitMessage, DecodeError> {
    read_exit_message_from(&mut Utcb)
}

/// [`read_exit_message`] through `source`.
#[inline]
pub fn read_exit_message_from(
    source: &mut impl MessageWords,
) -> core::result::Result<ExitMessage, DecodeError> {
    let mut words = [0u64; EXIT_MESSAGE_WORDS];
    source.read(0, &mut words[..1]);
    let mask = StateMask::from_bits_truncate(words[0] as u32);
    if mask.contains(StateMask::EXIT_INFO) {
        source.read(1, &mut words[1..EXIT_HEADER_WORDS]);
    } else {
        source.read(1, &mut words[1..2]);
    }
    for (group, first, len) in GROUPS {
        if mask.contains(group) {
            let at = EXIT_HEADER_WORDS + first;
            source.read(at, &mut words[at..at + len]);
        }
    }
    ExitMessage::from_words(&words)
}

/// Writes `reply` into the UTCB for an [`ExitReply::Written`] answer: the header, the groups
/// of its mask and the words with reserved halves (the kernel ignores the other groups' words).
/// Returns the answer to pass on.
pub fn write_reply(reply: &Reply) -> ExitReply {
    write_reply_to(&mut Utcb, reply)
}

/// [`write_reply_to`] of a reply that writes no state and takes `action` (no `Reply` built).
pub fn write_action_to(destination: &mut impl MessageWords, action: ResumeAction) -> ExitReply {
    destination.write(0, &Reply::header(StateMask::empty(), action));
    for at in RESERVED_HIGH {
        destination.write(REPLY_HEADER_WORDS + at, &[0]);
    }
    ExitReply::Written
}

/// [`write_reply`] through `destination`.
#[inline]
pub fn write_reply_to(destination: &mut impl MessageWords, reply: &Reply) -> ExitReply {
    if reply.mask.is_empty() {
        // Nothing but the action: the header, and zero reserved halves.
        return write_action_to(destination, reply.action);
    }
    let words = reply.to_words();
    if reply.mask.bits().count_ones() > 4 {
        // Most of the image: one copy costs less than picking groups.
        destination.write(0, &words);
        return ExitReply::Written;
    }
    destination.write(0, &words[..REPLY_HEADER_WORDS]);
    for (group, first, len) in GROUPS {
        if reply.mask.contains(group) {
            let at = REPLY_HEADER_WORDS + first;
            destination.write(at, &words[at..at + len]);
        }
    }
    for at in RESERVED_HIGH {
        let at = REPLY_HEADER_WORDS + at;
        destination.write(at, &words[at..at + 1]);
    }
    ExitReply::Written
}

// ---- The hot path: the header and the general-purpose registers only ----

/// An exit message's header (words 0 to 7): the groups it carries and the exit information,
/// decoded without the guest state, for the exits a VMM answers often (CPUID, EPT violations).
/// The words are those of the `vcpu::message` table; the tests check them against
/// `ExitMessage::to_words`. Decode the exit with `vcpu::exit::decode(&header.exit)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitHeader {
    pub mask: StateMask,
    pub exit: RawExit,
}

impl ExitHeader {
    /// Decodes the header words; fails as `ExitMessage::from_words` would on them.
    pub fn from_words(words: &[u64; EXIT_HEADER_WORDS]) -> core::result::Result<Self, DecodeError> {
        let low = |at: usize| words[at] as u32;
        let high = |at: usize| (words[at] >> 32) as u32;
        let mask = StateMask::from_bits(low(0))
            .filter(|_| high(0) == 0)
            .ok_or(DecodeError { word: 0 })?;
        if high(7) != 0 {
            return Err(DecodeError { word: 7 });
        }
        let exit = RawExit {
            reason: low(1),
            instruction_length: high(1),
            qualification: words[2],
            guest_linear_address: words[3],
            guest_physical_address: words[4],
            instruction_information: low(5),
            interruption_information: high(5),
            interruption_error_code: low(6),
            idt_vectoring_information: high(6),
            idt_vectoring_error_code: low(7),
        };
        Ok(Self { mask, exit })
    }

    /// Reads and decodes the header of the exit message in the UTCB.
    #[inline]
    pub fn read_from(source: &mut impl MessageWords) -> core::result::Result<Self, DecodeError> {
        let mut words = [0u64; EXIT_HEADER_WORDS];
        source.read(0, &mut words);
        Self::from_words(&words)
    }
}

/// The general-purpose registers of the exit message in the UTCB (meaningful if its mask has
/// `GPRS`).
#[inline]
pub fn read_gprs_from(source: &mut impl MessageWords) -> Gprs {
    let mut w = [0u64; GPRS_WORDS];
    source.read(EXIT_HEADER_WORDS + word::GPRS, &mut w);
    Gprs::from_words(w)
}

/// The first words of a reply that writes `gprs` (if any) and takes `action`: the same words
/// `Reply::to_words` gives for them (the tests check it).
pub fn gprs_reply_words(
    action: ResumeAction,
    gprs: Option<&Gprs>,
) -> [u64; REPLY_HEADER_WORDS + GPRS_WORDS] {
    let mask = if gprs.is_some() {
        StateMask::GPRS
    } else {
        StateMask::empty()
    };
    let mut words = [0; REPLY_HEADER_WORDS + GPRS_WORDS];
    words[..REPLY_HEADER_WORDS].copy_from_slice(&Reply::header(mask, action));
    if let Some(g) = gprs {
        words[REPLY_HEADER_WORDS..].copy_from_slice(&g.to_words());
    }
    words
}

/// Writes a reply that sets the general-purpose registers to `gprs` (if any) and takes
/// `action`, touching only its header, the registers and the words with reserved halves.
#[inline]
pub fn write_gprs_reply_to(
    destination: &mut impl MessageWords,
    action: ResumeAction,
    gprs: Option<&Gprs>,
) -> ExitReply {
    let words = gprs_reply_words(action, gprs);
    let n = if gprs.is_some() {
        words.len()
    } else {
        REPLY_HEADER_WORDS
    };
    destination.write(0, &words[..n]);
    for at in RESERVED_HIGH {
        destination.write(REPLY_HEADER_WORDS + at, &[0]);
    }
    ExitReply::Written
}

// ---- The root task's protocol with the VMM server ----

/// How the root task starts a VMM server and asks it to run guests.
///
/// The VMM is a boot module started by `roottask`'s `spawn` (slots 0 to 2 as every child:
/// its PD, its thread, its service endpoint with RECEIVE). Before its first request the root
/// task fills these slots:
///
/// | VMM slot | capability | rights |
/// |---:|---|---|
/// | [`RAM`] | guest memory: `2^RAM_ORDER` pages the VMM maps into its guests' EPTs | all |
/// | [`POOL`] | memory the VMM splits and donates to its EPT objects | all |
/// | [`IMAGE`] | a copy of the guest image (an ELF file) | READ, MAP |
/// | [`REPORT`] | the root task's endpoint for [`REPORT_LABEL`] calls | CALL |
/// | [`PAGER`] | nested guests: the L0 pager's service endpoint (`rt::nested::pager`) | CALL |
/// | [`SHADOW_POOL`] | nested guests: memory for shadow EPTs, `2^SHADOW_POOL_ORDER` pages | WRITE, DELEGATE |
///
/// A plain guest needs the first four; a nested guest ([`FLAG_NESTED`]: an L1 hypervisor whose
/// memory the L0 pager owns, `docs/nested.md`) needs [`IMAGE`], [`REPORT`], [`PAGER`] and
/// [`SHADOW_POOL`] (each nested guest takes a `2^NESTED_POOL_ORDER`-page piece of it). The root
/// task may replace [`PAGER`] between guests (a fresh pager for each L1).
///
/// A guest run: the root task calls the service endpoint with [`RUN`]; the VMM answers at once
/// ([`RUN_OK`] or [`RUN_ERROR`] with the status in word 0); when the guest has ended, the VMM
/// calls [`REPORT`] with [`REPORT_LABEL`] and the words below, and waits for any reply.
pub mod protocol {
    /// VMM slot: guest memory.
    pub const RAM: u64 = 3;
    /// VMM slot: memory for EPT pools.
    pub const POOL: u64 = 4;
    /// VMM slot: the guest image.
    pub const IMAGE: u64 = 5;
    /// VMM slot: the endpoint reports go to.
    pub const REPORT: u64 = 6;
    /// VMM slot: the L0 pager's service endpoint (nested guests).
    pub const PAGER: u64 = 7;
    /// VMM slot: memory for the shadow EPTs of nested guests.
    pub const SHADOW_POOL: u64 = 8;
    /// Size of [`SHADOW_POOL`]: 2^11 pages (8 MiB).
    pub const SHADOW_POOL_ORDER: u64 = 11;
    /// The piece of [`SHADOW_POOL`] each nested guest gets: 2^9 pages (2 MiB).
    pub const NESTED_POOL_ORDER: u64 = 9;
    /// Size of [`RAM`]: 2^12 pages (16 MiB).
    pub const RAM_ORDER: u64 = 12;
    /// Size of [`POOL`]: 2^9 pages (2 MiB).
    pub const POOL_ORDER: u64 = 9;
    /// Largest guest image: 2^9 pages (2 MiB).
    pub const IMAGE_MAX_ORDER: u64 = 9;

    /// Run a guest: words [image size in bytes, vCPU count, [`Mode`], flags | CPU count << 8].
    pub const RUN: u16 = 0x5601;
    pub const RUN_OK: u16 = 0x5602;
    pub const RUN_ERROR: u16 = 0x5603;
    /// A guest ended: words [guest number, [`Outcome`] code, detail, timer interrupts
    /// injected], and [`REPORT_WORDS`] extra words (indices below) in the UTCB.
    pub const REPORT_LABEL: u16 = 0x5604;

    /// Flag of RUN word 3: after the third timer interrupt of the last vCPU, move it to the
    /// next CPU (a nested guest: at the last vCPU's second query of CPUID 0x4000_0001).
    pub const FLAG_MIGRATE: u64 = 1 << 0;
    /// Flag of RUN word 3: the guest is an L1 hypervisor (`docs/nested.md`): its memory comes
    /// from the L0 pager in [`PAGER`], its L2 guests run on shadow EPTs, and the report carries
    /// [`NESTED_REPORT_WORDS`] extra words.
    pub const FLAG_NESTED: u64 = 1 << 1;
    /// Most vCPUs per guest.
    pub const MAX_VCPUS: u64 = 8;

    /// Extra report words.
    pub const REPORT_WORDS: usize = 13;
    /// Exits handled.
    pub const R_EXITS: usize = 0;
    /// EPT violations answered with a fresh page.
    pub const R_DEMAND_FAULTS: usize = 1;
    /// CPUID exits.
    pub const R_CPUID_EXITS: usize = 2;
    /// I/O exits.
    pub const R_IO_EXITS: usize = 3;
    /// MSR exits.
    pub const R_MSR_EXITS: usize = 4;
    /// The migrated vCPU's CPU before and after (`u64::MAX`: no migration).
    pub const R_MIGRATED_FROM: usize = 5;
    pub const R_MIGRATED_TO: usize = 6;
    /// Benchmark mode: the guest's medians (CPUID round trip, demand fault), emulated cycles.
    pub const R_GUEST_CPUID: usize = 7;
    pub const R_GUEST_EPT_FAULT: usize = 8;
    /// The VMM's share (message arrival to reply), medians over the CPUID exits and the
    /// demand faults.
    pub const R_VMM_CPUID: usize = 9;
    pub const R_VMM_EPT_FAULT: usize = 10;
    /// Guest RAM pages used.
    pub const R_PAGES: usize = 11;
    /// Of the VMM's share of a demand fault, the `EptMap` call (median).
    pub const R_VMM_EPT_MAP: usize = 12;

    /// A nested guest's report: the [`REPORT_WORDS`] above (the plain guest's meaning; the
    /// demand faults are those the L0 pager provided for L1 itself), then its first
    /// [`NESTED_RESULTS`] results (port 0xf5, `u64::MAX` for none), then for each of
    /// [`NESTED_MAX_VCPUS`] vCPUs [`NESTED_VCPU_WORDS`] words from [`nested_vcpu_word`]: the
    /// L2 EPT violations fixed in the vEPT, reflected to L1, passed to the L0 pager, the
    /// reflected EPT misconfigurations, the shadow faults fixed (port 0xf7), the L2 exits
    /// reflected to L1 (all reasons), the L1 VMX-instruction exits emulated, the L2 exits L0
    /// handled itself.
    pub const NESTED_RESULTS: usize = 8;
    pub const NESTED_MAX_VCPUS: usize = 4;
    pub const NESTED_VCPU_WORDS: usize = 8;
    pub const NESTED_REPORT_WORDS: usize =
        REPORT_WORDS + NESTED_RESULTS + NESTED_MAX_VCPUS * NESTED_VCPU_WORDS;
    /// Per-vCPU counters of a nested report.
    pub const N_FIXED: usize = 0;
    pub const N_REFLECTED: usize = 1;
    pub const N_PAGER: usize = 2;
    pub const N_MISCONFIGURATIONS: usize = 3;
    pub const N_SHADOW_FAULTS: usize = 4;
    pub const N_L2_EXITS_REFLECTED: usize = 5;
    pub const N_L1_VMX_EXITS: usize = 6;
    pub const N_L2_EXITS_L0: usize = 7;
    /// Index of result `i` of a nested report.
    pub const fn nested_result_word(i: usize) -> usize {
        REPORT_WORDS + i
    }
    /// Index of counter `counter` (`N_*`) of vCPU `vcpu` in a nested report.
    pub const fn nested_vcpu_word(vcpu: usize, counter: usize) -> usize {
        REPORT_WORDS + NESTED_RESULTS + vcpu * NESTED_VCPU_WORDS + counter
    }

    /// What the guest is asked to do (RUN word 2; the guest gets it in RSI bits 15:8).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u64)]
    pub enum Mode {
        /// Every check, then PASS or FAIL on the debug-exit port.
        Checks = 0,
        /// Triple-fault on purpose (a zero-limit IDT and INT3).
        TripleFault = 1,
        /// The exit benchmarks; results on the result port.
        Bench = 2,
        /// The VMM writes an invalid guest state on purpose (CR0.PG without CR0.PE): VM entry
        /// fails (exit reason 33 with bit 31) before the guest runs.
        InvalidState = 3,
    }

    impl Mode {
        pub const fn from_code(code: u64) -> Option<Self> {
            match code {
                0 => Some(Self::Checks),
                1 => Some(Self::TripleFault),
                2 => Some(Self::Bench),
                3 => Some(Self::InvalidState),
                _ => None,
            }
        }
    }

    /// How a guest ended (REPORT word 1; word 2 is the detail).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u64)]
    pub enum Outcome {
        /// Every vCPU wrote 0 to the debug-exit port.
        Pass = 0,
        /// A vCPU wrote a nonzero code (detail: vCPU << 32 | code).
        Fail = 1,
        /// A vCPU triple-faulted (detail: vCPU).
        TripleFault = 2,
        /// VM entry failed (detail: vCPU << 32 | exit reason with bit 31).
        EntryFailure = 3,
        /// An exit the VMM does not handle (detail: vCPU << 32 | basic exit reason), or an
        /// access outside guest memory (detail: the guest-physical address).
        Unhandled = 4,
        /// The VMM failed (detail: the status code).
        VmmError = 5,
        /// A vCPU halted with interrupts disabled (detail: vCPU).
        Halted = 6,
    }

    impl Outcome {
        pub const fn from_code(code: u64) -> Option<Self> {
            match code {
                0 => Some(Self::Pass),
                1 => Some(Self::Fail),
                2 => Some(Self::TripleFault),
                3 => Some(Self::EntryFailure),
                4 => Some(Self::Unhandled),
                5 => Some(Self::VmmError),
                6 => Some(Self::Halted),
                _ => None,
            }
        }
    }

    /// The guest's ports.
    pub mod port {
        /// The emulated 16550's registers: base (THR/RBR) to base + 7.
        pub const SERIAL: u16 = 0x3f8;
        /// Line status register.
        pub const SERIAL_LSR: u16 = SERIAL + 5;
        /// Debug exit: OUT of the vCPU's result, 0 = PASS, else the failed check.
        pub const DEBUG_EXIT: u16 = 0xf4;
        /// Benchmark results: each 32-bit OUT appends a value.
        pub const RESULT: u16 = 0xf5;
    }

    /// The guest-physical layout the VMM builds and the guest relies on.
    pub mod layout {
        /// GDT (null, 64-bit code 0x08, data 0x10, TSS 0x18), TSS at +0x100, per-vCPU blocks
        /// (GS base) of 64 bytes from +0x200: word 0 timer interrupts, word 1 #GP taken,
        /// word 2 #GP expected.
        pub const SYSTEM: u64 = 0x1000;
        pub const TSS: u64 = SYSTEM + 0x100;
        pub const PER_VCPU: u64 = SYSTEM + 0x200;
        pub const PER_VCPU_SIZE: u64 = 64;
        /// Identity page tables: PML4, PDPT, then four page directories of 2 MiB pages
        /// (0 to 4 GiB).
        pub const PML4: u64 = 0x2000;
        /// vCPU stacks: [`STACK_SIZE`] bytes each from here.
        pub const STACKS: u64 = 0x1_0000;
        pub const STACK_SIZE: u64 = 0x4000;
        /// The guest image is linked here.
        pub const IMAGE: u64 = 0x10_0000;
        /// Demand-paged memory: from [`IMAGE`] to 4 GiB, anything not in the image.
        pub const DEMAND_END: u64 = 1 << 32;
        /// Code segment selector.
        pub const CODE_SELECTOR: u16 = 0x08;
        pub const DATA_SELECTOR: u16 = 0x10;
        pub const TSS_SELECTOR: u16 = 0x18;
        /// The timer interrupt's vector.
        pub const TIMER_VECTOR: u8 = 0x20;
        /// Every u64 of a demand-paged page holds the page's guest-physical address XOR this.
        pub const PATTERN: u64 = 0x5a5a_5a5a_0000_0000;
        /// CPUID leaf with the hypervisor's signature: EBX, ECX, EDX = "capv", "isor", 0.
        pub const SIGNATURE_LEAF: u32 = 0x4000_0000;
        pub const SIGNATURE: [u32; 3] = [
            u32::from_le_bytes(*b"capv"),
            u32::from_le_bytes(*b"isor"),
            0,
        ];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcpu::message::GuestState;

    /// A deterministic stream of arbitrary words (xorshift64*).
    struct Words(u64);

    impl Words {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn exit_header_decodes_the_header_words_exit_message_encodes() {
        let mut w = Words(0x1234_5678_9abc_def1);
        for _ in 0..1000 {
            let message = ExitMessage {
                mask: StateMask::from_bits_truncate(w.next() as u32),
                exit: RawExit {
                    reason: w.next() as u32,
                    instruction_length: w.next() as u32,
                    qualification: w.next(),
                    guest_linear_address: w.next(),
                    guest_physical_address: w.next(),
                    instruction_information: w.next() as u32,
                    interruption_information: w.next() as u32,
                    interruption_error_code: w.next() as u32,
                    idt_vectoring_information: w.next() as u32,
                    idt_vectoring_error_code: w.next() as u32,
                },
                state: GuestState::default(),
            };
            let words = message.to_words();
            let header: &[u64; EXIT_HEADER_WORDS] = words[..EXIT_HEADER_WORDS].try_into().unwrap();
            let decoded = ExitHeader::from_words(header).unwrap();
            assert_eq!((decoded.mask, decoded.exit), (message.mask, message.exit));
        }
    }

    #[test]
    fn exit_header_refuses_what_exit_message_refuses() {
        let mut w = Words(0x0fed_cba9_8765_4321);
        for _ in 0..1000 {
            let mut words = [0u64; EXIT_MESSAGE_WORDS];
            for word in &mut words[..EXIT_HEADER_WORDS] {
                *word = w.next()
                    & if w.next() & 1 == 0 {
                        0xffff_ffff
                    } else {
                        u64::MAX
                    };
            }
            let header: &[u64; EXIT_HEADER_WORDS] = words[..EXIT_HEADER_WORDS].try_into().unwrap();
            assert_eq!(
                ExitHeader::from_words(header).map(|h| (h.mask, h.exit)),
                ExitMessage::from_words(&words).map(|m| (m.mask, m.exit))
            );
        }
    }

    #[test]
    fn gprs_reply_words_are_the_first_words_of_the_reply() {
        let mut w = Words(0x5555_aaaa_3333_cccc);
        for action in [
            ResumeAction::Resume,
            ResumeAction::Advance,
            ResumeAction::ResumeWithEptBinding(42),
            ResumeAction::Stop,
        ] {
            let state = GuestState {
                gprs: read_gprs_from(&mut Arbitrary(&mut w)),
                ..GuestState::default()
            };
            let reply = Reply::with_state(action, StateMask::GPRS, state).to_words();
            let ours = gprs_reply_words(action, Some(&state.gprs));
            assert_eq!(ours[..], reply[..ours.len()]);
            let empty = Reply::new(action).to_words();
            assert_eq!(
                gprs_reply_words(action, None)[..REPLY_HEADER_WORDS],
                empty[..2]
            );
        }
    }

    /// A message-word source of arbitrary words.
    struct Arbitrary<'a>(&'a mut Words);

    impl MessageWords for Arbitrary<'_> {
        fn read(&mut self, _first: usize, out: &mut [u64]) {
            for w in out {
                *w = self.0.next();
            }
        }

        fn write(&mut self, _first: usize, _words: &[u64]) {}
    }
}
