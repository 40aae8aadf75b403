//! Capability errors and the stable numeric codes the kernel returns from system calls.

use crate::derivation::DeriveError;

/// Why a capability operation failed.
///
/// Each variant has a stable code ([`CapError::code`]) that the kernel returns from system
/// calls; 0 is reserved for success. Codes never change meaning; new variants get new codes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u64)]
pub enum CapError {
    /// Code 1: the capability-space id does not name a space.
    InvalidSpace = 1,
    /// Code 2: the selector (slot index) is beyond the space's size.
    InvalidSelector = 2,
    /// Code 3: the selected slot holds no capability.
    EmptySlot = 3,
    /// Code 4: the capability is for a different kind of object than the operation needs.
    WrongType = 4,
    /// Code 5: the capability lacks a right the operation needs.
    InsufficientRights = 5,
    /// Code 6: the destination slot already holds a capability.
    SlotOccupied = 6,
    /// Code 7: no derivation-tree node is left to record the new capability.
    OutOfNodes = 7,
    /// Code 8: the rights given to `create` include bits undefined for the object kind.
    InvalidRights = 8,
    /// Code 9: an internal invariant is broken (derivation tree and slots disagree). Never
    /// returned unless the tree's storage was modified behind the capability system's back.
    Inconsistent = 9,
}

impl CapError {
    /// Every variant, in code order.
    pub const ALL: [CapError; 9] = [
        Self::InvalidSpace,
        Self::InvalidSelector,
        Self::EmptySlot,
        Self::WrongType,
        Self::InsufficientRights,
        Self::SlotOccupied,
        Self::OutOfNodes,
        Self::InvalidRights,
        Self::Inconsistent,
    ];

    /// The stable system-call status code (never 0).
    pub const fn code(self) -> u64 {
        self as u64
    }

    /// The error with status code `code`, if any.
    pub const fn from_code(code: u64) -> Option<Self> {
        let index = code.wrapping_sub(1);
        if index < Self::ALL.len() as u64 {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }
}

impl From<DeriveError> for CapError {
    fn from(error: DeriveError) -> Self {
        match error {
            DeriveError::OutOfNodes => Self::OutOfNodes,
            DeriveError::NoSuchNode | DeriveError::Inconsistent => Self::Inconsistent,
        }
    }
}
