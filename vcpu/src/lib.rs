//! VMCS encodings, VMX control negotiation and the one VM-exit decoder.
//!
//! This crate is the vocabulary of virtual CPUs in capvisor, shared by the kernel (which owns
//! the real VMCS and executes VMREAD/VMWRITE in its hardware module), the VMM servers (which
//! receive VM exits as IPC messages) and the nested server (which emulates VMX for an L1
//! hypervisor). It contains no `unsafe` code and builds and tests on the host.
//!
//! * [`vmcs`]: VMCS field encodings ([`VmcsField`], [`ALL_FIELDS`]) with their component
//!   decoding, the [`VmcsAccess`] trait (real VMREAD/VMWRITE in the kernel, [`VmcsImage`] in
//!   memory), guest interruptibility and activity state, and [`VmInstructionError`].
//! * [`controls`]: the VMX control bits, the capability MSRs ([`VmxCapabilities`]), control
//!   negotiation ([`negotiate`]), CR0/CR4 fixed bits, and the filtered capabilities the nested
//!   server advertises to L1.
//! * [`exit`]: [`RawExit`] (the exit-information fields) and [`decode`] into [`VmExit`], the
//!   only place raw exit bits are read.
//! * [`qualification`]: the EPT-violation exit qualification, decoded and encoded.
//! * [`message`]: the exit message and reply exchanged with VMM servers, their word encoding,
//!   and [`message::load`], which enforces the host-isolation rule on replies.
//!
//! Section numbers cite the Intel SDM (Intel 64 and IA-32 Architectures Software Developer's
//! Manual) in its 2023 and later numbering: Vol. 3C chapter 25 (VMCS), 26 (VMX non-root
//! operation), 27 (VM entries), 28 (VM exits), 31 (VMX instruction reference), Vol. 3D
//! Appendix A (VMX capability reporting), B (field encodings) and C (basic exit reasons).
//! Older editions number these chapters one lower (24-30).
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod controls;
pub mod exit;
pub mod message;
pub mod nested;
pub mod qualification;
pub mod vmcs;

pub use controls::{
    ControlError, ControlSet, EntryControls, EptVpidCapabilities, ExitControls, NestedFeatures,
    PinBasedControls, ProcessorBasedControls, SecondaryControls, TertiaryControls, VmxCapabilities,
    negotiate,
};
pub use exit::{EventInfo, ExitReason, RawExit, VmExit, decode};
pub use message::{ExitMessage, GuestState, Reply, ResumeAction, StateMask};
pub use qualification::EptViolationQualification;
pub use vmcs::{ALL_FIELDS, VmInstructionError, VmcsAccess, VmcsField, VmcsImage};
