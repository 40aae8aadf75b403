//! The `guest` and `vmexit-bench` scenarios: the user-level VMM (`vmm`) runs the 64-bit test
//! guest (`guest64`).
//!
//! The root task starts the VMM in its own PD and hands it, in the slots of
//! `rt::vmx::protocol`: guest RAM (16 MiB), memory for its EPT pools (2 MiB), a copy of the
//! guest image, and a CALL capability to the endpoint it reports on, which is also the VMM's
//! fault endpoint (a VMM that faults is seen at once). Each guest run is a `RUN` call answered
//! at once, then a `REPORT` call from the VMM when the guest has ended.
//!
//! - `guest`: the checks with 1 vCPU; with 2 vCPUs on 2 CPUs, the second vCPU moved to the other
//!   CPU after its third timer interrupt; a guest that triple-faults on purpose and one whose
//!   initial state is invalid on purpose (the VMM ends each and reports); then, to show the
//!   system goes on, another guest and an IPC round trip.
//! - `vmexit-bench`: the guest's medians of a CPUID exit and of a demand fault (emulated cycles
//!   measured inside the guest) and the VMM's share of each (measured in the VMM from the exit
//!   message's arrival to its reply).

use crate::memory::Memory;
use crate::spawn::{Child, spawn};
use crate::{Context, Outcome, ensure};
use abi::{EndpointRights, LABEL_FAULT, MemoryRights, ROOT_PD};
use alloc::format;
use rt::protocol::ECHO;
use rt::sys::{self, MapRights};
use rt::vmx::protocol::{
    self, FLAG_MIGRATE, IMAGE_MAX_ORDER, Mode, Outcome as GuestOutcome, POOL_ORDER, RAM_ORDER,
    REPORT_LABEL, REPORT_WORDS, RUN, RUN_OK,
};
use rt::{Mapping, Message, Selector, utcb};

/// Exit reason 33 (VM-entry failure due to invalid guest state) with bit 31 (entry failure).
const ENTRY_FAILURE_INVALID_GUEST_STATE: u32 = 33 | (1 << 31);

/// A guest's end as the VMM reported it.
#[derive(Debug)]
struct Report {
    outcome: Option<GuestOutcome>,
    detail: u64,
    interrupts: u64,
    extra: [u64; REPORT_WORDS],
}

impl Report {
    fn passed(&self, what: &str) -> Outcome<()> {
        ensure!(
            self.outcome == Some(GuestOutcome::Pass),
            "{what}: the guest ended with {:?} (detail {:#x})",
            self.outcome,
            self.detail
        );
        Ok(())
    }

    fn summary(&self) -> alloc::string::String {
        format!(
            "{} exits, {} timer interrupts, {} demand faults, {} CPUID, {} I/O, {} MSR exits",
            self.extra[protocol::R_EXITS],
            self.interrupts,
            self.extra[protocol::R_DEMAND_FAULTS],
            self.extra[protocol::R_CPUID_EXITS],
            self.extra[protocol::R_IO_EXITS],
            self.extra[protocol::R_MSR_EXITS],
        )
    }
}

/// The started VMM.
struct Vmm {
    child: Child,
    /// Where the VMM reports and faults.
    endpoint: Selector,
    image_size: u64,
    cpus: u64,
}

impl Vmm {
    /// Runs one guest and waits for its report.
    fn run_guest(&self, vcpus: u64, mode: Mode, flags: u64) -> Outcome<Report> {
        let request = Message::new(
            RUN,
            [
                self.image_size,
                vcpus,
                mode as u64,
                flags | (self.cpus << 8),
            ],
        );
        let answer = sys::call(self.child.endpoint, &request).context("Call RUN")?;
        ensure!(
            answer.label() == RUN_OK,
            "the VMM did not start the guest: label {:#x}, status {:?}",
            answer.label(),
            abi::Status::from_code(answer.words[0])
        );
        let report = sys::recv(self.endpoint).context("Recv of the VMM's report")?;
        if report.label() == LABEL_FAULT {
            let [vector, error, address, rip] = report.words;
            return Err(format!(
                "the VMM faulted: vector {vector}, error {error:#x}, address {address:#x}, rip {rip:#x}"
            ));
        }
        ensure!(
            report.label() == REPORT_LABEL && report.info.extra_words() == REPORT_WORDS,
            "unexpected message from the VMM: label {:#x}, {} extra words",
            report.label(),
            report.info.extra_words()
        );
        let mut extra = [0; REPORT_WORDS];
        utcb::read_words(&mut extra);
        sys::reply(&Message::new(0, [0; 4])).context("Reply to the VMM's report")?;
        let [_, outcome, detail, interrupts] = report.words;
        Ok(Report {
            outcome: GuestOutcome::from_code(outcome),
            detail,
            interrupts,
            extra,
        })
    }
}

