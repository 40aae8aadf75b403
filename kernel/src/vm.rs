//! vCPUs: a VMCS and guest state run like a thread (VM entry instead of IRETQ). The kernel
//! keeps external interrupts, NMIs and recall; every other exit is captured here, on the CPU
//! that holds the VMCS, and sent to the vCPU's exit endpoint as a call (see docs/abi.md).

use crate::hw::{self, msr, vmx};
use crate::percpu;
use core::arch::global_asm;
use core::sync::atomic::Ordering;
use vcpu::controls::{
    ControlSet, EntryControls, ExitControls, PinBasedControls, ProcessorBasedControls,
    SecondaryControls, TertiaryControls,
};
use vcpu::message::{ExitMessage, Gprs, SavedRegisters, StateMask};
use vcpu::vmcs::{VmcsAccess, VmcsField as F};

/// A shadow VMCS (SDM Vol. 3C 25.10) and the VMREAD/VMWRITE bitmaps that decide which of a
/// guest hypervisor's VMREADs and VMWRITEs it serves without a VM exit.
pub struct ShadowVmcs {
    pub vmcs: u64,
    pub read_bitmap: u64,
    pub write_bitmap: u64,
    /// Linked (the VMCS link pointer names it) rather than all ones.
    pub linked: bool,
    /// The fields the guest VMWRITEs without an exit, in the order they were listed: their
    /// values travel with every VMX-instruction exit (docs/abi.md, "VMCS shadowing").
    pub written: [vcpu::vmcs::VmcsField; SHADOW_WRITTEN_MAX],
    pub written_count: usize,
}

/// The most write-shadowed fields a vCPU may have.
pub const SHADOW_WRITTEN_MAX: usize = 16;

/// Exit reasons of the VMX instructions (SDM Vol. 3D Appendix C: VMCLEAR to VMXON, INVEPT,
/// INVVPID, VMFUNC): the exits after which a guest hypervisor's shadow VMCS is read.
fn is_vmx_instruction(basic: u16) -> bool {
    matches!(basic, 18..=27 | 50 | 53 | 59)
}

/// Runs `f` on the shadow VMCS `shadow` (made current for the time, then VMCLEARed so that it
/// is active nowhere when the guest runs), and makes `vmcs` current again.
pub fn with_shadow<R>(shadow: u64, vmcs: u64, f: impl FnOnce(&mut HwVmcs) -> R) -> Option<R> {
    let pc = percpu::current();
    // SAFETY: `shadow` is a shadow VMCS region the kernel allocated and stamped (revision
    // with bit 31), active on no CPU (it is VMCLEARed after every access).
    if unsafe { vmx::vmptrld(shadow) }.is_err() {
        return None;
    }
    pc.current_vmcs.store(shadow, Ordering::Relaxed);
    let r = f(&mut HwVmcs);
    // SAFETY: as above; VMCLEAR writes it back and leaves it inactive.
    let _ = unsafe { vmx::vmclear(shadow) };
    pc.current_vmcs.store(0, Ordering::Relaxed);
    make_current(vmcs).then_some(r)
}

/// The current VMCS of this CPU, through VMREAD/VMWRITE.
pub struct HwVmcs;

impl VmcsAccess for HwVmcs {
    fn read(&self, field: F) -> u64 {
        vmx::vmread(field.encoding())
    }

    fn write(&mut self, field: F, value: u64) {
        // SAFETY: `HwVmcs` is only used on the CPU where the kernel made the vCPU's VMCS
        // current; the values come from the kernel or passed `vcpu::message::validate`.
        let _ = unsafe { vmx::vmwrite(field.encoding(), value) };
    }
}

