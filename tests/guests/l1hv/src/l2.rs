//! L2, the payload: runs in L1's virtual machine from L1's own image (mapped one to one by L1's
//! EPT), on its own stack, GDT, IDT and identity page tables, and checks every u64 it reads.
//!
//! L2 talks to L1 only through exits: CPUID, HLT, UD2, RDMSR/WRMSR, and port I/O that L1's
//! bitmap intercepts (serial, 0xf4 end, 0xf5 results, 0xf6 revocation of the page behind an L2
//! address, 0xf7 shadow faults, 0xe0 requests).

use crate::arch;
use crate::l2_println;
use crate::layout::{
    self, BENCH_SAMPLES, BENCH_WARM_UP, L0_PAGES, LARGE_FAULT_LIMIT, LARGE_PAGE, LARGE_PAGES,
    LAZY_PAGES, MIGRATION_QUERIES, PAGE, UP_FRONT_PAGES, fail, l1_pattern, l2, leaf, mode,
    pager_pattern, port, request,
};

/// L2's entry (from `l1hv_l2_entry`): RDI = vCPU index, RSI = mode, RDX = vCPU count. Ends by
/// writing 0 (PASS) or the failed check to port 0xf4, which ends L2 for L1.
pub extern "C" fn l2_main(index: u64, mode: u64, count: u64) -> ! {
    let result = match mode {
        mode::CHECKS => checks(index, count),
        mode::BENCH => bench(),
        mode::MALFORMED => misconfigured(),
        _ => Err(fail::MODE),
    };
    arch::outl(port::END, result.err().unwrap_or(0));
    loop {
        arch::l2_hlt();
    }
}

fn check(cond: bool, code: u32) -> Result<(), u32> {
    if cond { Ok(()) } else { Err(code) }
}

/// Checks every u64 of the page at `page` against `expected(address)`.
fn check_page(page: u64, code: u32, expected: impl Fn(u64) -> u64) -> Result<(), u32> {
    for word in 0..PAGE / 8 {
        let address = page + 8 * word;
        let value = arch::l2_read(address);
        let want = expected(address);
        if value != want {
            l2_println!("{address:#x}: {value:#x}, expected {want:#x} (check {code})");
            return Err(code);
        }
    }
    Ok(())
}

/// Mode 0: the checks of docs/nested.md, in the order of its table, then the exits L1 handles.
fn checks(index: u64, count: u64) -> Result<(), u32> {
    // CPUID through L1: the VMM's signature (L1 passes it on), L1's own leaf, VMX hidden.
    let [_, ebx, ecx, edx] = arch::cpuid(leaf::SIGNATURE, 0);
    check([ebx, ecx, edx] == leaf::SIGNATURE_VALUE, fail::CPUID)?;
    let [eax, ebx, _, _] = arch::cpuid(leaf::L1, 0);
    check(
        u64::from(eax) == index && ebx == leaf::L1_SIGNATURE,
        fail::CPUID,
    )?;
    check(arch::cpuid(1, 0)[2] & (1 << 5) == 0, fail::CPUID)?;

    // Up front: L1 mapped and filled these before VMLAUNCH.
    for page in 0..UP_FRONT_PAGES {
        check_page(l2::UP_FRONT + page * PAGE, fail::UP_FRONT, |a| {
            l1_pattern(a, 0)
        })?;
    }
    // Lazy: each first touch is an EPT violation L1 receives; it maps and resumes.
    for page in 0..LAZY_PAGES {
        check_page(l2::LAZY + page * PAGE, fail::LAZY, |a| l1_pattern(a, 0))?;
    }
    // L0 on demand: L1 mapped these to L1 pages nobody touched; the pager provides them.
    for page in 0..L0_PAGES {
        let l2_page = l2::ON_DEMAND + page * PAGE;
        let l1_page = layout::on_demand_page(index, page);
        check_page(l2_page, fail::L0_PAGER, |a| {
            pager_pattern(l1_page + (a - l2_page), 0)
        })?;
    }
    // Remap: version 0, then L1 maps a new page (version 1) and executes INVEPT.
    check_page(l2::REMAP, fail::REMAP, |a| l1_pattern(a, 0))?;
    arch::l2_request(request::REMAP, l2::REMAP);
    check_page(l2::REMAP, fail::REMAP, |a| l1_pattern(a, 1))?;
    // Revoke: the first on-demand page (read above, generation 0) is revoked through L1; every
    // u64 read again must be generation 1.
    let l1_page = layout::on_demand_page(index, 0);
    arch::outl(port::REVOKE, l2::ON_DEMAND as u32);
    check_page(l2::ON_DEMAND, fail::REVOKE, |a| {
        pager_pattern(l1_page + (a - l2::ON_DEMAND), 1)
    })?;

    // Event injection: on request, and on HLT.
    let before = arch::l2_block(0);
    arch::l2_request(request::INJECT, u64::from(layout::L2_INTERRUPT_VECTOR));
    check(arch::l2_block(0) == before + 1, fail::INJECTION)?;
    arch::l2_hlt();
    check(arch::l2_block(0) == before + 2, fail::INJECTION)?;
    // #UD: intercepted by L1 (exception bitmap) and reflected.
    let before = arch::l2_block(1);
    arch::l2_ud2();
    check(arch::l2_block(1) == before + 1, fail::INVALID_OPCODE)?;
    // MSRs: L1's own (always exits), IA32_FS_BASE (passed through by L1's MSR bitmap).
    let value = 0x5eed_0000_0000_0000 | index;
    arch::wrmsr(layout::L1_MSR, value);
    check(arch::rdmsr(layout::L1_MSR) == value, fail::MSR)?;
    let fs_base = 0x0000_7f00_0000_0000 + index * PAGE;
    arch::wrmsr(layout::IA32_FS_BASE, fs_base);
    check(arch::rdmsr(layout::IA32_FS_BASE) == fs_base, fail::MSR)?;
    arch::wrmsr(layout::IA32_FS_BASE, 0);

    // 64 MiB through 2 MiB pages at every level.
    let faults = large()?;
    arch::l2_request(request::REPORT_LARGE_FAULTS, faults);
    check(faults <= LARGE_FAULT_LIMIT, fail::LARGE_FAULTS)?;

    if count >= 2 {
        migration();
    }
    Ok(())
}

