//! Capability spaces, typed capabilities and the derivation tree.
//!
//! - [`derivation`]: the derivation tree (mapping database) shared by capabilities and EPT
//!   mappings, with its node storages and the [`NodeKey`] encoding.
//! - [`rights`], [`object`]: object kinds, per-kind rights and typed handles [`Cap<T>`];
//!   [`CapError`] with the stable status codes the kernel returns.
//! - [`space`]: capability spaces and the [`CapSystem`] that delegates and revokes across them,
//!   with the one validation path [`CapSystem::lookup`].
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

#[cfg(any(test, feature = "alloc"))]
extern crate alloc;

pub mod derivation;
mod error;
#[cfg(any(test, feature = "alloc"))]
pub mod index;
mod key;
pub mod object;
pub mod rights;
pub mod space;
mod storage;

#[cfg(any(test, feature = "alloc"))]
pub use derivation::VecStorage;
pub use derivation::{
    DerivationTree, DeriveError, KeyError, MAX_NODES, Node, NodeId, NodeKey, NodeStorage,
    SliceStorage,
};
pub use error::CapError;
pub use object::{Cap, Capability, ObjectKind, ObjectType};
pub use rights::{
    EndpointRights, EptRights, InterruptRights, IoPortRights, MemoryRights, NotificationRights,
    ProtectionDomainRights, ThreadRights, VcpuRights,
};
pub use space::{CapSpace, CapSystem, RemovedCap, Slot};

#[cfg(test)]
mod tests;
