//! One guest: its construction (EPT, protection domain, vCPUs, page tables, GDT, initial 64-bit
//! state), its exit loop and its teardown.
//!
//! The EPT object's pool is a piece of `protocol::POOL` (more pieces are donated when a map
//! runs out); the vCPUs belong to a protection domain of the guest's own, bound to the EPT and
//! to the VMM's exit endpoint, with badge `guest number << 8 | vCPU index`.
//!
//! Guest-physical layout (`rt::vmx::protocol::layout`): a system page at 0x1000 (GDT, TSS,
//! per-vCPU blocks the GS bases point to), identity page tables for 0 to 4 GiB with 2 MiB pages
//! at 0x2000, the vCPU stacks from 0x10000, the image at its link address (1 MiB). These are
//! mapped before the first entry; the image is loaded page by page as the guest touches it, and
//! every other page from 1 MiB to 4 GiB is demand-paged: a fresh page whose every u64 holds the
//! page's guest-physical address XOR `PATTERN`.
//!
//! Every exit is decoded once, with `vcpu::exit::decode`, and handled by kind. A triple fault, a
//! failed VM entry, an unhandled exit or a bad access ends the guest: the exiting vCPU is told to
//! stop, every other vCPU is recalled and stopped at its next exit, and the outcome goes to the
//! root task. Nothing else is affected.

use crate::devices::{self, SerialLine, msr};
use crate::memory::{FastUtcb, Image, Ram};
use crate::slot;
use abi::elf::Executable;
use abi::{ALL_EXITS, Status, ept_map_flags, vcpu_config};
use alloc::vec::Vec;
use core::fmt;
use rt::layout::{PAGE_SIZE, SELF_PD};
use rt::vmx::protocol::{self, Mode, Outcome, layout, port};
use rt::vmx::{self, ExitCall, ExitHeader, ExitReply};
use rt::{Message, sys};
use vcpu::controls::{EntryControls, ProcessorBasedControls};
use vcpu::exit::{EventInfo, EventType, ExitReason, IoDirection, RawExit, VmExit, decode, vector};
use vcpu::message::{
    DecodeError, DescriptorTable, ExitMessage, GuestState, Reply, ResumeAction, Segment, StateMask,
};

/// Priority of every vCPU: below the VMM's (`roottask`'s `spawn::PRIORITY`, 100), so an exit
/// from another CPU preempts a vCPU running on the VMM's CPU.
const VCPU_PRIORITY: u8 = 90;
/// EPT entries: read, write, execute; 4 KiB; write-back; guest PAT honoured.
const EPT_FLAGS: u64 = ept_map_flags(0b111, abi::ORDER_4K, 6, false);
/// Pool pieces: 2^5 pages (128 KiB) each, split from `protocol::POOL`.
const POOL_PIECE_ORDER: u64 = 5;

/// CR0 (SDM Vol. 3A §2.5): PE, MP, ET, NE, PG. NE, PE and PG are also what IA32_VMX_CR0_FIXED0
/// requires of a guest without unrestricted guest.
const CR0: u64 = CR0_PE | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 31);
const CR0_PE: u64 = 1 << 0;
/// CR4: PAE, OSFXSR, OSXMMEXCPT (so the guest may use SSE).
const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// CR4.VMXE: IA32_VMX_CR4_FIXED0 requires it of every guest (SDM Vol. 3C §27.3.1.1); the VMM
/// owns it through the CR4 guest/host mask and the guest reads 0 (the read shadow).
const CR4_VMXE: u64 = 1 << 13;
/// RFLAGS: bit 1 is always 1; IF is bit 9.
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;
/// IA32_PAT at power-up (SDM Vol. 3A §13.12.4).
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// GDT entries: 64-bit code (L, P, S, execute/read), data (G, D/B, P, S, read/write), and the
/// access rights the VMCS takes for them (SDM Vol. 3C §25.4.1).
const GDT_CODE64: u64 = 0x00af_9a00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9200_0000_ffff;
const AR_CODE64: u16 = 0xa09b;
const AR_DATA: u16 = 0xc093;
/// TR: a busy 64-bit TSS (type 11, P), 0x68 bytes.
const AR_TSS_BUSY: u16 = 0x8b;
const TSS_LIMIT: u32 = 0x67;
const GDT_LIMIT: u32 = 5 * 8 - 1;

/// The state groups each exit kind carries (`VcpuSetMask`); the first entry is the default.
const EXIT_MASKS: [(u64, StateMask); 7] = [
    (
        ALL_EXITS,
        StateMask::EXIT_INFO
            .union(StateMask::GPRS)
            .union(StateMask::RIP_RSP_RFLAGS),
    ),
    (ExitReason::Cpuid as u64, StateMask::GPRS),
    (ExitReason::Hlt as u64, StateMask::RIP_RSP_RFLAGS),
    (
        ExitReason::IoInstruction as u64,
        StateMask::EXIT_INFO.union(StateMask::GPRS),
    ),
    (
        ExitReason::Rdmsr as u64,
        StateMask::GPRS
            .union(StateMask::EFER_PAT)
            .union(StateMask::TSC),
    ),
    (
        ExitReason::Wrmsr as u64,
        StateMask::GPRS
            .union(StateMask::EFER_PAT)
            .union(StateMask::TSC),
    ),
    (ExitReason::EptViolation as u64, StateMask::EXIT_INFO),
];

