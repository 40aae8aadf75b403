//! Property tests over random L1 EPTs, L0 maps and operation sequences. After every step:
//! (a) isolation: no shadow entry or usable TLB entry maps a host frame L0 does not give L1
//!     at that moment, or with more rights than L0 gives;
//! (b) fidelity: every shadow and usable TLB entry matches a value L1's EPT held for that
//!     address since the last INVEPT or fault covering it (what a real TLB may hold);
//! (c) every reflected fault, and every pass to L0, is the one the reference model says the
//!     hardware would raise (checked in `World::access`);
//! (d) no fault repeats forever: every access completes within a bound, and an access never
//!     faults again right after a fix.

mod common;

use common::{GIB, MIB, TABLE_AREA, World, WorldConfig, leaf};
use ept::entry::{PAGE_SIZE, PageSize, Rights};
use ept::memory_backend::RevocationMode;
use ept::model::ModelLeaf;
use ept::shadow::EngineConfig;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Access {
        vcpu: usize,
        pick: u32,
        offset: u32,
        access: u8,
        cooperate: bool,
    },
    L1Map {
        ept: usize,
        l2: u32,
        size: u8,
        l1: u32,
        near_tables: bool,
        rights: u8,
        memtype: u8,
        invept: bool,
    },
    L1Unmap {
        ept: usize,
        pick: u32,
        invept: bool,
    },
    Invept {
        vcpu: usize,
        ept: usize,
        all: bool,
    },
    Switch {
        vcpu: usize,
        ept: usize,
    },
    L0Revoke {
        pick: u32,
        tables: bool,
    },
    L0Restore {
        pick: u32,
    },
    L0Protect {
        pick: u32,
        rights: u8,
    },
    L0Move {
        pick: u32,
    },
    ShrinkPool {
        pages: u8,
    },
    GrowPool {
        pages: u8,
    },
    Migrate {
        vcpu: usize,
        cpu: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..2usize, any::<u32>(), any::<u32>(), 1..8u8, proptest::bool::weighted(0.6))
            .prop_map(|(vcpu, pick, offset, access, cooperate)| Op::Access { vcpu, pick, offset, access, cooperate }),
        5 => (0..2usize, any::<u32>(), 0..10u8, any::<u32>(), any::<bool>(), 0..8u8, 0..16u8, any::<bool>())
            .prop_map(|(ept, l2, size, l1, near_tables, rights, memtype, invept)| Op::L1Map {
                ept, l2, size, l1, near_tables, rights, memtype, invept
            }),
        1 => (0..2usize, any::<u32>(), any::<bool>()).prop_map(|(ept, pick, invept)| Op::L1Unmap { ept, pick, invept }),
        1 => (0..2usize, 0..2usize, any::<bool>()).prop_map(|(vcpu, ept, all)| Op::Invept { vcpu, ept, all }),
        1 => (0..2usize, 0..2usize).prop_map(|(vcpu, ept)| Op::Switch { vcpu, ept }),
        2 => (any::<u32>(), any::<bool>()).prop_map(|(pick, tables)| Op::L0Revoke { pick, tables }),
        1 => any::<u32>().prop_map(|pick| Op::L0Restore { pick }),
        1 => (any::<u32>(), 0..8u8).prop_map(|(pick, rights)| Op::L0Protect { pick, rights }),
        1 => any::<u32>().prop_map(|pick| Op::L0Move { pick }),
        1 => (1..64u8).prop_map(|pages| Op::ShrinkPool { pages }),
        1 => (1..16u8).prop_map(|pages| Op::GrowPool { pages }),
        1 => (0..2usize, 0..3usize).prop_map(|(vcpu, cpu)| Op::Migrate { vcpu, cpu }),
    ]
}

/// Minimum pool the engine must be able to work with: roots of 2 vCPUs x 2 EPTs and one
/// full path.
const MIN_POOL: usize = 10;

