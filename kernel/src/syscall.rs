//! System-call dispatch: decodes the registers, validates every argument (one capability
//! lookup path, explicit range and alignment checks), and calls the mechanism in `sched`.
//! The ABI is specified in docs/abi.md and the `abi` crate.

use crate::cpu::TrapFrame;
use crate::ept_space::{EPT_SPACE_BASE, EptSpace, Pool};
use crate::phys;
use crate::sched::State;
use crate::sched::{self, Kernel, map_status};
use abi::{MessageInfo, Status, Syscall, USER_BASE, USER_END};
use alloc::vec::Vec;
use caps::object::{
    Endpoint, Ept, Interrupts, IoPorts, Memory, Notification, ProtectionDomain, Thread, Vcpu,
};
use caps::{
    EndpointRights, EptRights, InterruptRights, IoPortRights, MemoryRights, NodeKey,
    NotificationRights, ObjectKind, ObjectType, ProtectionDomainRights, ThreadRights, VcpuRights,
};
use ept::entry::{MemType, PageSize, Rights};
use spin::MutexGuard;
use vcpu::message::StateMask;

/// What a call did for its caller.
enum Outcome {
    /// Finished: status Ok and these results in RDI, RSI, RDX (unset ones keep their value).
    Done([Option<u64>; 3]),
    /// The caller blocked or was answered by the IPC path, which wrote its registers.
    Blocked,
}

type CallResult = Result<Outcome, Status>;

const DONE: Outcome = Outcome::Done([None; 3]);

/// Entered from `entry::syscall_entry` on the CPU's kernel stack. The frame pointer is the
/// current thread's context, which is read and written through the kernel lock instead.
#[unsafe(no_mangle)]
extern "C" fn syscall_dispatch(_frame: *mut TrapFrame) -> ! {
    let mut k = sched::kernel();
    let me = k.current();
    let c = &k.thread(me).ctx;
    let nr = c.rax;
    let a = [c.rdi, c.rsi, c.rdx, c.r10, c.r8, c.r9];
    let space = k.pd_of(me);
    if (nr == Syscall::Call as u64 || nr == Syscall::ReplyRecv as u64)
        && k.fast_ipc(me, space, nr == Syscall::Call as u64, &a)
    {
        sched::enter_current_user(k);
    }
    slow_path(k, me, space, nr, a)
}

/// Every call the fast path does not take: full validation, then the mechanism.
#[inline(never)]
fn slow_path(mut k: MutexGuard<'static, Kernel>, me: u32, space: u32, nr: u64, a: [u64; 6]) -> ! {
    let result = handle(&mut k, me, space, nr, a);
    let ctx = &mut k.thread_mut(me).ctx;
    match result {
        Ok(Outcome::Done(r)) => {
            ctx.rax = Status::Ok.code();
            for (reg, v) in [&mut ctx.rdi, &mut ctx.rsi, &mut ctx.rdx]
                .into_iter()
                .zip(r)
            {
                if let Some(v) = v {
                    *reg = v;
                }
            }
        }
        Ok(Outcome::Blocked) => {}
        Err(status) => ctx.rax = status.code(),
    }
    sched::finish(k)
}

fn lookup<T: ObjectType>(
    k: &Kernel,
    space: u32,
    sel: u64,
    rights: T::Rights,
) -> Result<u32, Status> {
    Ok(k.caps.lookup::<T>(space, sel, rights)?.object())
}