/// Reads one u64 in every 4 KiB page of the 64 MiB region (the word that L1's pattern makes
/// unique to that L2 address, `layout::large_word`), and returns the shadow faults the VMM
/// counted meanwhile (port 0xf7 before and after).
fn large() -> Result<u64, u32> {
    let before = arch::inl(port::SHADOW_FAULTS);
    for page in 0..LARGE_PAGES {
        for small in 0..LARGE_PAGE / PAGE {
            let address = layout::large_word(page, small);
            let value = arch::l2_read(address);
            if value != l1_pattern(address, 0) {
                l2_println!("{address:#x}: {value:#x} (check {})", fail::LARGE);
                return Err(fail::LARGE);
            }
        }
    }
    let after = arch::inl(port::SHADOW_FAULTS);
    Ok(u64::from(after.wrapping_sub(before)))
}

/// Asks CPUID 0x4000_0001 (through L1) until the physical CPU changes, at most
/// [`MIGRATION_QUERIES`] times, and reports first | last << 16 | changed << 32 to L1.
fn migration() {
    let first = arch::cpuid(leaf::PHYSICAL_CPU, 0)[0];
    let mut last = first;
    for _ in 0..MIGRATION_QUERIES {
        last = arch::cpuid(leaf::PHYSICAL_CPU, 0)[0];
        if last != first {
            break;
        }
    }
    let report = u64::from(first & 0xffff)
        | (u64::from(last & 0xffff) << 16)
        | (u64::from(last != first) << 32);
    arch::l2_request(request::REPORT_MIGRATION, report);
}

/// Mode 1: the four benchmarks, medians in emulated cycles as L2 sees them, written to port
/// 0xf5 in order (L1 forwards them), then the 2 MiB test's shadow faults as a fifth value.
fn bench() -> Result<(), u32> {
    let mut samples = [0u64; BENCH_SAMPLES];
    let fixed = time_reads(&mut samples, fail::BENCH_FIXED, |i| {
        l2::BENCH_FIXED + i * LARGE_PAGE
    })?;
    arch::outl(port::RESULT, fixed);
    let reflect = time_reads(&mut samples, fail::BENCH_REFLECT, |i| {
        l2::BENCH_REFLECT + i * PAGE
    })?;
    arch::outl(port::RESULT, reflect);
    let invept = time_reads(&mut samples, fail::BENCH_INVEPT, |i| {
        l2::BENCH_INVEPT + i * PAGE
    })?;
    arch::outl(port::RESULT, invept);
    for i in 0..BENCH_WARM_UP + BENCH_SAMPLES {
        let start = arch::rdtsc();
        let [_, ebx, _, _] = arch::cpuid(leaf::L1, 0);
        let end = arch::rdtsc();
        check(ebx == leaf::L1_SIGNATURE, fail::BENCH_CPUID)?;
        if let Some(sample) = i.checked_sub(BENCH_WARM_UP) {
            samples[sample] = end - start;
        }
    }
    arch::outl(port::RESULT, median(&mut samples));
    let faults = large()?;
    arch::outl(port::RESULT, faults as u32);
    arch::l2_request(request::REPORT_LARGE_FAULTS, faults);
    check(faults <= LARGE_FAULT_LIMIT, fail::LARGE_FAULTS)
}

/// Times the first read of the u64 at `address(i)` for the warm-up and the samples, checking
/// each against L1's pattern; the median of the samples, saturated to 32 bits.
fn time_reads(
    samples: &mut [u64; BENCH_SAMPLES],
    code: u32,
    address: impl Fn(u64) -> u64,
) -> Result<u32, u32> {
    for i in 0..BENCH_WARM_UP + BENCH_SAMPLES {
        let address = address(i as u64);
        let start = arch::rdtsc();
        let value = arch::l2_read(address);
        let end = arch::rdtsc();
        if value != l1_pattern(address, 0) {
            l2_println!("{address:#x}: {value:#x} (check {code})");
            return Err(code);
        }
        if let Some(sample) = i.checked_sub(BENCH_WARM_UP) {
            samples[sample] = end - start;
        }
    }
    Ok(median(samples))
}

fn median(samples: &mut [u64]) -> u32 {
    samples.sort_unstable();
    samples[samples.len() / 2].min(u64::from(u32::MAX)) as u32
}

/// Mode 2: reads the page behind the misconfigured entry (L1 repairs it on the EPT
/// misconfiguration exit), checking L1's pattern.
fn misconfigured() -> Result<(), u32> {
    check_page(l2::MISCONFIGURED, fail::MISCONFIGURED, |a| l1_pattern(a, 0))
}
