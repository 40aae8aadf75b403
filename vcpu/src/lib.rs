//! VMCS encodings, VMX control negotiation and the one VM-exit decoder.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
