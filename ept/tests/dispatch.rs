//! Scenario tests of the three-way dispatch and of each invalidation rule, named after the
//! rule they check.

mod common;

use common::{GIB, MIB, World, WorldConfig, leaf};
use ept::backend::ShadowBackend;
use ept::check::EptViolationQualification;
use ept::entry::{EptFlags, Eptp, MemType, PAGE_SIZE, PageSize, Rights};
use ept::memory_backend::{HardwareFault, RevocationMode};
use ept::model::ModelLeaf;
use ept::shadow::{Dispatch, EngineConfig, EngineError, L1Exit};

const R: Rights = Rights::READ;
const W: Rights = Rights::WRITE;
const X: Rights = Rights::EXECUTE;

fn world() -> World {
    World::new(WorldConfig::default())
}

fn no_prefetch() -> WorldConfig {
    WorldConfig {
        engine: EngineConfig {
            prefetch: false,
            ..EngineConfig::default()
        },
        ..WorldConfig::default()
    }
}

fn fault(w: &mut World, v: usize, gpa: u64, access: Rights) -> Dispatch {
    let (_, shadow) = w.engine.active(w.vcpus[v]).unwrap();
    let q = match w.backend.access(shadow, gpa, access) {
        Err(HardwareFault::EptViolation(q)) => q,
        other => panic!("expected a shadow EPT violation, got {other:?}"),
    };
    w.engine
        .handle_ept_violation(&mut w.backend, w.vcpus[v], gpa, q)
        .unwrap()
}

fn shadow_of(w: &World, v: usize) -> ept::backend::ShadowId {
    w.engine.active(w.vcpus[v]).unwrap().1
}

#[test]
fn unmapped_l1_address_is_reflected_as_violation_with_no_rights() {
    let mut w = world();
    let q_in = EptViolationQualification::for_access(W)
        | EptViolationQualification::GUEST_LINEAR_ADDRESS_VALID;
    let d = w
        .engine
        .handle_ept_violation(&mut w.backend, w.vcpus[0], 0x1234_5000, q_in)
        .unwrap();
    assert_eq!(
        d,
        Dispatch::ReflectToL1(L1Exit::EptViolation {
            gpa: 0x1234_5000,
            qualification: EptViolationQualification::DATA_WRITE
                | EptViolationQualification::GUEST_LINEAR_ADDRESS_VALID
        })
    );
    assert_eq!(
        w.engine.counters(w.vcpus[0]).unwrap().reflected_violations,
        1
    );
}

