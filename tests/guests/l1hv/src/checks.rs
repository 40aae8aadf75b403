//! Mode 0 in L1: builds L2's address space for the checks of docs/nested.md, runs L2 (which
//! checks what it reads), then checks L1's own counters and, with 2 vCPUs, the migration.

use core::sync::atomic::{AtomicU64, Ordering};

use ept::entry::PageSize;

use crate::arch::{self, HostTables};
use crate::hv::{Backing, Hypervisor, LazyWindow};
use crate::layout::{
    L0_PAGES, LARGE_PAGE, LARGE_PAGES, LAZY_PAGES, MAX_VCPUS, PAGE, UP_FRONT_PAGES, fail, l1,
    l1_pattern, l2, large_frame, large_word, mode, on_demand_page,
};
use crate::memory;
use crate::println;

/// Each vCPU's migration report: [`POSTED`] | first CPU | last CPU << 16 | changed << 32.
static MIGRATION: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
const POSTED: u64 = 1 << 63;
const CHANGED: u64 = 1 << 32;
/// How long a vCPU waits for the others' reports (TSC ticks).
const MIGRATION_WAIT: u64 = 1 << 33;

/// Maps the 64 MiB region at [`l2::LARGE`] with 2 MiB EPT leaves over this vCPU's 2 MiB
/// frames, writing L1's pattern at each word L2 will read ([`large_word`]).
pub fn map_large(hv: &mut Hypervisor) -> Result<(), u32> {
    let index = hv.index as u64;
    for page in 0..LARGE_PAGES {
        let frame = large_frame(index, page % l1::FRAMES_PER_VCPU);
        for small in 0..LARGE_PAGE / PAGE {
            let word = large_word(page, small);
            arch::phys_write(
                frame + small * PAGE + (word & (PAGE - 1)),
                l1_pattern(word, 0),
            );
        }
        hv.ept
            .map(l2::LARGE + page * LARGE_PAGE, frame, PageSize::Size2M)?;
    }
    Ok(())
}

/// Mode 0 on vCPU `index` of `count`.
pub fn run(index: usize, count: usize, host: HostTables) -> Result<(), u32> {
    let result = checks(index, count, host);
    if count < 2 {
        return result.map(|_| ());
    }
    // Report (even after a failure, so that no vCPU waits for this one in vain), then wait for
    // every vCPU: the server migrates one of them, and that one must have seen it.
    let report = result.as_ref().ok().copied().flatten().unwrap_or(0);
    MIGRATION[index].store(POSTED | report, Ordering::Release);
    result?;
    let start = arch::rdtsc();
    while (0..count).any(|i| MIGRATION[i].load(Ordering::Acquire) & POSTED == 0) {
        if arch::rdtsc().wrapping_sub(start) > MIGRATION_WAIT {
            println!("l1hv: vcpu{index}: no migration report from every vCPU");
            return Err(fail::MIGRATION);
        }
        core::hint::spin_loop();
    }
    let changed = (0..count)
        .filter(|&i| MIGRATION[i].load(Ordering::Acquire) & CHANGED != 0)
        .count();
    if changed == 0 {
        println!("l1hv: vcpu{index}: no vCPU saw its physical CPU change");
        return Err(fail::MIGRATION);
    }
    Ok(())
}

/// Runs the checks; `Ok(migration report)` (`None` with one vCPU).
fn checks(index: usize, count: usize, host: HostTables) -> Result<Option<u64>, u32> {
    let mut hv = Hypervisor::new(index, count, mode::CHECKS, host)?;
    let v = index as u64;
    // Up front: filled and mapped before VMLAUNCH.
    for page in 0..UP_FRONT_PAGES {
        let l2_page = l2::UP_FRONT + page * PAGE;
        let l1_page = memory::page()?;
        memory::fill_pattern(l1_page, l2_page, 0);
        hv.ept.map(l2_page, l1_page, PageSize::Size4K)?;
    }
    // Lazy: nothing mapped; L1 maps each page on its EPT-violation exit.
    hv.windows[0] = Some(LazyWindow {
        base: l2::LAZY,
        pages: LAZY_PAGES,
        backing: Backing::Fill,
        invept: false,
        violations: 0,
    });
    // L0 on demand: mapped to on-demand L1 pages L1 never touches.
    for page in 0..L0_PAGES {
        hv.ept.map(
            l2::ON_DEMAND + page * PAGE,
            on_demand_page(v, page),
            PageSize::Size4K,
        )?;
    }
    // Remap: version 0 now; version 1 on L2's request.
    let remap = memory::page()?;
    memory::fill_pattern(remap, l2::REMAP, 0);
    hv.ept.map(l2::REMAP, remap, PageSize::Size4K)?;
    map_large(&mut hv)?;

    let end = hv.run()?;
    let c = hv.counters;
    let large = hv.reports.large_faults.unwrap_or(u64::MAX);
    let migration = hv.reports.migration;
    let (start, image_end) = arch::image_range();
    // Distinct L2 translations L2 may touch: image pages, the test pages (the remapped page
    // twice, the revoked page twice), the 2 MiB pages. Each is fixed in the vEPT at most once
    // per shadow flush: L1's one INVEPT and, with 2 vCPUs, possibly the migration.
    let touchable =
        (image_end - start) / PAGE + UP_FRONT_PAGES + LAZY_PAGES + L0_PAGES + 1 + 2 + LARGE_PAGES;
    let flushes = if count >= 2 { 3 } else { 2 };
    let (first, last) = migration.map_or((0, 0), |m| (m & 0xffff, (m >> 16) & 0xffff));
    println!(
        "l1hv: vcpu{index}: L2 ended {end}; exits {}, L1 EPT violations {}, 2M faults {large}, cpu {first}->{last}; expect reflect={LAZY_PAGES} pager={} vept<={}",
        c.exits,
        c.ept_violations,
        L0_PAGES + 1,
        touchable * flushes
    );
    if end != 0 {
        return Err(end);
    }
    if c.ept_violations != LAZY_PAGES || hv.windows[0].map(|w| w.violations) != Some(LAZY_PAGES) {
        return Err(fail::LAZY_COUNT);
    }
    let expected = [
        ("HLT", c.hlt, 1),
        ("injections", c.injections, 2),
        ("#UD", c.invalid_opcode, 1),
        ("MSR", c.msr, 2),
        ("remaps", c.remaps, 1),
        ("revocations", c.revocations, 1),
        ("misconfigurations", c.misconfigurations, 0),
    ];
    for (what, seen, want) in expected {
        if seen != want {
            println!("l1hv: vcpu{index}: {what} exits {seen}, expected {want}");
            return Err(fail::COUNTERS);
        }
    }
    if large > crate::layout::LARGE_FAULT_LIMIT {
        return Err(fail::LARGE_FAULTS);
    }
    if count >= 2 && migration.is_none() {
        return Err(fail::MIGRATION);
    }
    hv.finish()?;
    Ok(migration)
}
