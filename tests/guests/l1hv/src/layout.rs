//! The numbers l1hv shares with the nested scenario (docs/nested.md) and with its own L2: L1's
//! and L2's guest-physical layouts, the patterns, ports, CPUID leaves, counts and failure codes.

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// A 4 KiB page.
pub const PAGE: u64 = 4096;
/// A 2 MiB page.
pub const LARGE_PAGE: u64 = 2 * MIB;
/// vCPUs this image has stacks, TSSs and frames for.
pub const MAX_VCPUS: usize = 4;

/// Modes (RSI bits 15:8 at entry).
pub mod mode {
    /// The checks of docs/nested.md.
    pub const CHECKS: u64 = 0;
    /// The benchmarks (emulated cycles, port 0xf5).
    pub const BENCH: u64 = 1;
    /// The malformed-VMX table.
    pub const MALFORMED: u64 = 2;
}

/// L1 guest-physical memory (identity-mapped in L1 by its VMM's page tables).
pub mod l1 {
    use super::MIB;
    /// The image (guest.ld); it must end below [`ARENA_BASE`].
    pub const IMAGE_BASE: u64 = MIB;
    /// The page arena: EPT tables, VMXON and VMCS regions, bitmaps, L1's pattern pages.
    pub const ARENA_BASE: u64 = 4 * MIB;
    pub const ARENA_END: u64 = 32 * MIB;
    /// 2 MiB-aligned frames for the 2 MiB test: [`FRAMES_PER_VCPU`] per vCPU from here.
    pub const FRAMES_BASE: u64 = 32 * MIB;
    pub const FRAMES_PER_VCPU: u64 = 4;
    /// End of the memory backed from the start.
    pub const BACKED_END: u64 = 64 * MIB;
    /// On-demand memory (the L0 pager provides each page at its first touch): L1 never touches
    /// it itself; vCPU v's L2 uses [`super::L0_PAGES`] pages from `ON_DEMAND_BASE + v MiB`.
    pub const ON_DEMAND_BASE: u64 = 64 * MIB;
    pub const ON_DEMAND_END: u64 = 128 * MIB;
    pub const ON_DEMAND_PER_VCPU: u64 = MIB;

    // Every vCPU's frames are backed; every vCPU's on-demand pages are on demand.
    const _: () = assert!(
        FRAMES_BASE + FRAMES_PER_VCPU * super::MAX_VCPUS as u64 * super::LARGE_PAGE <= BACKED_END
    );
    const _: () = assert!(
        BACKED_END <= ON_DEMAND_BASE
            && ON_DEMAND_BASE + ON_DEMAND_PER_VCPU * super::MAX_VCPUS as u64 <= ON_DEMAND_END
    );
    const _: () = assert!(super::L0_PAGES * super::PAGE <= ON_DEMAND_PER_VCPU);
}

/// L2 guest-physical memory (= L2 virtual: L2's page tables are an identity map of 4 GiB). The
/// image is mapped one to one at its L1 address; the test regions lie above 1 GiB.
pub mod l2 {
    use super::{GIB, MIB};
    /// Pages L1 maps before VMLAUNCH (fixed in the vEPT).
    pub const UP_FRONT: u64 = GIB;
    /// Pages L1 maps on its EPT-violation exits (reflected to L1).
    pub const LAZY: u64 = GIB + 2 * MIB;
    /// Pages L1 maps up front to on-demand L1 pages (passed to the L0 pager).
    pub const ON_DEMAND: u64 = GIB + 4 * MIB;
    /// The page L1 remaps (new L1 page, new contents, INVEPT single-context).
    pub const REMAP: u64 = GIB + 6 * MIB;
    /// The page behind a page-directory entry with a reserved bit (mode 2).
    pub const MISCONFIGURED: u64 = GIB + 8 * MIB;
    /// Benchmark (2): pages L1 maps on its EPT-violation exits, 4 KiB apart.
    pub const BENCH_REFLECT: u64 = GIB + 16 * MIB;
    /// Benchmark (3): the same, L1 executing INVEPT single-context after each mapping.
    pub const BENCH_INVEPT: u64 = GIB + 20 * MIB;
    /// Benchmark (1): pages L1 mapped up front, one per 2 MiB (so that no shadow prefetch of
    /// neighbouring entries can hide a fault).
    pub const BENCH_FIXED: u64 = GIB + 64 * MIB;
    /// The 64 MiB region mapped with 2 MiB pages at every level.
    pub const LARGE: u64 = 2 * GIB;
    pub const LARGE_SIZE: u64 = 64 * MIB;
}

