//! Tests of capability spaces: every error path, and random operation sequences against a model.

use super::Counted;
use crate::derivation::{NodeKey, NodeStorage, SliceStorage, VecStorage};
use crate::object::{self, Capability, ObjectKind};
use crate::rights::*;
use crate::{CapError, CapSystem, RemovedCap};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use proptest::prelude::*;

type System = CapSystem<VecStorage, 3, 8>;

fn system() -> System {
    CapSystem::new(VecStorage::new())
}

fn removed_by(
    sys: &mut System,
    space: u32,
    slot: u64,
    delete: bool,
) -> (Result<usize, CapError>, Vec<RemovedCap>) {
    let mut seen = Vec::new();
    let mut record = |r| seen.push(r);
    let result = if delete {
        sys.delete(space, slot, &mut record)
    } else {
        sys.revoke(space, slot, &mut record)
    };
    (result, seen)
}

const ALL_MEMORY: u32 = MemoryRights::all().bits();

// ---- Error codes and kinds ----------------------------------------------------------------

#[test]
fn error_codes_are_stable() {
    use CapError::*;
    let expected = [
        (InvalidSpace, 1),
        (InvalidSelector, 2),
        (EmptySlot, 3),
        (WrongType, 4),
        (InsufficientRights, 5),
        (SlotOccupied, 6),
        (OutOfNodes, 7),
        (InvalidRights, 8),
        (Inconsistent, 9),
    ];
    assert_eq!(expected.len(), CapError::ALL.len());
    for (error, code) in expected {
        assert_eq!(error.code(), code);
        assert_eq!(CapError::from_code(code), Some(error));
    }
    assert_eq!(CapError::from_code(0), None, "0 means success");
    assert_eq!(CapError::from_code(10), None);
    assert_eq!(CapError::from_code(u64::MAX), None);
}

#[test]
fn object_kind_codes_are_stable_and_nonzero() {
    let expected = [
        (ObjectKind::ProtectionDomain, 1),
        (ObjectKind::Thread, 2),
        (ObjectKind::Endpoint, 3),
        (ObjectKind::Notification, 4),
        (ObjectKind::Memory, 5),
        (ObjectKind::Vcpu, 6),
        (ObjectKind::Ept, 7),
        (ObjectKind::IoPorts, 8),
        (ObjectKind::Interrupts, 9),
    ];
    for (kind, code) in expected {
        assert_eq!(kind.code(), code);
        assert_eq!(ObjectKind::from_code(code), Some(kind));
        assert_ne!(kind.valid_rights(), 0);
    }
    assert_eq!(ObjectKind::from_code(0), None);
    assert_eq!(ObjectKind::from_code(10), None);
    assert_eq!(ObjectKind::from_code(255), None);
}

#[test]
fn memory_access_rights_match_ept_permission_bits() {
    // Intel SDM Vol. 3C §29.3.2: EPT entry bit 0 = read, bit 1 = write, bit 2 = execute.
    assert_eq!(MemoryRights::READ.bits(), 1 << 0);
    assert_eq!(MemoryRights::WRITE.bits(), 1 << 1);
    assert_eq!(MemoryRights::EXECUTE.bits(), 1 << 2);
}

#[test]
fn cap_system_can_be_built_in_a_static() {
    static SYSTEM: CapSystem<SliceStorage<'static>, 4, 16> = CapSystem::new(SliceStorage::empty());
    assert!(SYSTEM.is_empty());
    assert_eq!(SYSTEM.space(3).unwrap().capacity(), 16);
}

// ---- lookup: the one validation path ------------------------------------------------------

#[test]
fn lookup_rejects_unknown_space() {
    let sys = system();
    let result = sys.lookup::<object::Memory>(3, 0, MemoryRights::empty());
    assert_eq!(result, Err(CapError::InvalidSpace));
    assert_eq!(
        sys.lookup::<object::Memory>(u32::MAX, 0, MemoryRights::empty())
            .unwrap_err(),
        CapError::InvalidSpace
    );
}

#[test]
fn lookup_rejects_selector_out_of_range() {
    let sys = system();
    for slot in [8, 9, u64::from(u32::MAX), 1 << 32, u64::MAX] {
        let result = sys.lookup::<object::Memory>(0, slot, MemoryRights::empty());
        assert_eq!(result, Err(CapError::InvalidSelector), "slot {slot}");
    }
}