/// Groups the initial state writes.
const INITIAL_STATE: StateMask = StateMask::GPRS
    .union(StateMask::RIP_RSP_RFLAGS)
    .union(StateMask::CR)
    .union(StateMask::DR7)
    .union(StateMask::SEGMENTS)
    .union(StateMask::DESCRIPTOR_TABLES)
    .union(StateMask::EFER_PAT)
    .union(StateMask::SYSENTER)
    .union(StateMask::SYSCALL_MSRS)
    .union(StateMask::INTERRUPTIBILITY_ACTIVITY)
    .union(StateMask::TSC)
    .union(StateMask::CONTROLS);

/// A RUN request.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub image_size: u64,
    pub vcpus: u64,
    /// The plain guest's mode (`Mode::Checks` for a nested guest).
    pub mode: Mode,
    /// The mode as requested: a nested guest's (an L1 hypervisor's own modes, 0 to 255).
    pub mode_code: u64,
    pub migrate: bool,
    /// An L1 hypervisor (`protocol::FLAG_NESTED`).
    pub nested: bool,
    pub cpus: u64,
}

impl Request {
    pub fn decode(msg: &Message) -> Result<Self, Status> {
        let [image_size, vcpus, mode_code, flags] = msg.words;
        let nested = flags & protocol::FLAG_NESTED != 0;
        let (mode, max_vcpus) = if nested {
            if mode_code > 0xff {
                return Err(Status::InvalidArgument);
            }
            (Mode::Checks, protocol::NESTED_MAX_VCPUS as u64)
        } else {
            let mode = Mode::from_code(mode_code).ok_or(Status::InvalidArgument)?;
            (mode, protocol::MAX_VCPUS)
        };
        let cpus = (flags >> 8) & 0xff;
        let known = protocol::FLAG_MIGRATE | protocol::FLAG_NESTED | (0xff << 8);
        if vcpus == 0 || vcpus > max_vcpus || cpus == 0 || image_size == 0 || flags & !known != 0 {
            return Err(Status::InvalidArgument);
        }
        Ok(Self {
            image_size,
            vcpus,
            mode,
            mode_code,
            migrate: flags & protocol::FLAG_MIGRATE != 0,
            nested,
            cpus,
        })
    }
}

/// What the VMM tells the root task about a guest that ended.
#[derive(Clone, Debug)]
pub struct Report {
    pub words: [u64; 4],
    /// `protocol::REPORT_WORDS` words (`NESTED_REPORT_WORDS` for a nested guest).
    pub extra: Vec<u64>,
}

#[derive(Debug)]
struct Vcpu {
    selector: u64,
    index: u32,
    cpu: u64,
    /// Neither stopped nor failed to start: it will exit again.
    running: bool,
    interrupts: u64,
    line: SerialLine,
}

/// What a handled exit counts toward in the VMM-share statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sample {
    None,
    Cpuid,
    DemandFault,
}

/// How the console lines of a vCPU begin.
struct Prefix {
    guest: u64,
    vcpu: Option<u32>,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vcpu {
            Some(v) => write!(f, "[guest{}.{}] ", self.guest, v),
            None => write!(f, "[guest{}] ", self.guest),
        }
    }
}

/// Most samples kept per statistic.
const MAX_SAMPLES: usize = 4096;

pub struct Guest {
    number: u64,
    request: Request,
    image: Image,
    executable: Executable,
    /// Guest-physical pages of the image: [start, end).
    image_pages: (u64, u64),
    vcpus: Vec<Vcpu>,
    ept_created: bool,
    pd_created: bool,
    /// Set once the guest is ending: how and the detail.
    outcome: Option<(Outcome, u64)>,
    stats: [u64; protocol::REPORT_WORDS],
    results: Vec<u64>,
    cpuid_samples: Vec<u64>,
    fault_samples: Vec<u64>,
    /// The `EptMap` calls of demand faults.
    map_samples: Vec<u64>,
}

impl Guest {
    /// Builds guest `number`: checks the image, creates the EPT (with a pool piece), maps the
    /// system pages, creates the vCPUs and writes their initial state. Nothing runs yet.
    pub fn start(
        number: u64,
        request: Request,
        image: Image,
        ram: &mut Ram,
        pool: &mut u64,
    ) -> Result<Self, Status> {
        let file = image
            .bytes()
            .get(..request.image_size as usize)
            .ok_or(Status::OutOfRange)?;
        let executable = abi::elf::parse(file).map_err(|e| {
            log::error!("guest image: {e}");
            Status::InvalidArgument
        })?;
        let image_pages = image_pages(&executable)?;
        let mut guest = Self {
            number,
            request,
            image,
            executable,
            image_pages,
            vcpus: Vec::new(),
            ept_created: false,
            pd_created: false,
            outcome: None,
            stats: [0; protocol::REPORT_WORDS],
            results: Vec::new(),
            cpuid_samples: Vec::new(),
            fault_samples: Vec::new(),
            map_samples: Vec::new(),
        };
        guest.stats[protocol::R_MIGRATED_FROM] = u64::MAX;
        guest.stats[protocol::R_MIGRATED_TO] = u64::MAX;
        match guest.build(ram, pool) {
            Ok(()) => Ok(guest),
            Err(e) => {
                let _ = guest.dismantle(ram);
                Err(e)
            }
        }
    }