#[test]
fn missing_right_is_reflected_with_l1_rights_in_bits_5_3() {
    let mut w = world();
    w.l1_map(
        0,
        leaf(0x10_0000, PageSize::Size4K, 0x20_0000, R | X),
        false,
    );
    match fault(&mut w, 0, 0x10_0008, W) {
        Dispatch::ReflectToL1(L1Exit::EptViolation { qualification, .. }) => {
            assert_eq!(qualification.access(), W);
            assert_eq!(qualification.entry_rights(), R | X);
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn misconfigured_l1_entry_is_reflected_as_misconfiguration() {
    let mut w = world();
    for (rights, memtype) in [(W, 6u8), (R, 2), (R, 7), (W | X, 6)] {
        let l = ModelLeaf {
            memtype_bits: memtype,
            ..leaf(0x30_0000, PageSize::Size4K, 0x40_0000, rights)
        };
        w.l1_map(0, l, true);
        let d = fault(&mut w, 0, 0x30_0000, R);
        assert_eq!(
            d,
            Dispatch::ReflectToL1(L1Exit::EptMisconfiguration { gpa: 0x30_0000 }),
            "{rights:?} {memtype}"
        );
    }
    assert_eq!(
        w.engine
            .counters(w.vcpus[0])
            .unwrap()
            .reflected_misconfigurations,
        4
    );
}

#[test]
fn mapped_page_is_fixed_with_l1_and_l0_rights_anded() {
    let mut w = world();
    let l1 = GIB + 200 * 2 * MIB + 0x5000; // L0: 2 MiB page, read+execute only.
    w.l0_protect(l1, R | X);
    w.l1_map(0, leaf(0x7000, PageSize::Size4K, l1, R | W | X), false);
    match fault(&mut w, 0, 0x7010, R) {
        Dispatch::Fixed { size, rights, .. } => {
            assert_eq!(size, PageSize::Size4K);
            assert_eq!(rights, R | X);
        }
        d => panic!("{d:?}"),
    }
    assert_eq!(
        w.backend.access(shadow_of(&w, 0), 0x7010, R),
        Ok(w.region.base() + l1 + 0x10)
    );
    w.check().unwrap();
}

#[test]
fn write_to_page_l0_write_protects_is_passed_to_l0_not_looped() {
    let mut w = world();
    let l1 = GIB + 300 * 2 * MIB;
    w.l0_protect(l1, R);
    w.l1_map(0, leaf(0x8000, PageSize::Size4K, l1, R | W), false);
    assert_eq!(
        fault(&mut w, 0, 0x8000, W),
        Dispatch::PassToL0 {
            l1_gpa: l1,
            access: W
        }
    );
    w.l0_page_in(l1);
    assert!(matches!(
        fault(&mut w, 0, 0x8000, W),
        Dispatch::Fixed { .. }
    ));
}

#[test]
fn unbacked_l1_page_is_passed_to_l0_then_fixed() {
    let mut w = world();
    let l1 = GIB + 3 * 2 * MIB + 0x3000; // a 4 KiB L0 page
    w.l1_map(0, leaf(0x9000, PageSize::Size4K, l1, R | W), false);
    w.l0_revoke(l1);
    assert_eq!(
        fault(&mut w, 0, 0x9abc, R),
        Dispatch::PassToL0 {
            l1_gpa: l1 + 0xabc,
            access: R
        }
    );
    assert_eq!(w.engine.counters(w.vcpus[0]).unwrap().passed_to_l0, 1);
    w.l0_page_in(l1);
    assert!(matches!(
        fault(&mut w, 0, 0x9abc, R),
        Dispatch::Fixed { .. }
    ));
}

#[test]
fn unbacked_l1_ept_table_page_is_passed_to_l0() {
    let mut w = world();
    w.l1_map(0, leaf(0x5000_0000, PageSize::Size4K, 0x1000, R), false);
    let pt = w.epts[0].table(2, 0x5000_0000).unwrap();
    w.l0_revoke(pt);
    assert_eq!(
        fault(&mut w, 0, 0x5000_0000, R),
        Dispatch::PassToL0 {
            l1_gpa: pt,
            access: R
        }
    );
    w.l0_page_in(pt);
    assert!(matches!(
        fault(&mut w, 0, 0x5000_0000, R),
        Dispatch::Fixed { .. }
    ));
}

#[test]
fn large_shadow_pages_when_l1_and_l0_both_map_large() {
    let mut w = World::new(no_prefetch());
    // L1 maps 1 GiB of L2 at 2 GiB to L1 [0, 1 GiB), which L0 maps with one 1 GiB page.
    w.l1_map(0, leaf(2 * GIB, PageSize::Size1G, 0, R | W), false);
    assert!(matches!(
        fault(&mut w, 0, 2 * GIB + 0x1234_5678, R),
        Dispatch::Fixed {
            size: PageSize::Size1G,
            ..
        }
    ));
    // L1 2 MiB over L0 2 MiB pages.
    let l1 = GIB + 100 * 2 * MIB;
    w.l1_map(0, leaf(3 * GIB + 4 * MIB, PageSize::Size2M, l1, R), false);
    assert!(matches!(
        fault(&mut w, 0, 3 * GIB + 5 * MIB, R),
        Dispatch::Fixed {
            size: PageSize::Size2M,
            ..
        }
    ));
    // L1 2 MiB over L0 4 KiB pages: clamped to 4 KiB.
    let l1 = GIB + 4 * MIB;
    w.l1_map(0, leaf(3 * GIB + 8 * MIB, PageSize::Size2M, l1, R), false);
    assert!(matches!(
        fault(&mut w, 0, 3 * GIB + 8 * MIB, R),
        Dispatch::Fixed {
            size: PageSize::Size4K,
            ..
        }
    ));
    w.check().unwrap();
}

#[test]
fn clamped_install_maps_the_faulting_page_not_the_first() {
    let mut w = World::new(no_prefetch());
    // L1 2 MiB page over L1 memory that L0 maps with 4 KiB pages.
    w.l1_map(0, leaf(0, PageSize::Size2M, GIB + 2 * MIB, R), false);
    assert!(matches!(
        fault(&mut w, 0, 0x1008, R),
        Dispatch::Fixed {
            size: PageSize::Size4K,
            ..
        }
    ));
    assert_eq!(
        w.backend.access(shadow_of(&w, 0), 0x1008, R),
        Ok(w.region.base() + GIB + 2 * MIB + 0x1008)
    );
}

#[test]
fn no_large_shadow_page_over_an_l1_ept_table_page() {
    let mut w = World::new(no_prefetch());
    // The L1 range [1 GiB, 1 GiB + 2 MiB) holds EPT 0's tables; L0 maps it with 4 KiB pages,
    // so give L0 a 2 MiB page there to make the table rule the only limit.
    w.l0_map(
        GIB,
        w.region.base() + GIB,
        PageSize::Size2M,
        Rights::RWX,
        MemType::WriteBack,
    );
    w.l1_map(0, leaf(2 * GIB, PageSize::Size2M, GIB, R), false);
    match fault(&mut w, 0, 2 * GIB + 0x10_0000, R) {
        Dispatch::Fixed { size, .. } => assert_eq!(size, PageSize::Size4K),
        d => panic!("{d:?}"),
    }
}

#[test]
fn large_shadow_page_is_split_when_a_table_page_is_found_inside() {
    let mut w = World::new(no_prefetch());
    let chunk = GIB + 50 * 2 * MIB;
    w.l1_map(0, leaf(2 * GIB, PageSize::Size2M, chunk, R), false);
    assert!(matches!(
        fault(&mut w, 0, 2 * GIB, R),
        Dispatch::Fixed {
            size: PageSize::Size2M,
            ..
        }
    ));
    // L1 grows a new page table inside that very L1 chunk (a new PDPT region).
    let mut model = std::mem::replace(&mut w.epts[0], ept::model::L1EptModel::new(vec![]));
    let root = model.root;
    model = ept::model::L1EptModel::new(
        std::iter::once(root)
            .chain((1..8).map(|i| chunk + i * PAGE_SIZE))
            .collect(),
    );
    // Re-create the existing mapping in the new layout (same values, new table pages) and
    // a second mapping whose tables now live in the chunk.
    w.epts[0] = model;
    w.l1_map(0, leaf(2 * GIB, PageSize::Size2M, chunk, R), false);
    w.l1_map(0, leaf(0x600_0000_0000, PageSize::Size4K, 0x1000, R), false);
    assert!(matches!(
        fault(&mut w, 0, 0x600_0000_0000, R),
        Dispatch::Fixed { .. }
    ));
    assert_eq!(w.engine.counters(w.vcpus[0]).unwrap().large_pages_split, 1);
    let leaves = w.backend.leaves(shadow_of(&w, 0));
    assert!(
        leaves.iter().all(|l| l.size == PageSize::Size4K),
        "{leaves:?}"
    );
}

#[test]
fn memory_type_is_l1s_unless_l0_maps_the_page_uncacheable() {
    let mut w = World::new(no_prefetch());
    let wc = ModelLeaf {
        memtype_bits: 1,
        ignore_pat: false,
        ..leaf(0x1000, PageSize::Size4K, GIB + 20 * 2 * MIB, R)
    };
    w.l1_map(0, wc, false);
    fault(&mut w, 0, 0x1000, R);
    let uc_page = GIB + 2 * MIB * 2 + 0x7000; // a 4 KiB L0 page
    w.l0_map(
        uc_page,
        w.region.base() + uc_page,
        PageSize::Size4K,
        Rights::RWX,
        MemType::Uncacheable,
    );
    w.l1_map(
        0,
        ModelLeaf {
            memtype_bits: 6,
            ..leaf(0x2000, PageSize::Size4K, uc_page, R)
        },
        false,
    );
    fault(&mut w, 0, 0x2000, R);
    let leaves = w.backend.leaves(shadow_of(&w, 0));
    let at = |b| leaves.iter().find(|l| l.base == b).unwrap();
    assert_eq!(
        (at(0x1000).memtype, at(0x1000).ignore_pat),
        (MemType::WriteCombining, false)
    );
    assert_eq!(
        (at(0x2000).memtype, at(0x2000).ignore_pat),
        (MemType::Uncacheable, true)
    );
}

#[test]
fn prefetch_installs_present_neighbours_of_the_same_cache_line() {
    let mut w = world();
    for i in 0..16u64 {
        if i != 5 {
            w.l1_map(
                0,
                leaf(
                    0x10_0000 + i * PAGE_SIZE,
                    PageSize::Size4K,
                    GIB + 30 * 2 * MIB + i * PAGE_SIZE,
                    R,
                ),
                false,
            );
        }
    }
    match fault(&mut w, 0, 0x10_0000 + 2 * PAGE_SIZE, R) {
        Dispatch::Fixed { prefetched, .. } => {
            assert_eq!(prefetched, 6, "entries 0..8 but 2 and the hole at 5")
        }
        d => panic!("{d:?}"),
    }
    for i in 0..8u64 {
        let hit = w
            .backend
            .access(shadow_of(&w, 0), 0x10_0000 + i * PAGE_SIZE, R)
            .is_ok();
        assert_eq!(hit, i != 5, "page {i}");
    }
    assert!(
        w.backend
            .access(shadow_of(&w, 0), 0x10_0000 + 8 * PAGE_SIZE, R)
            .is_err(),
        "next line not prefetched"
    );
    // Faulting in the same line again installs only what is missing.
    match fault(&mut w, 0, 0x10_0000 + 8 * PAGE_SIZE, R) {
        Dispatch::Fixed { prefetched, .. } => assert_eq!(prefetched, 7),
        d => panic!("{d:?}"),
    }
}

#[test]
fn root_cache_keeps_shadows_across_eptp_switches() {
    let mut w = world();
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x1000, R), false);
    w.l1_map(1, leaf(0x1000, PageSize::Size4K, 0x2000, R), false);
    w.access(0, 0x1000, R).unwrap();
    w.switch(0, 1);
    w.access(0, 0x1000, R).unwrap();
    w.switch(0, 0);
    assert!(
        w.access(0, 0x1000, R).unwrap().is_empty(),
        "no fault: the shadow of EPT 0 survived"
    );
    let c = w.engine.counters(w.vcpus[0]).unwrap();
    assert_eq!((c.shadows_created, c.root_cache_hits), (2, 1));
}

#[test]
fn root_cache_evicts_the_least_recently_used_root_beyond_capacity() {
    let cfg = WorldConfig {
        engine: EngineConfig {
            root_cache: 1,
            ..EngineConfig::default()
        },
        ..WorldConfig::default()
    };
    let mut w = World::new(cfg);
    let before = w.backend.pool_free();
    w.switch(0, 1);
    w.switch(0, 0);
    let c = w.engine.counters(w.vcpus[0]).unwrap();
    assert_eq!(c.shadows_created, 3);
    assert_eq!(w.engine.roots_of(w.vcpus[0]).len(), 1);
    assert_eq!(
        w.backend.pool_free(),
        before,
        "the evicted root went back to the pool"
    );
}

#[test]
fn stale_translation_is_kept_until_invept_as_the_sdm_allows() {
    let mut w = world();
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x10_0000, R), false);
    w.access(0, 0x1000, R).unwrap();
    let old = w.backend.access(shadow_of(&w, 0), 0x1000, R).unwrap();
    // L1 remaps without INVEPT: the old translation may still be used.
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x20_0000, R), false);
    assert_eq!(w.backend.access(shadow_of(&w, 0), 0x1000, R), Ok(old));
    w.check().unwrap();
    // After INVEPT it may not.
    w.invept_everywhere(0);
    w.access(0, 0x1000, R).unwrap();
    assert_eq!(
        w.backend.access(shadow_of(&w, 0), 0x1000, R),
        Ok(w.region.base() + 0x20_0000)
    );
    w.check().unwrap();
}