#[test]
fn lookup_rejects_empty_slot() {
    let sys = system();
    let result = sys.lookup::<object::Memory>(0, 7, MemoryRights::empty());
    assert_eq!(result, Err(CapError::EmptySlot));
}

#[test]
fn lookup_rejects_wrong_type() {
    let mut sys = system();
    sys.create(0, 1, ObjectKind::Endpoint, 5, EndpointRights::all().bits())
        .unwrap();
    let result = sys.lookup::<object::Notification>(0, 1, NotificationRights::empty());
    assert_eq!(result, Err(CapError::WrongType));
}

#[test]
fn lookup_rejects_missing_rights() {
    let mut sys = system();
    sys.create(0, 1, ObjectKind::Vcpu, 5, VcpuRights::RUN.bits())
        .unwrap();
    let result = sys.lookup::<object::Vcpu>(0, 1, VcpuRights::RUN | VcpuRights::WRITE_STATE);
    assert_eq!(result, Err(CapError::InsufficientRights));
}

#[test]
fn lookup_returns_typed_cap_with_all_held_rights() {
    let mut sys = system();
    let rights = EptRights::MAP | EptRights::INVALIDATE;
    sys.create(2, 3, ObjectKind::Ept, 42, rights.bits())
        .unwrap();
    let cap = sys.lookup::<object::Ept>(2, 3, EptRights::MAP).unwrap();
    assert_eq!(cap.object(), 42);
    assert_eq!(cap.rights(), rights);
    assert!(sys.lookup::<object::Ept>(2, 3, EptRights::empty()).is_ok());
}

// ---- create -------------------------------------------------------------------------------

#[test]
fn create_rejects_occupied_slot() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Thread, 1, 0).unwrap();
    assert_eq!(
        sys.create(0, 0, ObjectKind::Thread, 2, 0),
        Err(CapError::SlotOccupied)
    );
    assert_eq!(sys.get(0, 0).unwrap().object(), 1);
    assert_eq!(sys.len(), 1);
}

#[test]
fn create_rejects_rights_undefined_for_kind() {
    let mut sys = system();
    let bad = NotificationRights::all().bits() + 1;
    assert_eq!(
        sys.create(0, 0, ObjectKind::Notification, 1, bad),
        Err(CapError::InvalidRights)
    );
    assert_eq!(
        sys.create(0, 0, ObjectKind::Memory, 1, 1 << 31),
        Err(CapError::InvalidRights)
    );
    assert!(sys.is_empty());
}

#[test]
fn create_rejects_bad_space_and_selector() {
    let mut sys = system();
    assert_eq!(
        sys.create(3, 0, ObjectKind::Thread, 1, 0),
        Err(CapError::InvalidSpace)
    );
    assert_eq!(
        sys.create(0, 8, ObjectKind::Thread, 1, 0),
        Err(CapError::InvalidSelector)
    );
    assert!(sys.is_empty());
}

#[test]
fn create_without_nodes_is_out_of_nodes_and_leaves_slot_empty() {
    let mut sys: CapSystem<VecStorage, 2, 4> = CapSystem::new(VecStorage::with_limit(1));
    sys.create(0, 0, ObjectKind::Memory, 1, ALL_MEMORY).unwrap();
    assert_eq!(
        sys.create(0, 1, ObjectKind::Memory, 2, ALL_MEMORY),
        Err(CapError::OutOfNodes)
    );
    assert_eq!(sys.get(0, 1), Err(CapError::EmptySlot));
    assert_eq!(sys.space(0).unwrap().len(), 1);
}

// ---- delegate -----------------------------------------------------------------------------

#[test]
fn delegation_intersects_rights_with_mask() {
    let mut sys = system();
    let parent = MemoryRights::READ | MemoryRights::WRITE | MemoryRights::MAP;
    sys.create(0, 0, ObjectKind::Memory, 9, parent.bits())
        .unwrap();
    let mask = MemoryRights::READ | MemoryRights::EXECUTE | MemoryRights::MAP;
    let child = sys.delegate(0, 0, 1, 5, mask.bits()).unwrap();
    assert_eq!(
        child.rights(),
        (MemoryRights::READ | MemoryRights::MAP).bits()
    );
    assert_eq!((child.kind(), child.object()), (ObjectKind::Memory, 9));
    assert_eq!(sys.parent_of(1, 5), Ok(Some((0, 0))));
    assert_eq!(sys.parent_of(0, 0), Ok(None));
}

