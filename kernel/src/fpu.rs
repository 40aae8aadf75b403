//! FPU, SSE and AVX state of user threads: enabled on every CPU, saved and restored on every
//! thread switch (XSAVE where the CPU has it, else FXSAVE), so it survives every switch.

use crate::hw;
use core::sync::atomic::{AtomicU64, Ordering};

const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
/// x87, SSE, AVX (XCR0 bits 0-2).
const WANTED_FEATURES: u64 = 0b111;

/// The XSAVE feature mask in XCR0, or 0 when only FXSAVE is used.
static FEATURES: AtomicU64 = AtomicU64::new(0);

/// A save area: large enough for legacy + header + AVX (832 bytes), 64-byte aligned.
#[derive(Clone)]
#[repr(C, align(64))]
pub struct FpuArea([u8; 1024]);

impl FpuArea {
    /// The initial state: x87 control word 0x37f, MXCSR 0x1f80, everything else zero; for
    /// XSAVE the header marks x87 and SSE as in use so XRSTOR loads these values.
    pub fn initial() -> Self {
        let mut a = [0u8; 1024];
        a[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        if FEATURES.load(Ordering::Relaxed) != 0 {
            a[512..520].copy_from_slice(&0b11u64.to_le_bytes()); // XSTATE_BV
        }
        FpuArea(a)
    }

    /// Saves the CPU's current FPU state here.
    pub fn save(&mut self) {
        // SAFETY: the area is 64-byte aligned and 1024 bytes, enough for the features enabled
        // in XCR0 (limited to x87/SSE/AVX in `init_this_cpu`).
        unsafe { hw::fpu_save(self.0.as_mut_ptr(), FEATURES.load(Ordering::Relaxed)) }
    }

    /// Loads the FPU state saved here.
    pub fn restore(&self) {
        // SAFETY: the area holds either `initial()` or a state saved by `save` with the same
        // feature mask (set once at boot, before any thread exists).
        unsafe { hw::fpu_restore(self.0.as_ptr(), FEATURES.load(Ordering::Relaxed)) }
    }
}

/// Enables SSE (and XSAVE with AVX where present) on this CPU.
pub fn init_this_cpu() {
    let (_, _, ecx, _) = hw::cpuid(1, 0);
    let xsave = ecx & (1 << 26) != 0;
    let mut cr4 = hw::read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT;
    if xsave {
        cr4 |= CR4_OSXSAVE;
    }
    let cr0 = (hw::read_cr0() | CR0_MP) & !CR0_EM;
    // SAFETY: enables FXSAVE/SSE (and XSAVE where CPUID reports it); the kernel itself is
    // compiled soft-float and never touches these registers.
    unsafe {
        hw::write_cr0(cr0);
        hw::write_cr4(cr4);
    }
    if xsave {
        let (supported, ..) = hw::cpuid(0xd, 0);
        let features = u64::from(supported) & WANTED_FEATURES;
        // SAFETY: CR4.OSXSAVE is set; the mask is x87|SSE[|AVX], a subset of what CPUID.0DH
        // reports.
        unsafe { hw::xsetbv0(features) };
        FEATURES.store(features, Ordering::Relaxed);
    }
}