/// A vCPU's kernel state. Boxed: the exit path saves the guest registers into `regs` in
/// place (HOST_RSP points just past `regs.gprs`).
#[repr(C)]
pub struct Vcpu {
    /// Guest registers the VMCS does not hold; `gprs` must stay first (see the entry code).
    pub regs: SavedRegisters,
    /// Physical address of the VMCS region.
    pub vmcs: u64,
    pub launched: bool,
    /// The CPU on which the VMCS is active (VMPTRLD without VMCLEAR since).
    pub active_on: Option<usize>,
    /// The CPU the guest last ran on (a different one means: flush on arrival).
    pub last_cpu: Option<usize>,
    pub ept: u32,
    pub eptp_dirty: bool,
    pub exit_endpoint: u32,
    pub badge: u32,
    pub vpid: u16,
    /// State groups sent with each exit reason (0..=76); others use `default_mask`.
    pub masks: [u32; 80],
    /// A recall is pending: the next kernel exit handling sends a recall message.
    pub recall: bool,
    /// The message of the pending exit: label and the 78-word exit-message image.
    pub exit_label: u16,
    pub exit_words: [u64; vcpu::message::EXIT_MESSAGE_WORDS],
    /// The groups whose words `exit_words` holds (zeroed when a later message omits them).
    pub exit_mask: StateMask,
    /// VMCS shadowing for a guest hypervisor (`VcpuShadowVmcs`).
    pub shadow: Option<ShadowVmcs>,
    /// Words sent after the exit-message image: the count and values of the write-shadowed
    /// fields (a VMX-instruction exit with a linked shadow VMCS), `shadow_words` of them.
    pub shadow_values: [u64; 1 + SHADOW_WRITTEN_MAX],
    pub shadow_words: usize,
}

const _: () = assert!(core::mem::offset_of!(Vcpu, regs) == 0);
const _: () = assert!(core::mem::offset_of!(SavedRegisters, gprs) == 0);
const GPRS_SIZE: usize = core::mem::size_of::<Gprs>();

global_asm!(
    r#"
    .section .text.vm, "ax"
    /* vm_enter(gprs: *mut Gprs, launched: u64) -> ! */
    .global vm_enter
vm_enter:
    movq %rsi, %gs:8
    movq %rdi, %rsp
    popq %rax
    popq %rcx
    popq %rdx
    popq %rbx
    popq %rbp
    popq %rsi
    popq %rdi
    popq %r8
    popq %r9
    popq %r10
    popq %r11
    popq %r12
    popq %r13
    popq %r14
    popq %r15
    cmpq $0, %gs:8
    je 1f
    vmresume
    jmp 2f
1:  vmlaunch
2:  /* VMfail: no VM exit happened; put the registers back and report. */
    pushfq
    popq %gs:8
    pushq %r15
    pushq %r14
    pushq %r13
    pushq %r12
    pushq %r11
    pushq %r10
    pushq %r9
    pushq %r8
    pushq %rdi
    pushq %rsi
    pushq %rbp
    pushq %rbx
    pushq %rdx
    pushq %rcx
    pushq %rax
    movq %gs:0, %rsp
    cld
    call vm_entry_failed
3:  hlt
    jmp 3b

    /* VM exit: RSP = HOST_RSP = end of the vCPU's Gprs. */
    .global vm_exit_entry
vm_exit_entry:
    pushq %r15
    pushq %r14
    pushq %r13
    pushq %r12
    pushq %r11
    pushq %r10
    pushq %r9
    pushq %r8
    pushq %rdi
    pushq %rsi
    pushq %rbp
    pushq %rbx
    pushq %rdx
    pushq %rcx
    pushq %rax
    movq %gs:0, %rsp
    cld
    call vm_exit_dispatch
4:  hlt
    jmp 4b
"#,
    options(att_syntax)
);

unsafe extern "C" {
    fn vm_enter(gprs: *mut Gprs, launched: u64) -> !;
    fn vm_exit_entry();
}

/// Enters the guest whose registers are at `gprs` (the VMCS is current on this CPU).
pub fn enter(gprs: *mut Gprs, launched: bool) -> ! {
    // SAFETY: the caller made the vCPU's VMCS current on this CPU with host state pointing
    // at `vm_exit_entry`, HOST_RSP at the end of `gprs` (a boxed, live vCPU) and this CPU's
    // GS, TR, GDTR and IDTR; the kernel lock is released and interrupts are off.
    unsafe { vm_enter(gprs, u64::from(launched)) }
}

/// VMX-preemption-timer ticks per entry (the timer runs at the TSC rate divided by
/// 2^IA32_VMX_MISC[4:0]; on Bochs 2^5 here, so about 2^25 emulated cycles).
pub const PREEMPTION_SLICE: u64 = 1 << 20;

