//! Benchmarks of the shadow-EPT engine on the in-memory backend: fix-path throughput,
//! targeted versus flush-everything revocation, shadow-table memory and bookkeeping bytes.
//!
//! `cargo run --release -p ept --example vept_bench -- [--json PATH] [--quick]`
//!
//! Prints a table and optionally writes JSON `[{"name", "value", "unit", "target", "ok"}]`.
//! Every figure is measured on this run; the process exits with status 1 if a target is
//! missed.

use std::collections::HashMap;
use std::time::Instant;

use caps::derivation::Node;
use ept::backend::ShadowId;
use ept::check::EptViolationQualification;
use ept::entry::{EptEntry, Eptp, MemType, PAGE_SIZE, PageSize, Rights};
use ept::memory_backend::{MemoryBackend, MemoryBackendConfig, RevocationMode};
use ept::shadow::{Dispatch, Engine, EngineConfig, VcpuId};
use ept::walk::Level;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// L1 guest-physical address where L1 keeps its EPT tables.
const L1_TABLES: u64 = 4 * GIB;

struct Metric {
    name: &'static str,
    value: f64,
    unit: &'static str,
    target: Option<(&'static str, f64)>,
}

impl Metric {
    fn ok(&self) -> bool {
        match self.target {
            Some((">=", t)) => self.value >= t,
            Some((_, t)) => self.value <= t,
            None => true,
        }
    }
    fn target_text(&self) -> String {
        self.target
            .map_or(String::from("-"), |(op, t)| format!("{op} {t}"))
    }
}

/// Builds L1's EPT directly in L1 memory (4-level, all non-leaf entries RWX).
struct L1Ept {
    root: u64,
    next: u64,
    tables: HashMap<(u8, u64), u64>,
}

impl L1Ept {
    fn new(b: &mut MemoryBackend, base: u64) -> Self {
        let e = Self {
            root: base,
            next: base + PAGE_SIZE,
            tables: HashMap::new(),
        };
        e.zero(b, base);
        e
    }

    fn zero(&self, b: &mut MemoryBackend, page: u64) {
        for i in 0..512 {
            b.write_l1(page + i * 8, 0).expect("L1 table page backed");
        }
    }

    fn map(&mut self, b: &mut MemoryBackend, l2: u64, l1: u64, size: PageSize, rights: Rights) {
        let mut table = self.root;
        for n in (size.level() + 1..=4).rev() {
            let level = Level::new(n).unwrap();
            let key = (n, l2 >> level.shift());
            let next = match self.tables.get(&key) {
                Some(&t) => t,
                None => {
                    let t = self.next;
                    self.next += PAGE_SIZE;
                    self.zero(b, t);
                    b.write_l1(
                        table + level.index(l2).offset(),
                        EptEntry::table(t, Rights::RWX).0,
                    )
                    .unwrap();
                    self.tables.insert(key, t);
                    t
                }
            };
            table = next;
        }
        let level = Level::of_size(size);
        let entry = EptEntry::leaf(l1, size, rights, MemType::WriteBack, false);
        b.write_l1(table + level.index(l2).offset(), entry.0)
            .unwrap();
    }

    fn eptp(&self) -> Eptp {
        Eptp::new(self.root, false)
    }
}

/// An L1 of `memory` bytes that L0 maps with `l0_size` pages, its EPT tables (L0 maps them
/// with 4 KiB pages) and an engine with `vcpus` vCPUs.
struct Setup {
    backend: MemoryBackend,
    engine: Engine,
    vcpus: Vec<VcpuId>,
    ept: L1Ept,
}

fn setup(memory: u64, l0_size: PageSize, vcpus: usize, pool: usize, prefetch: bool) -> Setup {
    let mut backend = MemoryBackend::new(MemoryBackendConfig {
        cpus: vcpus.max(1),
        revocation: RevocationMode::Targeted,
        initial_pool_pages: pool,
    });
    let ram = backend.add_host_region(memory / PAGE_SIZE).unwrap();
    let tables = backend.add_host_region(8 * MIB / PAGE_SIZE).unwrap();
    let mut l1 = 0;
    while l1 < memory {
        backend
            .l0_map(
                l1,
                ram.base() + l1,
                l0_size,
                Rights::RWX,
                MemType::WriteBack,
            )
            .unwrap();
        l1 += l0_size.bytes();
    }
    for p in 0..(8 * MIB / PAGE_SIZE) {
        let l1 = L1_TABLES + p * PAGE_SIZE;
        backend
            .l0_map(
                l1,
                tables.base() + p * PAGE_SIZE,
                PageSize::Size4K,
                Rights::RWX,
                MemType::WriteBack,
            )
            .unwrap();
    }
    let ept = L1Ept::new(&mut backend, L1_TABLES);
    let mut engine = Engine::new(EngineConfig {
        prefetch,
        ..EngineConfig::default()
    });
    let vcpus = (0..vcpus).map(|_| engine.add_vcpu()).collect();
    Setup {
        backend,
        engine,
        vcpus,
        ept,
    }
}

impl Setup {
    fn activate_all(&mut self) -> Vec<ShadowId> {
        let mut out = Vec::new();
        for (i, &v) in self.vcpus.iter().enumerate() {
            let s = self
                .engine
                .activate(&mut self.backend, v, self.ept.eptp())
                .unwrap();
            self.backend.set_affinity(s, i).unwrap();
            out.push(s);
        }
        out
    }