/// The destination slot must exist and be empty.
fn vacant(k: &Kernel, space: u32, slot: u64) -> Result<(), Status> {
    match k.caps.get(space, slot) {
        Ok(_) => Err(Status::SlotOccupied),
        Err(caps::CapError::EmptySlot) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn info_of(raw: u64) -> Result<MessageInfo, Status> {
    let info = MessageInfo(raw);
    if info.is_valid() {
        Ok(info)
    } else {
        Err(Status::InvalidArgument)
    }
}

/// A capability transfer needs GRANT on the endpoint and a real capability to send.
fn check_grant(k: &Kernel, space: u32, ep_sel: u64, info: MessageInfo) -> Result<(), Status> {
    if info.transfers_capability() {
        lookup::<Endpoint>(k, space, ep_sel, EndpointRights::GRANT)?;
        k.caps.get(space, u64::from(info.selector()))?;
    }
    Ok(())
}

fn user_range(addr: u64, len: u64) -> Result<(), Status> {
    match addr.checked_add(len) {
        Some(end) if addr >= USER_BASE && end <= USER_END => Ok(()),
        _ => Err(Status::OutOfRange),
    }
}

fn page_size(order: u64) -> Result<PageSize, Status> {
    match order {
        abi::ORDER_4K => Ok(PageSize::Size4K),
        abi::ORDER_2M => Ok(PageSize::Size2M),
        abi::ORDER_1G => Ok(PageSize::Size1G),
        _ => Err(Status::InvalidArgument),
    }
}

fn handle(
    k: &mut MutexGuard<'static, Kernel>,
    me: u32,
    space: u32,
    nr: u64,
    a: [u64; 6],
) -> CallResult {
    let call = Syscall::from_number(nr).ok_or(Status::InvalidSyscall)?;
    let words = [a[2], a[3], a[4], a[5]];
    match call {
        Syscall::Print => {
            let (addr, len) = (a[0], a[1]);
            if len > 4096 {
                return Err(Status::InvalidArgument);
            }
            user_range(addr, len)?;
            let mut buf = [0u8; 4096];
            let pd = k.pds[space as usize].as_ref().ok_or(Status::Inconsistent)?;
            if !pd.aspace.copy_from_user(addr, &mut buf[..len as usize]) {
                return Err(Status::NotMapped);
            }
            let text = &buf[..len as usize];
            match core::str::from_utf8(text) {
                Ok(s) => crate::print!("{s}"),
                Err(_) => crate::print!("{}", alloc::string::String::from_utf8_lossy(text)),
            }
            Ok(DONE)
        }
        Syscall::Call => {
            let info = info_of(a[1])?;
            let ep = lookup::<Endpoint>(k, space, a[0], EndpointRights::CALL)?;
            check_grant(k, space, a[0], info)?;
            k.call(me, ep);
            Ok(Outcome::Blocked)
        }
        Syscall::ReplyRecv => {
            let info = info_of(a[1])?;
            let ep = lookup::<Endpoint>(k, space, a[0], EndpointRights::RECEIVE)?;
            check_grant(k, space, a[0], info)?;
            k.reply_recv(me, ep, Some((info, words)))?;
            Ok(Outcome::Blocked)
        }
        Syscall::Recv => {
            let ep = lookup::<Endpoint>(k, space, a[0], EndpointRights::RECEIVE)?;
            k.reply_recv(me, ep, None)?;
            Ok(Outcome::Blocked)
        }
        Syscall::Reply => {
            let info = info_of(a[1])?;
            if info.transfers_capability() {
                k.caps.get(space, u64::from(info.selector()))?;
            }
            k.reply(me, info, words)?;
            Ok(DONE)
        }
        Syscall::Signal => {
            let n = lookup::<Notification>(k, space, a[0], NotificationRights::SIGNAL)?;
            k.thread_mut(me).ctx.rax = Status::Ok.code();
            k.signal(n);
            Ok(Outcome::Blocked)
        }
        Syscall::Wait => {
            let n = lookup::<Notification>(k, space, a[0], NotificationRights::WAIT)?;
            k.thread_mut(me).ctx.rax = Status::Ok.code();
            k.wait(me, n);
            Ok(Outcome::Blocked)
        }
        Syscall::Yield => {
            k.thread_mut(me).ctx.rax = Status::Ok.code();
            k.yield_now();
            Ok(Outcome::Blocked)
        }
        Syscall::PdCreate => {
            lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::CREATE_DOMAIN)?;
            vacant(k, space, a[1])?;
            let pd = k.create_pd()?;
            k.caps.create(
                space,
                a[1],
                ObjectKind::ProtectionDomain,
                pd,
                ObjectKind::ProtectionDomain.valid_rights(),
            )?;
            Ok(DONE)
        }
        Syscall::ThreadCreate => {
            let pd =
                lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::CREATE_THREAD)?;
            vacant(k, space, a[1])?;
            let (entry, stack, utcb, config) = (a[2], a[3], a[4], a[5]);
            if entry >= USER_END || stack >= USER_END {
                return Err(Status::OutOfRange);
            }
            if utcb % 4096 != 0 {
                return Err(Status::Unaligned);
            }
            user_range(utcb, 4096)?;
            let priority = (config & 0xff) as u8;
            let cpu = ((config >> 8) & 0xff) as usize;
            if config & 0xffff_0000 != 0 || cpu >= sched::cpu_count() {
                return Err(Status::InvalidArgument);
            }
            let fault = match config >> 32 {
                0 => None,
                s => Some(lookup::<Endpoint>(k, space, s - 1, EndpointRights::CALL)?),
            };
            let start = sched::ThreadStart {
                entry,
                stack,
                utcb,
                priority,
                cpu,
                fault_endpoint: fault,
            };
            let t = k.create_thread(pd, start)?;
            k.caps.create(
                space,
                a[1],
                ObjectKind::Thread,
                t,
                ObjectKind::Thread.valid_rights(),
            )?;
            Ok(DONE)
        }
        Syscall::ThreadResume => {
            let t = lookup::<Thread>(k, space, a[0], ThreadRights::CONTROL)?;
            k.thread_mut(me).ctx.rax = Status::Ok.code();
            k.resume(t);
            Ok(Outcome::Blocked)
        }
        Syscall::ThreadSuspend => {
            let t = lookup::<Thread>(k, space, a[0], ThreadRights::CONTROL)?;
            k.thread_mut(me).ctx.rax = Status::Ok.code();
            k.suspend(t);
            Ok(Outcome::Blocked)
        }
        Syscall::ThreadSetAffinity => {
            let t = lookup::<Thread>(k, space, a[0], ThreadRights::SET_AFFINITY)?;
            let cpu = usize::try_from(a[1]).map_err(|_| Status::InvalidArgument)?;
            if cpu >= sched::cpu_count() {
                return Err(Status::InvalidArgument);
            }
            k.set_affinity(t, cpu);
            Ok(DONE)
        }
        Syscall::EndpointCreate => {
            lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::CREATE_ENDPOINT)?;
            vacant(k, space, a[1])?;
            let ep = k.create_endpoint();
            k.caps.create(
                space,
                a[1],
                ObjectKind::Endpoint,
                ep,
                ObjectKind::Endpoint.valid_rights(),
            )?;
            Ok(DONE)
        }
        Syscall::NotificationCreate => {
            lookup::<ProtectionDomain>(
                k,
                space,
                a[0],
                ProtectionDomainRights::CREATE_NOTIFICATION,
            )?;
            vacant(k, space, a[1])?;
            let n = k.create_notification();
            k.caps.create(
                space,
                a[1],
                ObjectKind::Notification,
                n,
                ObjectKind::Notification.valid_rights(),
            )?;
            Ok(DONE)
        }
        Syscall::CurrentCpu => Ok(Outcome::Done([Some(k.thread(me).cpu as u64), None, None])),
        Syscall::CapDelegate => {
            let dst = lookup::<ProtectionDomain>(k, space, a[1], ProtectionDomainRights::empty())?;
            let mask = u32::try_from(a[3]).map_err(|_| Status::InvalidArgument)?;
            k.caps.delegate(space, a[0], dst, a[2], mask)?;
            Ok(DONE)
        }
        Syscall::CapRevoke | Syscall::CapDelete => {
            let mut keys = Vec::new();
            let n = if call == Syscall::CapRevoke {
                k.caps
                    .revoke_with(space, a[0], &mut |_| {}, &mut |_, key| keys.push(key))?
            } else {
                k.caps
                    .delete_with(space, a[0], &mut |_| {}, &mut |_, key| keys.push(key))?
            };
            k.drop_mappings(keys);
            Ok(Outcome::Done([Some(n as u64), None, None]))
        }
        Syscall::CapInfo => {
            let cap = *k.caps.get(space, a[0])?;
            let detail = match cap.kind() {
                ObjectKind::Memory => k
                    .memory
                    .get(cap.object() as usize)
                    .and_then(|m| m.as_ref())
                    .map_or(0, |m| u64::from(m.order)),
                _ => 0,
            };
            Ok(Outcome::Done([
                Some(u64::from(cap.kind().code())),
                Some(u64::from(cap.rights())),
                Some(detail),
            ]))
        }
        Syscall::MemMap => mem_map(k, space, a),
        Syscall::MemUnmap => {
            let pd = lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::empty())?;
            let size = page_size(a[2])?;
            let vaddr = a[1];
            if !vaddr.is_multiple_of(size.bytes()) {
                return Err(Status::Unaligned);
            }
            user_range(vaddr, size.bytes())?;
            let node = match k.pds[pd as usize]
                .as_ref()
                .and_then(|p| p.mappings.get(vaddr))
            {
                Some((node, s)) if s == size => node,
                _ => return Err(Status::NotMapped),
            };
            let mut keys = Vec::new();
            k.caps
                .remove_node(node, &mut |_| {}, &mut |_, key| keys.push(key))?;
            k.drop_mappings(keys);
            Ok(DONE)
        }
        Syscall::MemSplit => {
            let src = lookup::<Memory>(k, space, a[0], MemoryRights::DELEGATE)?;
            vacant(k, space, a[3])?;
            let (offset, order) = (a[1], a[2]);
            let obj = k.memory[src as usize].ok_or(Status::Inconsistent)?;
            if order > u64::from(obj.order) {
                return Err(Status::OutOfRange);
            }
            let pages = 1u64 << order;
            if offset % pages != 0 {
                return Err(Status::Unaligned);
            }
            if offset
                .checked_add(pages)
                .is_none_or(|end| end > 1u64 << obj.order)
            {
                return Err(Status::OutOfRange);
            }
            let part = k.create_memory(obj.base + offset * 4096, order as u8);
            if let Err(e) = k
                .caps
                .derive_object(space, a[0], space, a[3], part, u32::MAX)
            {
                sched::uninsert(&mut k.memory, part);
                return Err(e.into());
            }
            Ok(DONE)
        }
        Syscall::EptCreate => {
            let pd =
                lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::CREATE_EPT)?;
            let _ = pd;
            vacant(k, space, a[1])?;
            let mut pool = Pool::default();
            take_donation(k, space, a[2], &mut pool)?;
            let ept = EptSpace::new(pool).ok_or(Status::OutOfMemory)?;
            let e = insert_ept(k, ept);
            k.caps.create(
                space,
                a[1],
                ObjectKind::Ept,
                e,
                ObjectKind::Ept.valid_rights(),
            )?;
            Ok(DONE)
        }
        Syscall::EptDonate => {
            let e = lookup::<Ept>(k, space, a[0], EptRights::MAP)?;
            let mut pool = Pool::default();
            take_donation(k, space, a[1], &mut pool)?;
            let ept = k.epts[e as usize].as_mut().ok_or(Status::Inconsistent)?;
            ept.pool.append(pool);
            Ok(Outcome::Done([Some(ept.pool.len() as u64), None, None]))
        }
        Syscall::EptReclaim => {
            let e = lookup::<Ept>(k, space, a[0], EptRights::MAP)?;
            let mut returned = 0u64;
            while returned < a[2] {
                let slot = a[1].checked_add(returned).ok_or(Status::InvalidSelector)?;
                if vacant(k, space, slot).is_err() {
                    break;
                }
                let Some(frame) = k.epts[e as usize].as_mut().and_then(|x| x.pool.pop()) else {
                    break;
                };
                k.donated.release_page(frame);
                let obj = k.create_memory(frame, 0);
                k.caps.create(
                    space,
                    slot,
                    ObjectKind::Memory,
                    obj,
                    ObjectKind::Memory.valid_rights(),
                )?;
                returned += 1;
            }
            Ok(Outcome::Done([Some(returned), None, None]))
        }
        Syscall::EptMap => ept_map(k, space, a),
        Syscall::EptUnmap => {
            let e = lookup::<Ept>(k, space, a[0], EptRights::UNMAP)?;
            let size = page_size(a[2])?;
            if !a[1].is_multiple_of(size.bytes()) {
                return Err(Status::Unaligned);
            }
            let node = match k.epts[e as usize]
                .as_ref()
                .and_then(|x| x.mappings.get(a[1]))
            {
                Some((node, s)) if s == size => node,
                _ => return Err(Status::NotMapped),
            };
            let mut keys = Vec::new();
            k.caps
                .remove_node(node, &mut |_| {}, &mut |_, key| keys.push(key))?;
            let n = keys.len() as u64;
            k.drop_mappings(keys);
            Ok(Outcome::Done([Some(n), None, None]))
        }
        Syscall::EptUnmapRange => {
            let e = lookup::<Ept>(k, space, a[0], EptRights::UNMAP)?;
            let (start, length) = (a[1], a[2]);
            if !start.is_multiple_of(4096) || !length.is_multiple_of(4096) {
                return Err(Status::Unaligned);
            }
            let end = start
                .checked_add(length)
                .filter(|&end| length != 0 && end <= 1 << 48)
                .ok_or(Status::OutOfRange)?;
            let leaves = k.epts[e as usize]
                .as_ref()
                .ok_or(Status::Inconsistent)?
                .nodes_overlapping(start, end);
            // A leaf may derive from another leaf of the same range (an EPT mapped from
            // itself): each removal drops what it took at once, and a leaf already gone is
            // skipped. Every CPU is invalidated once, at the end, whatever happens.
            let (mut removed, mut spaces) = (0u64, Vec::new());
            let mut keys = Vec::new();
            let mut result = Ok(());
            for (address, node) in leaves {
                let live = k.epts[e as usize]
                    .as_ref()
                    .and_then(|x| x.mappings.get(address))
                    .is_some_and(|(n, _)| n == node);
                if !live {
                    continue;
                }
                if let Err(err) = k
                    .caps
                    .remove_node(node, &mut |_| {}, &mut |_, key| keys.push(key))
                {
                    result = Err(err.into());
                    break;
                }
                removed += keys.len() as u64;
                spaces.extend(keys.drain(..).filter_map(|key| k.drop_mapping(key)));
            }
            k.invalidate_spaces(spaces);
            result.map(|()| Outcome::Done([Some(removed), None, None]))
        }
        Syscall::EptInvalidate => {
            let e = lookup::<Ept>(k, space, a[0], EptRights::INVALIDATE)?;
            k.invalidate_ept(e);
            Ok(DONE)
        }
        Syscall::EptRead | Syscall::EptWrite => {
            let write = call == Syscall::EptWrite;
            let right = if write {
                EptRights::MAP
            } else {
                EptRights::MAP_SOURCE
            };
            let e = lookup::<Ept>(k, space, a[0], right)?;
            let (gpa, count) = (a[1], a[2]);
            if count == 0 || count > abi::UTCB_WORDS as u64 {
                return Err(Status::InvalidArgument);
            }
            if !gpa.is_multiple_of(8) {
                return Err(Status::Unaligned);
            }
            let utcb = k.thread(me).utcb + UTCB_WORDS_OFFSET;
            let ept = k.epts[e as usize].as_ref().ok_or(Status::Inconsistent)?;
            let mut done = 0u64;
            while done < count {
                let at = gpa.checked_add(done * 8).ok_or(Status::OutOfRange)?;
                let leaf = ept.lookup(at).ok_or(Status::NotBacked)?;
                let needed = if write { Rights::WRITE } else { Rights::READ };
                if !leaf.rights.contains(needed) {
                    return Err(Status::NotBacked);
                }
                let in_page = (4096 - (at & 0xfff)) / 8;
                let n = in_page.min(count - done) as usize;
                let host = leaf.frame + (at & leaf.size.offset_mask());
                let (from, to) = if write {
                    (utcb + done * 8, host)
                } else {
                    (host, utcb + done * 8)
                };
                if !phys::copy(from, to, n * 8) {
                    return Err(Status::Inconsistent);
                }
                done += n as u64;
            }
            Ok(Outcome::Done([Some(count), None, None]))
        }
        Syscall::VcpuCreate => {
            let pd =
                lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::CREATE_VCPU)?;
            vacant(k, space, a[1])?;
            let e = lookup::<Ept>(k, space, a[2], EptRights::MAP)?;
            let ep = lookup::<Endpoint>(k, space, a[3], EndpointRights::CALL)?;
            let config = a[4];
            let priority = (config & 0xff) as u8;
            let cpu = ((config >> 8) & 0xff) as usize;
            if config & 0xffff_0000 != 0 || cpu >= sched::cpu_count() {
                return Err(Status::InvalidArgument);
            }
            let t = k.create_vcpu(pd, e, ep, priority, cpu, (config >> 32) as u32)?;
            k.caps.create(
                space,
                a[1],
                ObjectKind::Vcpu,
                t,
                ObjectKind::Vcpu.valid_rights(),
            )?;
            Ok(DONE)
        }
        Syscall::VcpuRun => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::RUN)?;
            k.thread_mut(me).ctx.rax = Status::Ok.code();
            k.resume(t);
            Ok(Outcome::Blocked)
        }
        Syscall::VcpuRecall => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::RECALL)?;
            k.recall(t);
            Ok(DONE)
        }
        Syscall::VcpuWriteState => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::WRITE_STATE)?;
            // a1 bit 0: run it too; bit 1: shadow VMCS pairs follow the reply image.
            if a[1] > 3 {
                return Err(Status::InvalidArgument);
            }
            let run = a[1] & 1 != 0;
            if run {
                lookup::<Vcpu>(k, space, a[0], VcpuRights::RUN)?;
            }
            write_vcpu_state(k, me, t, a[1] & 2 != 0)?;
            if run {
                // As `VcpuRun`, in the same call: the switch between a nested guest's two
                // vCPU objects is one system call.
                k.thread_mut(me).ctx.rax = Status::Ok.code();
                k.resume(t);
                return Ok(Outcome::Blocked);
            }
            Ok(DONE)
        }
        Syscall::VcpuSwitch => {
            // The exit being answered stops; vCPU a1 gets the state in the UTCB and runs; the
            // caller waits on endpoint a0: a nested VMM's switch between a guest
            // hypervisor's two vCPU objects in one call.
            let ep = lookup::<Endpoint>(k, space, a[0], EndpointRights::RECEIVE)?;
            let t = lookup::<Vcpu>(k, space, a[1], VcpuRights::WRITE_STATE | VcpuRights::RUN)?;
            if a[2] & !2 != 0 {
                return Err(Status::InvalidArgument);
            }
            let caller = k
                .thread(me)
                .caller
                .filter(|&c| k.thread(c).in_exit)
                .ok_or(Status::NoCaller)?;
            if caller == t {
                return Err(Status::InvalidArgument);
            }
            write_vcpu_state(k, me, t, a[2] & 2 != 0)?;
            k.stop_caller(me);
            k.resume(t);
            k.reply_recv(me, ep, None)?;
            Ok(Outcome::Blocked)
        }
        Syscall::VcpuReadState => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::READ_STATE)?;
            let mask = u32::try_from(a[1])
                .ok()
                .and_then(StateMask::from_bits)
                .ok_or(Status::InvalidArgument)?;
            if k.thread(t).state == State::Running {
                return Err(Status::Busy);
            }
            k.vcpu_vmcs_here(t)?;
            let v = k.thread(t).vcpu.as_deref().ok_or(Status::Inconsistent)?;
            let words = crate::vm::capture_state(v, mask);
            phys::write_words(k.thread(me).utcb + UTCB_WORDS_OFFSET, &words);
            Ok(DONE)
        }
        Syscall::VcpuSetMask => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::WRITE_STATE)?;
            let mask = u32::try_from(a[2])
                .ok()
                .and_then(StateMask::from_bits)
                .ok_or(Status::InvalidArgument)?;
            let v = k
                .thread_mut(t)
                .vcpu
                .as_deref_mut()
                .ok_or(Status::Inconsistent)?;
            if a[1] == abi::ALL_EXITS {
                v.masks = [mask.bits(); 80];
            } else {
                *v.masks
                    .get_mut(a[1] as usize)
                    .ok_or(Status::InvalidArgument)? = mask.bits();
            }
            Ok(DONE)
        }
        Syscall::VcpuBind => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::BIND)?;
            let e = lookup::<Ept>(k, space, a[1], EptRights::MAP)?;
            let v = k
                .thread_mut(t)
                .vcpu
                .as_deref_mut()
                .ok_or(Status::Inconsistent)?;
            v.ept = e;
            v.eptp_dirty = true;
            Ok(DONE)
        }
        Syscall::VcpuSetAffinity => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::RUN)?;
            let cpu = usize::try_from(a[1]).map_err(|_| Status::InvalidArgument)?;
            if cpu >= sched::cpu_count() {
                return Err(Status::InvalidArgument);
            }
            k.set_affinity(t, cpu);
            Ok(DONE)
        }
        Syscall::VmxCapability => {
            if crate::percpu::current().vmx_state() != crate::percpu::VmxState::Root {
                return Err(Status::Unsupported);
            }
            let index = u32::try_from(a[0]).map_err(|_| Status::InvalidArgument)?;
            let value = crate::vmx::capabilities()
                .msr(index)
                .ok_or(Status::InvalidArgument)?;
            Ok(Outcome::Done([Some(value), None, None]))
        }
        Syscall::IoPortMap => {
            let r = lookup::<IoPorts>(k, space, a[0], IoPortRights::USE)?;
            let pd = lookup::<ProtectionDomain>(k, space, a[1], ProtectionDomainRights::empty())?;
            let (first, count) = port_range(k, r, a[2], a[3])?;
            if k.pds[pd as usize]
                .as_ref()
                .is_some_and(|p| p.io_grants.contains_key(&first))
            {
                return Err(Status::AlreadyMapped);
            }
            let key = NodeKey::Mapping {
                space: sched::IO_SPACE_BASE + pd,
                page: u64::from(first),
                level: 0,
            };
            let node = k.caps.derive_node(space, a[0], key)?;
            k.grant_ports(pd, first, count, node)?;
            Ok(DONE)
        }
        Syscall::IoPortSplit => {
            let r = lookup::<IoPorts>(k, space, a[0], IoPortRights::DELEGATE)?;
            vacant(k, space, a[3])?;
            let range = port_range(k, r, a[1], a[2])?;
            let part = k.create_io_ports(range.0, range.1);
            if let Err(e) = k
                .caps
                .derive_object(space, a[0], space, a[3], part, u32::MAX)
            {
                sched::uninsert(&mut k.io_ranges, part);
                return Err(e.into());
            }
            Ok(DONE)
        }
        Syscall::IrqBind => {
            let r = lookup::<Interrupts>(k, space, a[0], InterruptRights::BIND)?;
            let n = lookup::<Notification>(k, space, a[2], NotificationRights::SIGNAL)?;
            if a[3] & !abi::IRQ_ISA != 0 {
                return Err(Status::InvalidArgument);
            }
            let (gsi, level, low) = if a[3] & abi::IRQ_ISA != 0 {
                let irq = u8::try_from(a[1])
                    .ok()
                    .filter(|&i| i < 16)
                    .ok_or(Status::InvalidArgument)?;
                crate::ioapic::isa_irq(irq)
            } else {
                let gsi = u32::try_from(a[1]).map_err(|_| Status::OutOfRange)?;
                (gsi, true, true)
            };
            let (first, count) = k.irq_ranges[r as usize].ok_or(Status::Inconsistent)?;
            if gsi < first || gsi >= first + count || gsi >= crate::ioapic::MAX_GSI {
                return Err(Status::OutOfRange);
            }
            if k.irq_bindings[gsi as usize].is_some() {
                return Err(Status::AlreadyMapped);
            }
            let bsp = crate::percpu::CPUS[0]
                .apic_id
                .load(core::sync::atomic::Ordering::Relaxed);
            if !crate::ioapic::route(gsi, bsp, level, low, false) {
                return Err(Status::Unsupported);
            }
            k.irq_bindings[gsi as usize] = Some((n, level));
            Ok(Outcome::Done([Some(u64::from(gsi)), None, None]))
        }
        Syscall::IrqAck => {
            let r = lookup::<Interrupts>(k, space, a[0], InterruptRights::BIND)?;
            let gsi = u32::try_from(a[1]).map_err(|_| Status::OutOfRange)?;
            let (first, count) = k.irq_ranges[r as usize].ok_or(Status::Inconsistent)?;
            if gsi < first
                || gsi >= first + count
                || k.irq_bindings.get(gsi as usize).is_none_or(Option::is_none)
            {
                return Err(Status::NotMapped);
            }
            crate::ioapic::set_masked(gsi, false);
            Ok(DONE)
        }
        Syscall::VcpuShadowVmcs => {
            use vcpu::controls::SecondaryControls;
            use vcpu::vmcs::{VmcsAccess, VmcsField as F};
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::WRITE_STATE)?;
            if a[1] > 1 {
                return Err(Status::InvalidArgument);
            }
            if k.thread(t).state == State::Running {
                return Err(Status::Busy);
            }
            let allowed = crate::vmx::capabilities().secondary_settings().allowed1;
            if allowed & u64::from(SecondaryControls::VMCS_SHADOWING.bits()) == 0 {
                return Err(Status::Unsupported);
            }
            if let Some(shadow) = k
                .thread(t)
                .vcpu
                .as_deref()
                .and_then(|v| v.shadow.as_ref().map(|s| s.vmcs))
            {
                // Link (a1 = 0) or unlink (1): with the link pointer all ones, the guest's
                // shadowed VMREAD/VMWRITE fail (VMfailInvalid) without an exit, as a
                // hypervisor's do with no current VMCS (SDM Vol. 3C §31.3).
                k.vcpu_vmcs_here(t)?;
                let link = if a[1] == 0 { shadow } else { u64::MAX };
                crate::vm::HwVmcs.write(F::VMCS_LINK_POINTER, link);
                if let Some(s) = k
                    .thread_mut(t)
                    .vcpu
                    .as_deref_mut()
                    .and_then(|v| v.shadow.as_mut())
                {
                    s.linked = a[1] == 0;
                }
                return Ok(DONE);
            }
            if a[1] == 1 {
                return Err(Status::NotMapped);
            }
            let pages = crate::memory::alloc_zeroed_pages(4).ok_or(Status::OutOfMemory)?;
            let (shadow, read_bitmap, write_bitmap) = (pages, pages + 4096, pages + 8192);
            let revision = crate::vmx::capabilities().revision_id() | (1 << 31);
            phys::write(shadow, &revision.to_le_bytes());
            crate::vm::clear(shadow);
            phys::write(read_bitmap, &[0xff; 4096]);
            phys::write(write_bitmap, &[0xff; 4096]);
            k.vcpu_vmcs_here(t)?;
            let mut m = crate::vm::HwVmcs;
            m.write(F::VMCS_LINK_POINTER, shadow);
            m.write(F::VMREAD_BITMAP_ADDRESS, read_bitmap);
            m.write(F::VMWRITE_BITMAP_ADDRESS, write_bitmap);
            let secondary = m.read(F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS);
            m.write(
                F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                secondary | u64::from(SecondaryControls::VMCS_SHADOWING.bits()),
            );
            let v = k
                .thread_mut(t)
                .vcpu
                .as_deref_mut()
                .ok_or(Status::Inconsistent)?;
            v.shadow = Some(crate::vm::ShadowVmcs {
                vmcs: shadow,
                read_bitmap,
                write_bitmap,
                linked: true,
                written: [F::VMCS_LINK_POINTER; crate::vm::SHADOW_WRITTEN_MAX],
                written_count: 0,
            });
            Ok(DONE)
        }
        Syscall::VcpuShadowFields => {
            let t = lookup::<Vcpu>(k, space, a[0], VcpuRights::WRITE_STATE)?;
            let count = usize::try_from(a[1]).map_err(|_| Status::InvalidArgument)?;
            if count == 0 || count > abi::UTCB_WORDS {
                return Err(Status::InvalidArgument);
            }
            let mut words = [0u64; abi::UTCB_WORDS];
            phys::read_words(k.thread(me).utcb + UTCB_WORDS_OFFSET, &mut words[..count]);
            let v = k
                .thread_mut(t)
                .vcpu
                .as_deref_mut()
                .ok_or(Status::Inconsistent)?;
            let s = v.shadow.as_mut().ok_or(Status::NotMapped)?;
            let mut written = s.written;
            let mut written_count = s.written_count;
            for w in &words[..count] {
                let Some(field) = vcpu::vmcs::VmcsField::from_encoding(*w as u32) else {
                    return Err(Status::InvalidArgument);
                };
                if w >> 34 != 0 {
                    return Err(Status::InvalidArgument);
                }
                if w & abi::SHADOW_WRITE != 0 && !written[..written_count].contains(&field) {
                    // More write-shadowed fields than an exit message carries.
                    if written_count == written.len() {
                        return Err(Status::InvalidArgument);
                    }
                    written[written_count] = field;
                    written_count += 1;
                }
            }
            (s.written, s.written_count) = (written, written_count);
            for w in &words[..count] {
                // SDM Vol. 3C 25.6.15: bits 14:0 of the encoding index the bitmaps.
                let bit = (*w as u32 & 0x7fff) as u64;
                for (flag, bitmap) in [
                    (abi::SHADOW_READ, s.read_bitmap),
                    (abi::SHADOW_WRITE, s.write_bitmap),
                ] {
                    if w & flag != 0 {
                        let mut byte = [0u8; 1];
                        phys::read(bitmap + bit / 8, &mut byte);
                        byte[0] &= !(1 << (bit % 8));
                        phys::write(bitmap + bit / 8, &byte);
                    }
                }
            }
            Ok(DONE)
        }
        Syscall::VcpuShadowAccess => {
            let t = lookup::<Vcpu>(
                k,
                space,
                a[0],
                VcpuRights::READ_STATE | VcpuRights::WRITE_STATE,
            )?;
            let pairs = usize::try_from(a[1]).map_err(|_| Status::InvalidArgument)?;
            if pairs == 0 || pairs > abi::UTCB_WORDS / 2 || a[2] > 1 {
                return Err(Status::InvalidArgument);
            }
            if k.thread(t).state == State::Running {
                return Err(Status::Busy);
            }
            let at = k.thread(me).utcb + UTCB_WORDS_OFFSET;
            shadow_access(k, t, at, pairs, a[2] == 1)?;
            Ok(DONE)
        }
        Syscall::DebugExit => {
            if space != 0 {
                return Err(Status::InsufficientRights);
            }
            match a[0] {
                0 => crate::scenario::shutdown(true),
                1 => crate::scenario::shutdown(false),
                _ => Err(Status::InvalidArgument),
            }
        }
    }
}

