//! Mode 2 (vCPU 0; any other vCPU just passes): malformed VMX from L1, each case with the
//! outcome the SDM prescribes, in the order of [`CASES`] (each depends on the state the earlier
//! ones leave: a valid current VMCS throughout, clear until the EPT case launches it).
//!
//! VMX instructions report failures as VMfail (SDM Vol. 3C §31.2): VMfailInvalid when there is
//! no current VMCS, else VMfailValid with an error number in the VM-instruction error field
//! (§31.4, `vcpu::VmInstructionError`). A valid VMCS is current in every case below, so each
//! failure the SDM's pseudocode (§31.3) names is a VMfailValid with that number.
//!
//! | case | SDM | expected |
//! |---|---|---|
//! | VMXON in VMX root operation | §31.3 VMXON | VMfailValid 15 |
//! | VMPTRLD of an address not 4 KiB aligned | §31.3 VMPTRLD | VMfailValid 9 |
//! | VMPTRLD of an address beyond the physical-address width | §31.3 VMPTRLD | VMfailValid 9 |
//! | VMPTRLD of the VMXON region | §31.3 VMPTRLD | VMfailValid 10 |
//! | VMPTRLD of a region with a wrong revision identifier | §31.3 VMPTRLD | VMfailValid 11 |
//! | VMCLEAR of an address not 4 KiB aligned | §31.3 VMCLEAR | VMfailValid 2 |
//! | VMCLEAR of the VMXON region | §31.3 VMCLEAR | VMfailValid 3 |
//! | VMREAD of an unsupported field (reserved encoding bit 16) | §31.3 VMREAD, §25.11.2 | VMfailValid 12 |
//! | VMWRITE of an unsupported field | §31.3 VMWRITE | VMfailValid 12 |
//! | VMWRITE of a read-only field (exit qualification) | §31.3 VMWRITE, §A.6 | VMfailValid 13 (VMsucceed if IA32_VMX_MISC[29]) |
//! | INVEPT type 0 (reserved) | §31.3 INVEPT, §A.10 | VMfailValid 28 |
//! | INVEPT type 3 (reserved) | §31.3 INVEPT, §A.10 | VMfailValid 28 |
//! | INVVPID type 4 (reserved) | §31.3 INVVPID, §A.10 | VMfailValid 28 |
//! | VMRESUME of a clear VMCS | §31.3 VMRESUME, §27.1 | VMfailValid 5 |
//! | VMLAUNCH with a pin-based control outside its allowed settings | §27.2.1.1, §A.3.1 | VMfailValid 7 |
//! | L2 reads through an EPT page-directory entry with reserved bit 3 set | §29.3.3.1, Vol. 3D App. C | EPT misconfiguration exit (49) to L1 |
//! | VMLAUNCH of a launched (not clear) VMCS | §31.3 VMLAUNCH, §27.1 | VMfailValid 4 |

use core::fmt;

use ept::entry::PageSize;
use vcpu::exit::ExitReason;
use vcpu::vmcs::{VmInstructionError as E, VmcsField};

use crate::arch::{self, HostTables, RunStatus, VmxStatus};
use crate::hv::Hypervisor;
use crate::layout::{fail, l2, mode};
use crate::memory;
use crate::println;
use crate::vmx::{self, VmFail};

/// What the SDM prescribes.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// VMfailValid with this error number.
    Fail(E),
    /// VMfailValid with this error number, or VMsucceed if IA32_VMX_MISC[29] ("VMWRITE may
    /// write any supported VMCS field") is 1.
    FailUnlessVmwriteAny(E),
    /// A VM exit with this basic reason, taken to L1.
    Exit(ExitReason),
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeed,
    FailInvalid,
    FailValid(u32),
    Exit(u16),
    /// The case could not be carried out (an allocation or L2 failed: the code).
    Error(u32),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeed => write!(f, "VMsucceed"),
            Outcome::FailInvalid => write!(f, "VMfailInvalid"),
            Outcome::FailValid(n) => write!(f, "VMfailValid {n}"),
            Outcome::Exit(reason) => write!(f, "exit {reason}"),
            Outcome::Error(code) => write!(f, "error {code}"),
        }
    }
}

fn outcome(status: VmxStatus) -> Outcome {
    match vmx::check(status) {
        Ok(()) => Outcome::Succeed,
        Err(VmFail::Invalid) => Outcome::FailInvalid,
        Err(VmFail::Valid(n)) => Outcome::FailValid(n),
    }
}

/// VMLAUNCH/VMRESUME from `hv`'s registers: the VMfail, or the exit reason if L2 ran.
fn entry(hv: &mut Hypervisor, launched: bool) -> Outcome {
    match arch::vm_run(&mut hv.regs, launched) {
        RunStatus::Failed(status) => outcome(status),
        RunStatus::HostRspFailed(_) => Outcome::Error(fail::VMX_SETUP),
        RunStatus::Exited => {
            hv.launched = true;
            let reason = vmx::read(VmcsField::EXIT_REASON).unwrap_or(0);
            Outcome::Exit(reason as u16)
        }
    }
}

