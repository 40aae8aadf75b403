//! Malformed system calls: each case makes one bad call and names the exact status it must get.
//!
//! Prints one line per case that got another status, and a summary line.

use crate::memory::Memory;
use crate::spawn::Child;
use crate::{Context, Outcome, ensure, status_of};
use abi::{
    EndpointRights, MemoryRights, MessageInfo, ROOT_BOOT_INFO, ROOT_PD, ROOT_THREAD, Status,
    Syscall, USER_BASE, USER_END, thread_config,
};
use alloc::boxed::Box;
use alloc::vec::Vec;
use rt::protocol::ECHO;
use rt::sys::{self, MapRights};
use rt::{Message, Selector};

/// A free, 1 GiB-aligned stretch of the root task's address space for mapping tests.
const TEST_VADDR: u64 = 0x0000_0300_0000_0000;
/// A canonical kernel-half address.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// The kernel image (identity mapped at 2 MiB, below user space).
const KERNEL_IMAGE: u64 = 0x20_0000;

/// What the cases use: capabilities of various kinds and rights, and an empty slot.
struct Fixture {
    /// An empty slot (also the destination of create calls that must fail), and another.
    empty: Selector,
    empty_too: Selector,
    /// A page with all rights.
    page: Selector,
    /// Copies of the page: READ|MAP (no WRITE, no DELEGATE) and READ|WRITE|DELEGATE (no MAP).
    page_read_only: Selector,
    page_no_map: Selector,
    /// The largest boot memory block and its order.
    block: (Selector, u64),
    /// The second echo server's endpoint: all rights, RECEIVE only, CALL only.
    endpoint: Selector,
    endpoint_receive_only: Selector,
    endpoint_call_only: Selector,
}