pub fn run(mem: &mut Memory, scenario: &str) -> Outcome<()> {
    let boot = rt::boot_info().ok_or("no boot information")?;
    ensure!(
        boot.vmx != 0,
        "VMX root operation is not available on every CPU"
    );
    let endpoint = mem.slot()?;
    sys::endpoint_create(ROOT_PD, endpoint).context("EndpointCreate of the report endpoint")?;
    let vmm = start_vmm(mem, endpoint, boot.cpus)?;
    match scenario {
        "vmexit-bench" => bench(&vmm),
        _ => guests(mem, &vmm),
    }
}

/// The `guest` scenario.
fn guests(mem: &mut Memory, vmm: &Vmm) -> Outcome<()> {
    let one = vmm.run_guest(1, Mode::Checks, 0)?;
    one.passed("1 vCPU")?;
    log::info!("guest with 1 vCPU: PASS ({})", one.summary());

    let migrate = vmm.cpus >= 2;
    if !migrate {
        log::info!("1 CPU: the 2 vCPUs share it and none migrates");
    }
    let two = vmm.run_guest(2, Mode::Checks, if migrate { FLAG_MIGRATE } else { 0 })?;
    two.passed("2 vCPUs")?;
    if migrate {
        let (from, to) = (
            two.extra[protocol::R_MIGRATED_FROM],
            two.extra[protocol::R_MIGRATED_TO],
        );
        ensure!(
            from != u64::MAX && from != to,
            "2 vCPUs: the second vCPU did not migrate"
        );
        log::info!(
            "guest with 2 vCPUs on 2 CPUs: PASS, vcpu1 migrated from cpu {from} to cpu {to} mid-run ({})",
            two.summary()
        );
    } else {
        log::info!("guest with 2 vCPUs: PASS ({})", two.summary());
    }

    let bad = vmm.run_guest(1, Mode::TripleFault, 0)?;
    ensure!(
        bad.outcome == Some(GuestOutcome::TripleFault),
        "bad guest: expected a triple fault, the VMM reported {:?} (detail {:#x})",
        bad.outcome,
        bad.detail
    );
    log::info!("bad guest: triple fault reported by the VMM, that guest ended");

    let invalid = vmm.run_guest(1, Mode::InvalidState, 0)?;
    ensure!(
        invalid.outcome == Some(GuestOutcome::EntryFailure)
            && invalid.detail as u32 == ENTRY_FAILURE_INVALID_GUEST_STATE,
        "invalid guest state: expected a failed VM entry (exit 33), the VMM reported {:?} \
         (detail {:#x})",
        invalid.outcome,
        invalid.detail
    );
    log::info!(
        "bad guest: invalid guest state (VM entry failed) reported by the VMM, that guest ended"
    );

    let again = vmm.run_guest(1, Mode::Checks, 0)?;
    again.passed("guest after the bad guest")?;
    log::info!(
        "the system goes on: another guest: PASS ({})",
        again.summary()
    );
    let echo = spawn(mem, "echo", vmm.endpoint)?;
    let words = [1, 2, 3, 4];
    let reply = sys::call(echo.endpoint, &Message::new(ECHO, words)).context("Call ECHO")?;
    ensure!(
        reply.label() == ECHO && reply.words == words.map(|w| w + 1),
        "ECHO after the guests: label {:#x} words {:x?}",
        reply.label(),
        reply.words
    );
    log::info!("the system goes on: IPC round trip with the echo server: ok");
    Ok(())
}

/// The `vmexit-bench` scenario.
fn bench(vmm: &Vmm) -> Outcome<()> {
    let report = vmm.run_guest(1, Mode::Bench, 0)?;
    report.passed("benchmark guest")?;
    let figure = |i: usize| report.extra[i];
    let figures = [
        figure(protocol::R_GUEST_CPUID),
        figure(protocol::R_VMM_CPUID),
        figure(protocol::R_GUEST_EPT_FAULT),
        figure(protocol::R_VMM_EPT_FAULT),
        figure(protocol::R_VMM_EPT_MAP),
    ];
    ensure!(
        figures.iter().all(|&f| f != u64::MAX),
        "the benchmark reported no figure for some measurement: {figures:?}"
    );
    let [cpuid, cpuid_vmm, fault, fault_vmm, fault_map] = figures;
    rt::println!("vmexit cpuid: {cpuid} cycles");
    rt::println!("vmexit cpuid vmm share: {cpuid_vmm} cycles");
    rt::println!(
        "vmexit cpuid kernel share: {} cycles",
        cpuid.saturating_sub(cpuid_vmm)
    );
    rt::println!("vmexit ept fault: {fault} cycles");
    rt::println!("vmexit ept fault vmm share: {fault_vmm} cycles");
    rt::println!("vmexit ept fault vmm share in EptMap: {fault_map} cycles");
    rt::println!(
        "vmexit ept fault kernel share: {} cycles",
        fault.saturating_sub(fault_vmm)
    );
    log::info!("({})", report.summary());
    Ok(())
}