#[test]
fn delegation_never_grows_rights_even_with_unknown_mask_bits() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Endpoint, 1, EndpointRights::CALL.bits())
        .unwrap();
    let child = sys.delegate(0, 0, 0, 1, u32::MAX).unwrap();
    assert_eq!(child.rights(), EndpointRights::CALL.bits());
    let grandchild = sys.delegate(0, 1, 0, 2, 0).unwrap();
    assert_eq!(grandchild.rights(), 0);
    let result = sys.lookup::<object::Endpoint>(0, 2, EndpointRights::CALL);
    assert_eq!(result, Err(CapError::InsufficientRights));
}

#[test]
fn delegation_checks_source_then_destination() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Thread, 1, ThreadRights::all().bits())
        .unwrap();
    assert_eq!(sys.delegate(3, 0, 0, 1, !0), Err(CapError::InvalidSpace));
    assert_eq!(sys.delegate(0, 8, 0, 1, !0), Err(CapError::InvalidSelector));
    assert_eq!(sys.delegate(0, 1, 0, 2, !0), Err(CapError::EmptySlot));
    assert_eq!(sys.delegate(0, 0, 3, 1, !0), Err(CapError::InvalidSpace));
    assert_eq!(
        sys.delegate(0, 0, 0, u64::MAX, !0),
        Err(CapError::InvalidSelector)
    );
    assert_eq!(
        sys.delegate(0, 0, 0, 0, !0),
        Err(CapError::SlotOccupied),
        "onto itself"
    );
    // The empty source is reported before the occupied destination.
    assert_eq!(sys.delegate(0, 1, 0, 0, !0), Err(CapError::EmptySlot));
    assert_eq!(sys.len(), 1);
}

#[test]
fn delegation_without_nodes_is_out_of_nodes_and_leaves_destination_empty() {
    let mut sys: CapSystem<VecStorage, 2, 4> = CapSystem::new(VecStorage::with_limit(2));
    sys.create(0, 0, ObjectKind::Memory, 1, ALL_MEMORY).unwrap();
    sys.delegate(0, 0, 1, 0, !0).unwrap();
    assert_eq!(sys.delegate(0, 0, 1, 1, !0), Err(CapError::OutOfNodes));
    assert_eq!(sys.get(1, 1), Err(CapError::EmptySlot));
    assert_eq!(
        sys.tree().children(sys.get(0, 0).unwrap().node()).count(),
        1
    );
}

// ---- revoke and delete --------------------------------------------------------------------

#[test]
fn revoke_removes_descendants_in_every_space_and_keeps_the_capability() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Memory, 1, ALL_MEMORY).unwrap();
    sys.delegate(0, 0, 1, 0, !0).unwrap();
    sys.delegate(1, 0, 2, 0, !0).unwrap();
    sys.delegate(0, 0, 0, 1, !0).unwrap();
    sys.create(2, 1, ObjectKind::Memory, 2, ALL_MEMORY).unwrap();
    let (result, seen) = removed_by(&mut sys, 0, 0, false);
    assert_eq!(result, Ok(3));
    let places: BTreeSet<(u32, u64)> = seen.iter().map(|r| (r.space, r.slot)).collect();
    assert_eq!(places, BTreeSet::from([(1, 0), (2, 0), (0, 1)]));
    assert!(
        seen.iter()
            .all(|r| !r.was_root && r.capability.object() == 1)
    );
    let pos = |space| {
        seen.iter()
            .position(|r| (r.space, r.slot) == (space, 0))
            .unwrap()
    };
    assert!(
        pos(2) < pos(1),
        "children are reported before their parents"
    );
    assert!(sys.get(0, 0).is_ok());
    assert!(sys.get(2, 1).is_ok(), "unrelated capability survives");
    assert_eq!(sys.get(1, 0), Err(CapError::EmptySlot));
    assert_eq!(sys.len(), 2);
}