    fn build(&mut self, ram: &mut Ram, pool: &mut u64) -> Result<(), Status> {
        take_pool_piece(pool)?;
        vmx::ept_create(SELF_PD, slot::EPT, slot::POOL_PIECE)?;
        self.ept_created = true;
        self.map_system_pages(ram, pool)?;
        sys::pd_create(SELF_PD, slot::GUEST_PD)?;
        self.pd_created = true;
        for index in 0..self.request.vcpus as u32 {
            self.create_vcpu(index)?;
        }
        Ok(())
    }

    /// The GDT page, the page tables and the stacks, zeroed and filled in, then mapped.
    fn map_system_pages(&mut self, ram: &mut Ram, pool: &mut u64) -> Result<(), Status> {
        let system = self.new_page(ram, pool, layout::SYSTEM)?;
        for (i, entry) in gdt_words().into_iter().enumerate() {
            ram.write_word(system, i, entry);
        }
        for (gpa, table) in identity_tables() {
            let page = self.new_page(ram, pool, gpa)?;
            for (i, entry) in table.into_iter().enumerate().filter(|&(_, e)| e != 0) {
                ram.write_word(page, i, entry);
            }
        }
        let stack_pages = self.request.vcpus * layout::STACK_SIZE / PAGE_SIZE;
        for i in 0..stack_pages {
            self.new_page(ram, pool, layout::STACKS + i * PAGE_SIZE)?;
        }
        Ok(())
    }

    /// A zeroed page of RAM mapped at `gpa`.
    fn new_page(&mut self, ram: &mut Ram, pool: &mut u64, gpa: u64) -> Result<u64, Status> {
        let page = ram.alloc().ok_or(Status::OutOfMemory)?;
        ram.fill(page, 0);
        map_page(ram, pool, page, gpa)?;
        Ok(page)
    }

    fn create_vcpu(&mut self, index: u32) -> Result<(), Status> {
        let selector = slot::FIRST_VCPU + u64::from(index);
        let cpu = u64::from(index) % self.request.cpus;
        let badge = ((self.number as u32) << 8) | index;
        vmx::vcpu_create(
            slot::GUEST_PD,
            selector,
            slot::EPT,
            slot::EXIT_ENDPOINT,
            vcpu_config(VCPU_PRIORITY, cpu as u8, badge),
        )?;
        self.vcpus.push(Vcpu {
            selector,
            index,
            cpu,
            running: false,
            interrupts: 0,
            line: SerialLine::new(),
        });
        for (reason, mask) in EXIT_MASKS {
            vmx::vcpu_set_mask(selector, reason, mask)?;
        }
        let current = vmx::vcpu_read_state(selector, StateMask::CONTROLS)?;
        vmx::vcpu_write_state(selector, &self.initial_state(index, &current))
    }

    /// The 64-bit state a vCPU starts in ([`boot_state`]): RSI the vCPU count | mode << 8.
    fn initial_state(&self, index: u32, current: &ExitMessage) -> Reply {
        let cr0 = match self.request.mode {
            // Paging without protection: VM entry refuses it (SDM Vol. 3C §27.3.1.1).
            Mode::InvalidState => CR0 & !CR0_PE,
            _ => CR0,
        };
        let rsi = self.request.vcpus | ((self.request.mode as u64) << 8);
        boot_state(index, rsi, self.executable.entry, cr0, current)
    }

    fn prefix(&self, index: u32) -> Prefix {
        Prefix {
            guest: self.number,
            vcpu: (self.request.vcpus > 1).then_some(index),
        }
    }

    /// Runs the guest until it ends: starts every vCPU, then answers exits.
    pub fn run(&mut self, ram: &mut Ram, pool: &mut u64) -> Report {
        for i in 0..self.vcpus.len() {
            match vmx::vcpu_run(self.vcpus[i].selector) {
                Ok(()) => self.vcpus[i].running = true,
                Err(e) => {
                    log::error!("guest{}: VcpuRun of vcpu{i}: {e:?}", self.number);
                    self.set_outcome(Outcome::VmmError, e.code());
                    break;
                }
            }
        }
        if self.outcome.is_some() {
            self.recall_running();
        }
        if self.vcpus.iter().any(|v| v.running) {
            self.exit_loop(ram, pool);
        }
        for i in 0..self.vcpus.len() {
            let prefix = self.prefix(self.vcpus[i].index);
            self.vcpus[i].line.flush(&prefix);
        }
        self.report(ram)
    }