/// `VcpuWriteState`'s work (docs/abi.md): the reply image in `me`'s UTCB (and, with
/// `shadow`, the shadow-VMCS pairs after it) into vCPU `t`, which must not run.
fn write_vcpu_state(k: &mut Kernel, me: u32, t: u32, shadow: bool) -> Result<(), Status> {
    use vcpu::message::{REPLY_WORDS, Reply};
    if k.thread(t).state == State::Running {
        return Err(Status::Busy);
    }
    let mut words = [0u64; REPLY_WORDS];
    phys::read_words(k.thread(me).utcb + UTCB_WORDS_OFFSET, &mut words);
    let reply = Reply::from_words(&words).map_err(|_| Status::InvalidArgument)?;
    if shadow {
        let at = k.thread(me).utcb + UTCB_WORDS_OFFSET + 8 * REPLY_WORDS as u64;
        let pairs = phys::read_u64(at)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0 && n <= (abi::UTCB_WORDS - REPLY_WORDS - 1) / 2)
            .ok_or(Status::InvalidArgument)?;
        shadow_access(k, t, at + 8, pairs, true)?;
    }
    k.vcpu_vmcs_here(t)?;
    let v = k
        .thread_mut(t)
        .vcpu
        .as_deref_mut()
        .ok_or(Status::Inconsistent)?;
    vcpu::message::load(
        &mut crate::vm::HwVmcs,
        &mut v.regs,
        reply.mask,
        &reply.state,
    )
    .map_err(|_| Status::InvalidArgument)?;
    crate::vm::fix_guest_control_registers(true);
    Ok(())
}

