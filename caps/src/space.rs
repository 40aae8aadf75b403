//! Capability spaces and the capability system that creates, delegates, revokes and validates.
//!
//! A [`CapSpace`] is a fixed array of slots indexed by selector. A [`CapSystem`] owns
//! `SPACES` spaces and one [`DerivationTree`] shared by all of them: every capability is a
//! tree node keyed by `NodeKey::Capability { space, slot }`, and a delegated capability is a
//! child of the capability it came from. Revoking a capability removes every capability derived
//! from it, in every space.
//!
//! Objects are not destroyed here. Every operation that removes capabilities reports each one
//! to an `on_remove` callback as a [`RemovedCap`]; the kernel decides what losing a reference
//! means for the object.
//!
//! Slot selectors are `u64` so that raw system-call arguments are range-checked here and never
//! truncated. Space ids are `u32` below `SPACES` (and below 2^20, the key encoding's limit).

use crate::derivation::{DerivationTree, NodeId, NodeKey, NodeStorage};
use crate::error::CapError;
use crate::object::{Cap, Capability, ObjectKind, ObjectType};

/// One slot of a capability space.
pub type Slot = Option<Capability>;

/// A fixed-size, slot-indexed capability space.
pub struct CapSpace<const SLOTS: usize> {
    slots: [Slot; SLOTS],
    occupied: usize,
}

impl<const SLOTS: usize> CapSpace<SLOTS> {
    /// An empty space.
    pub const fn new() -> Self {
        Self {
            slots: [None; SLOTS],
            occupied: 0,
        }
    }

    /// Number of slots (selectors `0..SLOTS`).
    pub const fn capacity(&self) -> usize {
        SLOTS
    }

    /// Number of occupied slots.
    pub fn len(&self) -> usize {
        self.occupied
    }

    /// Whether no slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.occupied == 0
    }

    /// The slot at `selector`: `InvalidSelector` if out of range.
    pub fn slot(&self, selector: u64) -> Result<&Slot, CapError> {
        usize::try_from(selector)
            .ok()
            .and_then(|i| self.slots.get(i))
            .ok_or(CapError::InvalidSelector)
    }

    /// The capability at `selector`: `InvalidSelector` if out of range, `EmptySlot` if empty.
    pub fn get(&self, selector: u64) -> Result<&Capability, CapError> {
        self.slot(selector)?.as_ref().ok_or(CapError::EmptySlot)
    }

    /// Occupied slots and their capabilities, in selector order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Capability)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|c| (i as u64, c)))
    }

    fn slot_mut(&mut self, selector: u64) -> Result<&mut Slot, CapError> {
        usize::try_from(selector)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .ok_or(CapError::InvalidSelector)
    }

    fn fill(&mut self, selector: u64, capability: Capability) {
        if let Ok(slot) = self.slot_mut(selector)
            && slot.is_none()
        {
            *slot = Some(capability);
            self.occupied += 1;
        }
    }

    /// Empties `selector` if it holds the capability recorded by `node`.
    fn take(&mut self, selector: u64, node: NodeId) -> Option<Capability> {
        let slot = self.slot_mut(selector).ok()?;
        let capability = slot.take_if(|c| c.node() == node)?;
        self.occupied -= 1;
        Some(capability)
    }
}

impl<const SLOTS: usize> Default for CapSpace<SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

/// A capability that an operation removed, reported to the caller's `on_remove` callback.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RemovedCap {
    /// The space it was in.
    pub space: u32,
    /// The slot it was in.
    pub slot: u64,
    /// The capability itself (its node is already freed).
    pub capability: Capability,
    /// Whether it was a root, made by `create` rather than delegated. If the kernel makes one
    /// root per object, removing the root means no capability to the object is left.
    pub was_root: bool,
}

/// `SPACES` capability spaces of `SLOTS` slots each, and the derivation tree linking them.
///
/// The struct is large (`SPACES * SLOTS * 16` bytes); [`CapSystem::new`] is a `const fn` so it
/// can be placed in a `static` instead of being built on a small kernel stack.
pub struct CapSystem<S: NodeStorage, const SPACES: usize, const SLOTS: usize> {
    tree: DerivationTree<S>,
    spaces: [CapSpace<SLOTS>; SPACES],
}

