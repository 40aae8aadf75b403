//! The `nested` and `nested-bench` scenarios: the VMM (`vmm`) runs the L1 test hypervisor
//! (`l1hv`, `docs/nested.md`) as a nested guest, its memory owned by an L0 pager (`pager`) in
//! a protection domain of its own.
//!
//! The root task carves from the top of its largest memory block: the pager's backed region
//! (64 MiB), its frames for on-demand pages, the pools of its L1 EPT objects, the VMM's
//! shadow-EPT memory and a copy of the L1 image. It starts the VMM with the image, the report
//! endpoint (also its fault endpoint) and the shadow memory (`rt::vmx::protocol`), then, for
//! each guest, a **fresh pager** (its slots as `rt::nested::pager` describes: the backed region
//! and the frames taken back from the previous pager with `CapRevoke`, a new pool), waits for
//! `READY`, gives the VMM a CALL capability to it (slot `PAGER`, the previous pager's revoked)
//! and asks for a nested RUN (`FLAG_NESTED`). Every L1 starts on zeroed memory and untouched
//! on-demand pages, so each guest's path counts are its own.
//!
//! - `nested`: l1hv mode 0 (the checks) with 1 vCPU, and with 2 vCPUs when there are 2 CPUs
//!   (the VMM moves the second virtual CPU to the other CPU mid-run); then mode 2 (the
//!   malformed-VMX table). Per vCPU of mode 0 the VMM's counters must be exactly 16 L2 EPT
//!   violations reflected to L1 (l1hv's lazy pages) and 17 passed to the L0 pager (16
//!   on-demand pages and the revoked one again), and at most 340 (1 vCPU) or 510 (2 vCPUs)
//!   fixed in the vEPT (what L2 can touch, times the shadow flushes); mode 2 must reflect
//!   exactly one EPT misconfiguration.
//! - `nested-bench`: l1hv mode 1 and its five results (emulated cycles as L2 sees them, and
//!   the shadow faults of 64 MiB in 2 MiB pages).

use crate::guest::copy_into;
use crate::memory::Memory;
use crate::spawn::{Child, spawn};
use crate::{Context, Outcome, ensure};
use abi::{EndpointRights, LABEL_FAULT, MemoryRights, ROOT_PD};
use alloc::format;
use alloc::vec::Vec;
use rt::nested::pager;
use rt::sys;
use rt::vmx::protocol::{
    self, FLAG_MIGRATE, FLAG_NESTED, IMAGE_MAX_ORDER, NESTED_REPORT_WORDS, Outcome as GuestOutcome,
    REPORT_LABEL, RUN, RUN_OK, SHADOW_POOL_ORDER, nested_result_word, nested_vcpu_word,
};
use rt::{Message, Selector, utcb};

/// l1hv's modes (`tests/guests/l1hv`, `layout::mode`).
const MODE_CHECKS: u64 = 0;
const MODE_BENCH: u64 = 1;
const MODE_MALFORMED: u64 = 2;

/// Mode 0's counts per vCPU (`docs/nested.md`, l1hv's `layout`): lazy pages, on-demand pages
/// plus the revoked one, and the bound on the vEPT fixes for 1 and 2 vCPUs.
const EXPECTED_REFLECTED: u64 = 16;
const EXPECTED_PAGER: u64 = 17;
const FIXED_BOUND_1: u64 = 340;
const FIXED_BOUND_2: u64 = 510;

/// The pager's memory: the backed region (64 MiB: `docs/nested.md`), frames for on-demand
/// pages (each vCPU's L2 takes 17), pools for its L1 EPT objects (16 pages each, one per
/// pager started).
const BACKED_ORDER: u64 = 14;
const FRAMES_ORDER: u64 = 8;
const PAGER_POOL_ORDER: u64 = 4;
const PAGER_POOLS_ORDER: u64 = 6;
/// Pagers the pools suffice for.
const MAX_PAGERS: u64 = 1 << (PAGER_POOLS_ORDER - PAGER_POOL_ORDER);

/// A nested guest's end as the VMM reported it.
struct Report {
    outcome: Option<GuestOutcome>,
    detail: u64,
    extra: [u64; NESTED_REPORT_WORDS],
}

impl Report {
    fn passed(&self, what: &str) -> Outcome<()> {
        ensure!(
            self.outcome == Some(GuestOutcome::Pass),
            "{what}: L1 ended with {:?} (detail {:#x})",
            self.outcome,
            self.detail
        );
        Ok(())
    }

