//! EPT formats, the one page-table walker and the shadow-EPT engine.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
