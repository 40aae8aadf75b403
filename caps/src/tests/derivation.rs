//! Tests of the derivation tree and its storages against a `BTreeMap` reference model.

use super::Counted;
use crate::derivation::*;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use proptest::prelude::*;

fn collect_removed<S: NodeStorage>(
    tree: &mut DerivationTree<S>,
    id: NodeId,
    remove: bool,
) -> (Result<usize, DeriveError>, Vec<(NodeId, u64)>) {
    let mut seen = Vec::new();
    let mut record = |n, k| seen.push((n, k));
    let result = if remove {
        tree.remove(id, &mut record)
    } else {
        tree.revoke(id, &mut record)
    };
    (result, seen)
}

#[test]
fn node_is_24_bytes() {
    assert_eq!(core::mem::size_of::<Node>(), 24);
}

#[test]
fn derive_from_missing_parent_is_no_such_node() {
    let mut tree = DerivationTree::new(VecStorage::new());
    assert_eq!(
        tree.derive(NodeId::from_index(0), 1),
        Err(DeriveError::NoSuchNode)
    );
    assert_eq!(
        tree.derive(NodeId::from_index(u32::MAX), 1),
        Err(DeriveError::NoSuchNode)
    );
    assert_eq!(
        tree.derive(NodeId::from_index(u32::MAX - 1), 1),
        Err(DeriveError::NoSuchNode)
    );
    assert!(tree.is_empty());
}

#[test]
fn operations_on_freed_node_are_no_such_node() {
    let mut tree = DerivationTree::new(VecStorage::new());
    let root = tree.insert_root(7).unwrap();
    let child = tree.derive(root, 8).unwrap();
    tree.remove(child, &mut |_, _| {}).unwrap();
    assert_eq!(tree.derive(child, 9), Err(DeriveError::NoSuchNode));
    assert_eq!(tree.set_key(child, 9), Err(DeriveError::NoSuchNode));
    assert_eq!(
        tree.revoke(child, &mut |_, _| {}),
        Err(DeriveError::NoSuchNode)
    );
    assert_eq!(
        tree.remove(child, &mut |_, _| {}),
        Err(DeriveError::NoSuchNode)
    );
    assert_eq!(tree.key(child), None);
    assert_eq!(tree.parent(child), None);
    assert_eq!(tree.children(child).count(), 0);
    assert_eq!(tree.descendants(child).count(), 0);
    assert_eq!(tree.len(), 1);
}

#[test]
fn revoke_removes_strict_descendants_children_first() {
    let mut tree = DerivationTree::new(VecStorage::new());
    let root = tree.insert_root(0).unwrap();
    let a = tree.derive(root, 1).unwrap();
    let b = tree.derive(root, 2).unwrap();
    let a1 = tree.derive(a, 11).unwrap();
    let a2 = tree.derive(a, 12).unwrap();
    let a11 = tree.derive(a1, 111).unwrap();
    let other = tree.insert_root(99).unwrap();
    let (result, seen) = collect_removed(&mut tree, root, false);
    assert_eq!(result, Ok(6 - 1));
    let position = |id| seen.iter().position(|&(n, _)| n == id).unwrap();
    assert!(position(a11) < position(a1));
    assert!(position(a1) < position(a) && position(a2) < position(a));
    let keys: BTreeSet<u64> = seen.iter().map(|&(_, k)| k).collect();
    assert_eq!(keys, BTreeSet::from([1, 2, 11, 12, 111]));
    assert!(tree.contains(root) && tree.contains(other));
    assert!(!tree.contains(b));
    assert_eq!(tree.children(root).count(), 0);
    assert_eq!(tree.len(), 2);
}

#[test]
fn remove_reports_the_node_itself_last() {
    let mut tree = DerivationTree::new(VecStorage::new());
    let root = tree.insert_root(0).unwrap();
    let a = tree.derive(root, 1).unwrap();
    tree.derive(a, 2).unwrap();
    let (result, seen) = collect_removed(&mut tree, a, true);
    assert_eq!(result, Ok(2));
    assert_eq!(seen.last(), Some(&(a, 1)));
    assert_eq!(tree.len(), 1);
    assert_eq!(tree.children(root).count(), 0);
}

#[test]
fn unlinking_a_middle_sibling_keeps_the_others_linked() {
    let mut tree = DerivationTree::new(VecStorage::new());
    let root = tree.insert_root(0).unwrap();
    let c: Vec<NodeId> = (1..=3).map(|k| tree.derive(root, k).unwrap()).collect();
    tree.remove(c[1], &mut |_, _| {}).unwrap();
    assert_eq!(tree.children(root).collect::<Vec<_>>(), [c[2], c[0]]);
    tree.remove(c[2], &mut |_, _| {}).unwrap();
    assert_eq!(tree.children(root).collect::<Vec<_>>(), [c[0]]);
    assert_eq!(tree.storage().get(c[0]).unwrap().prev_sibling(), None);
}

