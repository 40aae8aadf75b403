//! The one place with raw hardware access: ports, MSRs, control registers, CPUID, descriptor
//! tables, APIC registers and VMX instructions. Every other module calls these safe or
//! narrowly-unsafe wrappers, so each unsafe operation is justified once, here.

use core::arch::asm;

/// IA32 MSR numbers used by the kernel (Intel SDM Vol. 4, "Model-Specific Registers").
pub mod msr {
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const X2APIC_BASE: u32 = 0x800;
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory-safety effect on the kernel; the kernel owns all I/O
    // ports (user-level access is granted only through the TSS I/O bitmap, not this function).
    unsafe { x86::io::outb(port, value) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`; reads of device ports do not touch kernel memory.
    unsafe { x86::io::inb(port) }
}

/// Reads an MSR. The caller passes an MSR the CPU implements (checked through CPUID where
/// architectural); reading an unimplemented MSR raises #GP, which the exception handler reports.
pub fn rdmsr(msr: u32) -> u64 {
    // SAFETY: RDMSR only reads a register; a bad index faults into the exception handler,
    // which reports it and ends the run; no memory is touched.
    unsafe { x86::msr::rdmsr(msr) }
}

/// Writes an MSR.
///
/// # Safety
/// The write must not break the kernel's invariants (EFER.LME, GS base of the running CPU,
/// APIC base): callers name the MSR and state why the value is sound.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { x86::msr::wrmsr(msr, value) }
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR0.
///
/// # Safety
/// The new value must keep PE, PG, WP and the long-mode invariants the kernel relies on.
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes CR4.
///
/// # Safety
/// The new value must keep PAE set and may only add features the CPU reports.
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Loads CR3, switching address space and flushing non-global TLB entries.
///
/// # Safety
/// `pml4` must be the physical address of a valid PML4 that maps the kernel identically.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// Writes XCR0.
///
/// # Safety
/// CR4.OSXSAVE must be set and `value` must be a subset of CPUID.(EAX=0DH,ECX=0):EDX:EAX that
/// includes x87 and keeps AVX only with SSE.
pub unsafe fn xsetbv0(value: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags))
    };
}

/// Saves the FPU/SSE/AVX state into `area` with XSAVE (mask `features`), or FXSAVE when
/// `features` is 0.
///
/// # Safety
/// `area` must point to a 64-byte aligned, writable save area large enough for the features
/// enabled in XCR0 (or 512 bytes for FXSAVE).
pub unsafe fn fpu_save(area: *mut u8, features: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        if features == 0 {
            asm!("fxsave64 [{}]", in(reg) area, options(nostack, preserves_flags));
        } else {
            asm!("xsave64 [{}]", in(reg) area, in("eax") features as u32,
                 in("edx") (features >> 32) as u32, options(nostack, preserves_flags));
        }
    }
}

/// Restores the FPU/SSE/AVX state from `area` (XRSTOR with mask `features`, or FXRSTOR).
///
/// # Safety
/// `area` must hold a state saved by `fpu_save` with the same `features`, or a valid initial
/// image (a correct XSAVE header; MXCSR without reserved bits).
pub unsafe fn fpu_restore(area: *const u8, features: u64) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        if features == 0 {
            asm!("fxrstor64 [{}]", in(reg) area, options(nostack, preserves_flags));
        } else {
            asm!("xrstor64 [{}]", in(reg) area, in("eax") features as u32,
                 in("edx") (features >> 32) as u32, options(nostack, preserves_flags));
        }
    }
}

/// A descriptor-table register image for LGDT/LIDT.
#[repr(C, packed)]
pub struct DescriptorTablePointer {
    pub limit: u16,
    pub base: u64,
}

/// Loads the GDT, reloads CS with `code` and the data segments with `data`.
///
/// # Safety
/// `gdt` must describe a GDT that lives forever and holds a 64-bit code descriptor at `code`
/// and a data descriptor at `data`.
pub unsafe fn load_gdt(gdt: &DescriptorTablePointer, code: u16, data: u16) {
    // SAFETY: forwarded from the caller's contract; the far return reloads CS.
    unsafe {
        asm!(
            "lgdt [{gdt}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            gdt = in(reg) gdt,
            code = in(reg) code as u64,
            data = in(reg) data as u64,
            tmp = lateout(reg) _,
        );
    }
}

/// Loads the task register.
///
/// # Safety
/// `selector` must name an available 64-bit TSS descriptor in the current GDT.
pub unsafe fn load_tr(selector: u16) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { asm!("ltr {0:x}", in(reg) selector, options(nostack, preserves_flags)) };
}

/// Loads the IDT.
///
/// # Safety
/// `idt` must describe an IDT that lives forever with valid gates.
pub unsafe fn load_idt(idt: &DescriptorTablePointer) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { asm!("lidt [{}]", in(reg) idt, options(nostack, preserves_flags)) };
}

/// Enables maskable interrupts.
pub fn enable_interrupts() {
    // SAFETY: the IDT is loaded before any CPU calls this (cpu::init runs first).
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Disables maskable interrupts.
pub fn disable_interrupts() {
    // SAFETY: CLI only masks interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Waits for the next interrupt.
pub fn halt() {
    // SAFETY: HLT stops until an interrupt; with interrupts masked it stops for good, which
    // is the intended end of a run.
    unsafe { asm!("hlt", options(nomem, nostack)) };
}

/// Halts this CPU forever with interrupts masked.
pub fn halt_forever() -> ! {
    loop {
        disable_interrupts();
        halt();
    }
}

/// A spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Reads a 32-bit memory-mapped register.
///
/// # Safety
/// `addr` must be a mapped, 4-byte aligned device register whose read has no effect the
/// caller did not intend.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: forwarded from the caller's contract.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit memory-mapped register.
///
/// # Safety
/// As for `mmio_read32`.
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: forwarded from the caller's contract.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// VMX instructions (Intel SDM Vol. 3C, chapter 31 "VMX Instruction Reference").
pub mod vmx {
    /// Enters VMX root operation with the VMXON region at physical `region`.
    ///
    /// # Safety
    /// CR4.VMXE must be set, CR0/CR4 must honour the fixed bits, and `region` must be a
    /// 4 KiB-aligned page owned by this CPU for as long as it stays in VMX operation, with the
    /// VMCS revision identifier in its first word.
    pub unsafe fn vmxon(region: u64) -> Result<(), ()> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { x86::bits64::vmx::vmxon(region).map_err(|_| ()) }
    }

    /// VMCLEAR: flushes the VMCS at physical `vmcs` to memory and makes it clear and inactive.
    ///
    /// # Safety
    /// `vmcs` must be a VMCS region the kernel owns (4 KiB aligned, revision written), not the
    /// VMXON region, and not running on another CPU.
    pub unsafe fn vmclear(vmcs: u64) -> Result<(), ()> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { x86::bits64::vmx::vmclear(vmcs).map_err(|_| ()) }
    }

    /// VMPTRLD: makes the VMCS at physical `vmcs` current on this CPU.
    ///
    /// # Safety
    /// As for `vmclear`; the VMCS must not be active on another CPU.
    pub unsafe fn vmptrld(vmcs: u64) -> Result<(), ()> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { x86::bits64::vmx::vmptrld(vmcs).map_err(|_| ()) }
    }

    /// VMREAD of `field` from the current VMCS (0 if it fails: unsupported field).
    pub fn vmread(field: u32) -> u64 {
        // SAFETY: VMREAD only reads the current VMCS; without one, or for an unsupported field,
        // it fails with VMfail and changes nothing, which is reported as 0.
        unsafe { x86::bits64::vmx::vmread(field).unwrap_or(0) }
    }

    /// VMWRITE of `field` in the current VMCS.
    ///
    /// # Safety
    /// Host-state and control fields decide what the CPU does at the next VM exit: callers
    /// write only values the kernel computed (host state) or validated (`vcpu::message`).
    pub unsafe fn vmwrite(field: u32, value: u64) -> Result<(), ()> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { x86::bits64::vmx::vmwrite(field, value).map_err(|_| ()) }
    }

    /// INVEPT of `kind` (1 single-context, 2 all-context) for `eptp`.
    pub fn invept(kind: u64, eptp: u64) {
        let descriptor: [u64; 2] = [eptp, 0];
        // SAFETY: INVEPT only drops cached EPT translations; the descriptor is a valid
        // 16-byte memory operand on the stack. In VMX root operation with EPT supported (the
        // callers check), an unsupported type fails with VMfail and does nothing.
        unsafe {
            core::arch::asm!("invept {}, [{}]", in(reg) kind, in(reg) descriptor.as_ptr(),
                             options(nostack, readonly))
        };
    }

    /// INVVPID of `kind` (1 single-context, 2 all-context) for `vpid`.
    pub fn invvpid(kind: u64, vpid: u16) {
        let descriptor: [u64; 2] = [u64::from(vpid), 0];
        // SAFETY: INVVPID only drops cached linear translations tagged with the VPID.
        unsafe {
            core::arch::asm!("invvpid {}, [{}]", in(reg) kind, in(reg) descriptor.as_ptr(),
                             options(nostack, readonly))
        };
    }
}

/// Writes CR2 (the guest's value before a VM entry; VMX does not switch it).
pub fn write_cr2(value: u64) {
    // SAFETY: CR2 only reports the last page-fault address; the kernel reads it only in its
    // page-fault path, which does not run between this write and the VM entry.
    unsafe { asm!("mov cr2, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

/// Enables interrupts for one instruction so that an interrupt that caused a VM exit (left
/// pending in the local APIC) is delivered through the IDT, then disables them again.
pub fn deliver_pending_interrupt() {
    // SAFETY: runs on the CPU's kernel stack with the IDT loaded; the kernel-mode trap path
    // handles whatever interrupt arrives and returns here.
    unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Per-CPU base pointer in IA32_GS_BASE.
///
/// # Safety
/// `base` must point to this CPU's per-CPU block, which lives forever.
pub unsafe fn set_gs_base(base: u64) {
    // SAFETY: forwarded; GS is used only to find the per-CPU block.
    unsafe { wrmsr(msr::IA32_GS_BASE, base) }
}

/// Reads the u32 at `offset` in the per-CPU block GS points at.
///
/// Only valid after `percpu::install` set IA32_GS_BASE on this CPU (the kernel installs it
/// before enabling interrupts or entering user mode, and this is used only after that).
pub fn gs_read_u32(offset: usize) -> u32 {
    let v: u32;
    // SAFETY: GS points at this CPU's per-CPU block (a static), and `offset` is a field
    // offset inside it (callers pass `offset_of!`), so the read is in bounds.
    unsafe {
        asm!("mov {:e}, gs:[{}]", out(reg) v, in(reg) offset, options(nostack, readonly, preserves_flags))
    };
    v
}

/// Reads IA32_GS_BASE.
pub fn gs_base() -> u64 {
    rdmsr(msr::IA32_GS_BASE)
}