/// Starts the VMM and fills its slots: guest RAM, pool memory, the guest image, the report
/// endpoint.
fn start_vmm(mem: &mut Memory, endpoint: Selector, cpus: u64) -> Outcome<Vmm> {
    let boot = rt::boot_info().ok_or("no boot information")?;
    let index = boot
        .modules()
        .iter()
        .position(|m| m.name().split_whitespace().next() == Some("guest64"))
        .ok_or("no boot module named 'guest64'")?;
    let file = rt::module_bytes(index).ok_or("module 'guest64' is not mapped")?;
    let image_pages = (file.len() as u64).div_ceil(4096);
    let image_order = u64::from(image_pages.next_power_of_two().trailing_zeros());
    ensure!(
        image_order <= IMAGE_MAX_ORDER,
        "the guest image ({} bytes) is larger than 2^{IMAGE_MAX_ORDER} pages",
        file.len()
    );
    let [ram, pool, image] = carve(mem, [RAM_ORDER, POOL_ORDER, image_order])?;
    copy_into(image, file)?;

    let child = spawn(mem, "vmm", endpoint)?;
    let all = MemoryRights::all().bits();
    for (what, source, slot, rights) in [
        ("guest RAM", ram, protocol::RAM, all),
        ("the pool memory", pool, protocol::POOL, all),
        (
            "the guest image",
            image,
            protocol::IMAGE,
            (MemoryRights::READ | MemoryRights::MAP).bits(),
        ),
        (
            "the report endpoint",
            endpoint,
            protocol::REPORT,
            EndpointRights::CALL.bits(),
        ),
    ] {
        sys::cap_delegate(source, child.pd, slot, rights)
            .map_err(|e| format!("CapDelegate of {what} to the VMM: {e:?}"))?;
    }
    Ok(Vmm {
        child,
        endpoint,
        image_size: file.len() as u64,
        cpus,
    })
}

/// Splits naturally aligned blocks of the given orders (each at most 2^12 pages) off the top of
/// the largest boot memory block. The root task's page allocator splits single pages from the
/// bottom of that block, one slot each: with at least 2^14 pages in the block and at most 4096
/// slots, the two never meet.
fn carve(mem: &mut Memory, orders: [u64; 3]) -> Outcome<[Selector; 3]> {
    const MAX_ORDER: u64 = 12;
    let (block, order) = mem.largest_block();
    ensure!(
        order >= MAX_ORDER + 2,
        "the largest memory block (2^{order} pages) is too small for the VMM"
    );
    let mut top = 1u64 << order;
    let mut pieces = [0; 3];
    for (piece, piece_order) in pieces.iter_mut().zip(orders) {
        ensure!(piece_order <= MAX_ORDER, "a VMM memory piece is too large");
        // Below everything carved so far, aligned to its size.
        top = (top - (1 << piece_order)) & !((1 << piece_order) - 1);
        let slot = mem.slot()?;
        sys::mem_split(block, top, piece_order, slot)
            .map_err(|e| format!("MemSplit of 2^{piece_order} pages for the VMM: {e:?}"))?;
        *piece = slot;
    }
    Ok(pieces)
}

/// Copies `bytes` to the start of `memory`, a page at a time through the scratch window.
pub(crate) fn copy_into(memory: Selector, bytes: &[u8]) -> Outcome<()> {
    for (page, chunk) in bytes.chunks(4096).enumerate() {
        let map = Mapping::new(memory, page as u64, MapRights::READ | MapRights::WRITE)
            .context("MemMap of a guest image page")?;
        for (i, word) in chunk.chunks(8).enumerate() {
            let mut le = [0u8; 8];
            le[..word.len()].copy_from_slice(word);
            map.write_word(i, u64::from_le_bytes(le))
                .context("copying the guest image")?;
        }
    }
    Ok(())
}