#[test]
fn delete_removes_capability_and_descendants_and_reports_root() {
    let mut sys = system();
    sys.create(
        0,
        0,
        ObjectKind::Notification,
        4,
        NotificationRights::all().bits(),
    )
    .unwrap();
    sys.delegate(0, 0, 1, 0, !0).unwrap();
    sys.delegate(1, 0, 1, 1, !0).unwrap();
    let (result, seen) = removed_by(&mut sys, 1, 0, true);
    assert_eq!(result, Ok(2));
    assert!(seen.iter().all(|r| !r.was_root));
    assert_eq!(
        (seen[1].space, seen[1].slot),
        (1, 0),
        "the capability itself last"
    );
    assert!(sys.get(0, 0).is_ok(), "the parent survives");
    let (result, seen) = removed_by(&mut sys, 0, 0, true);
    assert_eq!(result, Ok(1));
    assert!(seen[0].was_root);
    assert!(sys.is_empty());
}

#[test]
fn revoke_and_delete_report_lookup_errors() {
    let mut sys = system();
    for delete in [false, true] {
        assert_eq!(
            removed_by(&mut sys, 3, 0, delete).0,
            Err(CapError::InvalidSpace)
        );
        assert_eq!(
            removed_by(&mut sys, 0, 8, delete).0,
            Err(CapError::InvalidSelector)
        );
        assert_eq!(
            removed_by(&mut sys, 0, 0, delete).0,
            Err(CapError::EmptySlot)
        );
    }
}

#[test]
fn freed_slot_can_be_reused_after_delete() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Thread, 1, 0).unwrap();
    sys.delete(0, 0, &mut |_| {}).unwrap();
    sys.create(0, 0, ObjectKind::Ept, 2, 0).unwrap();
    assert_eq!(sys.get(0, 0).unwrap().kind(), ObjectKind::Ept);
}

#[test]
fn clear_space_removes_its_capabilities_and_their_descendants() {
    let mut sys = system();
    sys.create(1, 0, ObjectKind::Memory, 1, ALL_MEMORY).unwrap();
    sys.delegate(1, 0, 1, 7, !0).unwrap();
    sys.delegate(1, 7, 2, 0, !0).unwrap();
    sys.create(2, 1, ObjectKind::Memory, 2, ALL_MEMORY).unwrap();
    sys.delegate(2, 1, 1, 3, !0).unwrap();
    let mut seen = Vec::new();
    assert_eq!(sys.clear_space(1, &mut |r| seen.push(r)), Ok(4));
    assert!(sys.space(1).unwrap().is_empty());
    assert_eq!(sys.get(2, 0), Err(CapError::EmptySlot));
    assert!(sys.get(2, 1).is_ok());
    assert_eq!(sys.len(), 1);
    assert_eq!(sys.clear_space(3, &mut |_| {}), Err(CapError::InvalidSpace));
}

#[test]
fn capability_check_is_the_kind_and_rights_rule() {
    let mut sys = system();
    let cap: Capability = sys
        .create(0, 0, ObjectKind::Memory, 3, MemoryRights::READ.bits())
        .unwrap();
    assert_eq!(
        cap.check::<object::Ept>(EptRights::empty()),
        Err(CapError::WrongType)
    );
    assert_eq!(
        cap.check::<object::Memory>(MemoryRights::WRITE),
        Err(CapError::InsufficientRights)
    );
    assert_eq!(
        cap.check::<object::Memory>(MemoryRights::READ)
            .unwrap()
            .object(),
        3
    );
}

// ---- Property tests against a reference model ---------------------------------------------

const SPACES: u32 = 3;
const SLOTS: u64 = 6;
type Sys<S> = CapSystem<S, 3, 6>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ModelCap {
    kind: ObjectKind,
    object: u32,
    rights: u32,
    parent: Option<(u32, u64)>,
}

/// The reference: a map from (space, slot) to capability and where it was delegated from.
#[derive(Default)]
struct Model {
    caps: BTreeMap<(u32, u64), ModelCap>,
    /// Node limit of the storage, if any.
    limit: Option<usize>,
}

impl Model {
    fn slot_error(&self, space: u32, slot: u64) -> Option<CapError> {
        if space >= SPACES {
            Some(CapError::InvalidSpace)
        } else if slot >= SLOTS {
            Some(CapError::InvalidSelector)
        } else {
            None
        }
    }