    fn exit_loop(&mut self, ram: &mut Ram, pool: &mut u64) {
        let mut call = match vmx::exit_recv(slot::EXIT_ENDPOINT) {
            Ok(call) => call,
            Err(e) => {
                log::error!("guest{}: receiving exits: {e:?}", self.number);
                self.set_outcome(Outcome::VmmError, e.code());
                return;
            }
        };
        loop {
            let start = rt::rdtsc();
            self.stats[protocol::R_EXITS] += 1;
            let (reply, sample) = self.handle(&call, ram, pool);
            if !self.vcpus.iter().any(|v| v.running) {
                if let Err(e) = vmx::exit_reply(reply) {
                    log::error!("guest{}: last reply refused: {e:?}", self.number);
                }
                return;
            }
            let end = rt::rdtsc();
            self.sample(sample, end.wrapping_sub(start));
            call = match vmx::exit_reply_recv(slot::EXIT_ENDPOINT, reply) {
                Ok(call) => call,
                Err(e) => {
                    // The kernel refused the reply (the vCPU still waits for one) or the
                    // endpoint failed: end the guest, stopping the waiting vCPU if we can.
                    log::error!("guest{}: reply refused: {e:?}", self.number);
                    self.set_outcome(Outcome::VmmError, e.code());
                    self.recall_running();
                    let stop = answer(&Reply::new(ResumeAction::Stop));
                    if let Some(v) = self.vcpu_of(&call) {
                        self.vcpus[v].running = false;
                    }
                    if !self.vcpus.iter().any(|v| v.running) {
                        let _ = vmx::exit_reply(stop);
                        return;
                    }
                    match vmx::exit_reply_recv(slot::EXIT_ENDPOINT, stop) {
                        Ok(call) => call,
                        Err(e) => {
                            log::error!("guest{}: stop refused: {e:?}", self.number);
                            return;
                        }
                    }
                }
            };
        }
    }

    fn sample(&mut self, sample: Sample, cycles: u64) {
        let samples = match sample {
            Sample::None => return,
            Sample::Cpuid => &mut self.cpuid_samples,
            Sample::DemandFault => &mut self.fault_samples,
        };
        if samples.len() < MAX_SAMPLES {
            samples.push(cycles);
        }
    }

    /// The vCPU (its position in `vcpus`) an exit call comes from, if it is this guest's.
    fn vcpu_of(&self, call: &ExitCall) -> Option<usize> {
        let index = (call.badge & 0xff) as usize;
        (call.badge >> 8 == self.number & 0xff_ffff && index < self.vcpus.len()).then_some(index)
    }

