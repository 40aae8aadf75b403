//! The `ipc` scenario: call and reply, UTCB words, capability transfer, revocation seen from
//! user level with the fault protocol, and a table of malformed system calls.

use crate::memory::{self, Memory};
use crate::spawn::{Child, spawn};
use crate::{Context, Outcome, ensure, malformed};
use abi::{
    FAULT_KILL, FAULT_RESUME, IRQ_ISA, LABEL_FAULT, MemoryRights, ObjectKind, ROOT_INTERRUPTS,
    ROOT_IO_PORTS, ROOT_PD, Status, UTCB_WORDS,
};
use alloc::vec::Vec;
use rt::protocol::{
    ECHO, ECHO_RECEIVE_SLOT, IO_PROBE, LAST_SUM, MAP_AND_SUM, READ_AGAIN, SSE, SUM_UTCB,
};
use rt::sys::{self, MapRights};
use rt::{Message, Selector, utcb};

/// Page-fault vector (#PF) and error-code bits (Intel SDM Vol. 3A §4.7): P (the page was
/// present), W/R (a write), U/S (from user mode).
const VECTOR_PAGE_FAULT: u64 = 14;
const PF_PRESENT: u64 = 1 << 0;
const PF_WRITE: u64 = 1 << 1;
const PF_USER: u64 = 1 << 2;

pub fn run(mem: &mut Memory) -> Outcome<()> {
    let fault = mem.slot()?;
    sys::endpoint_create(ROOT_PD, fault).context("EndpointCreate of the fault endpoint")?;
    let echo = spawn(mem, "echo", fault)?;

    call_and_reply(&echo)?;
    log::info!("call and reply: ok");
    utcb_words(&echo, 100)?;
    utcb_words(&echo, UTCB_WORDS)?;
    log::info!("extra words through the UTCB: ok");
    let sent = capability_transfer(mem, &echo)?;
    log::info!("capability transfer: ok");
    revocation_and_faults(mem, &echo, fault, &sent)?;
    log::info!("revocation seen from user level, fault resumed and fault killed: ok");

    // The system goes on: a second instance of the server answers.
    let echo2 = spawn(mem, "echo", fault)?;
    call_and_reply(&echo2)?;
    log::info!("second echo server: ok");
    sse_state(&echo2)?;
    log::info!("SSE state of two threads across IPC switches: ok");
    interrupts(mem)?;
    log::info!("interrupts: the PIT's IRQ 0 signals a notification through the I/O APIC: ok");

    malformed::run(mem, &echo2)?;

    // I/O ports, on a third server (the test kills it at the end).
    let echo3 = spawn(mem, "echo", fault)?;
    io_ports(mem, &echo3, fault)?;
    log::info!("I/O ports: denied without a grant, allowed with one, denied after revocation: ok");
    Ok(())
}

/// I/O-port space: the server's read of a port faults (#GP) until the root task grants the
/// port to its PD, succeeds then, and faults again once the grant is revoked.
fn io_ports(mem: &mut Memory, echo: &Child, fault: Selector) -> Outcome<()> {
    const PORT: u64 = 0x80;
    const VECTOR_GP: u64 = 13;
    let probe = |what: &str| -> Outcome<()> {
        let reply = sys::call(echo.endpoint, &Message::new(IO_PROBE, [PORT, 0, 0, 0]))
            .context("Call IO_PROBE")?;
        ensure!(
            reply.label() == IO_PROBE,
            "IO_PROBE ({what}): label {:#x}",
            reply.label()
        );
        Ok(())
    };
    let expect_gp = |what: &str| -> Outcome<()> {
        let msg = sys::recv(fault).context("Recv on the fault endpoint")?;
        let [vector, ..] = msg.words;
        ensure!(
            msg.label() == LABEL_FAULT && vector == VECTOR_GP,
            "{what}: expected #GP (13) on the fault endpoint, got label {:#x} words {:x?}",
            msg.label(),
            msg.words
        );
        Ok(())
    };
    let last = || -> Outcome<u64> {
        let r = sys::call(echo.endpoint, &Message::new(LAST_SUM, [0; 4])).context("LAST_SUM")?;
        Ok(r.words[0])
    };
    // 1. No grant: #GP, reported to the handler; the handler grants the port and resumes.
    probe("without a grant")?;
    expect_gp("IN without a grant")?;
    let grant = mem.slot()?;
    sys::io_port_split(ROOT_IO_PORTS, PORT, 1, grant).context("IoPortSplit")?;
    sys::io_port_map(grant, echo.pd, PORT, 1).context("IoPortMap")?;
    sys::reply(&Message::new(FAULT_RESUME, [0; 4])).context("Reply FAULT_RESUME")?;
    ensure!(last()? & 0x100 != 0, "the resumed IN did not complete");
    // 2. With the grant: no fault at all.
    probe("with a grant")?;
    ensure!(last()? & 0x100 != 0, "IN with a grant did not complete");
    // 3. Revoked (the split capability's children go, the grant with them): #GP again.
    let removed = sys::cap_revoke(grant).context("CapRevoke of the port grant")?;
    ensure!(
        removed == 1,
        "revoking the port capability removed {removed}, expected 1"
    );
    probe("after revocation")?;
    expect_gp("IN after revocation")?;
    sys::reply(&Message::new(FAULT_KILL, [0; 4])).context("Reply FAULT_KILL")?;
    Ok(())
}