    fn get(&self, space: u32, slot: u64) -> Result<ModelCap, CapError> {
        if let Some(e) = self.slot_error(space, slot) {
            return Err(e);
        }
        self.caps
            .get(&(space, slot))
            .copied()
            .ok_or(CapError::EmptySlot)
    }

    fn vacant(&self, space: u32, slot: u64) -> Result<(), CapError> {
        match self.get(space, slot) {
            Ok(_) => Err(CapError::SlotOccupied),
            Err(CapError::EmptySlot) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn has_node(&self) -> Result<(), CapError> {
        match self.limit {
            Some(limit) if self.caps.len() >= limit => Err(CapError::OutOfNodes),
            _ => Ok(()),
        }
    }

    fn descendants(&self, at: (u32, u64)) -> BTreeSet<(u32, u64)> {
        let mut out = BTreeSet::new();
        let mut frontier = alloc::vec![at];
        while let Some(p) = frontier.pop() {
            for (&c, m) in &self.caps {
                if m.parent == Some(p) {
                    out.insert(c);
                    frontier.push(c);
                }
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        space: u32,
        slot: u64,
        kind: u8,
        object: u32,
        rights: u32,
    },
    Delegate {
        src: Place,
        dst_space: u32,
        dst_slot: u64,
        mask: u32,
    },
    Revoke(Place),
    Delete(Place),
    Lookup {
        at: Place,
        kind: u8,
        required: u32,
    },
    ClearSpace(u32),
}

/// A slot chosen either among the occupied ones (by index) or anywhere (possibly invalid).
#[derive(Clone, Copy, Debug)]
enum Place {
    Occupied(usize),
    Raw(u32, u64),
}

impl Place {
    fn resolve(self, model: &Model) -> (u32, u64) {
        match self {
            Place::Occupied(i) if !model.caps.is_empty() => {
                *model.caps.keys().nth(i % model.caps.len()).unwrap()
            }
            Place::Occupied(_) => (0, 0),
            Place::Raw(space, slot) => (space, slot),
        }
    }
}

fn any_space() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0..SPACES, 1 => Just(SPACES), 1 => Just(u32::MAX)]
}

fn any_slot() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0..SLOTS, 1 => Just(SLOTS), 1 => Just(u64::MAX)]
}

fn any_place() -> impl Strategy<Value = Place> {
    prop_oneof![
        4 => any::<usize>().prop_map(Place::Occupied),
        1 => (any_space(), any_slot()).prop_map(|(s, l)| Place::Raw(s, l)),
    ]
}

fn kind_of(code: u8) -> ObjectKind {
    ObjectKind::ALL[code as usize % ObjectKind::ALL.len()]
}

fn any_op() -> impl Strategy<Value = Op> {
    // Rights are mostly valid for the kind; sometimes they carry undefined bits.
    let rights = prop_oneof![6 => 0u32..32, 1 => any::<u32>()];
    prop_oneof![
        4 => (any_space(), any_slot(), any::<u8>(), 0u32..4, rights)
            .prop_map(|(space, slot, kind, object, rights)| {
                let rights = if rights < 32 { rights & kind_of(kind).valid_rights() } else { rights };
                Op::Create { space, slot, kind, object, rights }
            }),
        8 => (any_place(), any_space(), any_slot(), any::<u32>())
            .prop_map(|(src, dst_space, dst_slot, mask)| Op::Delegate { src, dst_space, dst_slot, mask }),
        2 => any_place().prop_map(Op::Revoke),
        2 => any_place().prop_map(Op::Delete),
        3 => (any_place(), any::<u8>(), 0u32..32)
            .prop_map(|(at, kind, required)| Op::Lookup { at, kind, required }),
        1 => any_space().prop_map(Op::ClearSpace),
    ]
}

fn as_model(c: &Capability, parent: Option<(u32, u64)>) -> ModelCap {
    ModelCap {
        kind: c.kind(),
        object: c.object(),
        rights: c.rights(),
        parent,
    }
}