#[test]
fn a_later_invept_keeps_the_shadow_when_nothing_it_was_built_from_changed() {
    let mut w = World::new(no_prefetch());
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x10_0000, R), false);
    w.access(0, 0x1000, R).unwrap();
    // Untracked so far: the first INVEPT empties the shadow and starts tracking.
    w.invept(0, 0, false);
    assert!(w.backend.leaves(shadow_of(&w, 0)).is_empty());
    w.access(0, 0x1000, R).unwrap();
    // L1 maps another page in the same line (not present to present) and INVEPTs: nothing
    // the shadow holds is stale, so it stays.
    w.l1_map(0, leaf(0x5000, PageSize::Size4K, 0x50_0000, R), false);
    w.invept(0, 0, false);
    assert_eq!(w.backend.leaves(shadow_of(&w, 0)).len(), 1);
    assert_eq!(w.engine.counters(w.vcpus[0]).unwrap().invept_kept, 1);
    w.check().unwrap();
    // L1 remaps the page L2 uses: INVEPT empties the shadow, and L2 gets the new page.
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x20_0000, R), false);
    w.invept(0, 0, false);
    assert!(w.backend.leaves(shadow_of(&w, 0)).is_empty());
    w.access(0, 0x1000, R).unwrap();
    assert_eq!(
        w.backend.access(shadow_of(&w, 0), 0x1000, R),
        Ok(w.region.base() + 0x20_0000)
    );
    w.check().unwrap();
}