    /// Answers one exit.
    #[inline]
    fn handle(&mut self, call: &ExitCall, ram: &mut Ram, pool: &mut u64) -> (ExitReply, Sample) {
        let Some(v) = self.vcpu_of(call) else {
            log::warn!(
                "guest{}: exit with unknown badge {:#x}",
                self.number,
                call.badge
            );
            return (answer(&Reply::new(ResumeAction::Stop)), Sample::None);
        };
        if self.outcome.is_some() || !self.vcpus[v].running {
            // The guest is ending: every vCPU stops at its next exit (a recall or any other).
            return (self.stop(v), Sample::None);
        }
        if call.is_recall() {
            return (ExitReply::Resume, Sample::None);
        }
        let Some(reason) = call.exit_reason() else {
            log::error!("guest{}: call with label {:#x}", self.number, call.label());
            return (
                self.end(v, Outcome::Unhandled, u64::from(call.label())),
                Sample::None,
            );
        };
        let header = match ExitHeader::read_from(&mut FastUtcb) {
            Ok(header) => header,
            Err(e) => return self.undecodable(v, e),
        };
        let exit = decode(&header.exit);
        // The frequent exits need the header and at most the general-purpose registers.
        match exit {
            VmExit::Cpuid => return (self.cpuid(v), Sample::Cpuid),
            VmExit::EptViolation { gpa, .. } => {
                return self.ept_violation(v, gpa, &header.exit, ram, pool);
            }
            VmExit::IoInstruction {
                port,
                size,
                direction,
                string: None,
                ..
            } => return (self.io(v, port, size, direction), Sample::None),
            _ => {}
        }
        let msg = match vmx::read_exit_message_from(&mut FastUtcb) {
            Ok(msg) => msg,
            Err(e) => return self.undecodable(v, e),
        };
        match exit {
            VmExit::Hlt => (self.hlt(v, &msg), Sample::None),
            VmExit::Rdmsr => (self.rdmsr(v, &msg), Sample::None),
            VmExit::Wrmsr => (self.wrmsr(v, &msg), Sample::None),
            VmExit::ExceptionOrNmi {
                vector: vector @ (vector::DB | vector::AC),
                kind: EventType::HardwareException,
                error_code,
                ..
            } => {
                // The kernel intercepts #DB and #AC for its own safety; they are the guest's.
                let event = EventInfo::hardware_exception(vector, error_code);
                (
                    answer(&Reply::new(ResumeAction::Resume).inject(event, 0)),
                    Sample::None,
                )
            }
            VmExit::TripleFault => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: triple fault at rip {:#x}",
                    self.number,
                    call.words[3]
                );
                (self.end(v, Outcome::TripleFault, v as u64), Sample::None)
            }
            VmExit::InvalidGuestState { .. }
            | VmExit::MsrLoadFailure { .. }
            | VmExit::MachineCheckDuringEntry => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: VM entry failed: {exit:?} (exit reason {:#x})",
                    self.number,
                    msg.exit.reason
                );
                let detail = ((v as u64) << 32) | u64::from(msg.exit.reason);
                (self.end(v, Outcome::EntryFailure, detail), Sample::None)
            }
            other => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: unhandled exit {reason}: {other:?} at rip {:#x}",
                    self.number,
                    call.words[3]
                );
                let detail = ((v as u64) << 32) | u64::from(reason);
                (self.end(v, Outcome::Unhandled, detail), Sample::None)
            }
        }
    }

    /// An exit message that does not decode: the kernel and the VMM disagree; the guest ends.
    fn undecodable(&mut self, v: usize, e: DecodeError) -> (ExitReply, Sample) {
        log::error!(
            "guest{}: undecodable exit message (word {})",
            self.number,
            e.word
        );
        let reply = self.end(v, Outcome::VmmError, Status::Inconsistent.code());
        (reply, Sample::None)
    }

    fn set_outcome(&mut self, outcome: Outcome, detail: u64) {
        if self.outcome.is_none() {
            self.outcome = Some((outcome, detail));
        }
    }

    /// Recalls every running vCPU (each then stops at its next exit).
    fn recall_running(&self) {
        for vcpu in self.vcpus.iter().filter(|v| v.running) {
            if let Err(e) = vmx::vcpu_recall(vcpu.selector) {
                log::warn!(
                    "guest{}: VcpuRecall of vcpu{}: {e:?}",
                    self.number,
                    vcpu.index
                );
            }
        }
    }

    /// Stops vCPU `v` (the reply to its exit).
    fn stop(&mut self, v: usize) -> ExitReply {
        self.vcpus[v].running = false;
        answer(&Reply::new(ResumeAction::Stop))
    }

    /// Ends the guest with `outcome`: stops vCPU `v` and recalls the others.
    fn end(&mut self, v: usize, outcome: Outcome, detail: u64) -> ExitReply {
        self.set_outcome(outcome, detail);
        let reply = self.stop(v);
        self.recall_running();
        reply
    }

    // ---- Exits ----

    /// CPUID: the filtered values in RAX, RBX, RCX, RDX; then past the instruction.
    #[inline]
    fn cpuid(&mut self, v: usize) -> ExitReply {
        self.stats[protocol::R_CPUID_EXITS] += 1;
        let mut g = vmx::read_gprs_from(&mut FastUtcb);
        let [a, b, c, d] = devices::cpuid(g.rax as u32, g.rcx as u32, v as u32);
        (g.rax, g.rbx, g.rcx, g.rdx) = (a.into(), b.into(), c.into(), d.into());
        vmx::write_gprs_reply_to(&mut FastUtcb, ResumeAction::Advance, Some(&g))
    }

    /// An EPT violation: a fresh page for the guest-physical page (the image's bytes inside the
    /// image, the pattern elsewhere), mapped, and the interrupted event delivered again.
    #[inline]
    fn ept_violation(
        &mut self,
        v: usize,
        gpa: u64,
        exit: &RawExit,
        ram: &mut Ram,
        pool: &mut u64,
    ) -> (ExitReply, Sample) {
        let page_gpa = gpa & !(PAGE_SIZE - 1);
        if !(layout::IMAGE..layout::DEMAND_END).contains(&page_gpa) {
            rt::println!(
                "vmm: guest{} vcpu{v}: access to {gpa:#x} outside guest memory",
                self.number
            );
            return (self.end(v, Outcome::Unhandled, gpa), Sample::None);
        }
        let Some(page) = ram.alloc() else {
            rt::println!("vmm: guest{}: out of guest memory", self.number);
            return (
                self.end(v, Outcome::VmmError, Status::OutOfMemory.code()),
                Sample::None,
            );
        };
        let (image_start, image_end) = self.image_pages;
        let image_page = (image_start..image_end).contains(&page_gpa);
        if image_page {
            self.load_image_page(ram, page, page_gpa);
        } else {
            ram.fill(page, page_gpa ^ layout::PATTERN);
        }
        let start = rt::rdtsc();
        let mapped = map_page(ram, pool, page, page_gpa);
        let cycles = rt::rdtsc().wrapping_sub(start);
        match mapped {
            Ok(()) => {
                self.stats[protocol::R_DEMAND_FAULTS] += 1;
                if !image_page && self.map_samples.len() < MAX_SAMPLES {
                    self.map_samples.push(cycles);
                }
            }
            // Another vCPU touched the page first.
            Err(Status::AlreadyMapped) => ram.release(page),
            Err(e) => {
                rt::println!(
                    "vmm: guest{} vcpu{v}: EptMap at {page_gpa:#x}: {e:?}",
                    self.number
                );
                return (self.end(v, Outcome::VmmError, e.code()), Sample::None);
            }
        }
        let sample = if image_page {
            Sample::None
        } else {
            Sample::DemandFault
        };
        match exit.idt_vectoring() {
            Some(event) => {
                let length = if event.kind.uses_instruction_length() {
                    exit.instruction_length
                } else {
                    0
                };
                let reply = Reply::new(ResumeAction::Resume).inject(event, length);
                (answer(&reply), sample)
            }
            None => (ExitReply::Resume, sample),
        }
    }

    /// Zeroes `page` and copies into it the image bytes of the guest-physical page `page_gpa`.
    fn load_image_page(&self, ram: &Ram, page: u64, page_gpa: u64) {
        ram.fill(page, 0);
        let file = self.image.bytes();
        for segment in self.executable.segments() {
            let bytes = segment.bytes(file);
            let lo = page_gpa.max(segment.vaddr);
            let hi = (page_gpa + PAGE_SIZE).min(segment.vaddr + bytes.len() as u64);
            if lo < hi {
                let from = (lo - segment.vaddr) as usize;
                let to = (hi - segment.vaddr) as usize;
                ram.write_bytes(page, (lo - page_gpa) as usize, &bytes[from..to]);
            }
        }
    }

    /// IN and OUT: the 16550 at 0x3f8, the debug-exit and result ports; other ports read all
    /// ones and ignore writes.
    fn io(&mut self, v: usize, port: u16, size: u8, direction: IoDirection) -> ExitReply {
        self.stats[protocol::R_IO_EXITS] += 1;
        let mask = match size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        };
        let mut g = vmx::read_gprs_from(&mut FastUtcb);
        if direction == IoDirection::In {
            let value = u64::from(devices::port_in(port, size));
            // A 32-bit IN zero-extends into RAX; 8- and 16-bit INs keep the rest.
            g.rax = if size == 4 {
                value
            } else {
                (g.rax & !mask) | (value & mask)
            };
            return vmx::write_gprs_reply_to(&mut FastUtcb, ResumeAction::Advance, Some(&g));
        }
        let value = g.rax & mask;
        match port {
            port::SERIAL => {
                let prefix = self.prefix(self.vcpus[v].index);
                self.vcpus[v].line.put(value as u8, &prefix);
            }
            port::DEBUG_EXIT => {
                let prefix = self.prefix(self.vcpus[v].index);
                self.vcpus[v].line.flush(&prefix);
                if value != 0 {
                    rt::println!(
                        "vmm: guest{} vcpu{v}: the guest reports failure {value:#x}",
                        self.number
                    );
                    return self.end(v, Outcome::Fail, ((v as u64) << 32) | value);
                }
                return self.stop(v);
            }
            port::RESULT if self.results.len() < 16 => self.results.push(value),
            _ => {}
        }
        vmx::write_gprs_reply_to(&mut FastUtcb, ResumeAction::Advance, None)
    }

    /// HLT: with interrupts on, the virtual timer fires: past the HLT, vector 0x20 injected. With
    /// interrupts off the vCPU would sleep for good: the guest ends.
    fn hlt(&mut self, v: usize, msg: &ExitMessage) -> ExitReply {
        if msg.state.rflags & RFLAGS_IF == 0 {
            rt::println!(
                "vmm: guest{} vcpu{v}: HLT with interrupts disabled at rip {:#x}",
                self.number,
                msg.state.rip
            );
            return self.end(v, Outcome::Halted, v as u64);
        }
        self.vcpus[v].interrupts += 1;
        if self.request.migrate
            && v + 1 == self.vcpus.len()
            && self.vcpus[v].interrupts == 3
            && self.request.cpus > 1
        {
            self.migrate(v);
        }
        let timer = EventInfo::external_interrupt(layout::TIMER_VECTOR);
        answer(&Reply::new(ResumeAction::Advance).inject(timer, 0))
    }

    /// Moves vCPU `v` to the next CPU (while it waits for the reply to its exit).
    fn migrate(&mut self, v: usize) {
        let vcpu = &mut self.vcpus[v];
        let from = vcpu.cpu;
        let to = (from + 1) % self.request.cpus;
        match vmx::vcpu_set_affinity(vcpu.selector, to) {
            Ok(()) => {
                vcpu.cpu = to;
                self.stats[protocol::R_MIGRATED_FROM] = from;
                self.stats[protocol::R_MIGRATED_TO] = to;
                rt::println!(
                    "vmm: guest{} vcpu{v}: moved from cpu {from} to cpu {to} after {} timer interrupts",
                    self.number,
                    vcpu.interrupts
                );
            }
            Err(e) => rt::println!(
                "vmm: guest{} vcpu{v}: VcpuSetAffinity to cpu {to}: {e:?}",
                self.number
            ),
        }
    }

    /// The #GP(0) a refused MSR access raises (RIP stays at the instruction).
    fn general_protection() -> ExitReply {
        let gp = EventInfo::hardware_exception(vector::GP, Some(0));
        answer(&Reply::new(ResumeAction::Resume).inject(gp, 0))
    }

    fn rdmsr(&mut self, v: usize, msg: &ExitMessage) -> ExitReply {
        self.stats[protocol::R_MSR_EXITS] += 1;
        let mut state = msg.state;
        let value = match state.gprs.rcx as u32 {
            msr::IA32_EFER => state.efer,
            msr::IA32_PAT => state.pat,
            msr::IA32_TIME_STAMP_COUNTER => rt::rdtsc().wrapping_add(state.tsc_offset),
            msr::IA32_APIC_BASE => devices::apic_base(v as u32),
            // No MTRRs: no variable ranges, no fixed ranges, no write combining.
            msr::IA32_MTRRCAP => 0,
            _ => return Self::general_protection(),
        };
        state.gprs.rax = value & 0xffff_ffff;
        state.gprs.rdx = value >> 32;
        answer(&Reply::with_state(
            ResumeAction::Advance,
            StateMask::GPRS,
            state,
        ))
    }

    fn wrmsr(&mut self, _v: usize, msg: &ExitMessage) -> ExitReply {
        self.stats[protocol::R_MSR_EXITS] += 1;
        let mut state = msg.state;
        let value = (state.gprs.rdx << 32) | (state.gprs.rax & 0xffff_ffff);
        let mask = match state.gprs.rcx as u32 {
            msr::IA32_EFER if devices::efer_write_allowed(state.efer, value) => {
                state.efer = value;
                StateMask::EFER_PAT
            }
            msr::IA32_PAT if devices::pat_valid(value) => {
                state.pat = value;
                StateMask::EFER_PAT
            }
            msr::IA32_TIME_STAMP_COUNTER => {
                state.tsc_offset = value.wrapping_sub(rt::rdtsc());
                StateMask::TSC
            }
            _ => return Self::general_protection(),
        };
        answer(&Reply::with_state(ResumeAction::Advance, mask, state))
    }

    // ---- End ----

    fn report(&mut self, ram: &Ram) -> Report {
        let (outcome, detail) = self.outcome.unwrap_or((Outcome::Pass, 0));
        let interrupts = self.vcpus.iter().map(|v| v.interrupts).sum();
        let mut extra = self.stats;
        extra[protocol::R_GUEST_CPUID] = self.results.first().copied().unwrap_or(u64::MAX);
        extra[protocol::R_GUEST_EPT_FAULT] = self.results.get(1).copied().unwrap_or(u64::MAX);
        extra[protocol::R_VMM_CPUID] = median(&mut self.cpuid_samples);
        extra[protocol::R_VMM_EPT_FAULT] = median(&mut self.fault_samples);
        extra[protocol::R_VMM_EPT_MAP] = median(&mut self.map_samples);
        extra[protocol::R_PAGES] = ram.used();
        Report {
            words: [self.number, outcome as u64, detail, interrupts],
            extra: extra.to_vec(),
        }
    }

    /// Deletes the vCPUs and the EPT and takes the guest's memory back; a failure there becomes
    /// the outcome if the guest had none worse.
    pub fn teardown(mut self, ram: &mut Ram, mut report: Report) -> Report {
        if let Err(e) = self.dismantle(ram)
            && report.words[1] == Outcome::Pass as u64
        {
            report.words[1] = Outcome::VmmError as u64;
            report.words[2] = e.code();
        }
        report
    }

    fn dismantle(&mut self, ram: &mut Ram) -> Result<(), Status> {
        let mut result = Ok(());
        for vcpu in self.vcpus.drain(..) {
            if let Err(e) = sys::cap_delete(vcpu.selector) {
                log::error!("CapDelete of vcpu{}: {e:?}", vcpu.index);
                result = Err(e);
            }
        }
        if let Err(e) = ram.reclaim() {
            log::error!("taking guest memory back: {e:?}");
            result = Err(e);
        }
        if self.pd_created {
            self.pd_created = false;
            if let Err(e) = sys::cap_delete(slot::GUEST_PD) {
                log::error!("CapDelete of the guest's PD: {e:?}");
                result = Err(e);
            }
        }
        if self.ept_created {
            self.ept_created = false;
            if let Err(e) = sys::cap_delete(slot::EPT) {
                log::error!("CapDelete of the EPT: {e:?}");
                result = Err(e);
            }
        }
        result
    }
}