/// Compares removal reports with the model's expectation and applies the removal to the model.
fn expect_removed(
    model: &mut Model,
    expected: &BTreeSet<(u32, u64)>,
    root: Option<(u32, u64)>,
    seen: &[RemovedCap],
) -> Result<(), TestCaseError> {
    let places: BTreeSet<(u32, u64)> = seen.iter().map(|r| (r.space, r.slot)).collect();
    prop_assert_eq!(places.len(), seen.len(), "a capability was reported twice");
    prop_assert_eq!(&places, expected);
    for r in seen {
        let m = model.caps[&(r.space, r.slot)];
        prop_assert_eq!(as_model(&r.capability, m.parent), m);
        prop_assert_eq!(
            r.was_root,
            m.parent.is_none() && Some((r.space, r.slot)) == root
        );
    }
    for p in expected {
        model.caps.remove(p);
    }
    Ok(())
}

fn lookup_kind<S: NodeStorage>(
    sys: &Sys<S>,
    at: (u32, u64),
    kind: ObjectKind,
    required: u32,
) -> Result<u32, CapError> {
    macro_rules! typed {
        ($t:ident, $r:ident) => {
            sys.lookup::<object::$t>(at.0, at.1, $r::from_bits_truncate(required))
                .map(|c| c.rights().bits())
        };
    }
    match kind {
        ObjectKind::ProtectionDomain => typed!(ProtectionDomain, ProtectionDomainRights),
        ObjectKind::Thread => typed!(Thread, ThreadRights),
        ObjectKind::Endpoint => typed!(Endpoint, EndpointRights),
        ObjectKind::Notification => typed!(Notification, NotificationRights),
        ObjectKind::Memory => typed!(Memory, MemoryRights),
        ObjectKind::Vcpu => typed!(Vcpu, VcpuRights),
        ObjectKind::Ept => typed!(Ept, EptRights),
        ObjectKind::IoPorts => typed!(IoPorts, IoPortRights),
        ObjectKind::Interrupts => typed!(Interrupts, InterruptRights),
    }
}

fn apply<S: NodeStorage>(
    sys: &mut Sys<S>,
    model: &mut Model,
    op: &Op,
) -> Result<(), TestCaseError> {
    match *op {
        Op::Create {
            space,
            slot,
            kind,
            object,
            rights,
        } => {
            let kind = kind_of(kind);
            let expected = model.vacant(space, slot).and_then(|()| {
                if rights & !kind.valid_rights() != 0 {
                    Err(CapError::InvalidRights)
                } else {
                    model.has_node()
                }
            });
            let result = sys.create(space, slot, kind, object, rights);
            prop_assert_eq!(result.map(|c| as_model(&c, None)).err(), expected.err());
            if expected.is_ok() {
                model.caps.insert(
                    (space, slot),
                    ModelCap {
                        kind,
                        object,
                        rights,
                        parent: None,
                    },
                );
            }
        }
        Op::Delegate {
            src,
            dst_space,
            dst_slot,
            mask,
        } => {
            let src = src.resolve(model);
            let expected = model.get(src.0, src.1).and_then(|parent| {
                model.vacant(dst_space, dst_slot)?;
                model.has_node()?;
                Ok(ModelCap {
                    rights: parent.rights & mask,
                    parent: Some(src),
                    ..parent
                })
            });
            let result = sys.delegate(src.0, src.1, dst_space, dst_slot, mask);
            prop_assert_eq!(result.map(|c| as_model(&c, Some(src))), expected);
            if let Ok(m) = expected {
                model.caps.insert((dst_space, dst_slot), m);
            }
        }
        Op::Revoke(at) | Op::Delete(at) => {
            let delete = matches!(op, Op::Delete(_));
            let at = at.resolve(model);
            let mut seen = Vec::new();
            let mut record = |r| seen.push(r);
            let result = if delete {
                sys.delete(at.0, at.1, &mut record)
            } else {
                sys.revoke(at.0, at.1, &mut record)
            };
            match model.get(at.0, at.1) {
                Err(e) => {
                    prop_assert_eq!(result, Err(e));
                    prop_assert!(seen.is_empty());
                }
                Ok(_) => {
                    let mut expected = model.descendants(at);
                    if delete {
                        expected.insert(at);
                        prop_assert_eq!(seen.last().map(|r| (r.space, r.slot)), Some(at));
                    }
                    prop_assert_eq!(result, Ok(expected.len()));
                    expect_removed(model, &expected, delete.then_some(at), &seen)?;
                    if !delete {
                        // Nothing left is derived from the revoked capability.
                        let node = sys.get(at.0, at.1).unwrap().node();
                        prop_assert_eq!(sys.tree().descendants(node).count(), 0);
                        for space in 0..SPACES {
                            for (_, c) in sys.space(space).unwrap().iter() {
                                prop_assert!(!sys.tree().is_ancestor(node, c.node()));
                            }
                        }
                    }
                }
            }
        }
        Op::Lookup { at, kind, required } => {
            let at = at.resolve(model);
            let kind = kind_of(kind);
            let required = required & kind.valid_rights();
            let expected = model.get(at.0, at.1).and_then(|m| {
                if m.kind != kind {
                    Err(CapError::WrongType)
                } else if m.rights & required != required {
                    Err(CapError::InsufficientRights)
                } else {
                    Ok(m.rights)
                }
            });
            prop_assert_eq!(lookup_kind(sys, at, kind, required), expected);
        }
        Op::ClearSpace(space) => {
            let mut seen = Vec::new();
            let result = sys.clear_space(space, &mut |r| seen.push(r));
            if space >= SPACES {
                prop_assert_eq!(result, Err(CapError::InvalidSpace));
            } else {
                let mut expected = BTreeSet::new();
                for &p in model.caps.keys().filter(|p| p.0 == space) {
                    expected.insert(p);
                    expected.extend(model.descendants(p));
                }
                prop_assert_eq!(result, Ok(expected.len()));
                let places: BTreeSet<(u32, u64)> = seen.iter().map(|r| (r.space, r.slot)).collect();
                prop_assert_eq!(&places, &expected);
                for p in expected {
                    model.caps.remove(&p);
                }
            }
        }
    }
    Ok(())
}