#[test]
fn an_entry_made_present_after_tracking_began_is_checked_at_invept() {
    for prefetch in [false, true] {
        let mut w = if prefetch {
            world()
        } else {
            World::new(no_prefetch())
        };
        w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x10_0000, R), false);
        w.access(0, 0x1000, R).unwrap();
        w.invept(0, 0, false);
        w.access(0, 0x1000, R).unwrap();
        // The line was recorded with 0x2000 not present; L1 maps it and L2 uses it (or the
        // fault on 0x1000 below prefetches it)...
        w.l1_map(0, leaf(0x2000, PageSize::Size4K, 0x30_0000, R), false);
        w.access(0, 0x2000, R).unwrap();
        // ...then L1 changes it: the INVEPT must not keep the old translation.
        w.l1_map(0, leaf(0x2000, PageSize::Size4K, 0x40_0000, R), false);
        w.invept(0, 0, false);
        assert!(
            w.backend.leaves(shadow_of(&w, 0)).is_empty(),
            "prefetch {prefetch}"
        );
        w.access(0, 0x2000, R).unwrap();
        assert_eq!(
            w.backend.access(shadow_of(&w, 0), 0x2000, R),
            Ok(w.region.base() + 0x40_0000)
        );
        w.check().unwrap();
    }
}