#[test]
fn exhaustion_is_out_of_nodes_and_changes_nothing() {
    let mut tree = DerivationTree::new(VecStorage::with_limit(2));
    let root = tree.insert_root(0).unwrap();
    let child = tree.derive(root, 1).unwrap();
    assert_eq!(tree.derive(root, 2), Err(DeriveError::OutOfNodes));
    assert_eq!(tree.insert_root(3), Err(DeriveError::OutOfNodes));
    assert_eq!(tree.len(), 2);
    assert_eq!(tree.children(root).collect::<Vec<_>>(), [child]);
    tree.remove(child, &mut |_, _| {}).unwrap();
    assert_eq!(tree.derive(root, 4), Ok(child), "freed slot is reused");
}

#[test]
fn deep_chains_revoke_without_recursion() {
    // A recursive walk over 200 000 levels would overflow the 2 MiB test-thread stack.
    const DEPTH: usize = 200_000;
    let mut tree = DerivationTree::new(VecStorage::new());
    let root = tree.insert_root(0).unwrap();
    let mut last = root;
    for k in 1..DEPTH as u64 {
        last = tree.derive(last, k).unwrap();
    }
    assert!(tree.is_ancestor(root, last));
    assert_eq!(tree.descendants(root).count(), DEPTH - 1);
    let mut expected = DEPTH as u64;
    let mut order_ok = true;
    let result = tree.revoke(root, &mut |_, k| {
        expected -= 1;
        order_ok &= k == expected;
    });
    assert_eq!(result, Ok(DEPTH - 1));
    assert!(order_ok, "a chain is removed deepest first");
    assert_eq!(tree.len(), 1);
}

#[test]
fn descendants_are_pre_order() {
    let mut tree = DerivationTree::new(VecStorage::new());
    let root = tree.insert_root(0).unwrap();
    let a = tree.derive(root, 1).unwrap();
    let a1 = tree.derive(a, 2).unwrap();
    let b = tree.derive(root, 3).unwrap();
    let b1 = tree.derive(b, 4).unwrap();
    // Children are youngest first.
    assert_eq!(tree.descendants(root).collect::<Vec<_>>(), [b, b1, a, a1]);
    assert_eq!(tree.descendants(a).collect::<Vec<_>>(), [a1]);
    assert_eq!(tree.descendants(a1).count(), 0);
}

#[test]
fn is_ancestor_is_strict() {
    let mut tree = DerivationTree::new(VecStorage::new());
    let root = tree.insert_root(0).unwrap();
    let a = tree.derive(root, 1).unwrap();
    let other = tree.insert_root(2).unwrap();
    assert!(tree.is_ancestor(root, a));
    assert!(!tree.is_ancestor(a, root));
    assert!(!tree.is_ancestor(a, a));
    assert!(!tree.is_ancestor(other, a));
}

#[test]
fn slice_storage_exhausts_at_its_length() {
    let mut memory = [Node::new(0xdead); 3];
    let mut tree = DerivationTree::new(SliceStorage::new(&mut memory));
    assert_eq!(tree.storage().capacity(), 3);
    assert_eq!(tree.storage().bytes_used(), 3 * 24);
    let root = tree.insert_root(0).unwrap();
    tree.derive(root, 1).unwrap();
    tree.derive(root, 2).unwrap();
    assert_eq!(tree.derive(root, 3), Err(DeriveError::OutOfNodes));
    assert_eq!(tree.storage().free_count(), 0);
    assert_eq!(tree.revoke(root, &mut |_, _| {}), Ok(2));
    assert_eq!(tree.storage().free_count(), 2);
    assert_eq!(tree.storage().live_count(), 1);
}

#[test]
fn slice_storage_ignores_double_and_out_of_range_free() {
    let mut memory = [Node::new(0); 2];
    let mut storage = SliceStorage::new(&mut memory);
    let id = storage.alloc(Node::new(5)).unwrap();
    storage.free(id);
    storage.free(id);
    storage.free(NodeId::from_index(7));
    assert_eq!(storage.free_count(), 2);
    let a = storage.alloc(Node::new(1)).unwrap();
    let b = storage.alloc(Node::new(2)).unwrap();
    assert_ne!(a, b, "a double free must not hand the same slot out twice");
    assert_eq!(storage.alloc(Node::new(3)), None);
}