    fn vcpu(&self, vcpu: usize, counter: usize) -> u64 {
        self.extra[nested_vcpu_word(vcpu, counter)]
    }

    fn result(&self, i: usize) -> u64 {
        self.extra[nested_result_word(i)]
    }
}

/// The memory the scenario carved.
struct Pieces {
    backed: Selector,
    frames: Selector,
    pager_pools: Selector,
}

/// The VMM, the current pager and what they were given.
struct Nested {
    vmm: Child,
    /// Where the VMM reports and every server faults.
    endpoint: Selector,
    image_size: u64,
    cpus: u64,
    pieces: Pieces,
    pager: Option<Child>,
    pagers: u64,
}

pub fn run(mem: &mut Memory, scenario: &str) -> Outcome<()> {
    let boot = rt::boot_info().ok_or("no boot information")?;
    ensure!(
        boot.vmx != 0,
        "VMX root operation is not available on every CPU"
    );
    let endpoint = mem.slot()?;
    sys::endpoint_create(ROOT_PD, endpoint).context("EndpointCreate of the report endpoint")?;
    let mut nested = start(mem, endpoint, boot.cpus)?;
    match scenario {
        "nested-bench" => bench(mem, &mut nested),
        _ => checks(mem, &mut nested),
    }
}

/// The `nested` scenario.
fn checks(mem: &mut Memory, n: &mut Nested) -> Outcome<()> {
    let one = n.run_guest(mem, 1, MODE_CHECKS, 0)?;
    one.passed("l1hv checks, 1 vCPU")?;
    check_counts(&one, 1)?;
    log::info!("nested, 1 vCPU: PASS");

    if n.cpus >= 2 {
        let two = n.run_guest(mem, 2, MODE_CHECKS, FLAG_MIGRATE)?;
        two.passed("l1hv checks, 2 vCPUs")?;
        check_counts(&two, 2)?;
        let (from, to) = (
            two.extra[protocol::R_MIGRATED_FROM],
            two.extra[protocol::R_MIGRATED_TO],
        );
        ensure!(
            from != u64::MAX && from != to,
            "2 vCPUs: the VMM did not migrate a virtual CPU"
        );
        log::info!(
            "nested, 2 vCPUs on 2 CPUs: PASS, vcpu1 (its L1 and L2 vCPU objects) moved from cpu {from} to cpu {to} mid-run"
        );
    } else {
        log::info!("1 CPU: no run with 2 vCPUs and migration");
    }

    let malformed = n.run_guest(mem, 1, MODE_MALFORMED, 0)?;
    malformed.passed("l1hv malformed VMX")?;
    let misconfigurations = malformed.vcpu(0, protocol::N_MISCONFIGURATIONS);
    ensure!(
        misconfigurations == 1,
        "malformed VMX: {misconfigurations} EPT misconfigurations reflected to L1, expected 1"
    );
    rt::println!(
        "nested: malformed VMX: every case as the SDM prescribes, 1 EPT misconfiguration reflected to L1"
    );
    Ok(())
}