/// Reads (`write` false) or writes the shadow VMCS fields of vCPU `t` named by the `pairs`
/// (field, value) word pairs at physical `at` (the caller's UTCB): every field is checked
/// first (nothing happens if one is bad), then each value is read or written in place.
fn shadow_access(k: &mut Kernel, t: u32, at: u64, pairs: usize, write: bool) -> Result<(), Status> {
    use vcpu::vmcs::VmcsAccess;
    let field_at = |i: usize| {
        phys::read_u64(at + 16 * i as u64)
            .and_then(|w| u32::try_from(w).ok())
            .and_then(vcpu::vmcs::VmcsField::from_encoding)
    };
    if (0..pairs).any(|i| field_at(i).is_none()) {
        return Err(Status::InvalidArgument);
    }
    k.vcpu_vmcs_here(t)?;
    let v = k.thread(t).vcpu.as_deref().ok_or(Status::Inconsistent)?;
    let s = v.shadow.as_ref().ok_or(Status::NotMapped)?.vmcs;
    crate::vm::with_shadow(s, v.vmcs, |m| {
        for i in 0..pairs {
            // Another thread of the caller's PD may rewrite the UTCB meanwhile: a field that
            // no longer decodes ends the call.
            let Some(field) = field_at(i) else {
                return Err(Status::Inconsistent);
            };
            let value = at + 16 * i as u64 + 8;
            if write {
                let word = phys::read_u64(value).ok_or(Status::Inconsistent)?;
                m.write(field, word);
            } else {
                phys::write_words(value, &[m.read(field)]);
            }
        }
        Ok(())
    })
    .ok_or(Status::Inconsistent)?
}