#[test]
fn invept_single_context_drops_only_the_matching_root() {
    let mut w = world();
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x1000, R), false);
    w.l1_map(1, leaf(0x1000, PageSize::Size4K, 0x2000, R), false);
    w.access(0, 0x1000, R).unwrap();
    w.switch(0, 1);
    w.access(0, 0x1000, R).unwrap();
    let roots = w.engine.roots_of(w.vcpus[0]);
    w.invept(0, 0, false);
    for (eptp, s) in roots {
        let leaves = w.backend.leaves(s).len();
        assert_eq!(leaves == 0, eptp == w.eptps[0], "{eptp:?}");
    }
}

#[test]
fn invept_all_context_drops_every_root_of_the_vcpu_only() {
    let mut w = world();
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x1000, R), false);
    w.l1_map(1, leaf(0x1000, PageSize::Size4K, 0x2000, R), false);
    w.access(0, 0x1000, R).unwrap();
    w.access(1, 0x1000, R).unwrap();
    w.switch(0, 1);
    w.access(0, 0x1000, R).unwrap();
    w.invept(0, 0, true);
    for (_, s) in w.engine.roots_of(w.vcpus[0]) {
        assert!(w.backend.leaves(s).is_empty());
    }
    assert!(
        !w.backend.leaves(shadow_of(&w, 1)).is_empty(),
        "INVEPT acts on the executing vCPU only"
    );
}