impl<S: NodeStorage, const SPACES: usize, const SLOTS: usize> CapSystem<S, SPACES, SLOTS> {
    const LIMITS_FIT_KEY: () = assert!(
        SPACES <= NodeKey::MAX_SPACE as usize + 1 && SLOTS as u64 <= u32::MAX as u64 + 1,
        "space ids must fit 20 bits and selectors 32 bits (NodeKey::Capability)"
    );

    /// Empty spaces over `storage`, a fresh node storage shared by all spaces.
    pub const fn new(storage: S) -> Self {
        let () = Self::LIMITS_FIT_KEY;
        Self {
            tree: DerivationTree::new(storage),
            spaces: [const { CapSpace::new() }; SPACES],
        }
    }

    /// The space with id `space`.
    pub fn space(&self, space: u32) -> Result<&CapSpace<SLOTS>, CapError> {
        self.spaces
            .get(space as usize)
            .ok_or(CapError::InvalidSpace)
    }

    fn space_mut(&mut self, space: u32) -> Result<&mut CapSpace<SLOTS>, CapError> {
        self.spaces
            .get_mut(space as usize)
            .ok_or(CapError::InvalidSpace)
    }

    /// The shared derivation tree (read-only: all changes go through the capability system).
    pub fn tree(&self) -> &DerivationTree<S> {
        &self.tree
    }

    /// Number of capabilities in all spaces.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether there are no capabilities at all.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// The untyped capability at (`space`, `slot`), checking space, selector range and
    /// emptiness.
    pub fn get(&self, space: u32, slot: u64) -> Result<&Capability, CapError> {
        self.space(space)?.get(slot)
    }

    /// The one validation path: the capability at (`space`, `slot`) as a `Cap<T>`, if the space
    /// and selector are valid, the slot is occupied, it names a `T` and it carries every right
    /// in `required`. Errors, in the order checked: `InvalidSpace`, `InvalidSelector`,
    /// `EmptySlot`, `WrongType`, `InsufficientRights`.
    pub fn lookup<T: ObjectType>(
        &self,
        space: u32,
        slot: u64,
        required: T::Rights,
    ) -> Result<Cap<T>, CapError> {
        self.get(space, slot)?.check::<T>(required)
    }

    /// Where the capability at (`space`, `slot`) was delegated from: `None` for a root.
    pub fn parent_of(&self, space: u32, slot: u64) -> Result<Option<(u32, u64)>, CapError> {
        let node = self.get(space, slot)?.node();
        let Some(parent) = self.tree.parent(node) else {
            return Ok(None);
        };
        match self.tree.key(parent).and_then(NodeKey::unpack) {
            Some(NodeKey::Capability { space, slot }) => Ok(Some((space, u64::from(slot)))),
            _ => Err(CapError::Inconsistent),
        }
    }

    /// Checks that (`space`, `slot`) exists and is empty, and returns its tree key.
    fn vacant_key(&self, space: u32, slot: u64) -> Result<u64, CapError> {
        if self.space(space)?.slot(slot)?.is_some() {
            return Err(CapError::SlotOccupied);
        }
        let slot = u32::try_from(slot).map_err(|_| CapError::InvalidSelector)?;
        NodeKey::Capability { space, slot }
            .pack()
            .map_err(|_| CapError::InvalidSpace)
    }

    /// Puts a root capability for a new object in the empty slot (`space`, `slot`).
    /// `rights` must only use bits defined for `kind` (else `InvalidRights`).
    pub fn create(
        &mut self,
        space: u32,
        slot: u64,
        kind: ObjectKind,
        object: u32,
        rights: u32,
    ) -> Result<Capability, CapError> {
        let key = self.vacant_key(space, slot)?;
        if rights & !kind.valid_rights() != 0 {
            return Err(CapError::InvalidRights);
        }
        let node = self.tree.insert_root(key)?;
        let capability = Capability::new(kind, object, rights, node);
        self.space_mut(space)?.fill(slot, capability);
        Ok(capability)
    }