/// L1's pattern (docs/nested.md): `l2_gpa ^ 0x1111_0000_0000_0000 ^ (version << 40)`.
pub const fn l1_pattern(l2_gpa: u64, version: u64) -> u64 {
    l2_gpa ^ 0x1111_0000_0000_0000 ^ (version << 40)
}

/// The L0 pager's pattern (docs/nested.md): `l1_gpa ^ 0xa0a0_0000_0000_0000 ^ (generation <<
/// 32)`.
pub const fn pager_pattern(l1_gpa: u64, generation: u64) -> u64 {
    l1_gpa ^ 0xa0a0_0000_0000_0000 ^ (generation << 32)
}

/// The on-demand L1 page behind vCPU `index`'s L2 page `page` of [`l2::ON_DEMAND`].
pub const fn on_demand_page(index: u64, page: u64) -> u64 {
    l1::ON_DEMAND_BASE + index * l1::ON_DEMAND_PER_VCPU + page * PAGE
}

/// vCPU `index`'s 2 MiB frame `frame` (of [`l1::FRAMES_PER_VCPU`]).
pub const fn large_frame(index: u64, frame: u64) -> u64 {
    l1::FRAMES_BASE + (index * l1::FRAMES_PER_VCPU + frame) * LARGE_PAGE
}

/// The u64 L2 reads in the 4 KiB page `small` of the 2 MiB page `page` of [`l2::LARGE`].
///
/// L2's 32 large pages share vCPU's [`l1::FRAMES_PER_VCPU`] frames: page p maps frame
/// `p % FRAMES_PER_VCPU`, and reads word `p / FRAMES_PER_VCPU` of each 4 KiB page in it, so
/// every u64 read has one L2 address (and L1's pattern for it), and a page mapped to the wrong
/// frame reads another address's pattern.
pub const fn large_word(page: u64, small: u64) -> u64 {
    l2::LARGE + page * LARGE_PAGE + small * PAGE + (page / l1::FRAMES_PER_VCPU) * 8
}

/// I/O ports (docs/nested.md), intercepted by L1's I/O bitmap when L2 uses them.
pub mod port {
    pub const SERIAL: u16 = 0x3f8;
    pub const SERIAL_LAST: u16 = 0x3ff;
    pub const SERIAL_LSR: u16 = SERIAL + 5;
    /// LSR: transmitter holding register empty, transmitter empty.
    pub const LSR_IDLE: u8 = 0x60;
    pub const LSR_THRE: u8 = 0x20;
    /// End: 0 = PASS, else the failed check.
    pub const END: u16 = 0xf4;
    /// A benchmark result.
    pub const RESULT: u16 = 0xf5;
    /// Revoke the on-demand L1 page at this L1 address (from L2: at this L2 address, which L1
    /// translates).
    pub const REVOKE: u16 = 0xf6;
    /// Shadow faults fixed so far for this vCPU.
    pub const SHADOW_FAULTS: u16 = 0xf7;
    /// L2's requests to L1 (EAX = command, RSI = argument, answer in RAX); L1's own device.
    pub const TEST: u16 = 0xe0;
}

/// L2's requests on [`port::TEST`].
pub mod request {
    /// Remap the page at RSI (must be [`super::l2::REMAP`]) to new contents (version 1).
    pub const REMAP: u32 = 1;
    /// Inject the external interrupt vector RSI at the next VM entry.
    pub const INJECT: u32 = 2;
    /// Report: the shadow faults of the 2 MiB test (RSI).
    pub const REPORT_LARGE_FAULTS: u32 = 3;
    /// Report: the migration loop, RSI = first CPU | last CPU << 16 | changed << 32.
    pub const REPORT_MIGRATION: u32 = 4;
}

/// CPUID leaves: the VMM's (docs/nested.md) and L1's own.
pub mod leaf {
    pub const SIGNATURE: u32 = 0x4000_0000;
    pub const SIGNATURE_VALUE: [u32; 3] = [
        u32::from_le_bytes(*b"capv"),
        u32::from_le_bytes(*b"isor"),
        0,
    ];
    /// EAX = the physical CPU the asking vCPU runs on.
    pub const PHYSICAL_CPU: u32 = 0x4000_0001;
    /// L1's own leaf, answered by L1 without executing CPUID: EAX = the vCPU index, EBX =
    /// "l1hv". L2's CPUID benchmark uses it (the exit reflected to L1 and back, nothing more).
    pub const L1: u32 = 0x4000_0100;
    pub const L1_SIGNATURE: u32 = u32::from_le_bytes(*b"l1hv");
}

/// An MSR L1 emulates for L2 (outside the MSR bitmap's ranges: RDMSR/WRMSR of it always exit).
pub const L1_MSR: u32 = 0x4c31_4856;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_PAT: u32 = 0x277;
/// The power-on PAT (SDM Vol. 3A §13.12.4), L2's.
pub const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