#[test]
fn reflected_fault_removes_the_stale_shadow_entry_it_covers() {
    let mut w = world();
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x10_0000, R), false);
    w.access(0, 0x1000, R).unwrap();
    w.l1_unmap(0, 0x1000, false);
    // A write faults (the stale entry is read-only); L1 now has nothing: reflect, and the
    // stale read translation must go with the fault, as on hardware.
    let d = w.access_with(0, 0x1000, W, false).unwrap();
    assert!(
        matches!(d[..], [Dispatch::ReflectToL1(L1Exit::EptViolation { .. })]),
        "{d:?}"
    );
    w.check().unwrap();
    assert!(w.backend.leaves(shadow_of(&w, 0)).is_empty());
    assert_eq!(w.engine.counters(w.vcpus[0]).unwrap().reflect_unmaps, 1);
    w.check().unwrap();
}

#[test]
fn migration_flushes_the_destination_only_when_it_is_behind() {
    let mut w = world();
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x10_0000, R), false);
    w.access(0, 0x1000, R).unwrap(); // cached on CPU 0
    w.migrate(0, 1);
    w.access(0, 0x1000, R).unwrap(); // cached on CPU 1
    let skipped = w.backend.stats().affinity_flushes_skipped;
    w.migrate(0, 0); // nothing changed since CPU 0 last ran it: no flush needed
    assert_eq!(w.backend.stats().affinity_flushes_skipped, skipped + 1);
    // Now change the shadow while on CPU 0, move to CPU 1, which is behind and must flush.
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x20_0000, R), true);
    let invept = w.backend.stats().invept;
    w.migrate(0, 1);
    assert_eq!(w.backend.stats().invept, invept + 1);
    w.access(0, 0x1000, R).unwrap();
    assert_eq!(
        w.backend.access(shadow_of(&w, 0), 0x1000, R),
        Ok(w.region.base() + 0x20_0000)
    );
    w.check().unwrap();
}

#[test]
fn no_cpu_keeps_a_usable_stale_translation_after_revocation() {
    let mut w = world();
    let l1 = GIB + 4 * MIB + 0x2000;
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, l1, R), false);
    w.access(0, 0x1000, R).unwrap();
    w.migrate(0, 1);
    w.access(0, 0x1000, R).unwrap();
    w.l0_revoke(l1);
    w.check().unwrap();
    assert!(
        w.backend
            .usable_tlb_entries()
            .iter()
            .all(|e| e.3.host_page != w.region.base() + l1)
    );
}