struct Case {
    name: &'static str,
    sdm: &'static str,
    expect: Expect,
    run: fn(&mut Hypervisor) -> Outcome,
}

/// A VMCS encoding with reserved bit 16 set (bits 31:15 are reserved, §25.11.2): no field.
const UNSUPPORTED_FIELD: u64 = 0x1_0000 | VmcsField::GUEST_CR0.encoding() as u64;

const CASES: &[Case] = &[
    Case {
        name: "VMXON twice",
        sdm: "31.3 VMXON",
        expect: Expect::Fail(E::VmxonInVmxRoot),
        run: |hv| outcome(arch::vmxon(hv.vmxon_region)),
    },
    Case {
        name: "VMPTRLD unaligned",
        sdm: "31.3 VMPTRLD",
        expect: Expect::Fail(E::VmptrldInvalidAddress),
        run: |hv| outcome(arch::vmptrld(hv.vmcs + 0x800)),
    },
    Case {
        name: "VMPTRLD beyond MAXPHYADDR",
        sdm: "31.3 VMPTRLD",
        expect: Expect::Fail(E::VmptrldInvalidAddress),
        run: |hv| outcome(arch::vmptrld(hv.vmx.max_address() + 1)),
    },
    Case {
        name: "VMPTRLD VMXON region",
        sdm: "31.3 VMPTRLD",
        expect: Expect::Fail(E::VmptrldVmxonPointer),
        run: |hv| outcome(arch::vmptrld(hv.vmxon_region)),
    },
    Case {
        name: "VMPTRLD wrong revision",
        sdm: "31.3 VMPTRLD",
        expect: Expect::Fail(E::VmptrldIncorrectRevision),
        run: |hv| match memory::page() {
            Ok(region) => {
                let wrong = hv.vmx.caps.revision_id().wrapping_add(1) & 0x7fff_ffff;
                arch::phys_write(region, u64::from(wrong));
                outcome(arch::vmptrld(region))
            }
            Err(code) => Outcome::Error(code),
        },
    },
    Case {
        name: "VMCLEAR unaligned",
        sdm: "31.3 VMCLEAR",
        expect: Expect::Fail(E::VmclearInvalidAddress),
        run: |hv| outcome(arch::vmclear(hv.vmcs + 0x800)),
    },
    Case {
        name: "VMCLEAR VMXON region",
        sdm: "31.3 VMCLEAR",
        expect: Expect::Fail(E::VmclearVmxonPointer),
        run: |hv| outcome(arch::vmclear(hv.vmxon_region)),
    },
    Case {
        name: "VMREAD unsupported",
        sdm: "31.3 VMREAD, 25.11.2",
        expect: Expect::Fail(E::UnsupportedVmcsComponent),
        run: |_| outcome(arch::vmread(UNSUPPORTED_FIELD).0),
    },
    Case {
        name: "VMWRITE unsupported",
        sdm: "31.3 VMWRITE, 25.11.2",
        expect: Expect::Fail(E::UnsupportedVmcsComponent),
        run: |_| outcome(arch::vmwrite(UNSUPPORTED_FIELD, 0)),
    },
    Case {
        name: "VMWRITE read-only",
        sdm: "31.3 VMWRITE, A.6",
        expect: Expect::FailUnlessVmwriteAny(E::VmwriteReadOnlyComponent),
        run: |_| {
            outcome(arch::vmwrite(
                u64::from(VmcsField::EXIT_QUALIFICATION.encoding()),
                0,
            ))
        },
    },
    Case {
        name: "INVEPT type 0",
        sdm: "31.3 INVEPT, A.10",
        expect: Expect::Fail(E::InvalidInveptInvvpidOperand),
        run: |hv| outcome(arch::invept(0, hv.eptp)),
    },
    Case {
        name: "INVEPT type 3",
        sdm: "31.3 INVEPT, A.10",
        expect: Expect::Fail(E::InvalidInveptInvvpidOperand),
        run: |hv| outcome(arch::invept(3, hv.eptp)),
    },
    Case {
        name: "INVVPID type 4",
        sdm: "31.3 INVVPID, A.10",
        expect: Expect::Fail(E::InvalidInveptInvvpidOperand),
        run: |hv| outcome(arch::invvpid(4, hv.vpid, 0)),
    },
    Case {
        name: "VMRESUME clear VMCS",
        sdm: "31.3 VMRESUME, 27.1",
        expect: Expect::Fail(E::VmresumeNonLaunchedVmcs),
        run: |hv| entry(hv, true),
    },
    Case {
        name: "VMLAUNCH bad pin ctls",
        sdm: "27.2.1.1, A.3.1",
        expect: Expect::Fail(E::EntryInvalidControlFields),
        run: bad_control,
    },
    Case {
        name: "EPT reserved bit",
        sdm: "29.3.3.1, App. C",
        expect: Expect::Exit(ExitReason::EptMisconfiguration),
        run: misconfiguration,
    },
    Case {
        name: "VMLAUNCH launched VMCS",
        sdm: "31.3 VMLAUNCH, 27.1",
        expect: Expect::Fail(E::VmlaunchNonClearVmcs),
        run: |hv| entry(hv, false),
    },
];