    /// Copies the capability at (`src_space`, `src_slot`) into the empty slot (`dst_space`,
    /// `dst_slot`) with rights `source rights & rights_mask`, as a child of the source: rights
    /// never grow. Unknown mask bits are ignored.
    pub fn delegate(
        &mut self,
        src_space: u32,
        src_slot: u64,
        dst_space: u32,
        dst_slot: u64,
        rights_mask: u32,
    ) -> Result<Capability, CapError> {
        let source = *self.get(src_space, src_slot)?;
        let key = self.vacant_key(dst_space, dst_slot)?;
        let node = self.tree.derive(source.node(), key)?;
        let capability = Capability::new(
            source.kind(),
            source.object(),
            source.rights() & rights_mask,
            node,
        );
        self.space_mut(dst_space)?.fill(dst_slot, capability);
        Ok(capability)
    }

    /// Like [`CapSystem::delegate`], but the child names another object of the same kind: a
    /// part of the source's object (a sub-range of memory, say). Revoking the source removes
    /// it like any other child. Rights are `source rights & rights_mask`.
    pub fn derive_object(
        &mut self,
        src_space: u32,
        src_slot: u64,
        dst_space: u32,
        dst_slot: u64,
        object: u32,
        rights_mask: u32,
    ) -> Result<Capability, CapError> {
        let source = *self.get(src_space, src_slot)?;
        let key = self.vacant_key(dst_space, dst_slot)?;
        let node = self.tree.derive(source.node(), key)?;
        let capability =
            Capability::new(source.kind(), object, source.rights() & rights_mask, node);
        self.space_mut(dst_space)?.fill(dst_slot, capability);
        Ok(capability)
    }

    /// Removes every capability derived from the one at (`space`, `slot`), in every space,
    /// reporting each (children before parents). The capability itself stays. Returns how many
    /// were removed.
    pub fn revoke(
        &mut self,
        space: u32,
        slot: u64,
        on_remove: &mut impl FnMut(RemovedCap),
    ) -> Result<usize, CapError> {
        let node = self.get(space, slot)?.node();
        let spaces = &mut self.spaces;
        let mut clear = |id, key| clear_slot(spaces, id, key, false, on_remove);
        Ok(self.tree.revoke(node, &mut clear)?)
    }

    /// Removes the capability at (`space`, `slot`) and everything derived from it, reporting
    /// each (the capability itself last). Returns how many were removed.
    pub fn delete(
        &mut self,
        space: u32,
        slot: u64,
        on_remove: &mut impl FnMut(RemovedCap),
    ) -> Result<usize, CapError> {
        let node = self.get(space, slot)?.node();
        let is_root = self.tree.parent(node).is_none();
        let spaces = &mut self.spaces;
        let mut clear = |id, key| clear_slot(spaces, id, key, id == node && is_root, on_remove);
        Ok(self.tree.remove(node, &mut clear)?)
    }

    /// Records a non-capability node (a memory mapping, say) as a child of the capability at
    /// (`space`, `slot`): revoking or deleting that capability, or any ancestor, removes it and
    /// reports it to the `on_node` callback of [`CapSystem::revoke_with`] and friends.
    pub fn derive_node(&mut self, space: u32, slot: u64, key: NodeKey) -> Result<NodeId, CapError> {
        let parent = self.get(space, slot)?.node();
        self.derive_from_node(parent, key)
    }

    /// Records a non-capability node as a child of another node (a shadow mapping derived from
    /// a guest mapping). Capability keys are refused: capabilities live in slots.
    pub fn derive_from_node(&mut self, parent: NodeId, key: NodeKey) -> Result<NodeId, CapError> {
        if matches!(key, NodeKey::Capability { .. }) {
            return Err(CapError::Inconsistent);
        }
        let key = key.pack().map_err(|_| CapError::InvalidSpace)?;
        Ok(self.tree.derive(parent, key)?)
    }

