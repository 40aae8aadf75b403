//! Mode 1 in L1 (vCPU 0; any other vCPU just passes): builds L2's address space for the four
//! benchmarks and the 2 MiB test, runs L2 (which times and writes the results to port 0xf5,
//! forwarded by L1), and prints them.
//!
//! 1. an L2 EPT violation fixed in the vEPT: pages L1 mapped before VMLAUNCH, one per 2 MiB
//!    (its own L1 EPT page table each), touched once;
//! 2. an L2 EPT violation reflected to L1: L1 maps the (prefilled) page and resumes;
//! 3. the same with INVEPT single-context after the mapping;
//! 4. CPUID of L1's own leaf, reflected to L1 and answered by L1 without executing CPUID;
//! 5. (a fifth value) the shadow faults of touching 64 MiB mapped with 2 MiB pages.

use ept::entry::PageSize;

use crate::arch::{self, HostTables};
use crate::checks::map_large;
use crate::hv::{Backing, Hypervisor, LazyWindow};
use crate::layout::{BENCH_PAGES, LARGE_PAGE, PAGE, fail, l1_pattern, l2, mode};
use crate::memory;
use crate::println;

pub fn run(index: usize, count: usize, host: HostTables) -> Result<(), u32> {
    if index != 0 {
        return Ok(());
    }
    let mut hv = Hypervisor::new(index, count, mode::BENCH, host)?;
    for i in 0..BENCH_PAGES {
        let l2_page = l2::BENCH_FIXED + i * LARGE_PAGE;
        let l1_page = memory::page()?;
        arch::phys_write(l1_page, l1_pattern(l2_page, 0));
        hv.ept.map(l2_page, l1_page, PageSize::Size4K)?;
    }
    for (slot, base, invept) in [(0, l2::BENCH_REFLECT, false), (1, l2::BENCH_INVEPT, true)] {
        let backing = memory::pages(BENCH_PAGES)?;
        for i in 0..BENCH_PAGES {
            arch::phys_write(backing + i * PAGE, l1_pattern(base + i * PAGE, 0));
        }
        // The page table exists before L2 runs: L1's handler only writes a PTE.
        hv.ept.slot(base, 1)?;
        hv.windows[slot] = Some(LazyWindow {
            base,
            pages: BENCH_PAGES,
            backing: Backing::Prefilled(backing),
            invept,
            violations: 0,
        });
    }
    map_large(&mut hv)?;

    let end = hv.run()?;
    let r = &hv.results[..hv.result_count];
    let reflected = hv.windows.map(|w| w.map_or(0, |w| w.violations));
    if let [fixed, reflect, invept, cpuid, faults] = *r {
        println!(
            "l1hv: bench (emulated cycles, medians of {}): EPT fixed {fixed}, reflected {reflect}, reflected+INVEPT {invept}, CPUID {cpuid}; 2M shadow faults {faults}; L1 EPT violations {}+{}",
            crate::layout::BENCH_SAMPLES,
            reflected[0],
            reflected[1]
        );
    }
    if end != 0 {
        return Err(end);
    }
    if r.len() != 5 || reflected != [BENCH_PAGES; 2] {
        println!("l1hv: bench: {} results, reflected {reflected:?}", r.len());
        return Err(fail::COUNTERS);
    }
    hv.finish()
}
