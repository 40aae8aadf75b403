//! Kernel objects and the mechanisms over them: protection domains, threads, endpoints,
//! notifications and memory; the per-CPU priority scheduler; IPC (call, reply, receive, with
//! direct switches between threads on one CPU); faults as IPC; revocation with TLB shootdown.
//!
//! All kernel state sits behind one lock (`kernel()`), taken on every entry from user mode
//! with interrupts off. A CPU spinning on it still answers TLB shootdowns, so the CPU holding
//! it may wait for them.

use crate::cpu::{self, TrapFrame};
use crate::ept_space::{Donated, EPT_SPACE_BASE, EptSpace, Mappings};
use crate::fpu::FpuArea;
use crate::paging::{AddressSpace, MapError};
use crate::percpu::{self, CPU_COUNT, CPUS, MAX_CPUS};
use crate::vm::Vcpu;
use crate::{apic, entry, hw, memory, phys};
use abi::{MessageInfo, Status};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use caps::{CapSystem, NodeId, NodeKey, VecStorage};
use core::sync::atomic::{AtomicU64, Ordering};
use ept::entry::{PageSize, Rights};
use spin::{Mutex, MutexGuard};
use vcpu::vmcs::VmcsAccess;

/// Capability spaces (one per PD) and slots per space.
pub const SPACES: usize = 64;
pub const SLOTS: usize = 4096;
const PRIORITIES: usize = 256;

pub type Caps = CapSystem<VecStorage, SPACES, SLOTS>;

/// A protection domain.
pub struct Pd {
    pub aspace: AddressSpace,
    /// I/O permission bitmap (a set bit denies), once any port was granted.
    pub io_bitmap: Option<Box<[u8; cpu::IO_BITMAP_BYTES]>>,
    /// I/O port grants: first port -> (derivation node, number of ports).
    pub io_grants: BTreeMap<u32, (NodeId, u32)>,
    /// User mappings: virtual address -> (derivation node, page size).
    pub mappings: Mappings,
    /// CPUs that have this address space loaded now (bit per CPU index).
    pub active_cpus: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Suspended,
    Ready,
    Running,
    SendBlocked(u32),
    RecvBlocked(u32),
    ReplyBlocked,
    WaitBlocked(u32),
}

/// A thread. The saved user frame comes first and the struct is boxed, so the frame's address
/// is stable: the entry paths push and pop it in place.
#[repr(C, align(64))]
pub struct Thread {
    pub ctx: TrapFrame,
    pub fpu: FpuArea,
    pub pd: u32,
    pub priority: u8,
    pub cpu: usize,
    pub state: State,
    /// The thread whose call this thread must answer next.
    pub caller: Option<u32>,
    /// Endpoint (object index) that receives this thread's faults.
    pub fault_endpoint: Option<u32>,
    /// Set while the thread waits for its fault handler's reply; `fault_words` is the message.
    pub in_fault: bool,
    pub fault_words: [u64; 4],
    /// Physical frame of the UTCB (0 for vCPUs, which have none).
    pub utcb: u64,
    /// For a vCPU: its VMCS and guest state. `in_exit` is set while it waits for the reply
    /// to an exit message.
    pub vcpu: Option<Box<Vcpu>>,
    pub in_exit: bool,
}

/// Where and how a new thread starts.
pub struct ThreadStart {
    pub entry: u64,
    pub stack: u64,
    /// User address of its UTCB page.
    pub utcb: u64,
    pub priority: u8,
    pub cpu: usize,
    /// Endpoint (object index) for its faults.
    pub fault_endpoint: Option<u32>,
}

#[derive(Default)]
pub struct Endpoint {
    pub senders: VecDeque<u32>,
    pub receivers: VecDeque<u32>,
}

#[derive(Default)]
pub struct Notification {
    pub count: u64,
    pub waiters: VecDeque<u32>,
}

/// Memory: a naturally aligned block of 2^order frames.
#[derive(Clone, Copy, Debug)]
pub struct MemoryObject {
    pub base: u64,
    pub order: u8,
}

struct CpuSched {
    current: Option<u32>,
    ready: [VecDeque<u32>; PRIORITIES],
    bitmap: [u64; PRIORITIES / 64],
}

impl CpuSched {
    const fn new() -> Self {
        Self {
            current: None,
            ready: [const { VecDeque::new() }; PRIORITIES],
            bitmap: [0; PRIORITIES / 64],
        }
    }

    fn push(&mut self, prio: u8, t: u32) {
        self.ready[prio as usize].push_back(t);
        self.bitmap[prio as usize / 64] |= 1 << (prio % 64);
    }

    fn highest(&self) -> Option<u8> {
        (0..self.bitmap.len())
            .rev()
            .find(|&w| self.bitmap[w] != 0)
            .map(|w| (w * 64 + 63 - self.bitmap[w].leading_zeros() as usize) as u8)
    }

    fn pop(&mut self) -> Option<u32> {
        let p = self.highest()? as usize;
        let t = self.ready[p].pop_front();
        if self.ready[p].is_empty() {
            self.bitmap[p / 64] &= !(1 << (p % 64));
        }
        t
    }

    fn remove(&mut self, prio: u8, t: u32) {
        let q = &mut self.ready[prio as usize];
        q.retain(|&x| x != t);
        if q.is_empty() {
            self.bitmap[prio as usize / 64] &= !(1 << (prio % 64));
        }
    }
}

/// Everything the kernel knows, behind the one lock.
pub struct Kernel {
    pub caps: Caps,
    pub pds: Vec<Option<Pd>>,
    pub threads: Vec<Option<Box<Thread>>>,
    pub endpoints: Vec<Option<Endpoint>>,
    pub notifications: Vec<Option<Notification>>,
    pub memory: Vec<Option<MemoryObject>>,
    /// I/O port ranges: (first port, number of ports).
    pub io_ranges: Vec<Option<(u32, u32)>>,
    /// Interrupt-line ranges: (first GSI, number of lines).
    pub irq_ranges: Vec<Option<(u32, u32)>>,
    /// Per GSI: the notification it signals and whether it is level-triggered.
    pub irq_bindings: [Option<(u32, bool)>; crate::ioapic::MAX_GSI as usize],
    pub epts: Vec<Option<EptSpace>>,
    /// Memory donated to the kernel (EPT pools): never mappable again.
    pub donated: Donated,
    pub next_vpid: u16,
    cpus: [CpuSched; MAX_CPUS],
}