/// Interrupts as notifications: the root task takes the PIT's ports, binds ISA IRQ 0 (through
/// the MADT's override, to its GSI) to a notification, starts the PIT as a ~1 kHz rate
/// generator and waits for three signals, then stops it.
fn interrupts(mem: &mut Memory) -> Outcome<()> {
    let ports = mem.slot()?;
    sys::io_port_split(ROOT_IO_PORTS, 0x40, 4, ports).context("IoPortSplit of the PIT")?;
    sys::io_port_map(ports, ROOT_PD, 0x40, 4).context("IoPortMap of the PIT")?;
    let note = mem.slot()?;
    sys::notification_create(ROOT_PD, note).context("NotificationCreate")?;
    let gsi = sys::irq_bind(ROOT_INTERRUPTS, 0, note, IRQ_ISA).context("IrqBind of IRQ 0")?;
    ensure!(
        sys::irq_bind(ROOT_INTERRUPTS, 0, note, IRQ_ISA) == Err(Status::AlreadyMapped),
        "a second IrqBind of the same line succeeded"
    );
    // Channel 0, lobyte/hibyte, mode 2 (rate generator), divisor 1193 (1.193182 MHz / 1193).
    rt::outb(0x43, 0x34);
    rt::outb(0x40, 0xa9);
    rt::outb(0x40, 0x04);
    let mut signals = 0;
    for _ in 0..3 {
        signals += sys::wait(note).context("Wait for the PIT")?;
    }
    // Mode 0 with a count: one last edge, then the output stays high.
    rt::outb(0x43, 0x30);
    rt::outb(0x40, 0xff);
    rt::outb(0x40, 0xff);
    ensure!(signals >= 3, "{signals} signals from 3 waits");
    log::info!("interrupts: GSI {gsi}, {signals} signals");
    Ok(())
}

/// The FPU/SSE state of threads survives switches: the root task and the server each load
/// their own pattern into XMM0-15 and switch back and forth by IPC several times.
fn sse_state(echo: &Child) -> Outcome<()> {
    const MINE: u64 = 0x5a5a_0000_1234_5678;
    for round in 0..4u64 {
        rt::set_sse_pattern(MINE ^ round);
        let theirs = 0xa5a5_0000_8765_4321 ^ round;
        let reply =
            sys::call(echo.endpoint, &Message::new(SSE, [theirs, 0, 0, 0])).context("Call SSE")?;
        ensure!(reply.label() == SSE, "SSE: label {:#x}", reply.label());
        ensure!(
            reply.words[0] == 1,
            "the server's SSE registers changed across a switch"
        );
        ensure!(
            rt::sse_pattern_holds(MINE ^ round),
            "the root task's SSE registers changed across IPC (round {round})"
        );
    }
    Ok(())
}

/// ECHO: the server returns each word + 1 under the same label.
fn call_and_reply(echo: &Child) -> Outcome<()> {
    let cases = [
        [1, 2, 3, 4],
        [0, u64::MAX, 0x8000_0000_0000_0000, 0x0123_4567_89ab_cdef],
    ];
    for words in cases {
        let reply = sys::call(echo.endpoint, &Message::new(ECHO, words)).context("Call ECHO")?;
        let expected = words.map(|w| w.wrapping_add(1));
        ensure!(
            reply.label() == ECHO && reply.words == expected,
            "ECHO {words:x?}: got label {:#x} words {:x?}, expected {expected:x?}",
            reply.label(),
            reply.words
        );
        ensure!(
            reply.info.extra_words() == 0 && !reply.info.transfers_capability(),
            "ECHO reply info {:#x} has extra words or a capability",
            reply.info.0
        );
    }
    Ok(())
}

