//! System-call dispatch: decodes the registers, validates every argument (one capability
//! lookup path, explicit range and alignment checks), and calls the mechanism in `sched`.
//! The ABI is specified in docs/abi.md and the `abi` crate.

use crate::cpu::TrapFrame;
use crate::sched::{self, Kernel, map_status};
use abi::{MessageInfo, Status, Syscall, USER_BASE, USER_END};
use alloc::vec::Vec;
use caps::object::{Endpoint, Memory, Notification, ProtectionDomain, Thread};
use caps::{
    EndpointRights, MemoryRights, NodeKey, NotificationRights, ObjectKind, ObjectType,
    ProtectionDomainRights, ThreadRights,
};
use ept::entry::{PageSize, Rights};
use spin::MutexGuard;

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
extern "C" fn syscall_dispatch(_frame: *mut TrapFrame) {
    let mut k = sched::kernel();
    let me = k.current();
    let c = &k.thread(me).ctx;
    let nr = c.rax;
    let a = [c.rdi, c.rsi, c.rdx, c.r10, c.r8, c.r9];
    let space = k.pd_of(me);
    let result = handle(&mut k, me, space, nr, a);
    let ctx = &mut k.thread_mut(me).ctx;
    match result {
        Ok(Outcome::Done(r)) => {
            ctx.rax = Status::Ok.code();
            for (reg, v) in [&mut ctx.rdi, &mut ctx.rsi, &mut ctx.rdx].into_iter().zip(r) {
                if let Some(v) = v {
                    *reg = v;
                }
            }
        }
        Ok(Outcome::Blocked) => {}
        Err(status) => ctx.rax = status.code(),
    }
    sched::finish(k);
}

fn lookup<T: ObjectType>(k: &Kernel, space: u32, sel: u64, rights: T::Rights) -> Result<u32, Status> {
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
    if info.is_valid() { Ok(info) } else { Err(Status::InvalidArgument) }
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

/// Removes derivation-tree nodes' mappings and shoots down the affected PDs.
fn drop_mappings(k: &mut Kernel, keys: Vec<NodeKey>) {
    let mut pds: Vec<u32> = keys.into_iter().filter_map(|key| k.drop_mapping(key)).collect();
    pds.sort_unstable();
    pds.dedup();
    for pd in pds {
        k.shootdown(pd);
    }
}

fn handle(k: &mut MutexGuard<'static, Kernel>, me: u32, space: u32, nr: u64, a: [u64; 6]) -> CallResult {
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
            k.reply_recv(me, ep, Some((info, words)));
            Ok(Outcome::Blocked)
        }
        Syscall::Recv => {
            let ep = lookup::<Endpoint>(k, space, a[0], EndpointRights::RECEIVE)?;
            k.reply_recv(me, ep, None);
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
            let pd = lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::CREATE_THREAD)?;
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
            let t = k.create_thread(pd, entry, stack, utcb, priority, cpu, fault)?;
            k.caps.create(space, a[1], ObjectKind::Thread, t, ObjectKind::Thread.valid_rights())?;
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
            k.caps.create(space, a[1], ObjectKind::Endpoint, ep, ObjectKind::Endpoint.valid_rights())?;
            Ok(DONE)
        }
        Syscall::NotificationCreate => {
            lookup::<ProtectionDomain>(k, space, a[0], ProtectionDomainRights::CREATE_NOTIFICATION)?;
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
                k.caps.revoke_with(space, a[0], &mut |_| {}, &mut |_, key| keys.push(key))?
            } else {
                k.caps.delete_with(space, a[0], &mut |_| {}, &mut |_, key| keys.push(key))?
            };
            drop_mappings(k, keys);
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
            if vaddr % size.bytes() != 0 {
                return Err(Status::Unaligned);
            }
            user_range(vaddr, size.bytes())?;
            let node = match k.pds[pd as usize].as_ref().and_then(|p| p.mappings.get(&vaddr)) {
                Some(&(node, s)) if s == size => node,
                _ => return Err(Status::NotMapped),
            };
            let mut keys = Vec::new();
            k.caps.remove_node(node, &mut |_| {}, &mut |_, key| keys.push(key))?;
            drop_mappings(k, keys);
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
            if offset.checked_add(pages).is_none_or(|end| end > 1u64 << obj.order) {
                return Err(Status::OutOfRange);
            }
            let part = k.create_memory(obj.base + offset * 4096, order as u8);
            if let Err(e) = k.caps.derive_object(space, a[0], space, a[3], part, u32::MAX) {
                k.memory[part as usize] = None;
                return Err(e.into());
            }
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
    if offset.checked_add(pages).is_none_or(|end| end > 1u64 << obj.order) {
        return Err(Status::OutOfRange);
    }
    user_range(vaddr, size.bytes())?;
    if k.pds[pd as usize]
        .as_ref()
        .is_some_and(|p| p.mappings.contains_key(&vaddr))
    {
        return Err(Status::AlreadyMapped);
    }
    let key = NodeKey::Mapping { space: pd, page: vaddr >> 12, level: (size.shift() / 9 - 1) as u8 };
    let node = k.caps.derive_node(space, a[0], key)?;
    let frame = obj.base + offset * 4096;
    let target = k.pds[pd as usize].as_mut().ok_or(Status::Inconsistent)?;
    if let Err(e) = target.aspace.map(vaddr, frame, size, wanted) {
        let _ = k.caps.remove_node(node, &mut |_| {}, &mut |_, _| {});
        return Err(map_status(e));
    }
    target.mappings.insert(vaddr, (node, size));
    Ok(DONE)
}