static KERNEL: Mutex<Kernel> = Mutex::new(Kernel {
    caps: CapSystem::new(VecStorage::new()),
    pds: Vec::new(),
    threads: Vec::new(),
    endpoints: Vec::new(),
    notifications: Vec::new(),
    memory: Vec::new(),
    io_ranges: Vec::new(),
    irq_ranges: Vec::new(),
    irq_bindings: [None; crate::ioapic::MAX_GSI as usize],
    epts: Vec::new(),
    donated: Donated::new(),
    next_vpid: 1,
    cpus: [const { CpuSched::new() }; MAX_CPUS],
});

/// Requests to other CPUs, one slot per CPU (only the lock holder sends): the request kind in
/// bits 2:0 and a 4 KiB-aligned physical address above. Zero when answered.
static REMOTE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
const REMOTE_FLUSH_TLB: u64 = 1;
const REMOTE_VMCLEAR: u64 = 2;
const REMOTE_INVEPT: u64 = 3;

/// Takes the kernel lock, answering TLB shootdowns while waiting for it.
pub fn kernel() -> MutexGuard<'static, Kernel> {
    loop {
        if let Some(g) = KERNEL.try_lock() {
            return g;
        }
        shootdown_poll();
        hw::pause();
    }
}

#[inline(always)]
fn this_cpu() -> usize {
    percpu::index()
}

fn shootdown_poll() {
    if REMOTE[this_cpu()].load(Ordering::Acquire) != 0 {
        shootdown_ack();
    }
}

/// Carries out the request another CPU left for this one (TLB flush, VMCLEAR, INVEPT) and
/// acknowledges it.
pub fn shootdown_ack() {
    let me = this_cpu();
    let request = REMOTE[me].load(Ordering::Acquire);
    let address = request & !0xfff;
    match request & 7 {
        REMOTE_FLUSH_TLB => {
            // SAFETY: reloading CR3 with its current value only flushes translations.
            unsafe { hw::write_cr3(hw::read_cr3()) };
        }
        REMOTE_VMCLEAR => crate::vm::clear(address),
        REMOTE_INVEPT => hw::vmx::invept(1, ept::entry::Eptp::new(address, false).0),
        _ => {}
    }
    REMOTE[me].store(0, Ordering::Release);
}

/// Asks CPU `cpu` to carry out `request` and waits until it has.
fn remote(cpu: usize, request: u64) {
    REMOTE[cpu].store(request, Ordering::Release);
    apic::send_fixed(
        CPUS[cpu].apic_id.load(Ordering::Relaxed),
        cpu::VECTOR_SHOOTDOWN,
    );
    let mut spins = 0u64;
    while REMOTE[cpu].load(Ordering::Acquire) != 0 {
        hw::pause();
        spins += 1;
        if spins == 1 << 32 {
            log::error!("cpu {cpu} does not answer request {request:#x}");
        }
    }
}

/// Appends an object: objects are never reclaimed (docs/abi.md), so the table has no holes
/// to reuse except the last entry of a creation that failed, which [`uninsert`] pops.
fn insert<T>(table: &mut Vec<Option<T>>, value: T) -> u32 {
    table.push(Some(value));
    (table.len() - 1) as u32
}

/// Undoes the [`insert`] that returned `index` (a creation that failed after it).
pub fn uninsert<T>(table: &mut Vec<Option<T>>, index: u32) {
    if index as usize + 1 == table.len() {
        table.pop();
    } else if let Some(slot) = table.get_mut(index as usize) {
        *slot = None;
    }
}

/// Result of a system call for the calling thread.
pub type SysResult = Result<(), Status>;

impl Kernel {
    pub fn thread(&self, t: u32) -> &Thread {
        self.threads[t as usize].as_deref().expect("live thread id")
    }

    pub fn thread_mut(&mut self, t: u32) -> &mut Thread {
        self.threads[t as usize]
            .as_deref_mut()
            .expect("live thread id")
    }

    /// The thread running on this CPU (a system call always has one).
    pub fn current(&self) -> u32 {
        self.cpus[this_cpu()].current.expect("a current thread")
    }

    pub fn current_opt(&self) -> Option<u32> {
        self.cpus[this_cpu()].current
    }

    pub fn pd_of(&self, t: u32) -> u32 {
        self.thread(t).pd
    }

    /// Creates a PD with a fresh capability space and address space.
    pub fn create_pd(&mut self) -> Result<u32, Status> {
        if self.pds.iter().filter(|p| p.is_some()).count() >= SPACES {
            return Err(Status::OutOfMemory);
        }
        let aspace = AddressSpace::new().ok_or(Status::OutOfMemory)?;
        Ok(insert(
            &mut self.pds,
            Pd {
                aspace,
                io_bitmap: None,
                io_grants: BTreeMap::new(),
                mappings: Mappings::new(),
                active_cpus: 0,
            },
        ))
    }

    /// Creates a suspended thread in `pd` with its UTCB mapped at `start.utcb`.
    pub fn create_thread(&mut self, pd: u32, start: ThreadStart) -> Result<u32, Status> {
        let utcb = memory::alloc_zeroed_pages(1).ok_or(Status::OutOfMemory)?;
        phys::write_u64(utcb, abi::NO_SLOT);
        let aspace = &self.pds[pd as usize]
            .as_ref()
            .ok_or(Status::Inconsistent)?
            .aspace;
        if let Err(e) = aspace.map(
            start.utcb,
            utcb,
            PageSize::Size4K,
            Rights::READ | Rights::WRITE,
        ) {
            memory::free_pages(utcb, 1);
            return Err(map_status(e));
        }
        let thread = Box::new(Thread {
            ctx: entry::initial_frame(start.entry, start.stack),
            fpu: FpuArea::initial(),
            pd,
            priority: start.priority,
            cpu: start.cpu,
            state: State::Suspended,
            caller: None,
            fault_endpoint: start.fault_endpoint,
            in_fault: false,
            fault_words: [0; 4],
            utcb,
            vcpu: None,
            in_exit: false,
        });
        Ok(insert(&mut self.threads, thread))
    }

    pub fn create_endpoint(&mut self) -> u32 {
        insert(&mut self.endpoints, Endpoint::default())
    }

    pub fn create_notification(&mut self) -> u32 {
        insert(&mut self.notifications, Notification::default())
    }