/// The vector L1 injects into L2.
pub const L2_INTERRUPT_VECTOR: u8 = 0x30;

/// Mode 0: pages L1 maps up front, pages it maps lazily, on-demand pages, per vCPU.
pub const UP_FRONT_PAGES: u64 = 16;
pub const LAZY_PAGES: u64 = 16;
pub const L0_PAGES: u64 = 16;
/// 2 MiB pages in the 64 MiB region, and the shadow faults allowed for touching it.
pub const LARGE_PAGES: u64 = l2::LARGE_SIZE / LARGE_PAGE;
pub const LARGE_FAULT_LIMIT: u64 = 64;
/// Most CPUID 0x4000_0001 queries of the migration loop (it ends at the first change).
pub const MIGRATION_QUERIES: u64 = 512;
/// Benchmarks: samples per median and untimed warm-up accesses before them.
pub const BENCH_SAMPLES: usize = 256;
pub const BENCH_WARM_UP: usize = 32;
pub const BENCH_PAGES: u64 = (BENCH_SAMPLES + BENCH_WARM_UP) as u64;

/// Failure codes (port 0xf4): the check that failed. 0x80 + vector: an exception in L2;
/// 0x100 + vector: an exception in L1 (0x1ff: an interrupt); 0xff: a panic.
pub mod fail {
    /// VMX unusable: CPUID.1:ECX.VMX, IA32_FEATURE_CONTROL, a required control or EPT feature.
    pub const VMX_UNAVAILABLE: u32 = 1;
    /// Memory layout: vCPU index, image, boot tables or stack in the arena, arena exhausted.
    pub const LAYOUT: u32 = 2;
    /// VMXON, VMCLEAR, VMPTRLD, VMWRITE, INVEPT or INVVPID failed during set-up.
    pub const VMX_SETUP: u32 = 3;
    /// VMLAUNCH/VMRESUME failed, or VM entry failed (exit reason bit 31).
    pub const VM_ENTRY: u32 = 4;
    /// An L2 exit L1 did not expect (reason, port, EPT violation outside a lazy window).
    pub const UNEXPECTED_EXIT: u32 = 5;
    /// Up-front pages: L2 read something other than L1's pattern.
    pub const UP_FRONT: u32 = 10;
    /// Lazy pages: contents.
    pub const LAZY: u32 = 11;
    /// Lazy pages: L1's EPT-violation exits are not exactly [`super::LAZY_PAGES`].
    pub const LAZY_COUNT: u32 = 12;
    /// On-demand pages: L2 read something other than the pager's generation 0.
    pub const L0_PAGER: u32 = 13;
    /// Remap: old contents before, or not the new contents after INVEPT.
    pub const REMAP: u32 = 14;
    /// Revoke: after the revocation L2 read something other than generation 1.
    pub const REVOKE: u32 = 15;
    /// 2 MiB region: contents.
    pub const LARGE: u32 = 16;
    /// 2 MiB region: more than [`super::LARGE_FAULT_LIMIT`] shadow faults.
    pub const LARGE_FAULTS: u32 = 17;
    /// Migration (2 vCPUs): no vCPU saw CPUID 0x4000_0001 change, or a vCPU did not report.
    pub const MIGRATION: u32 = 18;
    /// CPUID through L1: the VMM's signature, L1's leaf, VMX hidden from L2.
    pub const CPUID: u32 = 19;
    /// Event injection: L2's handler did not run once per injection (request and HLT).
    pub const INJECTION: u32 = 20;
    /// #UD: not intercepted and reflected, or L2's handler did not run.
    pub const INVALID_OPCODE: u32 = 21;
    /// MSRs: L1's emulated MSR or the passed-through IA32_FS_BASE.
    pub const MSR: u32 = 22;
    /// L1's exit counters after L2 ended (HLT, injections, #UD, MSR exits, remap, revoke).
    pub const COUNTERS: u32 = 23;
    /// Benchmarks: (1) fixed, (2) reflected, (3) reflected + INVEPT, (4) CPUID, contents.
    pub const BENCH_FIXED: u32 = 30;
    pub const BENCH_REFLECT: u32 = 31;
    pub const BENCH_INVEPT: u32 = 32;
    pub const BENCH_CPUID: u32 = 33;
    /// Mode 2: a malformed case did not end as the SDM prescribes.
    pub const MALFORMED: u32 = 40;
    /// Mode 2: the misconfigured page read wrong after the repair.
    pub const MISCONFIGURED: u32 = 41;
    /// An unknown mode.
    pub const MODE: u32 = 0xfe;
    /// A panic.
    pub const PANIC: u32 = 0xff;
}
