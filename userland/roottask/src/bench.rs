//! The `ipc-bench` scenario: call-and-reply round trips timed with RDTSC, between protection
//! domains (root task and echo server) and within one (two threads of the root task), all on
//! CPU 0. Reports the median of each.

use crate::memory::Memory;
use crate::spawn::{PRIORITY, spawn};
use crate::{Context, Outcome, ensure};
use abi::{ROOT_PD, thread_config};
use alloc::vec;
use core::sync::atomic::{AtomicU64, Ordering};
use rt::layout::PAGE_SIZE;
use rt::protocol::BENCH;
use rt::sys::{self, MapRights};
use rt::{Message, Selector};

const WARM_UP: usize = 500;
const RUNS: usize = 5000;

/// The same-domain server thread's UTCB and stack, in the root task's own address space.
const SERVER_UTCB: u64 = 0x0000_0080_0050_0000;
const SERVER_STACK_TOP: u64 = 0x0000_0080_0060_0000;
const SERVER_STACK_PAGES: u64 = 4;

/// The endpoint the same-domain server receives on (set before the thread starts).
static SAME_DOMAIN_ENDPOINT: AtomicU64 = AtomicU64::new(u64::MAX);

pub fn run(mem: &mut Memory) -> Outcome<()> {
    let fault = mem.slot()?;
    sys::endpoint_create(ROOT_PD, fault).context("EndpointCreate of the fault endpoint")?;

    let echo = spawn(mem, "echo", fault)?;
    let cross = median_round_trip(echo.endpoint)?;

    let endpoint = start_same_domain_server(mem, fault)?;
    let same = median_round_trip(endpoint)?;

    let null = median_null_call()?;
    rt::println!("null system call round trip: {null} cycles");
    rt::println!("ipc round trip: {cross} cycles");
    rt::println!("ipc round trip (same domain): {same} cycles");
    Ok(())
}

/// The median of `RUNS` timed BENCH calls on `endpoint`, after `WARM_UP` untimed ones.
fn median_round_trip(endpoint: Selector) -> Outcome<u64> {
    let msg = Message::new(BENCH, [1, 2, 3, 4]);
    for _ in 0..WARM_UP {
        let reply = sys::call(endpoint, &msg).context("Call BENCH (warm-up)")?;
        ensure!(
            reply.label() == BENCH && reply.words == msg.words,
            "BENCH reply: label {:#x} words {:x?}",
            reply.label(),
            reply.words
        );
    }
    let mut samples = vec![0u64; RUNS];
    let mut errors = 0usize;
    for sample in samples.iter_mut() {
        let start = rt::rdtsc();
        let reply = sys::call(endpoint, &msg);
        let end = rt::rdtsc();
        *sample = end.wrapping_sub(start);
        errors += usize::from(reply.is_err());
    }
    ensure!(errors == 0, "{errors} of {RUNS} timed calls failed");
    samples.sort_unstable();
    Ok(samples[RUNS / 2])
}

/// The median of `RUNS` timed `CurrentCpu` calls: the cost of entering and leaving the kernel.
fn median_null_call() -> Outcome<u64> {
    let mut samples = vec![0u64; RUNS];
    for sample in samples.iter_mut() {
        let start = rt::rdtsc();
        let cpu = sys::current_cpu();
        let end = rt::rdtsc();
        ensure!(cpu.is_ok(), "CurrentCpu failed");
        *sample = end.wrapping_sub(start);
    }
    samples.sort_unstable();
    Ok(samples[RUNS / 2])
}

/// Starts a second thread in the root task's own PD, on CPU 0, serving a new endpoint.
fn start_same_domain_server(mem: &mut Memory, fault: Selector) -> Outcome<Selector> {
    let endpoint = mem.slot()?;
    sys::endpoint_create(ROOT_PD, endpoint).context("EndpointCreate (same domain)")?;
    SAME_DOMAIN_ENDPOINT.store(endpoint, Ordering::Release);

    let bottom = SERVER_STACK_TOP - SERVER_STACK_PAGES * PAGE_SIZE;
    for i in 0..SERVER_STACK_PAGES {
        let page = mem.page()?;
        let rw = MapRights::READ | MapRights::WRITE;
        sys::mem_map(page, 0, ROOT_PD, bottom + i * PAGE_SIZE, rw, 0)
            .context("MemMap of the same-domain server's stack")?;
    }
    let thread = mem.slot()?;
    let entry = same_domain_server as extern "C" fn() -> ! as usize as u64;
    // As if called: the return-address slot leaves RSP + 8 16-byte aligned at entry.
    let config = thread_config(PRIORITY, 0, Some(fault as u32));
    sys::thread_create(
        ROOT_PD,
        thread,
        entry,
        SERVER_STACK_TOP - 8,
        SERVER_UTCB,
        config,
    )
    .context("ThreadCreate (same domain)")?;
    sys::thread_resume(thread).context("ThreadResume (same domain)")?;
    Ok(endpoint)
}

/// The same-domain server: answers BENCH calls with the words unchanged, for ever. Uses no
/// UTCB words, heap or console.
extern "C" fn same_domain_server() -> ! {
    let endpoint = SAME_DOMAIN_ENDPOINT.load(Ordering::Acquire);
    let mut msg = receive(endpoint);
    loop {
        msg = match sys::reply_recv(endpoint, &Message::new(BENCH, msg.words)) {
            Ok(m) => m,
            Err(_) => receive(endpoint),
        };
    }
}

fn receive(endpoint: Selector) -> Message {
    loop {
        if let Ok(m) = sys::recv(endpoint) {
            return m;
        }
        let _ = sys::yield_now();
    }
}