/// Checks `[first, first + count)` against the I/O-port object `r`.
fn port_range(k: &Kernel, r: u32, first: u64, count: u64) -> Result<(u32, u32), Status> {
    let (base, len) = k.io_ranges[r as usize].ok_or(Status::Inconsistent)?;
    let end = first.checked_add(count).ok_or(Status::OutOfRange)?;
    if count == 0 {
        return Err(Status::InvalidArgument);
    }
    if first < u64::from(base) || end > u64::from(base) + u64::from(len) {
        return Err(Status::OutOfRange);
    }
    Ok((first as u32, count as u32))
}

const UTCB_WORDS_OFFSET: u64 = core::mem::offset_of!(abi::Utcb, words) as u64;

fn insert_ept(k: &mut Kernel, ept: EptSpace) -> u32 {
    if let Some(i) = k.epts.iter().position(Option::is_none) {
        k.epts[i] = Some(ept);
        i as u32
    } else {
        k.epts.push(Some(ept));
        (k.epts.len() - 1) as u32
    }
}

/// Consumes memory capability `sel` (WRITE, DELEGATE) as a donation to the kernel: it and
/// everything derived from it go, and its frames join `pool` and the donated set.
fn take_donation(k: &mut Kernel, space: u32, sel: u64, pool: &mut Pool) -> Result<(), Status> {
    let m = lookup::<Memory>(k, space, sel, MemoryRights::WRITE | MemoryRights::DELEGATE)?;
    let obj = k.memory[m as usize].ok_or(Status::Inconsistent)?;
    let pages = 1u64 << obj.order;
    let end = obj.base + pages * 4096;
    if k.donated.overlaps(obj.base, end) {
        return Err(Status::InsufficientRights);
    }
    let node = k.caps.get(space, sel)?.node();
    if mapped_elsewhere(k, node, obj.base, end) {
        return Err(Status::Busy);
    }
    let mut keys = Vec::new();
    k.caps
        .delete_with(space, sel, &mut |_| {}, &mut |_, key| keys.push(key))?;
    k.drop_mappings(keys);
    k.donated.add(obj.base, end);
    // Pool frames are zero (`ept_space::Pool`): zeroed once here, not per table.
    phys::zero(obj.base, (pages * 4096) as usize);
    pool.add(obj.base, pages);
    Ok(())
}