#[test]
fn storages_refuse_to_store_vacant_nodes() {
    let mut memory = [Node::new(0); 2];
    let mut slice = SliceStorage::new(&mut memory);
    assert_eq!(slice.alloc(Node::vacant(None)), None);
    let mut vec = VecStorage::new();
    assert_eq!(vec.alloc(Node::vacant(None)), None);
}

#[test]
fn empty_slice_storage_has_no_nodes() {
    let mut tree = DerivationTree::new(SliceStorage::empty());
    assert_eq!(tree.insert_root(1), Err(DeriveError::OutOfNodes));
    assert_eq!(tree.storage().bytes_used(), 0);
}

#[test]
fn slice_storage_get_ignores_garbage_in_free_slots() {
    let mut memory = [Node::new(0); 4];
    let storage = SliceStorage::new(&mut memory);
    for i in 0..5 {
        assert!(storage.get(NodeId::from_index(i)).is_none());
    }
}

// ---- Property tests against a reference model ----------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    InsertRoot(u64),
    Derive(usize, u64),
    Revoke(usize),
    Remove(usize),
    SetKey(usize, u64),
    /// An operation on an arbitrary raw id, usually dead.
    DeriveRaw(u32, u64),
    RevokeRaw(u32),
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => any::<u64>().prop_map(Op::InsertRoot),
        6 => (any::<usize>(), any::<u64>()).prop_map(|(i, k)| Op::Derive(i, k)),
        1 => any::<usize>().prop_map(Op::Revoke),
        1 => any::<usize>().prop_map(Op::Remove),
        1 => (any::<usize>(), any::<u64>()).prop_map(|(i, k)| Op::SetKey(i, k)),
        1 => (0u32..40, any::<u64>()).prop_map(|(i, k)| Op::DeriveRaw(i, k)),
        1 => (prop_oneof![0u32..40, Just(u32::MAX), Just(u32::MAX - 1)]).prop_map(Op::RevokeRaw),
    ]
}

/// The reference: each live node's key and parent.
#[derive(Default)]
struct Model {
    nodes: BTreeMap<NodeId, (u64, Option<NodeId>)>,
}

impl Model {
    fn pick(&self, i: usize) -> Option<NodeId> {
        (!self.nodes.is_empty()).then(|| *self.nodes.keys().nth(i % self.nodes.len()).unwrap())
    }

    fn children(&self, id: NodeId) -> BTreeSet<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, (_, p))| *p == Some(id))
            .map(|(&c, _)| c)
            .collect()
    }

    fn descendants(&self, id: NodeId) -> BTreeSet<NodeId> {
        let mut out = BTreeSet::new();
        let mut frontier = alloc::vec![id];
        while let Some(n) = frontier.pop() {
            for c in self.children(n) {
                out.insert(c);
                frontier.push(c);
            }
        }
        out
    }
}

fn check_revoke_report(
    model: &Model,
    expected: &BTreeSet<NodeId>,
    seen: &[(NodeId, u64)],
) -> Result<(), TestCaseError> {
    let seen_ids: BTreeSet<NodeId> = seen.iter().map(|&(n, _)| n).collect();
    prop_assert_eq!(seen_ids.len(), seen.len(), "a node was reported twice");
    prop_assert_eq!(&seen_ids, expected);
    for (pos, &(n, k)) in seen.iter().enumerate() {
        prop_assert_eq!(k, model.nodes[&n].0, "reported key is the node's key");
        // Children before parents: no descendant of n is reported after n.
        for &(later, _) in &seen[pos + 1..] {
            prop_assert!(
                !model.descendants(n).contains(&later),
                "parent reported before child"
            );
        }
    }
    Ok(())
}

