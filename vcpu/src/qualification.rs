//! The EPT-violation exit-qualification layout, decoded and encoded in this one place.
//!
//! SDM Vol. 3C §28.2.1, "Basic VM-Exit Information", table "Exit Qualification for EPT
//! Violations". The exit decoder reads it from hardware; the nested engine builds it to inject
//! an EPT violation into an L1 hypervisor (from its shadow-EPT walk). Both go through
//! [`EptViolationQualification`], so there is exactly one bit layout.

/// Exit qualification of an EPT violation (basic exit reason 48).
///
/// The permission bits describe the guest-physical access as the AND (read, write, supervisor
/// execute) of the EPT paging-structure entries walked; bits 9-11 are only defined when the
/// processor reports advanced VM-exit information (IA32_VMX_EPT_VPID_CAP\[22\]) and bits 7 and
/// 8 are both 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EptViolationQualification {
    /// Bit 0: the access was a data read.
    pub read: bool,
    /// Bit 1: the access was a data write.
    pub write: bool,
    /// Bit 2: the access was an instruction fetch.
    pub fetch: bool,
    /// Bit 3: the guest-physical address was readable.
    pub readable: bool,
    /// Bit 4: the guest-physical address was writable.
    pub writable: bool,
    /// Bit 5: the guest-physical address was executable (for supervisor-mode linear addresses
    /// when "mode-based execute control for EPT" is 1).
    pub executable: bool,
    /// Bit 6: executable for user-mode linear addresses (mode-based execute control only).
    pub user_executable: bool,
    /// Bit 7: the guest-linear-address field is valid.
    pub gla_valid: bool,
    /// Bit 8 (if bit 7): 1 = the access was to the translation of a linear address, 0 = to a
    /// guest paging-structure entry during the translation.
    pub gla_is_translation: bool,
    /// Bit 9 (advanced information): the linear address was user-mode.
    pub user_mode_linear: bool,
    /// Bit 10 (advanced information): the linear address was writable (read/write).
    pub writable_linear: bool,
    /// Bit 11 (advanced information): the linear address was execute-disable.
    pub execute_disable_linear: bool,
    /// Bit 12: NMI unblocking due to IRET.
    pub nmi_unblocking: bool,
    /// Bit 13: the access was a shadow-stack access.
    pub shadow_stack: bool,
    /// Bit 14: the EPT entry's supervisor shadow-stack bit was set (if enabled).
    pub supervisor_shadow_stack: bool,
    /// Bit 15: the violation came from guest-paging verification.
    pub guest_paging_verification: bool,
    /// Bit 16: the access was asynchronous to instruction execution.
    pub asynchronous: bool,
}

impl EptViolationQualification {
    /// The bits this layout defines (16:0); the rest of the qualification is reserved.
    pub const DEFINED_BITS: u64 = 0x1_ffff;

    /// Decodes a raw exit qualification; reserved bits are ignored.
    pub const fn decode(raw: u64) -> EptViolationQualification {
        const fn bit(raw: u64, n: u32) -> bool {
            raw & (1 << n) != 0
        }
        EptViolationQualification {
            read: bit(raw, 0),
            write: bit(raw, 1),
            fetch: bit(raw, 2),
            readable: bit(raw, 3),
            writable: bit(raw, 4),
            executable: bit(raw, 5),
            user_executable: bit(raw, 6),
            gla_valid: bit(raw, 7),
            gla_is_translation: bit(raw, 8),
            user_mode_linear: bit(raw, 9),
            writable_linear: bit(raw, 10),
            execute_disable_linear: bit(raw, 11),
            nmi_unblocking: bit(raw, 12),
            shadow_stack: bit(raw, 13),
            supervisor_shadow_stack: bit(raw, 14),
            guest_paging_verification: bit(raw, 15),
            asynchronous: bit(raw, 16),
        }
    }

    /// Encodes the qualification, e.g. to write it into an L1 hypervisor's VMCS.
    pub const fn encode(&self) -> u64 {
        let flags = [
            self.read,
            self.write,
            self.fetch,
            self.readable,
            self.writable,
            self.executable,
            self.user_executable,
            self.gla_valid,
            self.gla_is_translation,
            self.user_mode_linear,
            self.writable_linear,
            self.execute_disable_linear,
            self.nmi_unblocking,
            self.shadow_stack,
            self.supervisor_shadow_stack,
            self.guest_paging_verification,
            self.asynchronous,
        ];
        let mut raw = 0;
        let mut n = 0;
        while n < flags.len() {
            if flags[n] {
                raw |= 1 << n;
            }
            n += 1;
        }
        raw
    }

    /// Whether the access was denied by the permissions reported: a read without `readable`,
    /// a write without `writable` or a fetch without `executable` (or `user_executable`).
    pub const fn is_permission_fault(&self) -> bool {
        (self.read && !self.readable)
            || (self.write && !self.writable)
            || (self.fetch && !self.executable && !self.user_executable)
    }

    /// Whether no permission at all was granted: the translation was not present.
    pub const fn entry_not_present(&self) -> bool {
        !(self.readable || self.writable || self.executable || self.user_executable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read_of_a_not_present_entry_through_a_linear_translation_is_0x181() {
        let q = EptViolationQualification {
            read: true,
            gla_valid: true,
            gla_is_translation: true,
            ..Default::default()
        };
        assert_eq!(q.encode(), 0x181);
        assert!(q.entry_not_present());
        assert!(q.is_permission_fault());
    }

    #[test]
    fn write_to_a_read_only_page_sets_bits_1_3_5() {
        let q = EptViolationQualification::decode(0x2a);
        assert!(q.write && q.readable && q.executable);
        assert!(!q.writable && !q.read && !q.gla_valid);
        assert!(q.is_permission_fault());
        assert!(!q.entry_not_present());
    }

    proptest! {
        #[test]
        fn decode_then_encode_keeps_exactly_the_defined_bits(raw in any::<u64>()) {
            let q = EptViolationQualification::decode(raw);
            prop_assert_eq!(q.encode(), raw & EptViolationQualification::DEFINED_BITS);
        }

        #[test]
        fn encode_then_decode_is_the_identity(raw in 0u64..(1 << 17)) {
            let q = EptViolationQualification::decode(raw);
            prop_assert_eq!(EptViolationQualification::decode(q.encode()), q);
        }
    }
}