/// Whether a mapping outside the derivation subtree of capability node `node` (which the
/// donation removes) reaches physical `[base, end)`. Every mapping of memory derives from a
/// capability of the boot block the memory came from, so the block's tree holds them all.
fn mapped_elsewhere(k: &Kernel, node: caps::NodeId, base: u64, end: u64) -> bool {
    let tree = k.caps.tree();
    let mut root = node;
    while let Some(parent) = tree.parent(root) {
        root = parent;
    }
    tree.descendants(root).any(|d| {
        let Some(NodeKey::Mapping { space, page, level }) = tree.key(d).and_then(NodeKey::unpack)
        else {
            return false;
        };
        if space >= sched::IO_SPACE_BASE || level > 2 {
            return false;
        }
        let address = page << 12;
        let size = 1u64 << (12 + 9 * u64::from(level));
        let frame = if space >= EPT_SPACE_BASE {
            k.epts
                .get((space - EPT_SPACE_BASE) as usize)
                .and_then(Option::as_ref)
                .and_then(|e| e.lookup(address))
                .map(|leaf| leaf.frame)
        } else {
            k.pds
                .get(space as usize)
                .and_then(Option::as_ref)
                .and_then(|pd| pd.aspace.translate(address))
                .map(|(frame, _)| frame)
        };
        frame.is_some_and(|frame| frame < end && frame + size > base) && !tree.is_ancestor(node, d)
    })
}