/// The controls every vCPU gets (negotiated against the capability MSRs, so the same code
/// works on Bochs and on KVM nested).
pub fn controls() -> Option<ControlSet> {
    let caps = crate::vmx::capabilities();
    let required = ControlSet {
        pin_based: PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING,
        primary: ProcessorBasedControls::HLT_EXITING
            | ProcessorBasedControls::UNCONDITIONAL_IO_EXITING
            | ProcessorBasedControls::MOV_DR_EXITING
            | ProcessorBasedControls::RDPMC_EXITING,
        secondary: SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID,
        tertiary: TertiaryControls::empty(),
        exit: ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER,
        entry: EntryControls::LOAD_IA32_EFER,
    };
    let desired = ControlSet {
        pin_based: PinBasedControls::VIRTUAL_NMIS | PinBasedControls::ACTIVATE_VMX_PREEMPTION_TIMER,
        primary: ProcessorBasedControls::empty(),
        secondary: SecondaryControls::UNRESTRICTED_GUEST
            | SecondaryControls::ENABLE_RDTSCP
            | SecondaryControls::ENABLE_INVPCID
            | SecondaryControls::ENABLE_XSAVES_XRSTORS,
        tertiary: TertiaryControls::empty(),
        exit: ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT,
        entry: EntryControls::LOAD_IA32_PAT,
    };
    caps.negotiate_all(&required, &desired).ok()
}

/// Writes the host-state fields that differ per CPU (after VMPTRLD on this CPU).
fn write_host_per_cpu(v: &mut HwVmcs) {
    let pc = percpu::current();
    v.write(F::HOST_GS_BASE, pc as *const percpu::PerCpu as u64);
    v.write(F::HOST_TR_BASE, pc.tss.load(Ordering::Relaxed));
    v.write(F::HOST_GDTR_BASE, pc.gdt.load(Ordering::Relaxed));
    v.write(F::HOST_IDTR_BASE, pc.idt.load(Ordering::Relaxed));
}

/// Makes `vmcs` current on this CPU (the caller has it cleared wherever else it was active).
pub fn make_current(vmcs: u64) -> bool {
    let pc = percpu::current();
    if pc.current_vmcs.load(Ordering::Relaxed) == vmcs {
        return true;
    }
    // SAFETY: the VMCS is the kernel's, initialised with its revision, and not active on any
    // other CPU (the kernel VMCLEARs it there first).
    if unsafe { vmx::vmptrld(vmcs) }.is_err() {
        return false;
    }
    pc.current_vmcs.store(vmcs, Ordering::Relaxed);
    write_host_per_cpu(&mut HwVmcs);
    true
}

/// VMCLEARs `vmcs` on this CPU.
pub fn clear(vmcs: u64) {
    // SAFETY: the VMCS is the kernel's and not running (its vCPU is not current anywhere).
    let _ = unsafe { vmx::vmclear(vmcs) };
    let pc = percpu::current();
    if pc.current_vmcs.load(Ordering::Relaxed) == vmcs {
        pc.current_vmcs.store(0, Ordering::Relaxed);
    }
}

