//! Fuzzing over raw L1 EPT table contents (proptest-driven, runs in `cargo test`): whatever
//! L1 writes into its tables, and whatever L0 revokes meanwhile, the walker and the engine
//! neither panic nor loop nor index out of bounds, and every shadow entry they produce stays
//! within what L0 gives L1.

mod common;

use common::{GIB, TABLE_AREA, World, WorldConfig};
use ept::backend::ShadowBackend;
use ept::check::EptViolationQualification;
use ept::entry::{PAGE_SIZE, Rights};
use ept::memory_backend::HardwareFault;
use ept::shadow::{Dispatch, L1Exit};
use ept::walk::{Action, Ept, ReadOnly, X86Paging, traverse, walk};
use proptest::prelude::*;

const PAGES: u64 = 8;

/// An entry value biased towards the interesting: links to the other table pages (with
/// random low and high bits), large-page leaves, and pure noise.
fn entry() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..PAGES, 0..0x1000u64, prop::bits::u64::between(52, 64))
            .prop_map(|(p, low, high)| (TABLE_AREA + p * PAGE_SIZE) | low | high),
        (0..4u64, any::<u16>(), 0..2u64)
            .prop_map(|(gib, low, big)| (gib * GIB) | (u64::from(low) & 0x1ff) | (big << 7)),
        any::<u64>(),
        Just(0u64),
    ]
}

fn writes() -> impl Strategy<Value = Vec<(u64, u16, u64)>> {
    prop::collection::vec((0..PAGES, 0..512u16, entry()), 1..200)
}

fn faults() -> impl Strategy<Value = Vec<(u64, u8, bool)>> {
    // Addresses whose indices hit the low entries of every level, plus anything.
    let gpa = prop_oneof![
        (0..8u64, 0..8u64, 0..8u64, 0..8u64)
            .prop_map(|(a, b, c, d)| a << 39 | b << 30 | c << 21 | d << 12),
        any::<u64>(),
    ];
    prop::collection::vec((gpa, 1..8u8, any::<bool>()), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn raw_l1_table_contents_never_break_the_engine(writes in writes(), faults in faults()) {
        let mut w = World::new(WorldConfig { vcpus: 1, epts: 1, pool: 32, ..WorldConfig::default() });
        for &(page, index, value) in &writes {
            w.l1_write(TABLE_AREA + page * PAGE_SIZE + u64::from(index) * 8, value);
        }
        let (_, shadow) = w.engine.active(w.vcpus[0]).unwrap();
        for &(gpa, access, revoke) in &faults {
            let access = Rights::from_bits_truncate(access & 7);
            if revoke {
                // L0 takes one of L1's table pages away under the engine's feet.
                w.l0_revoke(TABLE_AREA + (gpa % PAGES) * PAGE_SIZE);
            }
            let q = match w.backend.access(shadow, gpa, access) {
                Ok(_) => continue,
                Err(HardwareFault::EptViolation(q)) => q,
                Err(HardwareFault::EptMisconfiguration) => return Err(TestCaseError::fail("shadow misconfigured")),
            };
            let d = w.engine.handle_ept_violation(&mut w.backend, w.vcpus[0], gpa, q);
            match d {
                Ok(Dispatch::ReflectToL1(L1Exit::EptViolation { gpa: g, qualification })) => {
                    prop_assert_eq!(g, gpa);
                    prop_assert_eq!(qualification.access(), access);
                    prop_assert!(!qualification.entry_rights().contains(access) || access.is_empty());
                    prop_assert_eq!(qualification.bits() & !0x1_ffff, 0);
                }
                Ok(Dispatch::ReflectToL1(L1Exit::EptMisconfiguration { gpa: g })) => prop_assert_eq!(g, gpa),
                Ok(Dispatch::PassToL0 { .. }) => {}
                Ok(Dispatch::Fixed { rights, .. }) => prop_assert!(rights.contains(access)),
                Err(e) => return Err(TestCaseError::fail(format!("engine error {e:?}"))),
            }
            for l in w.backend.leaves(shadow) {
                prop_assert!(w.l0.gives(l.host, l.size.bytes(), l.rights), "isolation: {:?}", l);
            }
        }
    }

    #[test]
    fn raw_tables_never_break_the_walkers(writes in writes(), faults in faults()) {
        let mut w = World::new(WorldConfig { vcpus: 1, epts: 1, ..WorldConfig::default() });
        for &(page, index, value) in &writes {
            w.l1_write(TABLE_AREA + page * PAGE_SIZE + u64::from(index) * 8, value);
        }
        let memory = ept::backend::L1Memory(&w.backend);
        for &(gpa, _, _) in &faults {
            let _ = walk(&Ept::default(), &memory, TABLE_AREA, gpa);
            let _ = walk(&X86Paging::default(), &memory, TABLE_AREA, gpa);
            let _ = walk(&X86Paging { nxe: false, pages_1g: false, max_phys_bits: 36 }, &memory, TABLE_AREA, gpa);
        }
        let mut seen = 0u32;
        let _ = traverse(&Ept::default(), &mut ReadOnly(&memory), TABLE_AREA, 0, u64::MAX, |_, _| {
            seen += 1;
            if seen > 20_000 { Action::Stop } else { Action::Keep }
        });
        let _ = w.backend.read_l1(TABLE_AREA);
        let _ = EptViolationQualification::for_access(Rights::all());
    }
}
