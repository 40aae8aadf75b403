//! Capability spaces, typed capabilities and the derivation tree.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