    /// Faults in `[start, end)` on vCPU `v` page by page (skipping pages the previous fault's
    /// prefetch covered); returns the number of faults.
    fn fault_range(&mut self, v: usize, start: u64, end: u64, step: PageSize) -> u64 {
        let q = EptViolationQualification::for_access(Rights::READ);
        let mut gpa = start;
        let mut faults = 0;
        while gpa < end {
            let d = self
                .engine
                .handle_ept_violation(&mut self.backend, self.vcpus[v], gpa, q)
                .unwrap();
            faults += 1;
            match d {
                Dispatch::Fixed {
                    prefetched, size, ..
                } => {
                    gpa += size.bytes() * (1 + u64::from(prefetched));
                }
                other => panic!("fault at {gpa:#x} not fixed: {other:?}"),
            }
        }
        let _ = step;
        faults
    }
}

fn fix_path(quick: bool, metrics: &mut Vec<Metric>) {
    let memory = if quick { 64 * MIB } else { 256 * MIB };
    for prefetch in [false, true] {
        let mut s = setup(memory, PageSize::Size4K, 1, 4096, prefetch);
        let mut l2 = 0;
        while l2 < memory {
            s.ept
                .map(&mut s.backend, l2, l2, PageSize::Size4K, Rights::RWX);
            l2 += PAGE_SIZE;
        }
        s.activate_all();
        let t = Instant::now();
        let faults = s.fault_range(0, 0, memory, PageSize::Size4K);
        let secs = t.elapsed().as_secs_f64();
        let pages = memory / PAGE_SIZE;
        assert_eq!(
            s.backend
                .shadow_nodes(s.engine.active(s.vcpus[0]).unwrap().1) as u64,
            pages
        );
        if prefetch {
            metrics.push(Metric {
                name: "fix_path_faults_per_second_with_prefetch",
                value: faults as f64 / secs,
                unit: "faults/s",
                target: Some((">=", 10_000.0)),
            });
            metrics.push(Metric {
                name: "fix_path_pages_shadowed_per_second_with_prefetch",
                value: pages as f64 / secs,
                unit: "pages/s",
                target: Some((">=", 100_000.0)),
            });
        } else {
            metrics.push(Metric {
                name: "fix_path_faults_per_second",
                value: faults as f64 / secs,
                unit: "faults/s",
                target: Some((">=", 100_000.0)),
            });
        }
    }
}

fn revocation(quick: bool, metrics: &mut Vec<Metric>) {
    let memory = if quick { 256 * MIB } else { GIB };
    let vcpus = 4;
    let pages = memory / PAGE_SIZE;
    let pool = (vcpus as u64 * (pages / 512 + 8)) as usize;
    let mut s = setup(memory, PageSize::Size4K, vcpus, pool, true);
    let mut l2 = 0;
    while l2 < memory {
        s.ept
            .map(&mut s.backend, l2, l2, PageSize::Size4K, Rights::RWX);
        l2 += PAGE_SIZE;
    }
    let shadows = s.activate_all();
    for v in 0..vcpus {
        s.fault_range(v, 0, memory, PageSize::Size4K);
    }
    for &sh in &shadows {
        assert_eq!(s.backend.shadow_nodes(sh) as u64, pages, "fully shadowed");
    }
    // Targeted: revoke one L1 page at a time, then fault back what went.
    let samples = if quick { 64 } else { 256 };
    let mut revoke_secs = 0.0;
    let mut refault_secs = 0.0;
    let mut removed = 0;
    let mut refaults = 0u64;
    let q = EptViolationQualification::for_access(Rights::READ);
    for i in 0..samples {
        let page = (i * 7919 % pages) * PAGE_SIZE;
        let host = s.backend.l0_translate(page).unwrap().0;
        let before = s.backend.stats().revoked_entries;
        let t = Instant::now();
        s.backend.l0_unmap(page, PageSize::Size4K).unwrap();
        revoke_secs += t.elapsed().as_secs_f64();
        removed += s.backend.stats().revoked_entries - before;
        s.backend
            .l0_map(
                page,
                host,
                PageSize::Size4K,
                Rights::RWX,
                MemType::WriteBack,
            )
            .unwrap();
        let t = Instant::now();
        for v in 0..vcpus {
            let d = s
                .engine
                .handle_ept_violation(&mut s.backend, s.vcpus[v], page, q)
                .unwrap();
            assert!(matches!(d, Dispatch::Fixed { .. }));
            refaults += 1;
        }
        refault_secs += t.elapsed().as_secs_f64();
    }
    assert_eq!(
        removed,
        samples * vcpus as u64,
        "exactly one entry per vCPU per revoked page"
    );
    for &sh in &shadows {
        assert_eq!(s.backend.shadow_nodes(sh) as u64, pages, "all refaulted");
    }
    let targeted = (revoke_secs + refault_secs) / samples as f64;
    metrics.push(Metric {
        name: "revocation_targeted_cost_per_revoked_page",
        value: revoke_secs / samples as f64 * 1e6,
        unit: "us",
        target: Some(("<=", 100.0)),
    });
    metrics.push(Metric {
        name: "revocation_targeted_plus_refaults_per_revoked_page",
        value: targeted * 1e6,
        unit: "us",
        target: Some(("<=", 200.0)),
    });
    metrics.push(Metric {
        name: "revocation_targeted_refaults_per_revoked_page",
        value: refaults as f64 / samples as f64,
        unit: "faults",
        // Exactly what the revocation removed: one entry per vCPU.
        target: Some(("<=", vcpus as f64)),
    });
    // Flush everything: the same revocation empties every shadow; fault it all back.
    s.backend
        .set_revocation_mode(RevocationMode::FlushEverything);
    let page = 12345 * PAGE_SIZE % memory;
    let host = s.backend.l0_translate(page).unwrap().0;
    let t = Instant::now();
    s.backend.l0_unmap(page, PageSize::Size4K).unwrap();
    let flush_secs = t.elapsed().as_secs_f64();
    s.backend
        .l0_map(
            page,
            host,
            PageSize::Size4K,
            Rights::RWX,
            MemType::WriteBack,
        )
        .unwrap();
    // The engine's bookkeeping still marks the lost entries as installed; as the server would
    // after a flush notification, reset it so the refaults rebuild everything.
    for v in 0..vcpus {
        s.engine
            .invept_all_context(&mut s.backend, s.vcpus[v])
            .unwrap();
    }
    let t = Instant::now();
    let mut flush_refaults = 0;
    for v in 0..vcpus {
        flush_refaults += s.fault_range(v, 0, memory, PageSize::Size4K);
    }
    let flush_refault_secs = t.elapsed().as_secs_f64();
    for &sh in &shadows {
        assert_eq!(s.backend.shadow_nodes(sh) as u64, pages, "all refaulted");
    }
    let flush = flush_secs + flush_refault_secs;
    metrics.push(Metric {
        name: "revocation_flush_everything_plus_refaults",
        value: flush * 1e6,
        unit: "us",
        target: Some((">=", 0.0)),
    });
    metrics.push(Metric {
        name: "revocation_flush_everything_refaults",
        value: flush_refaults as f64,
        unit: "faults",
        target: Some((">=", 0.0)),
    });
    metrics.push(Metric {
        name: "revocation_ratio_flush_everything_to_targeted",
        value: flush / targeted,
        unit: "x",
        target: Some((">=", 100.0)),
    });
}

/// Shadow-table and bookkeeping bytes of one vCPU's shadow after shadowing 1 GiB and 2 GiB.
struct Footprint {
    tables: usize,
    engine: usize,
    nodes: usize,
    metadata: usize,
}

fn footprint(size: PageSize) -> (Footprint, Footprint) {
    let memory = 2 * GIB;
    let mut s = setup(memory, PageSize::Size2M, 1, 4096, true);
    let mut l2 = 0;
    while l2 < memory {
        s.ept.map(&mut s.backend, l2, l2, size, Rights::RWX);
        l2 += size.bytes();
    }
    let shadow = s.activate_all()[0];
    let measure = |s: &Setup| Footprint {
        tables: s.backend.table_pages(shadow) * PAGE_SIZE as usize,
        engine: s.engine.bookkeeping_bytes(),
        nodes: s.backend.shadow_nodes(shadow),
        metadata: s.backend.shadow_metadata_bytes(shadow),
    };
    s.fault_range(0, 0, GIB, size);
    let one = measure(&s);
    s.fault_range(0, GIB, 2 * GIB, size);
    let two = measure(&s);
    (one, two)
}

fn memory(metrics: &mut Vec<Metric>) {
    let (one, two) = footprint(PageSize::Size4K);
    metrics.push(Metric {
        name: "shadow_table_bytes_per_gib_4k",
        value: (two.tables - one.tables) as f64,
        unit: "bytes",
        target: Some(("<=", (2 * MIB + 16 * 1024) as f64)),
    });
    let pages = (GIB / PAGE_SIZE) as f64;
    let node = std::mem::size_of::<Node>();
    let engine = (two.engine as f64 - one.engine as f64) / pages;
    let derivation = ((two.nodes - one.nodes) * node) as f64 / pages;
    let metadata = (two.metadata - one.metadata) as f64 / pages;
    metrics.push(Metric {
        name: "bookkeeping_engine_bytes_per_4k_page",
        value: engine,
        unit: "bytes",
        target: Some(("<=", 4.0)),
    });
    metrics.push(Metric {
        name: "bookkeeping_derivation_node_bytes_per_4k_page",
        value: derivation,
        unit: "bytes",
        target: Some(("<=", node as f64)),
    });
    metrics.push(Metric {
        name: "bookkeeping_node_id_companion_bytes_per_4k_page",
        value: metadata,
        unit: "bytes",
        target: Some(("<=", 4.1)),
    });
    metrics.push(Metric {
        name: "bookkeeping_total_bytes_per_4k_page",
        value: engine + derivation + metadata,
        unit: "bytes",
        target: Some(("<=", 32.0)),
    });
    let (one, two) = footprint(PageSize::Size2M);
    metrics.push(Metric {
        name: "shadow_table_bytes_per_gib_2m",
        value: (two.tables - one.tables) as f64,
        unit: "bytes",
        target: Some(("<=", 8.0 * 1024.0)),
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let start = Instant::now();
    let mut metrics = Vec::new();
    fix_path(quick, &mut metrics);
    revocation(quick, &mut metrics);
    memory(&mut metrics);
    println!(
        "{:<52} {:>16} {:<9} {:>12} ok",
        "metric", "value", "unit", "target"
    );
    for m in &metrics {
        println!(
            "{:<52} {:>16.2} {:<9} {:>12} {}",
            m.name,
            m.value,
            m.unit,
            m.target_text(),
            if m.ok() { "yes" } else { "NO" }
        );
    }
    println!(
        "({} mode, {:.1} s)",
        if quick { "quick" } else { "full" },
        start.elapsed().as_secs_f64()
    );
    if let Some(path) = json {
        let items: Vec<String> = metrics
            .iter()
            .map(|m| {
                format!(
                    "  {{\"name\": \"{}\", \"value\": {}, \"unit\": \"{}\", \"target\": {}, \"ok\": {}}}",
                    m.name,
                    if m.value.is_finite() { format!("{:.3}", m.value) } else { "null".into() },
                    m.unit,
                    m.target.map_or("null".into(), |(op, t)| format!("\"{op} {t}\"")),
                    m.ok()
                )
            })
            .collect();
        std::fs::write(&path, format!("[\n{}\n]\n", items.join(",\n"))).expect("write JSON");
    }
    if metrics.iter().any(|m| !m.ok()) {
        std::process::exit(1);
    }
}