/// Checks and prints the path counts of a mode-0 run with `vcpus` vCPUs.
fn check_counts(report: &Report, vcpus: usize) -> Outcome<()> {
    let bound = if vcpus >= 2 {
        FIXED_BOUND_2
    } else {
        FIXED_BOUND_1
    };
    let mut failures = Vec::new();
    for v in 0..vcpus {
        let reflect = report.vcpu(v, protocol::N_REFLECTED);
        let fixed = report.vcpu(v, protocol::N_FIXED);
        let pager = report.vcpu(v, protocol::N_PAGER);
        rt::println!("nested: vcpu{v} reflect={reflect} fixed={fixed} pager={pager}");
        log::info!(
            "vcpu{v}: {} misconfigurations, {} shadow faults fixed, {} L2 exits reflected, {} L1 VMX exits, {} L2 exits handled in L0",
            report.vcpu(v, protocol::N_MISCONFIGURATIONS),
            report.vcpu(v, protocol::N_SHADOW_FAULTS),
            report.vcpu(v, protocol::N_L2_EXITS_REFLECTED),
            report.vcpu(v, protocol::N_L1_VMX_EXITS),
            report.vcpu(v, protocol::N_L2_EXITS_L0),
        );
        if reflect != EXPECTED_REFLECTED {
            failures.push(format!(
                "vcpu{v}: {reflect} reflected to L1, expected {EXPECTED_REFLECTED}"
            ));
        }
        if pager != EXPECTED_PAGER {
            failures.push(format!(
                "vcpu{v}: {pager} passed to the L0 pager, expected {EXPECTED_PAGER}"
            ));
        }
        if fixed > bound {
            failures.push(format!(
                "vcpu{v}: {fixed} fixed in the vEPT, at most {bound} allowed"
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}

/// The `nested-bench` scenario.
fn bench(mem: &mut Memory, n: &mut Nested) -> Outcome<()> {
    let report = n.run_guest(mem, 1, MODE_BENCH, 0)?;
    report.passed("l1hv benchmarks")?;
    let results: [u64; 5] = core::array::from_fn(|i| report.result(i));
    ensure!(
        results.iter().all(|&r| r != u64::MAX),
        "l1hv reported {} of its 5 benchmark results",
        results.iter().filter(|&&r| r != u64::MAX).count()
    );
    let [fixed, reflected, invept, cpuid, faults] = results;
    rt::println!("nested ept fixed in vept: {fixed} cycles");
    rt::println!("nested ept reflected to l1: {reflected} cycles");
    rt::println!("nested ept reflected to l1 with invept: {invept} cycles");
    rt::println!("nested cpuid reflected to l1: {cpuid} cycles");
    rt::println!("nested 2m shadow faults for 64 MiB: {faults}");
    Ok(())
}

impl Nested {
    /// Starts a fresh pager for the next guest, hands it to the VMM, runs the guest with
    /// `vcpus` vCPUs in l1hv mode `mode` and waits for the report.
    fn run_guest(
        &mut self,
        mem: &mut Memory,
        vcpus: u64,
        mode: u64,
        flags: u64,
    ) -> Outcome<Report> {
        self.next_pager(mem)?;
        let request = Message::new(
            RUN,
            [
                self.image_size,
                vcpus,
                mode,
                flags | FLAG_NESTED | (self.cpus << 8),
            ],
        );
        let answer = sys::call(self.vmm.endpoint, &request).context("Call RUN")?;
        ensure!(
            answer.label() == RUN_OK,
            "the VMM did not start L1: label {:#x}, status {:?}",
            answer.label(),
            abi::Status::from_code(answer.words[0])
        );
        let report = sys::recv(self.endpoint).context("Recv of the VMM's report")?;
        if report.label() == LABEL_FAULT {
            let [vector, error, address, rip] = report.words;
            return Err(format!(
                "a server (VMM or pager) faulted: vector {vector}, error {error:#x}, address {address:#x}, rip {rip:#x}"
            ));
        }
        ensure!(
            report.label() == REPORT_LABEL && report.info.extra_words() == NESTED_REPORT_WORDS,
            "unexpected message from the VMM: label {:#x}, {} extra words",
            report.label(),
            report.info.extra_words()
        );
        let mut extra = [0; NESTED_REPORT_WORDS];
        utcb::read_words(&mut extra);
        sys::reply(&Message::new(0, [0; 4])).context("Reply to the VMM's report")?;
        let [_, outcome, detail, _] = report.words;
        Ok(Report {
            outcome: GuestOutcome::from_code(outcome),
            detail,
            extra,
        })
    }

    /// Retires the current pager (its thread suspended, its endpoint and everything derived
    /// from the memory it was given revoked) and starts a new one on the same memory.
    fn next_pager(&mut self, mem: &mut Memory) -> Outcome<()> {
        ensure!(self.pagers < MAX_PAGERS, "no pool left for another pager");
        if let Some(old) = self.pager.take() {
            sys::thread_suspend(old.thread).context("ThreadSuspend of the old pager")?;
            sys::cap_revoke(old.endpoint).context("CapRevoke of the old pager's endpoint")?;
            sys::cap_revoke(self.pieces.backed).context("CapRevoke of the backed region")?;
            sys::cap_revoke(self.pieces.frames).context("CapRevoke of the frames")?;
        }
        let child = spawn(mem, "pager", self.endpoint)?;
        let pool = mem.slot()?;
        sys::mem_split(
            self.pieces.pager_pools,
            self.pagers << PAGER_POOL_ORDER,
            PAGER_POOL_ORDER,
            pool,
        )
        .context("MemSplit of a pager pool")?;
        self.pagers += 1;
        use MemoryRights as M;
        for (what, source, slot, rights) in [
            (
                "the backed region",
                self.pieces.backed,
                pager::BACKED,
                M::READ | M::WRITE | M::EXECUTE | M::MAP,
            ),
            (
                "the frames",
                self.pieces.frames,
                pager::FRAMES,
                M::READ | M::WRITE | M::EXECUTE | M::MAP,
            ),
            ("the pool", pool, pager::POOL, M::WRITE | M::DELEGATE),
        ] {
            sys::cap_delegate(source, child.pd, slot, rights.bits())
                .map_err(|e| format!("CapDelegate of {what} to the pager: {e:?}"))?;
        }
        let layout = pager::ready(child.endpoint).context("the pager's READY")?;
        log::info!(
            "pager {}: L1 memory backed to {:#x}, on demand {:#x}..{:#x}",
            self.pagers,
            layout.backed_end,
            layout.on_demand_base,
            layout.on_demand_end
        );
        sys::cap_delegate(
            child.endpoint,
            self.vmm.pd,
            protocol::PAGER,
            EndpointRights::CALL.bits(),
        )
        .context("CapDelegate of the pager's endpoint to the VMM")?;
        self.pager = Some(child);
        Ok(())
    }
}

/// Carves the memory, copies the L1 image and starts the VMM with its slots filled.
fn start(mem: &mut Memory, endpoint: Selector, cpus: u64) -> Outcome<Nested> {
    let boot = rt::boot_info().ok_or("no boot information")?;
    let index = boot
        .modules()
        .iter()
        .position(|m| m.name().split_whitespace().next() == Some("l1hv"))
        .ok_or("no boot module named 'l1hv'")?;
    let file = rt::module_bytes(index).ok_or("module 'l1hv' is not mapped")?;
    let image_pages = (file.len() as u64).div_ceil(4096);
    let image_order = u64::from(image_pages.next_power_of_two().trailing_zeros());
    ensure!(
        image_order <= IMAGE_MAX_ORDER,
        "the L1 image ({} bytes) is larger than 2^{IMAGE_MAX_ORDER} pages",
        file.len()
    );
    let [backed, shadow, image, frames, pager_pools] = carve(
        mem,
        [
            BACKED_ORDER,
            SHADOW_POOL_ORDER,
            image_order,
            FRAMES_ORDER,
            PAGER_POOLS_ORDER,
        ],
    )?;
    copy_into(image, file)?;

    let vmm = spawn(mem, "vmm", endpoint)?;
    let all = MemoryRights::all().bits();
    for (what, source, slot, rights) in [
        (
            "the L1 image",
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
        ("the shadow memory", shadow, protocol::SHADOW_POOL, all),
    ] {
        sys::cap_delegate(source, vmm.pd, slot, rights)
            .map_err(|e| format!("CapDelegate of {what} to the VMM: {e:?}"))?;
    }
    Ok(Nested {
        vmm,
        endpoint,
        image_size: file.len() as u64,
        cpus,
        pieces: Pieces {
            backed,
            frames,
            pager_pools,
        },
        pager: None,
        pagers: 0,
    })
}

/// Pages of the largest block left to the root task's page allocator, which splits single
/// pages from the bottom of its blocks (16 MiB: more than every program image, stack and
/// table the scenario needs).
const LEFT_TO_PAGES: u64 = 1 << 12;

/// Splits naturally aligned blocks of the given orders (largest first) off the top of the
/// largest boot memory block, leaving [`LEFT_TO_PAGES`] at its bottom.
fn carve<const N: usize>(mem: &mut Memory, orders: [u64; N]) -> Outcome<[Selector; N]> {
    let (block, order) = mem.largest_block();
    let total: u64 = orders.iter().map(|o| 1u64 << o).sum();
    ensure!(
        order < 40 && total + LEFT_TO_PAGES <= 1 << order,
        "the largest memory block (2^{order} pages) is too small for {total} pages"
    );
    let mut top = 1u64 << order;
    let mut pieces = [0; N];
    for (piece, piece_order) in pieces.iter_mut().zip(orders) {
        top = (top - (1 << piece_order)) & !((1 << piece_order) - 1);
        let slot = mem.slot()?;
        sys::mem_split(block, top, piece_order, slot)
            .map_err(|e| format!("MemSplit of 2^{piece_order} pages: {e:?}"))?;
        *piece = slot;
    }
    Ok(pieces)
}