/// `EptMap` (docs/abi.md): memory or another EPT as the source, clamped to the source.
fn ept_map(k: &mut MutexGuard<'static, Kernel>, space: u32, a: [u64; 6]) -> CallResult {
    let (src_offset, gpa, flags) = (a[2], a[3], a[4]);
    if flags >> 20 != 0 || flags & 0xf8 != 0 {
        return Err(Status::InvalidArgument);
    }
    let requested = page_size((flags >> 8) & 0xff)?;
    let memtype = MemType::from_bits(((flags >> 16) & 7) as u8).ok_or(Status::InvalidArgument)?;
    let ignore_pat = flags & (1 << 19) != 0;
    let wanted = Rights::from_bits_truncate((flags & 7) as u8);
    if wanted.is_empty() {
        return Err(Status::InvalidArgument);
    }
    if gpa
        .checked_add(requested.bytes())
        .is_none_or(|end| end > 1 << 48)
    {
        return Err(Status::OutOfRange);
    }
    let e = lookup::<Ept>(k, space, a[0], EptRights::MAP)?;
    let key = |gpa: u64, size: PageSize| NodeKey::Mapping {
        space: EPT_SPACE_BASE + e,
        page: gpa >> 12,
        level: (size.shift() / 9 - 1) as u8,
    };
    // An occupied address is found by the table walk itself (`MapError::AlreadyMapped`),
    // which then undoes the node: no separate lookup on the common path.
    let (frame, gpa, size, rights, memtype, ignore_pat, node) =
        match k.caps.get(space, a[1])?.kind() {
            ObjectKind::Ept => {
                // The page of the source that holds `src_offset`, mapped at the page of this
                // EPT that holds `gpa`: as large as asked, the source's page and the two
                // addresses' alignment allow.
                let src = lookup::<Ept>(k, space, a[1], EptRights::MAP_SOURCE)?;
                if !gpa.is_multiple_of(4096) || !src_offset.is_multiple_of(4096) {
                    return Err(Status::Unaligned);
                }
                let source = k.epts[src as usize].as_ref().ok_or(Status::Inconsistent)?;
                let leaf = source.lookup(src_offset).ok_or(Status::NotBacked)?;
                let rights = wanted & leaf.rights;
                if rights.is_empty() {
                    return Err(Status::NotBacked);
                }
                let mut size = requested;
                while size != PageSize::Size4K
                    && (leaf.size.bytes() < size.bytes()
                        || gpa & size.offset_mask() != src_offset & size.offset_mask())
                {
                    size = if size == PageSize::Size1G {
                        PageSize::Size2M
                    } else {
                        PageSize::Size4K
                    };
                }
                let (gpa, src_base) = (size.align_down(gpa), size.align_down(src_offset));
                let leaf_base = leaf.size.align_down(src_offset);
                let frame = leaf.frame + (src_base - leaf_base);
                // A page the source maps uncacheable stays uncacheable, whatever PAT says.
                let (memtype, ignore_pat) = if leaf.memtype == MemType::Uncacheable {
                    (MemType::Uncacheable, true)
                } else {
                    (memtype, ignore_pat)
                };
                let parent = source
                    .mappings
                    .get(leaf_base)
                    .ok_or(Status::Inconsistent)?
                    .0;
                let node = k.caps.derive_from_node(parent, key(gpa, size))?;
                (frame, gpa, size, rights, memtype, ignore_pat, node)
            }
            _ => {
                let size = requested;
                if !gpa.is_multiple_of(size.bytes()) {
                    return Err(Status::Unaligned);
                }
                let mut need = MemoryRights::MAP | MemoryRights::READ;
                if wanted.contains(Rights::WRITE) {
                    need |= MemoryRights::WRITE;
                }
                if wanted.contains(Rights::EXECUTE) {
                    need |= MemoryRights::EXECUTE;
                }
                let m = lookup::<Memory>(k, space, a[1], need)?;
                let obj = k.memory[m as usize].ok_or(Status::Inconsistent)?;
                let pages = size.bytes() / 4096;
                if !src_offset.is_multiple_of(pages) {
                    return Err(Status::Unaligned);
                }
                if src_offset
                    .checked_add(pages)
                    .is_none_or(|end| end > 1u64 << obj.order)
                {
                    return Err(Status::OutOfRange);
                }
                let frame = obj.base + src_offset * 4096;
                if k.donated.overlaps(frame, frame + size.bytes()) {
                    return Err(Status::InsufficientRights);
                }
                let node = k.caps.derive_node(space, a[1], key(gpa, size))?;
                (frame, gpa, size, wanted, memtype, ignore_pat, node)
            }
        };
    let ept = k.epts[e as usize].as_mut().ok_or(Status::Inconsistent)?;
    let result = if ept.charge() {
        ept.map(gpa, frame, size, rights, memtype, ignore_pat)
            .map_err(map_status)
    } else {
        Err(Status::OutOfMemory)
    };
    if let Err(status) = result {
        if status != Status::OutOfMemory || ept.budget > 0 {
            ept.refund();
        }
        let _ = k.caps.remove_node(node, &mut |_| {}, &mut |_, _| {});
        return Err(status);
    }
    ept.mappings.insert(gpa, node, size);
    Ok(Outcome::Done([
        Some(u64::from(size.shift() - 12)),
        Some(u64::from(rights.bits())),
        Some(u64::from(memtype.bits())),
    ]))
}