    pub fn create_interrupts(&mut self, first: u32, count: u32) -> u32 {
        insert(&mut self.irq_ranges, (first, count))
    }

    pub fn create_io_ports(&mut self, first: u32, count: u32) -> u32 {
        insert(&mut self.io_ranges, (first, count))
    }

    pub fn create_memory(&mut self, base: u64, order: u8) -> u32 {
        insert(&mut self.memory, MemoryObject { base, order })
    }

    // ---- scheduling ------------------------------------------------------------------------

    /// Makes `t` runnable on its CPU (poking that CPU if it is another).
    pub fn wake(&mut self, t: u32) {
        let (cpu, prio) = {
            let th = self.thread_mut(t);
            th.state = State::Ready;
            (th.cpu, th.priority)
        };
        self.cpus[cpu].push(prio, t);
        if cpu != this_cpu() {
            apic::send_fixed(
                CPUS[cpu].apic_id.load(Ordering::Relaxed),
                cpu::VECTOR_RESCHEDULE,
            );
        }
    }

    /// Switches this CPU to thread `next` (already removed from any queue).
    pub fn switch_to(&mut self, next: u32) {
        let me = this_cpu();
        let prev = self.cpus[me].current;
        if prev == Some(next) {
            self.thread_mut(next).state = State::Running;
            return;
        }
        let prev_pd = prev.map(|p| {
            let t = self.thread_mut(p);
            t.fpu.save();
            t.pd
        });
        let t = self.thread_mut(next);
        t.state = State::Running;
        t.fpu.restore();
        let (next_pd, is_thread) = (t.pd, t.vcpu.is_none());
        let base = &t.ctx as *const TrapFrame as u64;
        self.cpus[me].current = Some(next);
        if prev_pd == Some(next_pd) {
            // Same PD, but a VM exit in between may have left the kernel's CR3 loaded.
            if let Some(pd) = self.pds[next_pd as usize].as_ref() {
                pd.aspace.activate();
            }
        } else {
            if let Some(p) = prev_pd
                && let Some(pd) = self.pds[p as usize].as_mut()
            {
                pd.active_cpus &= !(1 << me);
            }
            if let Some(pd) = self.pds[next_pd as usize].as_mut() {
                pd.active_cpus |= 1 << me;
                pd.aspace.activate();
                if is_thread {
                    let bitmap = pd.io_bitmap.as_deref().map(|b| (next_pd, b));
                    cpu::load_io_bitmap(&CPUS[me], bitmap);
                }
            }
        }
        let top = base + core::mem::size_of::<TrapFrame>() as u64;
        let pc = &CPUS[me];
        pc.context_base.store(base, Ordering::Relaxed);
        pc.context_top.store(top, Ordering::Relaxed);
        cpu::set_user_trap_frame(pc, top);
    }

    /// The current thread stopped running (blocked or suspended): save its FPU state and
    /// pick the next one, if any.
    pub fn schedule(&mut self) {
        let me = this_cpu();
        if let Some(cur) = self.cpus[me].current
            && self.thread(cur).state == State::Running
        {
            return;
        }
        match self.cpus[me].pop() {
            Some(next) => self.switch_to(next),
            None => {
                if let Some(cur) = self.cpus[me].current.take() {
                    self.thread_mut(cur).fpu.save();
                    let pd = self.thread(cur).pd;
                    if let Some(pd) = self.pds[pd as usize].as_mut() {
                        pd.active_cpus &= !(1 << me);
                    }
                }
            }
        }
    }

    /// Puts the running thread back in its queue and runs the best ready thread if it has at
    /// least the same priority (round robin) or, with `only_higher`, a higher one.
    fn preempt(&mut self, only_higher: bool) {
        let me = this_cpu();
        let Some(cur) = self.cpus[me].current else {
            return;
        };
        let prio = self.thread(cur).priority;
        let better = match self.cpus[me].highest() {
            Some(h) if only_higher => h > prio,
            Some(h) => h >= prio,
            None => false,
        };
        if better {
            self.thread_mut(cur).state = State::Ready;
            self.cpus[me].push(prio, cur);
            if let Some(next) = self.cpus[me].pop() {
                self.switch_to(next);
            }
        }
    }

    /// `Yield`: let an equal-priority thread run.
    pub fn yield_now(&mut self) {
        self.preempt(false);
    }

    /// Before resuming user mode: a current thread whose affinity moved elsewhere goes there.
    fn settle(&mut self) {
        let me = this_cpu();
        if let Some(cur) = self.cpus[me].current
            && self.thread(cur).cpu != me
        {
            if let Some(v) = self.thread_mut(cur).vcpu.as_deref_mut()
                && v.active_on == Some(me)
            {
                crate::vm::clear(v.vmcs);
                v.active_on = None;
                v.launched = false;
            }
            self.thread_mut(cur).fpu.save();
            self.cpus[me].current = None;
            let pd = self.thread(cur).pd;
            if let Some(pd) = self.pds[pd as usize].as_mut() {
                pd.active_cpus &= !(1 << me);
            }
            self.wake(cur);
            self.schedule();
        }
    }

    /// Moves thread `t` to CPU `cpu`.
    pub fn set_affinity(&mut self, t: u32, cpu: usize) {
        let (old, state, prio) = {
            let th = self.thread(t);
            (th.cpu, th.state, th.priority)
        };
        if old == cpu {
            return;
        }
        self.thread_mut(t).cpu = cpu;
        match state {
            State::Ready => {
                self.cpus[old].remove(prio, t);
                self.wake(t);
            }
            State::Running if old != this_cpu() => {
                // It moves at its CPU's next kernel entry (`settle`), which this IPI forces.
                apic::send_fixed(
                    CPUS[old].apic_id.load(Ordering::Relaxed),
                    cpu::VECTOR_RESCHEDULE,
                );
            }
            _ => {}
        }
    }

    // ---- IPC -------------------------------------------------------------------------------