/// VMLAUNCH with one pin-based control bit outside the allowed settings (§A.3.1): a bit that
/// may not be 1 set, or else a bit that must be 1 cleared; then the valid value back.
fn bad_control(hv: &mut Hypervisor) -> Outcome {
    let settings = hv.vmx.caps.pin_based_settings();
    let valid = u64::from(hv.vmx.controls.pin_based.bits());
    let not_allowed1 = !settings.allowed1 & 0xffff_ffff;
    let bad = if not_allowed1 != 0 {
        valid | (1 << not_allowed1.trailing_zeros())
    } else if settings.allowed0 != 0 {
        valid & !(1 << settings.allowed0.trailing_zeros())
    } else {
        return Outcome::Error(fail::MALFORMED);
    };
    let field = VmcsField::PIN_BASED_VM_EXECUTION_CONTROLS;
    if vmx::write(field, bad).is_err() {
        return Outcome::Error(fail::VMX_SETUP);
    }
    let result = entry(hv, false);
    if vmx::write(field, valid).is_err() {
        return Outcome::Error(fail::VMX_SETUP);
    }
    result
}

/// Sets reserved bit 3 of the (non-leaf) EPT page-directory entry above
/// [`l2::MISCONFIGURED`] (bits 6:3 are reserved, Vol. 3C Table 29-5), invalidates, and runs
/// L2: its read must exit to L1 as an EPT misconfiguration at that address; L1 repairs the
/// entry and L2 must then read L1's pattern there.
fn misconfiguration(hv: &mut Hypervisor) -> Outcome {
    let slot = match hv.ept.slot(l2::MISCONFIGURED, 2) {
        Ok(slot) => slot,
        Err(code) => return Outcome::Error(code),
    };
    let good = arch::phys_read(slot);
    arch::phys_write(slot, good | 1 << 3);
    hv.misconfigured = Some((l2::MISCONFIGURED, slot, good));
    if let Err(code) = hv.invept() {
        return Outcome::Error(code);
    }
    match hv.run() {
        Ok(0) if hv.counters.misconfigurations == 1 && hv.misconfigured.is_none() => {
            Outcome::Exit(ExitReason::EptMisconfiguration.number())
        }
        Ok(0) => Outcome::Error(fail::UNEXPECTED_EXIT),
        Ok(code) | Err(code) => Outcome::Error(code),
    }
}

/// Mode 2 on vCPU `index`.
pub fn run(index: usize, count: usize, host: HostTables) -> Result<(), u32> {
    if index != 0 {
        return Ok(());
    }
    let mut hv = Hypervisor::new(index, count, mode::MALFORMED, host)?;
    let page = memory::page()?;
    memory::fill_pattern(page, l2::MISCONFIGURED, 0);
    hv.ept.map(l2::MISCONFIGURED, page, PageSize::Size4K)?;
    let vmwrite_any = hv.vmx.caps.misc().vmwrite_any_field;
    let mut failures = 0;
    for (number, case) in CASES.iter().enumerate() {
        let seen = (case.run)(&mut hv);
        let expected = match case.expect {
            Expect::Fail(error) => Outcome::FailValid(error.number()),
            Expect::FailUnlessVmwriteAny(_) if vmwrite_any => Outcome::Succeed,
            Expect::FailUnlessVmwriteAny(error) => Outcome::FailValid(error.number()),
            Expect::Exit(reason) => Outcome::Exit(reason.number()),
        };
        let ok = seen == expected;
        if !ok {
            failures += 1;
        }
        println!(
            "l1hv: m{:02} {}: {seen} (SDM {}) {}",
            number + 1,
            case.name,
            case.sdm,
            if ok { "ok" } else { "MISMATCH" }
        );
        if !ok {
            println!("l1hv:     expected {expected}");
        }
        // Every case must leave L2's VMCS current; a wrongly successful VMPTRLD would not.
        match arch::vmptrst() {
            (VmxStatus::Succeed, current) if current == hv.vmcs => {}
            _ => {
                if vmx::check(arch::vmptrld(hv.vmcs)).is_err() {
                    return Err(fail::VMX_SETUP);
                }
            }
        }
    }
    println!(
        "l1hv: malformed VMX: {} of {} as the SDM prescribes",
        CASES.len() - failures,
        CASES.len()
    );
    if failures != 0 {
        return Err(fail::MALFORMED);
    }
    hv.finish()
}