/// Every invariant of the capability system, compared with the model.
fn check_consistent<S: Counted>(sys: &Sys<S>, model: &Model) -> Result<(), TestCaseError> {
    // Nothing leaks: one tree node per occupied slot, and the storage agrees.
    prop_assert_eq!(sys.len(), model.caps.len());
    prop_assert_eq!(sys.tree().storage().live(), model.caps.len());
    let storage = sys.tree().storage();
    prop_assert_eq!(storage.live() + storage.free_slots(), storage.total());
    let mut nodes = BTreeSet::new();
    for space in 0..SPACES {
        let cap_space = sys.space(space).unwrap();
        prop_assert_eq!(
            cap_space.len(),
            model.caps.keys().filter(|p| p.0 == space).count()
        );
        for slot in 0..SLOTS {
            let actual = sys.get(space, slot);
            let Some(m) = model.caps.get(&(space, slot)) else {
                prop_assert_eq!(actual, Err(CapError::EmptySlot));
                continue;
            };
            let c = *actual.unwrap();
            prop_assert_eq!(as_model(&c, sys.parent_of(space, slot).unwrap()), *m);
            // No aliasing: the slot's node is live, unique, and keyed by this very slot.
            prop_assert!(nodes.insert(c.node()), "two slots share a node");
            let key = sys.tree().key(c.node()).and_then(NodeKey::unpack);
            prop_assert_eq!(
                key,
                Some(NodeKey::Capability {
                    space,
                    slot: slot as u32
                })
            );
            // Rights never grow and kind/object never change along a derivation.
            if let Some((ps, pl)) = m.parent {
                let p = sys.get(ps, pl).unwrap();
                prop_assert_eq!(
                    c.rights() & !p.rights(),
                    0,
                    "rights grew through delegation"
                );
                prop_assert_eq!((c.kind(), c.object()), (p.kind(), p.object()));
                prop_assert_eq!(sys.tree().parent(c.node()), Some(p.node()));
            } else {
                prop_assert_eq!(sys.tree().parent(c.node()), None);
            }
        }
    }
    Ok(())
}