/// The 64-bit state a vCPU of a guest laid out as `rt::vmx::protocol::layout` says starts in:
/// long mode with paging on the identity tables at `layout::PML4`, flat segments from the
/// GDT at `layout::SYSTEM`, a busy TSS in TR, interrupts off, RIP at `entry`, RSP at the top of
/// its stack, RDI its index, RSI `rsi`, CR0 `cr0`, CR4.VMXE owned by the VMM and hidden (read
/// shadow), HLT exiting and TSC offsetting on. `current` carries the vCPU's controls as the
/// kernel reported them (its bits are echoed).
pub fn boot_state(index: u32, rsi: u64, entry: u64, cr0: u64, current: &ExitMessage) -> Reply {
    let index64 = u64::from(index);
    let mut s = GuestState::default();
    s.gprs.rdi = index64;
    s.gprs.rsi = rsi;
    s.rip = entry;
    s.rsp = layout::STACKS + (index64 + 1) * layout::STACK_SIZE;
    s.rflags = RFLAGS_RESERVED;
    s.cr0 = cr0;
    s.cr3 = layout::PML4;
    s.cr4 = CR4 | CR4_VMXE;
    s.dr7 = 0x400;
    let flat = |selector: u16, ar: u16| Segment {
        selector,
        ar,
        limit: 0xffff_ffff,
        base: 0,
    };
    let data = flat(layout::DATA_SELECTOR, AR_DATA);
    s.cs = flat(layout::CODE_SELECTOR, AR_CODE64);
    (s.es, s.ss, s.ds, s.fs) = (data, data, data, data);
    s.gs = Segment {
        base: layout::PER_VCPU + index64 * layout::PER_VCPU_SIZE,
        ..data
    };
    s.ldtr = Segment {
        ar: Segment::UNUSABLE,
        ..Segment::default()
    };
    s.tr = Segment {
        selector: layout::TSS_SELECTOR,
        ar: AR_TSS_BUSY,
        limit: TSS_LIMIT,
        base: layout::TSS,
    };
    s.gdtr = DescriptorTable {
        base: layout::SYSTEM,
        limit: GDT_LIMIT,
    };
    s.idtr = DescriptorTable::default();
    s.efer = devices::EFER_LME | devices::EFER_LMA;
    s.pat = PAT_DEFAULT;
    let mut c = current.state.controls;
    c.entry |= EntryControls::IA32E_MODE_GUEST;
    c.primary |= ProcessorBasedControls::HLT_EXITING | ProcessorBasedControls::USE_TSC_OFFSETTING;
    c.primary -= ProcessorBasedControls::RDTSC_EXITING;
    c.cr4_guest_host_mask |= CR4_VMXE;
    c.cr4_read_shadow = CR4;
    s.controls = c;
    Reply::with_state(ResumeAction::Resume, INITIAL_STATE, s)
}