/// SUM_UTCB: `n` words go out in the UTCB; the server sums them and sends each + 1 back.
fn utcb_words(echo: &Child, n: usize) -> Outcome<()> {
    let words: Vec<u64> = (0..n as u64)
        .map(|i| i.wrapping_mul(0x1_0000_0001) ^ 0x5a5a)
        .collect();
    utcb::write_words(&words);
    let sum = words.iter().fold(0u64, |s, w| s.wrapping_add(*w));
    let reply = sys::call(echo.endpoint, &Message::with_extra(SUM_UTCB, [0; 4], n))
        .context("Call SUM_UTCB")?;
    ensure!(
        reply.label() == SUM_UTCB && reply.words[0] == sum && reply.words[1] == n as u64,
        "SUM_UTCB of {n} words: got label {:#x} words {:x?}, expected sum {sum:#x}",
        reply.label(),
        reply.words
    );
    ensure!(
        reply.info.extra_words() == n,
        "SUM_UTCB of {n} words: the reply carries {} extra words",
        reply.info.extra_words()
    );
    for (i, w) in words.iter().enumerate() {
        let got = utcb::word(i);
        ensure!(
            got == w.wrapping_add(1),
            "SUM_UTCB of {n} words: reply word {i} is {got:#x}, expected {:#x}",
            w.wrapping_add(1)
        );
    }
    Ok(())
}

/// What the capability-transfer check leaves for the revocation check.
struct Sent {
    /// The page (root capability).
    page: Selector,
    /// The root task's reduced copy that went to the server.
    copy: Selector,
    /// Where the server mapped it.
    server_vaddr: u64,
}