#[test]
fn l0_revocation_removes_exactly_the_derived_shadow_entries() {
    let mut w = world();
    let l1 = GIB + 4 * MIB; // 4 KiB L0 pages
    for i in 0..4u64 {
        w.l1_map(
            0,
            leaf(
                0x1000 + i * PAGE_SIZE,
                PageSize::Size4K,
                l1 + i * PAGE_SIZE,
                R,
            ),
            false,
        );
    }
    for v in 0..2 {
        for i in 0..4u64 {
            w.access(v, 0x1000 + i * PAGE_SIZE, R).unwrap();
        }
    }
    let revoked = w.backend.stats().revoked_entries;
    w.l0_revoke(l1 + 2 * PAGE_SIZE);
    assert_eq!(
        w.backend.stats().revoked_entries,
        revoked + 2,
        "one entry per vCPU"
    );
    for v in 0..2 {
        let bases: Vec<u64> = w
            .backend
            .leaves(shadow_of(&w, v))
            .iter()
            .map(|l| l.base)
            .collect();
        assert_eq!(bases, vec![0x1000, 0x2000, 0x4000], "vCPU {v}");
    }
    w.check().unwrap();
    // The removed page faults back (after L0 pages it in) through the engine.
    let d = w.access(0, 0x3000, R).unwrap();
    assert!(matches!(d.last(), Some(Dispatch::Fixed { .. })), "{d:?}");
}

#[test]
fn flush_everything_mode_empties_every_shadow_on_any_l0_change() {
    let cfg = WorldConfig {
        revocation: RevocationMode::FlushEverything,
        ..WorldConfig::default()
    };
    let mut w = World::new(cfg);
    let l1 = GIB + 4 * MIB;
    for i in 0..4u64 {
        w.l1_map(
            0,
            leaf(
                0x1000 + i * PAGE_SIZE,
                PageSize::Size4K,
                l1 + i * PAGE_SIZE,
                R,
            ),
            false,
        );
        w.access(0, 0x1000 + i * PAGE_SIZE, R).unwrap();
        w.access(1, 0x1000 + i * PAGE_SIZE, R).unwrap();
    }
    w.l0_revoke(GIB + 100 * 2 * MIB); // unrelated page
    assert!(w.backend.leaves(shadow_of(&w, 0)).is_empty());
    assert!(w.backend.leaves(shadow_of(&w, 1)).is_empty());
    w.check().unwrap();
}

#[test]
fn pool_exhaustion_evicts_lru_regions_then_fails_with_a_typed_error() {
    let cfg = WorldConfig {
        pool: 8,
        vcpus: 1,
        ..no_prefetch()
    };
    let mut w = World::new(cfg);
    // Each 2 MiB region needs its own page table: 8 regions cannot all fit.
    for r in 0..8u64 {
        w.l1_map(
            0,
            leaf(
                r * 2 * MIB,
                PageSize::Size4K,
                GIB + 4 * MIB + r * PAGE_SIZE,
                R,
            ),
            false,
        );
    }
    for r in 0..8u64 {
        w.access(0, r * 2 * MIB, R).unwrap();
        w.check().unwrap();
    }
    assert!(w.engine.counters(w.vcpus[0]).unwrap().evictions > 0);
    assert!(
        w.backend.access(shadow_of(&w, 0), 7 * 2 * MIB, R).is_ok(),
        "most recent stays"
    );
    // With every page reclaimed but the root, a fault cannot be fixed: typed error.
    let got = w.engine.shrink_pool(&mut w.backend, 100).unwrap();
    assert_eq!(w.backend.pool_total(), 8 - got);
    let (_, shadow) = w.engine.active(w.vcpus[0]).unwrap();
    let q = EptViolationQualification::for_access(R);
    let err = w
        .engine
        .handle_ept_violation(&mut w.backend, w.vcpus[0], 0, q)
        .unwrap_err();
    assert_eq!(err, EngineError::OutOfTables);
    assert!(w.backend.leaves(shadow).is_empty());
    w.backend.donate_table_pages(4).unwrap();
    w.access(0, 0, R).unwrap();
}