fn rights_of(bits: u8) -> Rights {
    Rights::from_bits_truncate(bits & 0b111)
}

fn pick_leaf(w: &World, ept: usize, pick: u32) -> Option<ModelLeaf> {
    let n = w.epts[ept].leaves.len();
    (n > 0).then(|| *w.epts[ept].leaves.values().nth(pick as usize % n).unwrap())
}

fn apply(w: &mut World, op: &Op) -> Result<(), String> {
    match *op {
        Op::Access {
            vcpu,
            pick,
            offset,
            access,
            cooperate,
        } => {
            let ept = w.active_ept[vcpu];
            // Mostly addresses L1 maps or once mapped (stale shadow entries live there).
            let held: Vec<ModelLeaf> = w
                .history
                .held
                .get(&ept)
                .map(|h| h.iter().map(|h| h.leaf).collect())
                .unwrap_or_default();
            let target = match pick % 4 {
                0 => None,
                1 | 2 if !held.is_empty() => Some(held[(pick / 4) as usize % held.len()]),
                _ => pick_leaf(w, ept, pick / 4),
            };
            let gpa = match target {
                Some(l) => {
                    l.l2 + (u64::from(offset) * PAGE_SIZE) % l.size.bytes()
                        + u64::from(offset % 512) * 8
                }
                None => (u64::from(pick) * PAGE_SIZE) % (4 * GIB),
            };
            // A cooperative L1 and L0 resolve every fault; otherwise the first reflected or
            // passed fault ends the access (L1 injects a fault into L2, L0 kills it, ...).
            w.access_with(vcpu, gpa, rights_of(access), cooperate)?;
        }
        Op::L1Map {
            ept,
            l2,
            size,
            l1,
            near_tables,
            rights,
            memtype,
            invept,
        } => {
            let size = match size {
                0..=6 => PageSize::Size4K,
                7..=8 => PageSize::Size2M,
                _ => PageSize::Size1G,
            };
            // Half the time, remap what L1 already maps (same base, maybe another size).
            let l2 = match pick_leaf(w, ept, l2).filter(|_| l2 % 2 == 0) {
                Some(old) => size.align_down(old.l2),
                None => size.align_down((u64::from(l2) * PAGE_SIZE) % (4 * GIB)),
            };
            let l1 = if near_tables {
                TABLE_AREA + (u64::from(l1) * PAGE_SIZE) % (4 * MIB)
            } else {
                (u64::from(l1) * PAGE_SIZE) % w.l1_memory
            };
            let l1 = size.align_down(l1);
            // Mostly valid entries; sometimes misconfigured ones.
            let (rights, memtype_bits) = match (rights, memtype) {
                (0, _) => (Rights::READ, 6),
                (r, m) if m < 12 => (
                    rights_of(r) | Rights::READ,
                    [6, 0, 1, 4, 5, 6][m as usize % 6],
                ),
                (r, m) => (rights_of(r), m & 7),
            };
            let leaf = ModelLeaf {
                l2,
                size,
                l1,
                rights,
                memtype_bits,
                ignore_pat: memtype % 2 == 1,
            };
            w.l1_map(ept, leaf, invept);
        }
        Op::L1Unmap { ept, pick, invept } => {
            if let Some(l) = pick_leaf(w, ept, pick) {
                w.l1_unmap(ept, l.l2, invept);
            }
        }
        Op::Invept { vcpu, ept, all } => w.invept(vcpu, ept, all),
        Op::Switch { vcpu, ept } => w.switch(vcpu, ept),
        Op::L0Revoke { pick, tables } => {
            let target = if tables {
                let pages: Vec<u64> = w.epts.iter().flat_map(|e| e.table_pages()).collect();
                pages[pick as usize % pages.len()]
            } else {
                let leaves: Vec<_> = w
                    .epts
                    .iter()
                    .flat_map(|e| e.leaves.values().copied())
                    .collect();
                match leaves.get(pick as usize % leaves.len().max(1)) {
                    Some(l) => l.l1,
                    None => return Ok(()),
                }
            };
            // Never take the whole 1 GiB page: restoring it would be the only remedy anyway.
            if w.l0
                .lookup(target)
                .is_some_and(|l| l.size != PageSize::Size1G)
            {
                w.l0_revoke(target);
            }
        }
        Op::L0Restore { pick } => {
            let n = w.revoked.len();
            if n > 0 {
                let l1 = *w.revoked.keys().nth(pick as usize % n).unwrap();
                w.l0_page_in(l1);
            }
        }
        Op::L0Protect { pick, rights } => {
            let leaves: Vec<_> = w
                .epts
                .iter()
                .flat_map(|e| e.leaves.values().copied())
                .collect();
            if let Some(l) = leaves.get(pick as usize % leaves.len().max(1))
                && w.l0
                    .lookup(l.l1)
                    .is_some_and(|x| x.size != PageSize::Size1G)
            {
                w.l0_protect(l.l1, rights_of(rights) | Rights::READ);
            }
        }
        Op::L0Move { pick } => {
            let pages: Vec<u64> = w.epts.iter().flat_map(|e| e.table_pages()).collect();
            let leaves: Vec<u64> = w
                .epts
                .iter()
                .flat_map(|e| e.leaves.values().map(|l| l.l1))
                .collect();
            let all: Vec<u64> = pages.into_iter().chain(leaves).collect();
            w.l0_move(all[pick as usize % all.len()]);
        }
        Op::ShrinkPool { pages } => {
            let spare = w.backend.pool_total().saturating_sub(MIN_POOL);
            let n = usize::from(pages).min(spare);
            let got = w
                .engine
                .shrink_pool(&mut w.backend, n)
                .map_err(|e| format!("{e:?}"))?;
            if got != n {
                return Err(format!("shrink_pool gave {got} of {n}"));
            }
        }
        Op::GrowPool { pages } => {
            use ept::backend::ShadowBackend;
            w.backend.donate_table_pages(usize::from(pages)).unwrap();
        }
        Op::Migrate { vcpu, cpu } => w.migrate(vcpu, cpu),
    }
    Ok(())
}