type Case = (&'static str, Status, Box<dyn Fn(&Fixture) -> Status>);

fn raw(number: u64) -> Status {
    sys::status_of(sys::raw_syscall(number, [0; 6]).status)
}

fn call_info(endpoint: Selector, info: u64) -> Status {
    let msg = Message {
        info: MessageInfo(info),
        words: [0; 4],
    };
    status_of(sys::call(endpoint, &msg))
}

const R: MapRights = MapRights::READ;

fn cases() -> Vec<Case> {
    let read = MapRights::READ.bits();
    let echo = u64::from(ECHO) << 16;
    let entry = TEST_VADDR;
    let stack = TEST_VADDR + 0x1000;
    let cfg = thread_config(1, 0, None);
    let mut v: Vec<Case> = Vec::new();
    let mut case = |name, expected, f: Box<dyn Fn(&Fixture) -> Status>| {
        v.push((name, expected, f));
    };
    use Status::*;
    case("call number 99", InvalidSyscall, Box::new(|_| raw(99)));
    case(
        "call number 8 (unassigned)",
        InvalidSyscall,
        Box::new(|_| raw(8)),
    );
    case(
        "call number 2^63",
        InvalidSyscall,
        Box::new(|_| raw(1 << 63)),
    );
    case(
        "CapInfo on selector 4096",
        InvalidSelector,
        Box::new(|_| status_of(sys::cap_info(4096))),
    );
    case(
        "CapInfo on selector 2^64-1",
        InvalidSelector,
        Box::new(|_| status_of(sys::cap_info(u64::MAX))),
    );
    case(
        "CapInfo on an empty slot",
        EmptySlot,
        Box::new(|f| status_of(sys::cap_info(f.empty))),
    );
    case(
        "CapRevoke on an empty slot",
        EmptySlot,
        Box::new(|f| status_of(sys::cap_revoke(f.empty))),
    );
    case(
        "Call on an empty slot",
        EmptySlot,
        Box::new(|f| status_of(sys::call(f.empty, &Message::new(ECHO, [0; 4])))),
    );
    case(
        "Call on a memory capability",
        WrongType,
        Box::new(|f| status_of(sys::call(f.page, &Message::new(ECHO, [0; 4])))),
    );
    case(
        "Signal on an endpoint",
        WrongType,
        Box::new(|f| status_of(sys::signal(f.endpoint))),
    );
    case(
        "PdCreate on a thread capability",
        WrongType,
        Box::new(|f| status_of(sys::pd_create(ROOT_THREAD, f.empty))),
    );
    case(
        "CapDelegate to a thread as the destination PD",
        WrongType,
        Box::new(|f| status_of(sys::cap_delegate(f.page, ROOT_THREAD, f.empty, u32::MAX))),
    );
    case(
        "Call on an endpoint copy without CALL",
        InsufficientRights,
        Box::new(|f| {
            status_of(sys::call(
                f.endpoint_receive_only,
                &Message::new(ECHO, [0; 4]),
            ))
        }),
    );
    case(
        "Call transferring a capability without GRANT",
        InsufficientRights,
        Box::new(|f| {
            let msg = Message::new(ECHO, [0; 4]).with_capability(f.page);
            status_of(sys::call(f.endpoint_call_only, &msg))
        }),
    );
    case(
        "MemMap of a read-only copy with WRITE",
        InsufficientRights,
        Box::new(|f| {
            let rw = MapRights::READ | MapRights::WRITE;
            status_of(sys::mem_map(
                f.page_read_only,
                0,
                ROOT_PD,
                TEST_VADDR,
                rw,
                0,
            ))
        }),
    );
    case(
        "MemMap of a copy without MAP",
        InsufficientRights,
        Box::new(|f| status_of(sys::mem_map(f.page_no_map, 0, ROOT_PD, TEST_VADDR, R, 0))),
    );
    case(
        "MemSplit of a copy without DELEGATE",
        InsufficientRights,
        Box::new(|f| status_of(sys::mem_split(f.page_read_only, 0, 0, f.empty))),
    );
    case(
        "EndpointCreate into an occupied slot",
        SlotOccupied,
        Box::new(|_| status_of(sys::endpoint_create(ROOT_PD, ROOT_THREAD))),
    );
    case(
        "CapDelegate into an occupied slot",
        SlotOccupied,
        Box::new(|f| status_of(sys::cap_delegate(f.page, ROOT_PD, ROOT_THREAD, u32::MAX))),
    );
    case(
        "MemMap at an unaligned address",
        Unaligned,
        Box::new(|f| status_of(sys::mem_map(f.page, 0, ROOT_PD, TEST_VADDR + 0x123, R, 0))),
    );
    case(
        "MemMap into the kernel half",
        OutOfRange,
        Box::new(|f| status_of(sys::mem_map(f.page, 0, ROOT_PD, KERNEL_HALF, R, 0))),
    );
    case(
        "MemMap below USER_BASE",
        OutOfRange,
        Box::new(|f| status_of(sys::mem_map(f.page, 0, ROOT_PD, KERNEL_IMAGE, R, 0))),
    );
    case(
        "MemMap at USER_END",
        OutOfRange,
        Box::new(|f| status_of(sys::mem_map(f.page, 0, ROOT_PD, USER_END, R, 0))),
    );
    case(
        "MemMap of page 1 of a one-page object",
        OutOfRange,
        Box::new(|f| status_of(sys::mem_map(f.page, 1, ROOT_PD, TEST_VADDR, R, 0))),
    );
    case(
        "MemSplit of page 1 of a one-page object",
        OutOfRange,
        Box::new(|f| status_of(sys::mem_split(f.page, 1, 0, f.empty))),
    );
    case(
        "MemMap with order 5",
        InvalidArgument,
        Box::new(move |f| {
            status_of(sys::mem_map_raw(
                f.block.0,
                0,
                ROOT_PD,
                TEST_VADDR,
                read | (5 << 8),
            ))
        }),
    );
    case(
        "MemSplit of two pages from a one-page object",
        OutOfRange,
        Box::new(|f| status_of(sys::mem_split(f.page, 0, 1, f.empty))),
    );
    case(
        "MemSplit of an order-1 part at an odd page",
        Unaligned,
        Box::new(|f| status_of(sys::mem_split(f.block.0, 1, 1, f.empty))),
    );
    case(
        "MemMap with an unknown rights bit",
        InvalidArgument,
        Box::new(move |f| {
            status_of(sys::mem_map_raw(
                f.page,
                0,
                ROOT_PD,
                TEST_VADDR,
                read | (1 << 3),
            ))
        }),
    );
    case(
        "MemUnmap where nothing is mapped",
        NotMapped,
        Box::new(|_| status_of(sys::mem_unmap(ROOT_PD, TEST_VADDR, 0))),
    );
    case(
        "MemMap where a page is mapped",
        AlreadyMapped,
        Box::new(|f| {
            let at = TEST_VADDR + 0x10_0000;
            if let Err(e) = sys::mem_map(f.page, 0, ROOT_PD, at, R, 0) {
                return e;
            }
            let second = status_of(sys::mem_map(f.page, 0, ROOT_PD, at, R, 0));
            let _ = sys::mem_unmap(ROOT_PD, at, 0);
            second
        }),
    );
    case(
        "EptCreate donating a copy of memory its parent capability still maps",
        Busy,
        Box::new(|f| {
            let at = TEST_VADDR + 0x20_0000;
            if let Err(e) = sys::mem_map(f.page, 0, ROOT_PD, at, R, 0) {
                return e;
            }
            let got = if let Err(e) = sys::cap_delegate(f.page, ROOT_PD, f.empty_too, u32::MAX) {
                e
            } else {
                status_of(rt::vmx::ept_create(ROOT_PD, f.empty, f.empty_too))
            };
            let _ = sys::cap_delete(f.empty_too);
            let _ = sys::mem_unmap(ROOT_PD, at, 0);
            got
        }),
    );
    case(
        "Call with a reserved message-info bit (11)",
        InvalidArgument,
        Box::new(move |f| call_info(f.endpoint, echo | (1 << 11))),
    );
    case(
        "Call with 501 extra words",
        InvalidArgument,
        Box::new(move |f| call_info(f.endpoint, echo | 501)),
    );
    case(
        "Call transferring selector 4096",
        InvalidSelector,
        Box::new(|f| {
            let msg = Message::new(ECHO, [0; 4]).with_capability(4096);
            status_of(sys::call(f.endpoint, &msg))
        }),
    );
    case(
        "Reply with no caller",
        NoCaller,
        Box::new(|_| status_of(sys::reply(&Message::new(0, [0; 4])))),
    );
    case(
        "Print from the kernel image's address",
        OutOfRange,
        Box::new(|_| status_of(sys::print_raw(KERNEL_IMAGE, 16))),
    );
    case(
        "Print from the kernel half",
        OutOfRange,
        Box::new(|_| status_of(sys::print_raw(KERNEL_HALF, 16))),
    );
    case(
        "Print of 4097 bytes",
        InvalidArgument,
        Box::new(|_| status_of(sys::print_raw(ROOT_BOOT_INFO, 4097))),
    );
    case(
        "ThreadSetAffinity to CPU 200",
        InvalidArgument,
        Box::new(|_| status_of(sys::thread_set_affinity(ROOT_THREAD, 200))),
    );
    case(
        "ThreadCreate with an unaligned UTCB",
        Unaligned,
        Box::new(move |f| {
            let utcb = TEST_VADDR + 0x20_0010;
            status_of(sys::thread_create(
                ROOT_PD, f.empty, entry, stack, utcb, cfg,
            ))
        }),
    );
    case(
        "ThreadCreate with a UTCB in the kernel half",
        OutOfRange,
        Box::new(move |f| {
            status_of(sys::thread_create(
                ROOT_PD,
                f.empty,
                entry,
                stack,
                KERNEL_HALF,
                cfg,
            ))
        }),
    );
    case(
        "ThreadCreate on CPU 200",
        InvalidArgument,
        Box::new(move |f| {
            let utcb = TEST_VADDR + 0x20_0000;
            let cfg = thread_config(1, 200, None);
            status_of(sys::thread_create(
                ROOT_PD, f.empty, entry, stack, utcb, cfg,
            ))
        }),
    );
    // Last: a kernel that skipped this rights check would block here for good.
    case(
        "Recv on an endpoint copy without RECEIVE",
        InsufficientRights,
        Box::new(|f| status_of(sys::recv(f.endpoint_call_only))),
    );
    v
}

fn copy(mem: &mut Memory, from: Selector, rights: u32) -> Outcome<Selector> {
    let slot = mem.slot()?;
    sys::cap_delegate(from, ROOT_PD, slot, rights).context("CapDelegate for the fixture")?;
    Ok(slot)
}

pub fn run(mem: &mut Memory, echo: &Child) -> Outcome<()> {
    let page = mem.page()?;
    let fixture = Fixture {
        empty: mem.slot()?,
        empty_too: mem.slot()?,
        page,
        page_read_only: copy(mem, page, (MemoryRights::READ | MemoryRights::MAP).bits())?,
        page_no_map: copy(
            mem,
            page,
            (MemoryRights::READ | MemoryRights::WRITE | MemoryRights::DELEGATE).bits(),
        )?,
        block: mem.largest_block(),
        endpoint: echo.endpoint,
        endpoint_receive_only: copy(mem, echo.endpoint, EndpointRights::RECEIVE.bits())?,
        endpoint_call_only: copy(mem, echo.endpoint, EndpointRights::CALL.bits())?,
    };
    ensure!(
        fixture.block.1 >= 5,
        "no boot memory block of order 5 or more for the order tests"
    );
    ensure!(
        TEST_VADDR >= USER_BASE && Syscall::from_number(8).is_none(),
        "test constants out of date with the ABI"
    );

    let cases = cases();
    let mut failed = 0;
    for (name, expected, call) in &cases {
        let got = call(&fixture);
        if got != *expected {
            failed += 1;
            rt::println!("malformed call: {name}: got {got:?}, expected {expected:?}");
        }
        // A call that wrongly succeeded may have filled the empty slot: empty it again.
        if sys::cap_info(fixture.empty).is_ok() {
            let _ = sys::cap_delete(fixture.empty);
        }
    }
    rt::println!(
        "malformed calls: {} of {} returned the expected status",
        cases.len() - failed,
        cases.len()
    );
    ensure!(
        failed == 0,
        "{failed} of {} malformed calls returned an unexpected status",
        cases.len()
    );
    Ok(())
}