    /// Copies a message into `to`'s registers (and UTCB words); transfers a capability when
    /// asked and possible. `from_ctx` supplies info and words for normal messages.
    fn deliver(&mut self, from: u32, to: u32, info: MessageInfo, words: [u64; 4]) {
        let mut out = MessageInfo::new(info.label(), info.extra_words());
        let n = info.extra_words();
        let mut badge = 0;
        if self.thread(from).in_exit
            && let Some(v) = self.thread(from).vcpu.as_deref()
        {
            badge = u64::from(v.badge);
            let off = core::mem::offset_of!(abi::Utcb, words) as u64;
            let dst = self.thread(to).utcb + off;
            phys::write_words(dst, &v.exit_words);
            let extra = n.saturating_sub(vcpu::message::EXIT_MESSAGE_WORDS);
            if extra > 0 {
                let at = dst + 8 * vcpu::message::EXIT_MESSAGE_WORDS as u64;
                phys::write_words(at, &v.shadow_values[..extra]);
            }
        } else if n > 0 {
            let off = core::mem::offset_of!(abi::Utcb, words) as u64;
            let (src, dst) = (self.thread(from).utcb + off, self.thread(to).utcb + off);
            phys::copy(src, dst, n * 8);
        }
        if info.transfers_capability() {
            let slot = phys::read_u64(self.thread(to).utcb).unwrap_or(abi::NO_SLOT);
            let from_space = self.thread(from).pd;
            let to_space = self.thread(to).pd;
            if slot != abi::NO_SLOT
                && self
                    .caps
                    .delegate(
                        from_space,
                        u64::from(info.selector()),
                        to_space,
                        slot,
                        u32::MAX,
                    )
                    .is_ok()
            {
                out = out.with_capability(slot as u32);
            }
        }
        let ctx = &mut self.thread_mut(to).ctx;
        ctx.rax = Status::Ok.code();
        ctx.rdi = badge;
        ctx.rsi = out.0;
        ctx.rdx = words[0];
        ctx.r10 = words[1];
        ctx.r8 = words[2];
        ctx.r9 = words[3];
    }

    /// The message a blocked sender carries: its fault message, or its registers.
    fn sender_message(&self, s: u32) -> (MessageInfo, [u64; 4]) {
        let t = self.thread(s);
        if t.in_exit
            && let Some(v) = t.vcpu.as_deref()
        {
            let w = &v.exit_words;
            let rip = w[8 + vcpu::message::word::RIP_RSP_RFLAGS];
            (
                MessageInfo::new(
                    v.exit_label,
                    vcpu::message::EXIT_MESSAGE_WORDS + v.shadow_words,
                ),
                [w[1] & 0xffff_ffff, w[2], w[4], rip],
            )
        } else if t.in_fault {
            (MessageInfo::new(abi::LABEL_FAULT, 0), t.fault_words)
        } else {
            let c = &t.ctx;
            (MessageInfo(c.rsi), [c.rdx, c.r10, c.r8, c.r9])
        }
    }

    /// Sends `from`'s message (already in its registers, or its fault) to endpoint `ep` as a
    /// call: to a waiting receiver (switching to it directly on this CPU), or into the queue.
    pub fn call(&mut self, from: u32, ep: u32) {
        let receiver = self.endpoints[ep as usize]
            .as_mut()
            .and_then(|e| e.receivers.pop_front());
        match receiver {
            Some(r) => {
                let (info, words) = self.sender_message(from);
                self.deliver(from, r, info, words);
                self.thread_mut(r).caller = Some(from);
                self.thread_mut(from).state = State::ReplyBlocked;
                if self.thread(r).cpu == this_cpu() {
                    self.switch_to(r);
                } else {
                    self.wake(r);
                    self.schedule();
                }
            }
            None => {
                if let Some(e) = self.endpoints[ep as usize].as_mut() {
                    e.senders.push_back(from);
                }
                self.thread_mut(from).state = State::SendBlocked(ep);
                self.schedule();
            }
        }
    }

    /// The IPC fast path (the common case of `Call` and `ReplyRecv`, decided with a handful of
    /// checks): a register-only message, no capability transfer, partner on this CPU and a
    /// plain thread, and for `ReplyRecv` a caller to answer and no sender queued. It does
    /// exactly what `call` and `reply_recv` do in that case, switching directly to the
    /// partner; anything else returns false and takes the slow path, which validates and
    /// reports errors.
    pub fn fast_ipc(&mut self, me: u32, space: u32, call: bool, a: &[u64; 6]) -> bool {
        use caps::{EndpointRights, ObjectKind};
        if a[1] & 0xffff != 0 {
            return false;
        }
        let Ok(cap) = self.caps.get(space, a[0]) else {
            return false;
        };
        let need = if call {
            EndpointRights::CALL
        } else {
            EndpointRights::RECEIVE
        };
        if cap.kind() != ObjectKind::Endpoint || cap.rights() & need.bits() == 0 {
            return false;
        }
        let ep = cap.object() as usize;
        let cpu = this_cpu();
        let partner = if call {
            match self
                .endpoints
                .get(ep)
                .and_then(Option::as_ref)
                .and_then(|e| e.receivers.front())
            {
                Some(&r) => r,
                None => return false,
            }
        } else {
            match self.thread(me).caller {
                Some(c) => c,
                None => return false,
            }
        };
        let p = self.thread(partner);
        if p.cpu != cpu || p.vcpu.is_some() || p.in_fault || p.in_exit {
            return false;
        }
        let Some(endpoint) = self.endpoints.get_mut(ep).and_then(Option::as_mut) else {
            return false;
        };
        if call {
            endpoint.receivers.pop_front();
        } else {
            if !endpoint.senders.is_empty() {
                return false;
            }
            endpoint.receivers.push_back(me);
        }
        let p = self.thread_mut(partner);
        let ctx = &mut p.ctx;
        ctx.rax = Status::Ok.code();
        ctx.rdi = 0;
        ctx.rsi = a[1] & 0xffff_0000;
        ctx.rdx = a[2];
        ctx.r10 = a[3];
        ctx.r8 = a[4];
        ctx.r9 = a[5];
        if call {
            p.caller = Some(me);
        }
        let t = self.thread_mut(me);
        if call {
            t.state = State::ReplyBlocked;
        } else {
            t.caller = None;
            t.state = State::RecvBlocked(ep as u32);
        }
        self.switch_to(partner);
        true
    }

    /// Answers `caller` on behalf of `me`; the caller is then ready (not yet queued) or
    /// suspended. A vCPU's caller gets its reply checked and applied first; a bad reply fails
    /// and leaves the vCPU waiting.
    fn reply_to(&mut self, me: u32, caller: u32, info: MessageInfo, words: [u64; 4]) -> SysResult {
        if self.thread(caller).in_exit {
            return self.reply_to_vcpu(me, caller, info);
        }
        if self.thread(caller).in_fault {
            let t = self.thread_mut(caller);
            t.in_fault = false;
            if info.label() != abi::FAULT_RESUME {
                t.state = State::Suspended;
                return Ok(());
            }
        } else {
            self.deliver(me, caller, info, words);
        }
        self.thread_mut(caller).state = State::Ready;
        Ok(())
    }