fn apply<S: Counted>(
    tree: &mut DerivationTree<S>,
    model: &mut Model,
    op: &Op,
) -> Result<(), TestCaseError> {
    match *op {
        Op::InsertRoot(key) => match tree.insert_root(key) {
            Ok(id) => {
                prop_assert!(!model.nodes.contains_key(&id), "live id handed out again");
                model.nodes.insert(id, (key, None));
            }
            Err(e) => {
                prop_assert_eq!(e, DeriveError::OutOfNodes);
                prop_assert_eq!(tree.storage().free_slots(), 0);
            }
        },
        Op::Derive(i, key) => {
            let Some(parent) = model.pick(i) else {
                return Ok(());
            };
            match tree.derive(parent, key) {
                Ok(id) => {
                    prop_assert!(!model.nodes.contains_key(&id), "live id handed out again");
                    model.nodes.insert(id, (key, Some(parent)));
                }
                Err(e) => {
                    prop_assert_eq!(e, DeriveError::OutOfNodes);
                    prop_assert_eq!(tree.storage().free_slots(), 0);
                }
            }
        }
        Op::DeriveRaw(raw, key) => {
            let id = NodeId::from_index(raw);
            let result = tree.derive(id, key);
            if model.nodes.contains_key(&id) {
                if let Ok(child) = result {
                    model.nodes.insert(child, (key, Some(id)));
                } else {
                    prop_assert_eq!(result, Err(DeriveError::OutOfNodes));
                }
            } else {
                prop_assert_eq!(result, Err(DeriveError::NoSuchNode));
            }
        }
        Op::Revoke(i) | Op::Remove(i) => {
            let Some(id) = model.pick(i) else {
                return Ok(());
            };
            let remove = matches!(op, Op::Remove(_));
            let mut expected = model.descendants(id);
            if remove {
                expected.insert(id);
            }
            let (result, seen) = collect_removed(tree, id, remove);
            prop_assert_eq!(result, Ok(expected.len()));
            check_revoke_report(model, &expected, &seen)?;
            if remove {
                prop_assert_eq!(seen.last().map(|&(n, _)| n), Some(id), "node itself last");
            }
            for n in &expected {
                model.nodes.remove(n);
            }
        }
        Op::RevokeRaw(raw) => {
            let id = NodeId::from_index(raw);
            if !model.nodes.contains_key(&id) {
                let (result, seen) = collect_removed(tree, id, false);
                prop_assert_eq!(result, Err(DeriveError::NoSuchNode));
                prop_assert!(seen.is_empty());
            }
        }
        Op::SetKey(i, key) => {
            let Some(id) = model.pick(i) else {
                return Ok(());
            };
            tree.set_key(id, key).unwrap();
            model.nodes.get_mut(&id).unwrap().0 = key;
        }
    }
    Ok(())
}

/// Every structural invariant of the tree, compared with the model.
fn check_consistent<S: Counted>(
    tree: &DerivationTree<S>,
    model: &Model,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(tree.len(), model.nodes.len());
    prop_assert_eq!(
        tree.storage().live(),
        model.nodes.len(),
        "storage leaks or double-frees"
    );
    prop_assert_eq!(
        tree.storage().live() + tree.storage().free_slots(),
        tree.storage().total()
    );
    for (&id, &(key, parent)) in &model.nodes {
        prop_assert_eq!(tree.key(id), Some(key));
        prop_assert_eq!(tree.parent(id), parent);
        let node = *tree.storage().get(id).unwrap();
        let children: Vec<NodeId> = tree.children(id).collect();
        let child_set: BTreeSet<NodeId> = children.iter().copied().collect();
        prop_assert_eq!(child_set.len(), children.len(), "sibling list has a cycle");
        prop_assert_eq!(&child_set, &model.children(id));
        // Doubly linked: each child's prev is the one before it, its next the one after.
        for (pos, &c) in children.iter().enumerate() {
            let cn = tree.storage().get(c).unwrap();
            prop_assert_eq!(cn.parent(), Some(id));
            prop_assert_eq!(cn.prev_sibling(), pos.checked_sub(1).map(|p| children[p]));
            prop_assert_eq!(cn.next_sibling(), children.get(pos + 1).copied());
        }
        prop_assert_eq!(node.first_child(), children.first().copied());
        if parent.is_none() {
            prop_assert_eq!(node.prev_sibling(), None);
            prop_assert_eq!(node.next_sibling(), None);
        }
        let descendants: BTreeSet<NodeId> = tree.descendants(id).collect();
        prop_assert_eq!(descendants, model.descendants(id));
    }
    // Ids the model says are dead are dead in the tree.
    for raw in 0..tree.storage().total() as u32 + 2 {
        let id = NodeId::from_index(raw);
        prop_assert_eq!(tree.contains(id), model.nodes.contains_key(&id));
    }
    Ok(())
}

fn run<S: Counted>(tree: &mut DerivationTree<S>, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    for op in ops {
        apply(tree, &mut model, op)?;
        check_consistent(tree, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn tree_matches_model_on_unlimited_vec_storage(ops in prop::collection::vec(any_op(), 1..80)) {
        run(&mut DerivationTree::new(VecStorage::new()), &ops)?;
    }

    #[test]
    fn tree_matches_model_when_vec_storage_exhausts(
        limit in 1usize..12,
        ops in prop::collection::vec(any_op(), 1..80),
    ) {
        run(&mut DerivationTree::new(VecStorage::with_limit(limit)), &ops)?;
    }

    #[test]
    fn tree_matches_model_on_slice_storage(
        len in 0usize..24,
        ops in prop::collection::vec(any_op(), 1..80),
    ) {
        let mut memory = alloc::vec![Node::new(0x5a5a); len];
        run(&mut DerivationTree::new(SliceStorage::new(&mut memory)), &ops)?;
    }
}