/// `MemMap`: memory capability a0 (MAP and the rights mapped), offset a1 pages, PD a2,
/// address a3, rights | order << 8 in a4.
fn mem_map(k: &mut MutexGuard<'static, Kernel>, space: u32, a: [u64; 6]) -> CallResult {
    let (offset, vaddr, flags) = (a[1], a[3], a[4]);
    if flags >> 16 != 0 || flags & 0xf8 != 0 {
        return Err(Status::InvalidArgument);
    }
    let size = page_size((flags >> 8) & 0xff)?;
    let mut wanted = Rights::READ;
    let mut need = MemoryRights::MAP | MemoryRights::READ;
    if flags & 2 != 0 {
        wanted |= Rights::WRITE;
        need |= MemoryRights::WRITE;
    }
    if flags & 4 != 0 {
        wanted |= Rights::EXECUTE;
        need |= MemoryRights::EXECUTE;
    }
    let mem = lookup::<Memory>(k, space, a[0], need)?;
    let pd = lookup::<ProtectionDomain>(k, space, a[2], ProtectionDomainRights::empty())?;
    let obj = k.memory[mem as usize].ok_or(Status::Inconsistent)?;
    let pages = size.bytes() / 4096;
    if offset % pages != 0 || vaddr % size.bytes() != 0 {
        return Err(Status::Unaligned);
    }
    if offset
        .checked_add(pages)
        .is_none_or(|end| end > 1u64 << obj.order)
    {
        return Err(Status::OutOfRange);
    }
    user_range(vaddr, size.bytes())?;
    if k.pds[pd as usize]
        .as_ref()
        .is_some_and(|p| p.mappings.contains_key(vaddr))
    {
        return Err(Status::AlreadyMapped);
    }
    let key = NodeKey::Mapping {
        space: pd,
        page: vaddr >> 12,
        level: (size.shift() / 9 - 1) as u8,
    };
    let node = k.caps.derive_node(space, a[0], key)?;
    let frame = obj.base + offset * 4096;
    if k.donated.overlaps(frame, frame + size.bytes()) {
        return Err(Status::InsufficientRights);
    }
    let target = k.pds[pd as usize].as_mut().ok_or(Status::Inconsistent)?;
    if let Err(e) = target.aspace.map(vaddr, frame, size, wanted) {
        let _ = k.caps.remove_node(node, &mut |_| {}, &mut |_, _| {});
        return Err(map_status(e));
    }
    target.mappings.insert(vaddr, node, size);
    Ok(DONE)
}