    /// Applies a VMM's reply to an exit message (docs/abi.md, "Replies").
    fn reply_to_vcpu(&mut self, me: u32, caller: u32, info: MessageInfo) -> SysResult {
        use vcpu::message::{REPLY_WORDS, Reply, ResumeAction, StateMask};
        let mut stop = false;
        match info.extra_words() {
            0 => {}
            REPLY_WORDS => {
                let off = core::mem::offset_of!(abi::Utcb, words) as u64;
                let words: [u64; REPLY_WORDS] =
                    phys::read_array(self.thread(me).utcb + off).ok_or(Status::Inconsistent)?;
                // A binding names a capability of the replier: check it before writing.
                let binding = match (words[0] >> 32) & 0xff {
                    2 => Some(
                        self.caps
                            .lookup::<caps::object::Ept>(
                                self.thread(me).pd,
                                words[1],
                                caps::EptRights::MAP,
                            )?
                            .object(),
                    ),
                    _ => None,
                };
                self.vcpu_vmcs_here(caller)?;
                let v = self
                    .thread_mut(caller)
                    .vcpu
                    .as_deref_mut()
                    .ok_or(Status::Inconsistent)?;
                let action = Reply::apply_words(&words, &mut crate::vm::HwVmcs, &mut v.regs)
                    .map_err(|_| Status::InvalidArgument)?;
                let mask = StateMask::from_bits_truncate(words[0] as u32);
                if mask.intersects(StateMask::CR | StateMask::CONTROLS) {
                    crate::vm::fix_guest_control_registers(true);
                }
                if let Some(e) = binding {
                    v.ept = e;
                    v.eptp_dirty = true;
                }
                stop = action == ResumeAction::Stop;
            }
            _ => return Err(Status::InvalidArgument),
        }
        let t = self.thread_mut(caller);
        t.in_exit = false;
        t.state = if stop { State::Suspended } else { State::Ready };
        Ok(())
    }

    /// Answers `me`'s caller, a vCPU in an exit, with a stop (as a reply whose action is
    /// stop): it runs again only when resumed.
    pub fn stop_caller(&mut self, me: u32) {
        if let Some(c) = self.thread_mut(me).caller.take() {
            let t = self.thread_mut(c);
            t.in_exit = false;
            t.state = State::Suspended;
        }
    }

    /// Makes vCPU `t`'s VMCS current on this CPU (VMCLEARing it where else it is active).
    pub fn vcpu_vmcs_here(&mut self, t: u32) -> SysResult {
        let me = this_cpu();
        let v = self
            .thread_mut(t)
            .vcpu
            .as_deref_mut()
            .ok_or(Status::Inconsistent)?;
        let vmcs = v.vmcs;
        if let Some(c) = v.active_on
            && c != me
        {
            remote(c, REMOTE_VMCLEAR | vmcs);
            v.active_on = None;
            v.launched = false;
        }
        if !crate::vm::make_current(vmcs) {
            return Err(Status::Inconsistent);
        }
        if v.active_on.is_none() {
            v.launched = false;
        }
        v.active_on = Some(me);
        Ok(())
    }

    /// Reply (if `reply` and a caller waits), then receive on `ep`. A reply that fails (a
    /// bad reply to a vCPU) fails the call before anything is received.
    pub fn reply_recv(
        &mut self,
        me: u32,
        ep: u32,
        reply: Option<(MessageInfo, [u64; 4])>,
    ) -> SysResult {
        let mut woken = None;
        if let Some((info, words)) = reply
            && let Some(c) = self.thread_mut(me).caller.take()
        {
            if let Err(e) = self.reply_to(me, c, info, words) {
                self.thread_mut(me).caller = Some(c);
                return Err(e);
            }
            if self.thread(c).state == State::Ready {
                woken = Some(c);
            }
        }
        let sender = self.endpoints[ep as usize]
            .as_mut()
            .and_then(|e| e.senders.pop_front());
        match sender {
            Some(s) => {
                let (info, words) = self.sender_message(s);
                self.deliver(s, me, info, words);
                self.thread_mut(me).caller = Some(s);
                self.thread_mut(s).state = State::ReplyBlocked;
                if let Some(c) = woken {
                    self.wake(c);
                }
            }
            None => {
                if let Some(e) = self.endpoints[ep as usize].as_mut() {
                    e.receivers.push_back(me);
                }
                self.thread_mut(me).state = State::RecvBlocked(ep);
                match woken {
                    Some(c) if self.thread(c).cpu == this_cpu() => self.switch_to(c),
                    Some(c) => {
                        self.wake(c);
                        self.schedule();
                    }
                    None => self.schedule(),
                }
            }
        }
        Ok(())
    }

    /// Reply without receiving.
    pub fn reply(&mut self, me: u32, info: MessageInfo, words: [u64; 4]) -> SysResult {
        let c = self.thread_mut(me).caller.take().ok_or(Status::NoCaller)?;
        if let Err(e) = self.reply_to(me, c, info, words) {
            self.thread_mut(me).caller = Some(c);
            return Err(e);
        }
        if self.thread(c).state == State::Ready {
            self.wake(c);
        }
        Ok(())
    }

    pub fn signal(&mut self, n: u32) {
        let waiter = self.notifications[n as usize]
            .as_mut()
            .and_then(|x| x.waiters.pop_front());
        match waiter {
            Some(w) => {
                self.thread_mut(w).ctx.rax = Status::Ok.code();
                self.thread_mut(w).ctx.rdi = 1;
                self.wake(w);
                self.preempt(true);
            }
            None => {
                if let Some(x) = self.notifications[n as usize].as_mut() {
                    x.count += 1;
                }
            }
        }
    }

    pub fn wait(&mut self, me: u32, n: u32) {
        let Some(x) = self.notifications[n as usize].as_mut() else {
            return;
        };
        if x.count > 0 {
            let c = core::mem::take(&mut x.count);
            self.thread_mut(me).ctx.rdi = c;
        } else {
            x.waiters.push_back(me);
            self.thread_mut(me).state = State::WaitBlocked(n);
            self.schedule();
        }
    }