fn run<S: Counted>(
    sys: &mut Sys<S>,
    limit: Option<usize>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut model = Model {
        limit,
        ..Model::default()
    };
    for op in ops {
        apply(sys, &mut model, op)?;
        check_consistent(sys, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn capability_system_matches_model(ops in prop::collection::vec(any_op(), 1..60)) {
        run(&mut Sys::new(VecStorage::new()), None, &ops)?;
    }

    #[test]
    fn capability_system_matches_model_when_nodes_run_out(
        limit in 0usize..8,
        ops in prop::collection::vec(any_op(), 1..60),
    ) {
        run(&mut Sys::new(VecStorage::with_limit(limit)), Some(limit), &ops)?;
    }

    #[test]
    fn capability_system_matches_model_on_slice_storage(
        len in 0usize..10,
        ops in prop::collection::vec(any_op(), 1..60),
    ) {
        let mut memory = alloc::vec![crate::derivation::Node::new(0); len];
        run(&mut Sys::new(SliceStorage::new(&mut memory)), Some(len), &ops)?;
    }
}

// ---- Mappings and derived objects in the same tree ------------------------------------------

fn mapping(space: u32, page: u64) -> NodeKey {
    NodeKey::Mapping {
        space,
        page,
        level: 0,
    }
}

#[test]
fn revoking_a_capability_removes_mappings_derived_from_its_copies() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Memory, 7, ALL_MEMORY).unwrap();
    sys.delegate(0, 0, 1, 3, ALL_MEMORY).unwrap();
    let map = sys.derive_node(1, 3, mapping(1, 0x100)).unwrap();
    let shadow = sys.derive_from_node(map, mapping(0x1001, 0x200)).unwrap();
    let (mut caps, mut nodes) = (Vec::new(), Vec::new());
    let n = sys
        .revoke_with(0, 0, &mut |c| caps.push(c), &mut |id, key| {
            nodes.push((id, key))
        })
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(caps.len(), 1);
    assert_eq!((caps[0].space, caps[0].slot), (1, 3));
    let keys: BTreeSet<_> = nodes.iter().map(|(_, k)| *k).collect();
    assert!(keys.contains(&mapping(1, 0x100)) && keys.contains(&mapping(0x1001, 0x200)));
    assert!(!sys.tree().contains(map) && !sys.tree().contains(shadow));
    assert!(sys.get(0, 0).is_ok(), "revoke keeps the capability itself");
    assert_eq!(sys.len(), 1);
}

#[test]
fn removing_a_mapping_node_removes_only_its_subtree() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Memory, 1, ALL_MEMORY).unwrap();
    let a = sys.derive_node(0, 0, mapping(0, 1)).unwrap();
    let b = sys.derive_node(0, 0, mapping(0, 2)).unwrap();
    let a_child = sys.derive_from_node(a, mapping(0x1000, 9)).unwrap();
    let mut removed = Vec::new();
    let n = sys
        .remove_node(a, &mut |_| {}, &mut |id, _| removed.push(id))
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(removed, vec![a_child, a]);
    assert!(sys.tree().contains(b));
    assert!(sys.get(0, 0).is_ok());
}

#[test]
fn capability_keys_cannot_be_recorded_as_plain_nodes() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Memory, 1, ALL_MEMORY).unwrap();
    let key = NodeKey::Capability { space: 0, slot: 5 };
    assert_eq!(sys.derive_node(0, 0, key), Err(CapError::Inconsistent));
    let cap_node = sys.get(0, 0).unwrap().node();
    assert_eq!(
        sys.remove_node(cap_node, &mut |_| {}, &mut |_, _| {}),
        Err(CapError::Inconsistent)
    );
}

#[test]
fn derived_objects_keep_the_kind_narrow_the_rights_and_go_with_the_source() {
    let mut sys = system();
    sys.create(0, 0, ObjectKind::Memory, 1, ALL_MEMORY).unwrap();
    let part = sys
        .derive_object(
            0,
            0,
            0,
            1,
            42,
            (MemoryRights::READ | MemoryRights::MAP).bits(),
        )
        .unwrap();
    assert_eq!(part.kind(), ObjectKind::Memory);
    assert_eq!(part.object(), 42);
    assert_eq!(
        part.rights(),
        (MemoryRights::READ | MemoryRights::MAP).bits()
    );
    assert_eq!(sys.parent_of(0, 1), Ok(Some((0, 0))));
    assert_eq!(
        sys.derive_object(0, 0, 0, 1, 43, ALL_MEMORY),
        Err(CapError::SlotOccupied)
    );
    let (r, removed) = removed_by(&mut sys, 0, 0, false);
    assert_eq!(r, Ok(1));
    assert_eq!(removed[0].capability.object(), 42);
    assert_eq!(sys.get(0, 1), Err(CapError::EmptySlot));
}