fn pattern(seed: u64) -> impl Fn(usize) -> u64 {
    move |i| (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

/// MAP_AND_SUM with a memory capability through an endpoint with GRANT: the server maps the
/// page and returns its sum. Then a second transfer while the server's receive slot is
/// occupied: delivered without the capability.
fn capability_transfer(mem: &mut Memory, echo: &Child) -> Outcome<Sent> {
    let page = mem.page()?;
    let sum = memory::fill(page, pattern(0x1111))?;
    let info = memory::info(page).context("CapInfo of a fresh page")?;
    ensure!(
        info.kind() == Some(ObjectKind::Memory) && info.detail == 0,
        "CapInfo of a page split with order 0: {info:?}"
    );

    let copy = mem.slot()?;
    let rights = (MemoryRights::READ | MemoryRights::MAP).bits();
    sys::cap_delegate(page, ROOT_PD, copy, rights).context("CapDelegate of a page copy")?;
    let info = memory::info(copy).context("CapInfo of the page copy")?;
    ensure!(
        info.kind() == Some(ObjectKind::Memory) && info.rights == rights,
        "CapInfo of a READ|MAP copy: {info:?}"
    );

    let msg = Message::new(MAP_AND_SUM, [0; 4]).with_capability(copy);
    let reply = sys::call(echo.endpoint, &msg).context("Call MAP_AND_SUM with a capability")?;
    ensure!(
        reply.label() == MAP_AND_SUM,
        "MAP_AND_SUM: the server answered label {:#x} words {:x?}",
        reply.label(),
        reply.words
    );
    let [got, server_vaddr, slot, transferred] = reply.words;
    ensure!(
        transferred == 1,
        "MAP_AND_SUM: the server got no capability"
    );
    ensure!(
        slot == ECHO_RECEIVE_SLOT,
        "MAP_AND_SUM: the capability landed in slot {slot}, not the receive slot {ECHO_RECEIVE_SLOT}"
    );
    ensure!(
        got == sum,
        "MAP_AND_SUM: the server summed {got:#x}, the page sums to {sum:#x}"
    );
    ensure!(
        memory::info(copy).is_ok(),
        "the sender lost its copy by transferring it"
    );

    // The server's receive slot is occupied now: the message arrives without the capability.
    let other = mem.page()?;
    memory::fill(other, pattern(0x2222))?;
    let msg = Message::new(MAP_AND_SUM, [0; 4]).with_capability(other);
    let reply = sys::call(echo.endpoint, &msg).context("Call MAP_AND_SUM, slot occupied")?;
    ensure!(
        reply.label() == MAP_AND_SUM && reply.words == [0; 4],
        "a capability sent to an occupied receive slot: the server answered label {:#x} words {:x?} (expected no capability delivered)",
        reply.label(),
        reply.words
    );
    mem.release_page(other)?;

    Ok(Sent {
        page,
        copy,
        server_vaddr,
    })
}

/// Revokes the page the server mapped, asks the server to read it again and checks the fault
/// the root task receives; resumes the server after mapping a fresh page (a pager), then
/// revokes that one too and kills the server on its second fault.
fn revocation_and_faults(
    mem: &mut Memory,
    echo: &Child,
    fault: Selector,
    sent: &Sent,
) -> Outcome<()> {
    // The root task's copy, the server's copy of it, and the server's mapping of that.
    let removed = sys::cap_revoke(sent.page).context("CapRevoke of the transferred page")?;
    ensure!(
        removed == 3,
        "CapRevoke removed {removed} capabilities and mappings, expected 3 (the root task's copy, the server's copy, the server's mapping)"
    );
    ensure!(
        memory::info(sent.copy) == Err(Status::EmptySlot),
        "after CapRevoke the root task's copy is still there: {:?}",
        memory::info(sent.copy)
    );
    mem.slots.free(sent.copy);
    ensure!(
        memory::info(sent.page).is_ok(),
        "CapRevoke removed the revoked capability itself"
    );

    // First fault: resumed after mapping a fresh page at the address.
    read_again_and_fault(echo, fault, sent.server_vaddr, "first")?;
    let fresh = mem.page()?;
    let fresh_sum = memory::fill(fresh, pattern(0x3333))?;
    sys::mem_map(fresh, 0, echo.pd, sent.server_vaddr, MapRights::READ, 0)
        .context("MemMap of a fresh page at the faulting address")?;
    sys::reply(&Message::new(FAULT_RESUME, [0; 4])).context("Reply FAULT_RESUME")?;
    let reply =
        sys::call(echo.endpoint, &Message::new(LAST_SUM, [0; 4])).context("Call LAST_SUM")?;
    ensure!(
        reply.label() == LAST_SUM && reply.words[0] == fresh_sum,
        "after FAULT_RESUME the server read {:#x} (label {:#x}), the fresh page sums to {fresh_sum:#x}",
        reply.words[0],
        reply.label()
    );

    // Second fault: the page is revoked again and the server is killed.
    let removed = sys::cap_revoke(fresh).context("CapRevoke of the fresh page")?;
    ensure!(
        removed == 1,
        "CapRevoke of the fresh page removed {removed}, expected 1 (the server's mapping)"
    );
    read_again_and_fault(echo, fault, sent.server_vaddr, "second")?;
    sys::reply(&Message::new(FAULT_KILL, [0; 4])).context("Reply FAULT_KILL")?;

    // The killed thread stays, suspended, until deleted: the root task's capability and the
    // server's own copy (its slot 1) go.
    let info = memory::info(echo.thread).context("CapInfo of the killed server's thread")?;
    ensure!(
        info.kind() == Some(ObjectKind::Thread),
        "CapInfo of the killed server's thread: {info:?}"
    );
    let removed = sys::cap_delete(echo.thread).context("CapDelete of the killed thread")?;
    ensure!(
        removed == 2,
        "CapDelete of the killed server's thread removed {removed}, expected 2 (the root task's capability and the server's copy)"
    );
    mem.slots.free(echo.thread);
    Ok(())
}

/// READ_AGAIN: the server answers, then reads its page; the root task must receive the
/// resulting #PF on the fault endpoint, and is left as the faulting thread's replier.
fn read_again_and_fault(echo: &Child, fault: Selector, vaddr: u64, which: &str) -> Outcome<()> {
    let reply =
        sys::call(echo.endpoint, &Message::new(READ_AGAIN, [0; 4])).context("Call READ_AGAIN")?;
    ensure!(
        reply.label() == READ_AGAIN && reply.words[0] == vaddr,
        "READ_AGAIN: the server answered label {:#x} words {:x?}, expected its page at {vaddr:#x}",
        reply.label(),
        reply.words
    );
    let msg = sys::recv(fault).context("Recv on the fault endpoint")?;
    let [vector, error, address, rip] = msg.words;
    ensure!(
        msg.label() == LABEL_FAULT,
        "{which} fault: message label {:#x}, expected LABEL_FAULT {LABEL_FAULT:#x} (words {:x?})",
        msg.label(),
        msg.words
    );
    ensure!(
        vector == VECTOR_PAGE_FAULT && address == vaddr,
        "{which} fault: vector {vector} address {address:#x}, expected vector 14 at {vaddr:#x}"
    );
    ensure!(
        error & (PF_PRESENT | PF_WRITE | PF_USER) == PF_USER,
        "{which} fault: error code {error:#x}, expected a user-mode read of a non-present page"
    );
    ensure!(
        (echo.text.0..echo.text.1).contains(&rip),
        "{which} fault: RIP {rip:#x} outside the server's code {:#x}..{:#x}",
        echo.text.0,
        echo.text.1
    );
    Ok(())
}