    /// Takes `t` off whatever it waits on and suspends it.
    pub fn suspend(&mut self, t: u32) {
        let state = self.thread(t).state;
        match state {
            State::Ready => {
                let (cpu, prio) = (self.thread(t).cpu, self.thread(t).priority);
                self.cpus[cpu].remove(prio, t);
            }
            State::SendBlocked(ep) | State::RecvBlocked(ep) => {
                if let Some(e) = self.endpoints[ep as usize].as_mut() {
                    e.senders.retain(|&x| x != t);
                    e.receivers.retain(|&x| x != t);
                }
            }
            State::WaitBlocked(n) => {
                if let Some(x) = self.notifications[n as usize].as_mut() {
                    x.waiters.retain(|&x| x != t);
                }
            }
            _ => {}
        }
        self.thread_mut(t).state = State::Suspended;
        if state == State::Running {
            if self.thread(t).cpu == this_cpu() && self.current_opt() == Some(t) {
                self.schedule();
            } else {
                let cpu = self.thread(t).cpu;
                apic::send_fixed(
                    CPUS[cpu].apic_id.load(Ordering::Relaxed),
                    cpu::VECTOR_RESCHEDULE,
                );
            }
        }
    }

    pub fn resume(&mut self, t: u32) {
        if self.thread(t).state == State::Suspended {
            self.wake(t);
            self.preempt(true);
        }
    }

    // ---- memory ----------------------------------------------------------------------------

    /// Flushes every CPU that may cache translations of `pd`.
    pub fn shootdown(&mut self, pd: u32) {
        let me = this_cpu();
        let Some(p) = self.pds[pd as usize].as_ref() else {
            return;
        };
        let mask = p.active_cpus;
        if mask & (1 << me) != 0 {
            // SAFETY: reloading CR3 with its current value only flushes translations.
            unsafe { hw::write_cr3(hw::read_cr3()) };
        }
        for c in (0..MAX_CPUS).filter(|&c| c != me && mask & (1 << c) != 0) {
            remote(c, REMOTE_FLUSH_TLB);
        }
    }

    /// INVEPT (single context) on every CPU that may cache translations of EPT `e`.
    pub fn invalidate_ept(&mut self, e: u32) {
        let me = this_cpu();
        let Some(space) = self.epts[e as usize].as_ref() else {
            return;
        };
        let (mask, root, eptp) = (space.cpus, space.root, space.eptp());
        if mask & (1 << me) != 0 {
            hw::vmx::invept(1, eptp);
        }
        for c in (0..MAX_CPUS).filter(|&c| c != me && mask & (1 << c) != 0) {
            remote(c, REMOTE_INVEPT | root);
        }
    }

    /// Removes the mapping recorded by a derivation-tree node (called for every mapping a
    /// revocation removes). Returns the PD to shoot down.
    pub fn drop_mapping(&mut self, key: NodeKey) -> Option<Space> {
        let NodeKey::Mapping { space, page, .. } = key else {
            return None;
        };
        if space >= IO_SPACE_BASE {
            let pd = space - IO_SPACE_BASE;
            let p = self.pds.get_mut(pd as usize)?.as_mut()?;
            let (_, count) = p.io_grants.remove(&(page as u32))?;
            if let Some(bitmap) = p.io_bitmap.as_deref_mut() {
                set_ports(bitmap, page as u32, count, true);
            }
            self.refresh_io(pd);
            return None;
        }
        let address = page << 12;
        if space >= EPT_SPACE_BASE {
            let e = space - EPT_SPACE_BASE;
            let ept = self.epts.get_mut(e as usize)?.as_mut()?;
            let (_, size) = ept.mappings.remove(address)?;
            let _ = ept.unmap(address, size);
            ept.refund();
            return Some(Space::Ept(e));
        }
        let pd = self.pds.get_mut(space as usize)?.as_mut()?;
        let (_, size) = pd.mappings.remove(address)?;
        let _ = pd.aspace.unmap(address, size);
        Some(Space::Pd(space))
    }

    /// Grants `pd` the ports `[first, first + count)`, recorded as a child of `node`'s
    /// capability (done by the caller).
    pub fn grant_ports(&mut self, pd: u32, first: u32, count: u32, node: NodeId) -> SysResult {
        let p = self.pds[pd as usize].as_mut().ok_or(Status::Inconsistent)?;
        let bitmap = p
            .io_bitmap
            .get_or_insert_with(|| Box::new([0xff; cpu::IO_BITMAP_BYTES]));
        set_ports(bitmap, first, count, false);
        p.io_grants.insert(first, (node, count));
        self.refresh_io(pd);
        Ok(())
    }

    /// Puts `pd`'s new bitmap in force on every CPU that runs it now.
    fn refresh_io(&mut self, pd: u32) {
        let Some(p) = self.pds[pd as usize].as_ref() else {
            return;
        };
        let Some(bitmap) = p.io_bitmap.as_deref() else {
            return;
        };
        // A CPU whose TSS still holds this PD's old bitmap must copy it again, even if the PD
        // does not run there now; a CPU that runs it gets the new one at once.
        for c in CPUS.iter() {
            if c.io_owner.load(Ordering::Relaxed) == u64::from(pd) + 1 {
                cpu::invalidate_io_bitmap(c);
            }
        }
        for c in (0..MAX_CPUS).filter(|c| p.active_cpus & (1 << c) != 0) {
            let runs_thread = self.cpus[c]
                .current
                .is_some_and(|t| self.thread(t).vcpu.is_none());
            if runs_thread {
                cpu::load_io_bitmap(&CPUS[c], Some((pd, bitmap)));
            }
        }
    }

    /// Removes the mappings of removed derivation-tree nodes and invalidates what cached them.
    pub fn drop_mappings(&mut self, keys: Vec<NodeKey>) {
        let spaces: Vec<Space> = keys
            .into_iter()
            .filter_map(|k| self.drop_mapping(k))
            .collect();
        self.invalidate_spaces(spaces);
    }

    /// Flushes, once each, the address spaces mappings were dropped from.
    pub fn invalidate_spaces(&mut self, mut spaces: Vec<Space>) {
        spaces.sort_unstable();
        spaces.dedup();
        for s in spaces {
            match s {
                Space::Pd(pd) => self.shootdown(pd),
                Space::Ept(e) => self.invalidate_ept(e),
            }
        }
    }
}