/// Initialises a fresh VMCS (current on this CPU) for a vCPU: controls, host state, and an
/// empty 64-bit-capable guest state the VMM overwrites.
pub fn init_vmcs(v: &mut Vcpu, controls: &ControlSet, eptp: u64) {
    let mut m = HwVmcs;
    let caps = crate::vmx::capabilities();
    m.write(
        F::PIN_BASED_VM_EXECUTION_CONTROLS,
        u64::from(controls.pin_based.bits()),
    );
    m.write(
        F::PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
        u64::from(controls.primary.bits()),
    );
    m.write(
        F::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
        u64::from(controls.secondary.bits()),
    );
    m.write(F::PRIMARY_VM_EXIT_CONTROLS, u64::from(controls.exit.bits()));
    m.write(F::VM_ENTRY_CONTROLS, u64::from(controls.entry.bits()));
    // #DB and #AC are intercepted (benign-exception loops); the VMM reinjects them.
    m.write(F::EXCEPTION_BITMAP, (1 << 1) | (1 << 17));
    m.write(F::EPT_POINTER, eptp);
    m.write(F::VIRTUAL_PROCESSOR_ID, u64::from(v.vpid));
    m.write(F::VMCS_LINK_POINTER, u64::MAX);
    m.write(F::CR3_TARGET_COUNT, 0);
    m.write(F::VM_EXIT_MSR_STORE_COUNT, 0);
    m.write(F::VM_EXIT_MSR_LOAD_COUNT, 0);
    m.write(F::VM_ENTRY_MSR_LOAD_COUNT, 0);
    m.write(F::VM_ENTRY_INTERRUPTION_INFORMATION, 0);
    // A time slice for the guest: the timer counts down from this value at every entry (it
    // is not saved on exit), so a guest that never takes an exit still yields the CPU.
    m.write(F::VMX_PREEMPTION_TIMER_VALUE, PREEMPTION_SLICE);

    // Host state: the kernel as it runs now.
    m.write(F::HOST_CR0, hw::read_cr0());
    m.write(F::HOST_CR3, crate::boot::kernel_pml4());
    m.write(F::HOST_CR4, hw::read_cr4());
    m.write(F::HOST_CS_SELECTOR, u64::from(crate::cpu::KERNEL_CS));
    m.write(F::HOST_SS_SELECTOR, u64::from(crate::cpu::KERNEL_DS));
    m.write(F::HOST_DS_SELECTOR, u64::from(crate::cpu::KERNEL_DS));
    m.write(F::HOST_ES_SELECTOR, u64::from(crate::cpu::KERNEL_DS));
    m.write(F::HOST_FS_SELECTOR, 0);
    m.write(F::HOST_GS_SELECTOR, 0);
    m.write(F::HOST_TR_SELECTOR, u64::from(crate::cpu::TSS_SELECTOR));
    m.write(F::HOST_FS_BASE, 0);
    m.write(F::HOST_IA32_EFER, hw::rdmsr(msr::IA32_EFER));
    m.write(F::HOST_IA32_PAT, hw::rdmsr(msr::IA32_PAT));
    m.write(F::HOST_IA32_SYSENTER_CS, 0);
    m.write(F::HOST_IA32_SYSENTER_ESP, 0);
    m.write(F::HOST_IA32_SYSENTER_EIP, 0);
    m.write(F::HOST_RIP, vm_exit_entry as *const () as u64);
    m.write(
        F::HOST_RSP,
        &v.regs.gprs as *const Gprs as u64 + GPRS_SIZE as u64,
    );
    write_host_per_cpu(&mut m);

    // Guest: 64-bit flat segments, paging off until the VMM writes its state.
    let unrestricted = controls
        .secondary
        .contains(SecondaryControls::UNRESTRICTED_GUEST);
    m.write(F::GUEST_CR0, caps.fixed_cr0(0x30, unrestricted));
    m.write(F::GUEST_CR4, caps.fixed_cr4(0));
    m.write(F::CR4_GUEST_HOST_MASK, caps.fixed_cr4(0));
    m.write(F::CR4_READ_SHADOW, 0);
    m.write(F::GUEST_CR3, 0);
    m.write(F::GUEST_DR7, 0x400);
    m.write(F::GUEST_RFLAGS, 2);
    m.write(F::GUEST_IA32_PAT, 0x0007_0406_0007_0406);
    m.write(F::GUEST_IA32_EFER, 0);
    for (sel, base, limit, ar) in [
        (
            F::GUEST_ES_SELECTOR,
            F::GUEST_ES_BASE,
            F::GUEST_ES_LIMIT,
            F::GUEST_ES_ACCESS_RIGHTS,
        ),
        (
            F::GUEST_SS_SELECTOR,
            F::GUEST_SS_BASE,
            F::GUEST_SS_LIMIT,
            F::GUEST_SS_ACCESS_RIGHTS,
        ),
        (
            F::GUEST_DS_SELECTOR,
            F::GUEST_DS_BASE,
            F::GUEST_DS_LIMIT,
            F::GUEST_DS_ACCESS_RIGHTS,
        ),
        (
            F::GUEST_FS_SELECTOR,
            F::GUEST_FS_BASE,
            F::GUEST_FS_LIMIT,
            F::GUEST_FS_ACCESS_RIGHTS,
        ),
        (
            F::GUEST_GS_SELECTOR,
            F::GUEST_GS_BASE,
            F::GUEST_GS_LIMIT,
            F::GUEST_GS_ACCESS_RIGHTS,
        ),
    ] {
        m.write(sel, 0);
        m.write(base, 0);
        m.write(limit, 0xffff);
        m.write(ar, 0x93);
    }
    m.write(F::GUEST_CS_SELECTOR, 0);
    m.write(F::GUEST_CS_BASE, 0);
    m.write(F::GUEST_CS_LIMIT, 0xffff);
    m.write(F::GUEST_CS_ACCESS_RIGHTS, 0x9b);
    m.write(F::GUEST_LDTR_SELECTOR, 0);
    m.write(F::GUEST_LDTR_ACCESS_RIGHTS, 0x1_0000);
    m.write(F::GUEST_TR_SELECTOR, 0);
    m.write(F::GUEST_TR_BASE, 0);
    m.write(F::GUEST_TR_LIMIT, 0x67);
    m.write(F::GUEST_TR_ACCESS_RIGHTS, 0x8b);
    m.write(F::GUEST_GDTR_BASE, 0);
    m.write(F::GUEST_GDTR_LIMIT, 0xffff);
    m.write(F::GUEST_IDTR_BASE, 0);
    m.write(F::GUEST_IDTR_LIMIT, 0xffff);
    m.write(F::GUEST_ACTIVITY_STATE, 0);
    m.write(F::GUEST_INTERRUPTIBILITY_STATE, 0);
    m.write(F::GUEST_PENDING_DEBUG_EXCEPTIONS, 0);
}

