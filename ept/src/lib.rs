//! EPT formats, the one page-table walker and the shadow-EPT engine.
//!
//! - [`entry`]: EPT and 4-level paging entry bits, memory types, rights, the EPT pointer.
//! - [`walk`]: the one generic page-table walker ([`walk::walk`], [`walk::traverse`]) over a
//!   [`walk::PageTableFormat`] ([`walk::Ept`], [`walk::X86Paging`]) and a
//!   [`walk::PhysMemory`] whose reads can fail.
//! - [`check`]: EPT misconfigurations, violations and their exit qualification, as the
//!   processor computes them, applied to L1's EPT; the two-level walk (L2 paging, then L1's
//!   EPT) an emulator needs to tell an L2 page fault from an L1 EPT fault.
//! - [`backend`]: the [`backend::ShadowBackend`] trait through which the engine changes shadow
//!   tables, and the memory-type rule.
//! - [`shadow`] (feature `alloc`): the nested server's shadow-EPT engine and its three-way
//!   dispatch.
//! - [`memory_backend`] (feature `alloc`): a real in-memory backend (SDM-format tables in
//!   simulated host memory, the `caps` derivation tree, per-CPU TLBs) for tests and benches.
//! - [`model`] (feature `alloc`): the deliberately simple reference model the engine is
//!   checked against.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod backend;
pub mod check;
pub mod entry;
pub mod walk;

#[cfg(feature = "alloc")]
pub mod memory_backend;
#[cfg(feature = "alloc")]
pub mod model;
#[cfg(feature = "alloc")]
pub mod shadow;