/// The GDT entries of `layout::SYSTEM` (null, 64-bit code, data, the TSS's two words).
pub fn gdt_words() -> [u64; 5] {
    let tss = layout::TSS;
    let tss_low = u64::from(TSS_LIMIT)
        | ((tss & 0xff_ffff) << 16)
        | (u64::from(AR_TSS_BUSY) << 40)
        | (((tss >> 24) & 0xff) << 56);
    [0, GDT_CODE64, GDT_DATA, tss_low, tss >> 32]
}

/// The identity page tables of `layout::PML4` (0 to 4 GiB, 2 MiB pages): the PML4, the PDPT
/// and four page directories, each with its guest-physical address.
pub fn identity_tables() -> impl Iterator<Item = (u64, [u64; 512])> {
    let pdpt_gpa = layout::PML4 + PAGE_SIZE;
    let mut pml4 = [0; 512];
    pml4[0] = pdpt_gpa | 0b11;
    let mut pdpt = [0; 512];
    for (gib, entry) in pdpt.iter_mut().enumerate().take(4) {
        *entry = (pdpt_gpa + (1 + gib as u64) * PAGE_SIZE) | 0b11;
    }
    let directories = (0..4u64).map(move |gib| {
        let mut pd = [0; 512];
        for (i, entry) in pd.iter_mut().enumerate() {
            // Present, writable, 2 MiB page (PS).
            *entry = ((gib * 512 + i as u64) << 21) | 0x83;
        }
        (pdpt_gpa + (1 + gib) * PAGE_SIZE, pd)
    });
    [(layout::PML4, pml4), (pdpt_gpa, pdpt)]
        .into_iter()
        .chain(directories)
}