/// Derivation-tree space ids of I/O-port grants: `IO_SPACE_BASE + PD`.
pub const IO_SPACE_BASE: u32 = 0x2000;

/// Sets (`deny`) or clears the bitmap bits of ports `[first, first + count)`.
fn set_ports(bitmap: &mut [u8; cpu::IO_BITMAP_BYTES], first: u32, count: u32, deny: bool) {
    for port in first..first.saturating_add(count).min(0x1_0000) {
        let (byte, bit) = ((port / 8) as usize, port % 8);
        if deny {
            bitmap[byte] |= 1 << bit;
        } else {
            bitmap[byte] &= !(1 << bit);
        }
    }
}

/// An address space that a removed mapping belonged to.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Space {
    Pd(u32),
    Ept(u32),
}

pub fn map_status(e: MapError) -> Status {
    match e {
        MapError::AlreadyMapped => Status::AlreadyMapped,
        MapError::NotMapped => Status::NotMapped,
        MapError::OutOfMemory => Status::OutOfMemory,
        MapError::Corrupt => Status::Inconsistent,
    }
}

/// Number of CPUs online.
pub fn cpu_count() -> usize {
    CPU_COUNT.load(Ordering::Acquire) as usize
}

// ---- entries from user mode ------------------------------------------------------------------

/// Finishes a kernel entry: settles migrations, then resumes the current thread or vCPU,
/// or idles.
pub fn finish(mut k: MutexGuard<'static, Kernel>) -> ! {
    k.settle();
    resume(k)
}

/// Resumes whatever is current on this CPU (a thread in user mode, a vCPU in its guest), or
/// idles until something is.
fn resume(mut k: MutexGuard<'static, Kernel>) -> ! {
    loop {
        match k.current_opt() {
            Some(t) if k.thread(t).vcpu.is_some() => match k.prepare_vcpu_entry(t) {
                Some((gprs, launched)) => {
                    drop(k);
                    crate::vm::enter(gprs, launched);
                }
                None => {
                    // The vCPU sent a message instead (recall, failed VMPTRLD): pick again.
                    k.settle();
                    continue;
                }
            },
            Some(_) => {
                drop(k);
                entry::enter_user();
            }
            None => {
                drop(k);
                // SAFETY: STI's one-instruction shadow makes "enable interrupts and halt"
                // atomic, so a wake-up IPI that arrives after the check still ends the HLT.
                unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
                k = kernel();
                k.schedule();
            }
        }
    }
}

/// Resumes the current thread in user mode right away (after the IPC fast path).
pub fn enter_current_user(k: MutexGuard<'static, Kernel>) -> ! {
    drop(k);
    entry::enter_user()
}

/// Runs the first ready thread on this CPU, halting until there is one.
pub fn idle() -> ! {
    hw::disable_interrupts();
    let mut k = kernel();
    k.schedule();
    resume(k)
}

/// A device interrupt on `gsi`: signal the bound notification (a level-triggered line stays
/// masked until `IrqAck`), then end the interrupt.
pub fn device_interrupt(gsi: u32) {
    let mut k = kernel();
    if let Some(&Some((n, level))) = k.irq_bindings.get(gsi as usize) {
        if level {
            crate::ioapic::set_masked(gsi, true);
        }
        k.signal(n);
    }
    drop(k);
    apic::eoi();
}

/// Timer interrupt from user mode: round robin among equal priorities.
pub fn timer_tick() -> ! {
    let mut k = kernel();
    k.preempt(false);
    finish(k)
}

/// A reschedule IPI from user mode: a thread became ready here, or the current one moved.
pub fn reschedule_ipi() -> ! {
    let mut k = kernel();
    k.preempt(true);
    finish(k)
}

/// An exception in user mode: a fault message to the thread's handler, or suspension.
pub fn user_exception(vector: u64, error: u64, cr2: u64) -> ! {
    let mut k = kernel();
    let me = k.current();
    let rip = k.thread(me).ctx.rip;
    let addr = if vector == 14 { cr2 } else { 0 };
    match k.thread(me).fault_endpoint {
        Some(ep) => {
            let t = k.thread_mut(me);
            t.in_fault = true;
            t.fault_words = [vector, error, addr, rip];
            k.call(me, ep);
        }
        None => {
            log::warn!(
                "thread {me} (pd {}) fault vector {vector} error {error:#x} address {addr:#x} rip {rip:#x}: no handler, suspended",
                k.thread(me).pd
            );
            k.thread_mut(me).state = State::Suspended;
            k.schedule();
        }
    }
    finish(k)
}

/// Makes `t` run on this CPU now (used once, for the root task).
pub fn start_first(t: u32) -> ! {
    let mut k = kernel();
    let cpu = k.thread(t).cpu;
    if cpu == this_cpu() {
        k.thread_mut(t).state = State::Ready;
        k.switch_to(t);
        resume(k)
    }
    k.wake(t);
    drop(k);
    idle()
}

// ---- vCPUs ----------------------------------------------------------------------------------

impl Kernel {
    /// Creates a suspended vCPU in `pd` bound to EPT `ept` and exit endpoint `exit_endpoint`.
    pub fn create_vcpu(
        &mut self,
        pd: u32,
        ept: u32,
        exit_endpoint: u32,
        priority: u8,
        cpu: usize,
        badge: u32,
    ) -> Result<u32, Status> {
        if percpu::current().vmx_state() != percpu::VmxState::Root {
            return Err(Status::Unsupported);
        }
        let controls = crate::vm::controls().ok_or(Status::Unsupported)?;
        let eptp = self.epts[ept as usize]
            .as_ref()
            .ok_or(Status::Inconsistent)?
            .eptp();
        let vpid = self.next_vpid;
        self.next_vpid = self.next_vpid.checked_add(1).ok_or(Status::OutOfMemory)?;
        let vmcs = memory::alloc_zeroed_pages(1).ok_or(Status::OutOfMemory)?;
        let caps = crate::vmx::capabilities();
        phys::write(vmcs, &caps.revision_id().to_le_bytes());
        let default_mask =
            (vcpu::message::StateMask::GPRS | vcpu::message::StateMask::RIP_RSP_RFLAGS).bits();
        let mut v = Box::new(Vcpu {
            regs: vcpu::message::SavedRegisters::default(),
            vmcs,
            launched: false,
            active_on: None,
            last_cpu: None,
            ept,
            eptp_dirty: false,
            exit_endpoint,
            badge,
            vpid,
            masks: [default_mask; 80],
            recall: false,
            exit_label: 0,
            exit_words: [0; vcpu::message::EXIT_MESSAGE_WORDS],
            exit_mask: vcpu::message::StateMask::empty(),
            shadow: None,
            shadow_values: [0; 1 + crate::vm::SHADOW_WRITTEN_MAX],
            shadow_words: 0,
        });
        crate::vm::clear(vmcs);
        if !crate::vm::make_current(vmcs) {
            memory::free_pages(vmcs, 1);
            return Err(Status::Inconsistent);
        }
        crate::vm::init_vmcs(&mut v, &controls, eptp);
        crate::vm::clear(vmcs);
        let thread = Box::new(Thread {
            ctx: entry::initial_frame(0, 0),
            fpu: FpuArea::initial(),
            pd,
            priority,
            cpu,
            state: State::Suspended,
            caller: None,
            fault_endpoint: None,
            in_fault: false,
            fault_words: [0; 4],
            utcb: 0,
            vcpu: Some(v),
            in_exit: false,
        });
        Ok(insert(&mut self.threads, thread))
    }