fn run(cfg: WorldConfig, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut w = World::new(cfg);
    w.check().map_err(TestCaseError::fail)?;
    for (i, op) in ops.iter().enumerate() {
        apply(&mut w, op).map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}")))?;
        w.check()
            .map_err(|e| TestCaseError::fail(format!("after step {i} {op:?}: {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn shadows_stay_isolated_faithful_and_make_progress(ops in proptest::collection::vec(op(), 1..60)) {
        run(WorldConfig { pool: 24, ..WorldConfig::default() }, &ops)?;
    }

    #[test]
    fn shadows_stay_isolated_faithful_and_make_progress_without_large_pages_or_prefetch(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        let engine = EngineConfig { large_pages: false, prefetch: false, root_cache: 1, ..EngineConfig::default() };
        run(WorldConfig { pool: 16, engine, l0_1g: false, ..WorldConfig::default() }, &ops)?;
    }

    #[test]
    fn flush_everything_mode_keeps_the_same_guarantees(ops in proptest::collection::vec(op(), 1..40)) {
        run(WorldConfig { revocation: RevocationMode::FlushEverything, ..WorldConfig::default() }, &ops)?;
    }
}

#[test]
fn mapping_l2_onto_l1s_own_ept_tables_stays_faithful() {
    // L2 reads L1's EPT table pages through a 2 MiB L1 page over the table area.
    let mut w = World::new(WorldConfig::default());
    w.l1_map(
        0,
        leaf(
            0,
            PageSize::Size2M,
            TABLE_AREA,
            Rights::READ | Rights::WRITE,
        ),
        false,
    );
    for p in 0..8 {
        w.access(0, p * PAGE_SIZE, Rights::WRITE).unwrap();
        w.check().unwrap();
    }
}