/// Writes `reply` for the answer to the current exit.
#[inline]
fn answer(reply: &Reply) -> ExitReply {
    vmx::write_reply_to(&mut FastUtcb, reply)
}

/// Maps RAM page `page` at `gpa`, donating another pool piece if the EPT's pool runs dry.
fn map_page(ram: &Ram, pool: &mut u64, page: u64, gpa: u64) -> Result<(), Status> {
    match vmx::ept_map(slot::EPT, ram.cap(), page, gpa, EPT_FLAGS) {
        Err(Status::OutOfMemory) => {
            take_pool_piece(pool)?;
            vmx::ept_donate(slot::EPT, slot::POOL_PIECE)?;
            vmx::ept_map(slot::EPT, ram.cap(), page, gpa, EPT_FLAGS).map(|_| ())
        }
        other => other.map(|_| ()),
    }
}

/// Splits the next pool piece into `slot::POOL_PIECE`.
fn take_pool_piece(pool: &mut u64) -> Result<(), Status> {
    let pieces = 1 << (protocol::POOL_ORDER - POOL_PIECE_ORDER);
    if *pool >= pieces {
        return Err(Status::OutOfMemory);
    }
    sys::mem_split(
        protocol::POOL,
        *pool << POOL_PIECE_ORDER,
        POOL_PIECE_ORDER,
        slot::POOL_PIECE,
    )?;
    *pool += 1;
    Ok(())
}

/// The guest-physical pages the image occupies, checked to lie between the image base and the
/// end of demand-paged memory, with the entry point in an executable segment.
fn image_pages(executable: &Executable) -> Result<(u64, u64), Status> {
    let (mut start, mut end) = (u64::MAX, 0);
    let mut entry_ok = false;
    for s in executable.segments() {
        let segment_end = s.vaddr.checked_add(s.mem_size).ok_or(Status::OutOfRange)?;
        if s.vaddr < layout::IMAGE || segment_end > layout::DEMAND_END {
            return Err(Status::OutOfRange);
        }
        start = start.min(s.vaddr & !(PAGE_SIZE - 1));
        end = end.max(segment_end.next_multiple_of(PAGE_SIZE));
        entry_ok |= s.executable && (s.vaddr..segment_end).contains(&executable.entry);
    }
    if !entry_ok {
        return Err(Status::InvalidArgument);
    }
    Ok((start, end))
}

/// The median of `samples` (`u64::MAX` if there are none).
fn median(samples: &mut [u64]) -> u64 {
    if samples.is_empty() {
        return u64::MAX;
    }
    samples.sort_unstable();
    samples[samples.len() / 2]
}