    /// `VcpuRecall`: the vCPU reports to its VMM at its next kernel exit handling (now, if it
    /// runs on another CPU: the IPI makes it exit).
    pub fn recall(&mut self, t: u32) {
        if let Some(v) = self.thread_mut(t).vcpu.as_deref_mut() {
            v.recall = true;
        }
        let (state, cpu) = (self.thread(t).state, self.thread(t).cpu);
        if state == State::Running && cpu != this_cpu() {
            apic::send_fixed(
                CPUS[cpu].apic_id.load(Ordering::Relaxed),
                cpu::VECTOR_RESCHEDULE,
            );
        }
    }

    /// Gets vCPU `t` (current on this CPU) ready to enter its guest: VMCS current here, EPT
    /// bound, translations flushed if it arrived from another CPU. Returns where its registers
    /// are and whether it was launched; `None` if it sent a message instead.
    fn prepare_vcpu_entry(&mut self, t: u32) -> Option<(*mut vcpu::message::Gprs, bool)> {
        let me = this_cpu();
        if self.vcpu_vmcs_here(t).is_err() {
            log::error!("vcpu {t}: its VMCS cannot be loaded; stopped");
            self.thread_mut(t).state = State::Suspended;
            self.schedule();
            return None;
        }
        if self.thread(t).vcpu.as_deref().is_some_and(|v| v.recall) {
            self.send_exit(t, abi::LABEL_RECALL, None);
            return None;
        }
        let ept = self.thread(t).vcpu.as_deref()?.ept;
        let eptp = self.epts.get(ept as usize)?.as_ref()?.eptp();
        if let Some(space) = self.epts[ept as usize].as_mut() {
            space.cpus |= 1 << me;
        }
        let v = self.thread_mut(t).vcpu.as_deref_mut()?;
        if v.eptp_dirty {
            crate::vm::HwVmcs.write(vcpu::vmcs::VmcsField::EPT_POINTER, eptp);
            v.eptp_dirty = false;
            hw::vmx::invept(1, eptp);
        }
        if v.last_cpu != Some(me) {
            crate::vm::flush_on_arrival(eptp, v.vpid);
            v.last_cpu = Some(me);
        }
        hw::write_cr2(v.regs.cr2);
        let launched = v.launched;
        v.launched = true;
        Some((&mut v.regs.gprs as *mut vcpu::message::Gprs, launched))
    }

    /// Sends vCPU `t`'s exit (already captured, or the current state for a recall) to its
    /// exit endpoint as a call.
    fn send_exit(&mut self, t: u32, label: u16, captured: Option<()>) {
        let Some(v) = self.thread_mut(t).vcpu.as_deref_mut() else {
            return;
        };
        if captured.is_none() {
            v.recall = false;
            crate::vm::capture_state_into(v, crate::vm::RECALL_MASK);
        }
        v.exit_label = label;
        let ep = v.exit_endpoint;
        self.thread_mut(t).in_exit = true;
        self.call(t, ep);
    }
}

/// A VM exit (from `vm::vm_exit_entry`, on this CPU's kernel stack; the guest's registers are
/// saved in its vCPU).
#[unsafe(no_mangle)]
extern "C" fn vm_exit_dispatch() -> ! {
    let mut k = kernel();
    let t = k.current();
    let reason = crate::vm::HwVmcs.read(vcpu::vmcs::VmcsField::EXIT_REASON);
    let basic = (reason & 0xffff) as u16;
    if let Some(v) = k.thread_mut(t).vcpu.as_deref_mut() {
        v.regs.cr2 = crate::hw::read_cr2();
    }
    cpu::note_vm_exit(&CPUS[this_cpu()]);
    match basic {
        // External interrupt: let the host take it (it is pending in the local APIC); the
        // VMX-preemption timer (52): the guest's time slice ran out. Both are scheduling points.
        1 | 52 => {
            if basic == 1 {
                hw::deliver_pending_interrupt();
            }
            if k.thread(t).vcpu.as_deref().is_some_and(|v| v.recall) {
                k.send_exit(t, abi::LABEL_RECALL, None);
            } else {
                k.preempt(false);
            }
        }
        _ => {
            if let Some(v) = k.thread_mut(t).vcpu.as_deref_mut() {
                crate::vm::capture_exit(v, basic);
            }
            k.send_exit(t, abi::LABEL_VM_EXIT.wrapping_add(basic), Some(()));
        }
    }
    finish(k)
}

/// VMLAUNCH/VMRESUME failed without a VM exit (VMfail): reported to the VMM as a failed VM
/// entry (exit reason 33 with bit 31) whose qualification is the VM-instruction error.
#[unsafe(no_mangle)]
extern "C" fn vm_entry_failed() -> ! {
    let mut k = kernel();
    let t = k.current();
    let error = crate::vm::instruction_error();
    if let Some(v) = k.thread_mut(t).vcpu.as_deref_mut() {
        v.launched = false;
        crate::vm::capture_state_into(v, vcpu::message::StateMask::RIP_RSP_RFLAGS);
        v.exit_words[1] = 33 | (1 << 31);
        v.exit_words[2] = error;
    }
    log::warn!("vcpu {t}: VM entry failed, VM-instruction error {error}");
    k.send_exit(t, abi::LABEL_VM_EXIT + 33, Some(()));
    finish(k)
}