/// Keeps the guest's CR0/CR4 within the VMX fixed bits (SDM Vol. 3D A.7, A.8) after the VMM
/// wrote them: forced bits are set in the real register, owned by the host (guest/host mask)
/// and shown to the guest as the VMM wrote them (read shadow).
pub fn fix_guest_control_registers(unrestricted: bool) {
    let mut m = HwVmcs;
    let caps = crate::vmx::capabilities();
    for (cr, mask, shadow, forced) in [
        (
            F::GUEST_CR0,
            F::CR0_GUEST_HOST_MASK,
            F::CR0_READ_SHADOW,
            caps.fixed_cr0(0, unrestricted),
        ),
        (
            F::GUEST_CR4,
            F::CR4_GUEST_HOST_MASK,
            F::CR4_READ_SHADOW,
            caps.fixed_cr4(0),
        ),
    ] {
        let value = m.read(cr);
        let missing = forced & !value;
        if missing != 0 {
            let owned = m.read(mask);
            let shown = m.read(shadow);
            m.write(shadow, (shown & !missing) | (value & missing));
            m.write(mask, owned | missing);
            m.write(cr, value | missing);
        }
    }
}

/// Captures the exit that just happened (the VMCS is current): its raw fields and the state
/// groups the VMM asked for, as the 78-word message image.
pub fn capture_exit(v: &mut Vcpu, basic: u16) {
    let mask = StateMask::from_bits_truncate(*v.masks.get(usize::from(basic)).unwrap_or(&0))
        | StateMask::EXIT_INFO
        | StateMask::RIP_RSP_RFLAGS;
    ExitMessage::capture_words(&HwVmcs, &v.regs, mask, v.exit_mask, &mut v.exit_words);
    v.exit_mask = mask;
    v.shadow_words = 0;
    if let Some(s) = v
        .shadow
        .as_ref()
        .filter(|s| s.linked && s.written_count > 0)
        && is_vmx_instruction(basic)
    {
        let (fields, n) = (s.written, s.written_count);
        let values = &mut v.shadow_values;
        if with_shadow(s.vmcs, v.vmcs, |m| {
            for (value, field) in values[1..=n].iter_mut().zip(&fields[..n]) {
                *value = m.read(*field);
            }
        })
        .is_some()
        {
            values[0] = n as u64;
            v.shadow_words = 1 + n;
        }
    }
}

/// What a recall message carries: every guest-state group.
pub const RECALL_MASK: StateMask = StateMask::all().difference(StateMask::EXIT_INFO);

/// Captures the current guest state (for a recall or `VcpuReadState`) with `mask`.
pub fn capture_state(v: &Vcpu, mask: StateMask) -> [u64; vcpu::message::EXIT_MESSAGE_WORDS] {
    ExitMessage::capture(&HwVmcs, &v.regs, mask).to_words()
}

/// Captures the current guest state into the vCPU's message buffer.
pub fn capture_state_into(v: &mut Vcpu, mask: StateMask) {
    v.exit_words = capture_state(v, mask);
    v.exit_mask = StateMask::all();
    v.shadow_words = 0;
}

/// The VM-instruction error of the last failed VMX instruction (SDM Vol. 3C 31.4).
pub fn instruction_error() -> u64 {
    HwVmcs.read(F::VM_INSTRUCTION_ERROR)
}

/// Flushes this CPU's cached translations for a vCPU arriving here.
pub fn flush_on_arrival(eptp: u64, vpid: u16) {
    vmx::invept(1, eptp);
    vmx::invvpid(1, vpid);
}