#[test]
fn first_shadow_creation_failure_is_reported_not_ignored() {
    let cfg = WorldConfig {
        pool: 0,
        vcpus: 0,
        ..WorldConfig::default()
    };
    let mut w = World::new(cfg);
    let v = w.engine.add_vcpu();
    assert_eq!(
        w.engine
            .activate(&mut w.backend, v, w.eptps[0])
            .unwrap_err(),
        EngineError::OutOfTables
    );
}

#[test]
fn invalid_l1_eptp_is_refused() {
    let mut w = world();
    let bad = Eptp(w.eptps[0].0 | 1 << 9);
    assert!(matches!(
        w.engine.activate(&mut w.backend, w.vcpus[0], bad),
        Err(EngineError::InvalidEptp(_))
    ));
}

#[test]
fn accessed_and_dirty_flags_are_set_in_l1s_ept_and_writes_wait_for_dirty() {
    let mut w = World::new(no_prefetch());
    let ad = Eptp::new(w.eptps[0].root(), true);
    w.eptps[0] = ad;
    w.switch(0, 0);
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x10_0000, R | W), false);
    let pt = w.epts[0].table(2, 0x1000).unwrap();
    let entry = pt + 8;
    assert!(matches!(fault(&mut w, 0, 0x1000, R), Dispatch::Fixed { rights, .. } if rights == R));
    let raw = w.backend.read_l1(entry).unwrap();
    assert!(raw & EptFlags::ACCESSED.bits() != 0 && raw & EptFlags::DIRTY.bits() == 0);
    let root = w.backend.read_l1(w.epts[0].root).unwrap();
    assert!(root & EptFlags::ACCESSED.bits() != 0);
    // The write faults (write-protected until dirty), sets D, and gets write access.
    assert!(
        matches!(fault(&mut w, 0, 0x1000, W), Dispatch::Fixed { rights, .. } if rights == R | W)
    );
    assert!(w.backend.read_l1(entry).unwrap() & EptFlags::DIRTY.bits() != 0);
}

#[test]
fn destroyed_and_flushed_shadows_return_every_table_page() {
    let mut w = world();
    let before = w.backend.pool_free();
    for i in 0..64u64 {
        w.l1_map(
            0,
            leaf(i * 2 * MIB, PageSize::Size4K, i * PAGE_SIZE, R),
            false,
        );
        w.access(0, i * 2 * MIB, R).unwrap();
    }
    assert!(w.backend.pool_free() < before);
    w.invept(0, 0, false);
    assert_eq!(w.backend.pool_free(), before);
    assert_eq!(w.engine.region_count(), 0);
    assert!(w.backend.pool_consistent());
}

#[test]
fn a_freed_root_page_is_flushed_before_its_next_owner_runs() {
    let cfg = WorldConfig {
        engine: EngineConfig {
            root_cache: 1,
            ..EngineConfig::default()
        },
        ..WorldConfig::default()
    };
    let mut w = World::new(cfg);
    w.l1_map(0, leaf(0x1000, PageSize::Size4K, 0x10_0000, R), false);
    w.l1_map(1, leaf(0x1000, PageSize::Size4K, 0x20_0000, R), false);
    w.access(0, 0x1000, R).unwrap();
    let root0 = w.backend.shadow_root(shadow_of(&w, 0)).unwrap();
    w.switch(0, 1); // destroys shadow of EPT 0; its root page may be reused
    let root1 = w.backend.shadow_root(shadow_of(&w, 0)).unwrap();
    assert_eq!(root0, root1, "LIFO pool hands the same page back");
    let d = w.access(0, 0x1000, R).unwrap();
    assert!(
        !d.is_empty(),
        "the stale TLB entry of the old owner was not used"
    );
    assert_eq!(
        w.backend.access(shadow_of(&w, 0), 0x1000, R),
        Ok(w.region.base() + 0x20_0000)
    );
    w.check().unwrap();
}