    /// Removes `node` (a non-capability node) and everything derived from it. Capabilities
    /// below it go to `on_cap`, other nodes (itself included) to `on_node`.
    pub fn remove_node(
        &mut self,
        node: NodeId,
        on_cap: &mut impl FnMut(RemovedCap),
        on_node: &mut impl FnMut(NodeId, NodeKey),
    ) -> Result<usize, CapError> {
        match self.tree.key(node).and_then(NodeKey::unpack) {
            None => return Err(CapError::Inconsistent),
            Some(NodeKey::Capability { .. }) => return Err(CapError::Inconsistent),
            Some(_) => {}
        }
        let spaces = &mut self.spaces;
        let mut clear = |id, key| dispatch_removed(spaces, id, key, false, on_cap, on_node);
        Ok(self.tree.remove(node, &mut clear)?)
    }

    /// As [`CapSystem::revoke`], also reporting removed non-capability nodes to `on_node`.
    pub fn revoke_with(
        &mut self,
        space: u32,
        slot: u64,
        on_cap: &mut impl FnMut(RemovedCap),
        on_node: &mut impl FnMut(NodeId, NodeKey),
    ) -> Result<usize, CapError> {
        let node = self.get(space, slot)?.node();
        let spaces = &mut self.spaces;
        let mut clear = |id, key| dispatch_removed(spaces, id, key, false, on_cap, on_node);
        Ok(self.tree.revoke(node, &mut clear)?)
    }

    /// As [`CapSystem::delete`], also reporting removed non-capability nodes to `on_node`.
    pub fn delete_with(
        &mut self,
        space: u32,
        slot: u64,
        on_cap: &mut impl FnMut(RemovedCap),
        on_node: &mut impl FnMut(NodeId, NodeKey),
    ) -> Result<usize, CapError> {
        let node = self.get(space, slot)?.node();
        let is_root = self.tree.parent(node).is_none();
        let spaces = &mut self.spaces;
        let mut clear =
            |id, key| dispatch_removed(spaces, id, key, id == node && is_root, on_cap, on_node);
        Ok(self.tree.remove(node, &mut clear)?)
    }

    /// Deletes every capability in `space` (and everything derived from them, wherever it is),
    /// so that the space id can be reused. Returns how many capabilities were removed.
    pub fn clear_space(
        &mut self,
        space: u32,
        on_remove: &mut impl FnMut(RemovedCap),
    ) -> Result<usize, CapError> {
        let mut removed = 0;
        for slot in 0..SLOTS as u64 {
            if self.space(space)?.is_empty() {
                break;
            }
            if self.space(space)?.slot(slot)?.is_some() {
                removed += self.delete(space, slot, on_remove)?;
            }
        }
        Ok(removed)
    }
}

/// Routes one removed tree node: capabilities to `clear_slot`, anything else to `on_node`.
fn dispatch_removed<const SLOTS: usize>(
    spaces: &mut [CapSpace<SLOTS>],
    id: NodeId,
    key: u64,
    was_root: bool,
    on_cap: &mut impl FnMut(RemovedCap),
    on_node: &mut impl FnMut(NodeId, NodeKey),
) {
    match NodeKey::unpack(key) {
        Some(NodeKey::Capability { .. }) => clear_slot(spaces, id, key, was_root, on_cap),
        Some(other) => on_node(id, other),
        None => {}
    }
}

/// Empties the slot that tree node `id` (with `key`) recorded and reports the capability.
fn clear_slot<const SLOTS: usize>(
    spaces: &mut [CapSpace<SLOTS>],
    id: NodeId,
    key: u64,
    was_root: bool,
    on_remove: &mut impl FnMut(RemovedCap),
) {
    let Some(NodeKey::Capability { space, slot }) = NodeKey::unpack(key) else {
        return;
    };
    let Some(cap_space) = spaces.get_mut(space as usize) else {
        return;
    };
    let slot = u64::from(slot);
    if let Some(capability) = cap_space.take(slot, id) {
        on_remove(RemovedCap {
            space,
            slot,
            capability,
            was_root,
        });
    }
}
