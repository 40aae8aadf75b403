//! VMCS field encodings, the `VmcsAccess` trait and the VM-instruction error numbers.
//!
//! Every VMCS component is named by a 32-bit *encoding* (SDM Vol. 3C §25.11.2, "VMREAD,
//! VMWRITE, and Encodings of VMCS Fields"):
//!
//! | bits  | meaning                                                                  |
//! |-------|--------------------------------------------------------------------------|
//! | 0     | access type: 0 = full, 1 = high (only for 64-bit fields)                 |
//! | 9:1   | index                                                                    |
//! | 11:10 | type: 0 = control, 1 = VM-exit information (read-only), 2 = guest state, 3 = host state |
//! | 12    | reserved (0)                                                             |
//! | 14:13 | width: 0 = 16-bit, 1 = 64-bit, 2 = 32-bit, 3 = natural width             |
//! | 31:15 | reserved (0)                                                             |
//!
//! The encodings themselves are listed in SDM Vol. 3D Appendix B ("Field Encoding in VMCS").
//! [`ALL_FIELDS`] lists the full encoding of every field this crate knows, sorted by encoding;
//! the `_HIGH` halves of 64-bit fields are reached through [`VmcsField::high`].

use core::fmt;

/// Width of a VMCS field, bits 14:13 of its encoding (SDM Vol. 3C §25.11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldWidth {
    /// 16-bit field (width 0).
    Bits16 = 0,
    /// 64-bit field (width 1); its high half has its own encoding (access type 1).
    Bits64 = 1,
    /// 32-bit field (width 2).
    Bits32 = 2,
    /// Natural-width field (width 3): 64 bits on processors that support Intel 64.
    Natural = 3,
}

impl FieldWidth {
    /// Mask of the value bits a field of this width holds on Intel 64.
    pub const fn value_mask(self) -> u64 {
        match self {
            FieldWidth::Bits16 => 0xffff,
            FieldWidth::Bits32 => 0xffff_ffff,
            FieldWidth::Bits64 | FieldWidth::Natural => u64::MAX,
        }
    }
}

/// Type of a VMCS field, bits 11:10 of its encoding (SDM Vol. 3C §25.11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    /// VM-execution, VM-exit and VM-entry control fields (§25.6-25.8).
    Control = 0,
    /// Read-only VM-exit information fields (§25.9).
    ExitInformation = 1,
    /// Guest-state area (§25.4).
    GuestState = 2,
    /// Host-state area (§25.5).
    HostState = 3,
}

/// Access type, bit 0 of an encoding (SDM Vol. 3C §25.11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessType {
    /// The whole field (the only access type of 16-bit, 32-bit and natural-width fields).
    Full = 0,
    /// Bits 63:32 of a 64-bit field.
    High = 1,
}

/// A VMCS component: the encoding of a known field (SDM Vol. 3D Appendix B).
///
/// Values only come from the associated constants, from [`VmcsField::high`] and from
/// [`VmcsField::from_encoding`], so every `VmcsField` names a field this crate knows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmcsField(u32);

/// Static description of one field: its constant's name and the width and type of the
/// Appendix B table it is listed in (tests check these against the decoded encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDescriptor {
    /// The field.
    pub field: VmcsField,
    /// The name of its associated constant on [`VmcsField`].
    pub name: &'static str,
    /// The width of the Appendix B table listing the field.
    pub width: FieldWidth,
    /// The type of the Appendix B table listing the field.
    pub field_type: FieldType,
}

macro_rules! vmcs_fields {
    ($(
        $(#[$group_doc:meta])*
        group ($width:ident, $ty:ident) {
            $( $(#[$doc:meta])* $name:ident = $enc:literal; )*
        }
    )*) => {
        impl VmcsField {
            $($( $(#[$doc])* pub const $name: VmcsField = VmcsField($enc); )*)*
        }

        /// Every field's descriptor, sorted by encoding.
        pub const FIELD_DESCRIPTORS: &[FieldDescriptor] = &[
            $($( FieldDescriptor {
                field: VmcsField::$name,
                name: stringify!($name),
                width: FieldWidth::$width,
                field_type: FieldType::$ty,
            }, )*)*
        ];

        /// The full encoding of every known field, sorted by encoding (SDM Vol. 3D Appendix B).
        pub const ALL_FIELDS: &[VmcsField] = &[ $($( VmcsField::$name, )*)* ];
    };
}

vmcs_fields! {
    /// SDM Vol. 3D §B.1.1, "16-Bit Control Fields".
    group (Bits16, Control) {
        /// Virtual-processor identifier (VPID), §25.6.12.
        VIRTUAL_PROCESSOR_ID = 0x0000;
        /// Posted-interrupt notification vector, §25.6.8.
        POSTED_INTERRUPT_NOTIFICATION_VECTOR = 0x0002;
        /// EPTP index, §25.6.20 (virtualization exceptions).
        EPTP_INDEX = 0x0004;
        /// HLAT prefix size, §25.6.22.
        HLAT_PREFIX_SIZE = 0x0006;
        /// Last PID-pointer index (IPI virtualization), §25.6.8.
        LAST_PID_POINTER_INDEX = 0x0008;
    }
    /// SDM Vol. 3D §B.1.2, "16-Bit Guest-State Fields".
    group (Bits16, GuestState) {
        /// Guest ES selector, §25.4.1.
        GUEST_ES_SELECTOR = 0x0800;
        /// Guest CS selector.
        GUEST_CS_SELECTOR = 0x0802;
        /// Guest SS selector.
        GUEST_SS_SELECTOR = 0x0804;
        /// Guest DS selector.
        GUEST_DS_SELECTOR = 0x0806;
        /// Guest FS selector.
        GUEST_FS_SELECTOR = 0x0808;
        /// Guest GS selector.
        GUEST_GS_SELECTOR = 0x080A;
        /// Guest LDTR selector.
        GUEST_LDTR_SELECTOR = 0x080C;
        /// Guest TR selector.
        GUEST_TR_SELECTOR = 0x080E;
        /// Guest interrupt status (RVI, SVI), §25.4.2.
        GUEST_INTERRUPT_STATUS = 0x0810;
        /// PML index, §25.4.2.
        PML_INDEX = 0x0812;
        /// Guest UINV (user-interrupt notification vector), §25.4.2.
        GUEST_UINV = 0x0814;
    }
    /// SDM Vol. 3D §B.1.3, "16-Bit Host-State Fields".
    group (Bits16, HostState) {
        /// Host ES selector, §25.5.
        HOST_ES_SELECTOR = 0x0C00;
        /// Host CS selector.
        HOST_CS_SELECTOR = 0x0C02;
        /// Host SS selector.
        HOST_SS_SELECTOR = 0x0C04;
        /// Host DS selector.
        HOST_DS_SELECTOR = 0x0C06;
        /// Host FS selector.
        HOST_FS_SELECTOR = 0x0C08;
        /// Host GS selector.
        HOST_GS_SELECTOR = 0x0C0A;
        /// Host TR selector.
        HOST_TR_SELECTOR = 0x0C0C;
    }
    /// SDM Vol. 3D §B.2.1, "64-Bit Control Fields".
    group (Bits64, Control) {
        /// Address of I/O bitmap A (ports 0000H-7FFFH), §25.6.4.
        IO_BITMAP_A_ADDRESS = 0x2000;
        /// Address of I/O bitmap B (ports 8000H-FFFFH), §25.6.4.
        IO_BITMAP_B_ADDRESS = 0x2002;
        /// Address of MSR bitmaps, §25.6.9.
        MSR_BITMAPS_ADDRESS = 0x2004;
        /// VM-exit MSR-store address, §25.7.2.
        VM_EXIT_MSR_STORE_ADDRESS = 0x2006;
        /// VM-exit MSR-load address, §25.7.2.
        VM_EXIT_MSR_LOAD_ADDRESS = 0x2008;
        /// VM-entry MSR-load address, §25.8.2.
        VM_ENTRY_MSR_LOAD_ADDRESS = 0x200A;
        /// Executive-VMCS pointer, §25.6.10.
        EXECUTIVE_VMCS_POINTER = 0x200C;
        /// PML address, §25.6.19.
        PML_ADDRESS = 0x200E;
        /// TSC offset, §25.6.5.
        TSC_OFFSET = 0x2010;
        /// Virtual-APIC address, §25.6.8.
        VIRTUAL_APIC_ADDRESS = 0x2012;
        /// APIC-access address, §25.6.8.
        APIC_ACCESS_ADDRESS = 0x2014;
        /// Posted-interrupt descriptor address, §25.6.8.
        POSTED_INTERRUPT_DESCRIPTOR_ADDRESS = 0x2016;
        /// VM-function controls, §25.6.14.
        VM_FUNCTION_CONTROLS = 0x2018;
        /// EPT pointer (EPTP), §25.6.11.
        EPT_POINTER = 0x201A;
        /// EOI-exit bitmap 0 (vectors 0-63), §25.6.8.
        EOI_EXIT_BITMAP_0 = 0x201C;
        /// EOI-exit bitmap 1 (vectors 64-127).
        EOI_EXIT_BITMAP_1 = 0x201E;
        /// EOI-exit bitmap 2 (vectors 128-191).
        EOI_EXIT_BITMAP_2 = 0x2020;
        /// EOI-exit bitmap 3 (vectors 192-255).
        EOI_EXIT_BITMAP_3 = 0x2022;
        /// EPTP-list address, §25.6.14.
        EPTP_LIST_ADDRESS = 0x2024;
        /// VMREAD-bitmap address (VMCS shadowing), §25.6.15.
        VMREAD_BITMAP_ADDRESS = 0x2026;
        /// VMWRITE-bitmap address (VMCS shadowing), §25.6.15.
        VMWRITE_BITMAP_ADDRESS = 0x2028;
        /// Virtualization-exception information address, §25.6.20.
        VIRTUALIZATION_EXCEPTION_INFORMATION_ADDRESS = 0x202A;
        /// XSS-exiting bitmap, §25.6.21.
        XSS_EXITING_BITMAP = 0x202C;
        /// ENCLS-exiting bitmap, §25.6.16.
        ENCLS_EXITING_BITMAP = 0x202E;
        /// Sub-page-permission-table pointer, §25.6.23.
        SUB_PAGE_PERMISSION_TABLE_POINTER = 0x2030;
        /// TSC multiplier, §25.6.5.
        TSC_MULTIPLIER = 0x2032;
        /// Tertiary processor-based VM-execution controls, §25.6.2.
        TERTIARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS = 0x2034;
        /// ENCLV-exiting bitmap, §25.6.17.
        ENCLV_EXITING_BITMAP = 0x2036;
        /// Low PASID directory address, §25.6.24.
        LOW_PASID_DIRECTORY_ADDRESS = 0x2038;
        /// High PASID directory address, §25.6.24.
        HIGH_PASID_DIRECTORY_ADDRESS = 0x203A;
        /// Shared EPT pointer.
        SHARED_EPT_POINTER = 0x203C;
        /// PCONFIG-exiting bitmap, §25.6.18.
        PCONFIG_EXITING_BITMAP = 0x203E;
        /// Hypervisor-managed linear-address translation pointer (HLATP), §25.6.22.
        HLAT_POINTER = 0x2040;
        /// PID-pointer table address (IPI virtualization), §25.6.8.
        PID_POINTER_TABLE_ADDRESS = 0x2042;
        /// Secondary VM-exit controls, §25.7.1.
        SECONDARY_VM_EXIT_CONTROLS = 0x2044;
    }
    /// SDM Vol. 3D §B.2.2, "64-Bit Read-Only Data Field".
    group (Bits64, ExitInformation) {
        /// Guest-physical address (EPT violations and misconfigurations), §25.9.1.
        GUEST_PHYSICAL_ADDRESS = 0x2400;
    }
    /// SDM Vol. 3D §B.2.3, "64-Bit Guest-State Fields".
    group (Bits64, GuestState) {
        /// VMCS link pointer (shadow VMCS), §25.4.2.
        VMCS_LINK_POINTER = 0x2800;
        /// Guest IA32_DEBUGCTL.
        GUEST_IA32_DEBUGCTL = 0x2802;
        /// Guest IA32_PAT.
        GUEST_IA32_PAT = 0x2804;
        /// Guest IA32_EFER.
        GUEST_IA32_EFER = 0x2806;
        /// Guest IA32_PERF_GLOBAL_CTRL.
        GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808;
        /// Guest PDPTE0 (PAE paging with EPT), §25.4.2.
        GUEST_PDPTE0 = 0x280A;
        /// Guest PDPTE1.
        GUEST_PDPTE1 = 0x280C;
        /// Guest PDPTE2.
        GUEST_PDPTE2 = 0x280E;
        /// Guest PDPTE3.
        GUEST_PDPTE3 = 0x2810;
        /// Guest IA32_BNDCFGS.
        GUEST_IA32_BNDCFGS = 0x2812;
        /// Guest IA32_RTIT_CTL.
        GUEST_IA32_RTIT_CTL = 0x2814;
        /// Guest IA32_LBR_CTL.
        GUEST_IA32_LBR_CTL = 0x2816;
        /// Guest IA32_PKRS.
        GUEST_IA32_PKRS = 0x2818;
    }
    /// SDM Vol. 3D §B.2.4, "64-Bit Host-State Fields".
    group (Bits64, HostState) {
        /// Host IA32_PAT.
        HOST_IA32_PAT = 0x2C00;
        /// Host IA32_EFER.
        HOST_IA32_EFER = 0x2C02;
        /// Host IA32_PERF_GLOBAL_CTRL.
        HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04;
        /// Host IA32_PKRS.
        HOST_IA32_PKRS = 0x2C06;
    }
    /// SDM Vol. 3D §B.3.1, "32-Bit Control Fields".
    group (Bits32, Control) {
        /// Pin-based VM-execution controls, §25.6.1.
        PIN_BASED_VM_EXECUTION_CONTROLS = 0x4000;
        /// Primary processor-based VM-execution controls, §25.6.2.
        PRIMARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS = 0x4002;
        /// Exception bitmap, §25.6.3.
        EXCEPTION_BITMAP = 0x4004;
        /// Page-fault error-code mask, §25.6.3.
        PAGE_FAULT_ERROR_CODE_MASK = 0x4006;
        /// Page-fault error-code match, §25.6.3.
        PAGE_FAULT_ERROR_CODE_MATCH = 0x4008;
        /// CR3-target count, §25.6.7.
        CR3_TARGET_COUNT = 0x400A;
        /// Primary VM-exit controls, §25.7.1.
        PRIMARY_VM_EXIT_CONTROLS = 0x400C;
        /// VM-exit MSR-store count, §25.7.2.
        VM_EXIT_MSR_STORE_COUNT = 0x400E;
        /// VM-exit MSR-load count, §25.7.2.
        VM_EXIT_MSR_LOAD_COUNT = 0x4010;
        /// VM-entry controls, §25.8.1.
        VM_ENTRY_CONTROLS = 0x4012;
        /// VM-entry MSR-load count, §25.8.2.
        VM_ENTRY_MSR_LOAD_COUNT = 0x4014;
        /// VM-entry interruption-information field, §25.8.3.
        VM_ENTRY_INTERRUPTION_INFORMATION = 0x4016;
        /// VM-entry exception error code, §25.8.3.
        VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018;
        /// VM-entry instruction length, §25.8.3.
        VM_ENTRY_INSTRUCTION_LENGTH = 0x401A;
        /// TPR threshold, §25.6.8.
        TPR_THRESHOLD = 0x401C;
        /// Secondary processor-based VM-execution controls, §25.6.2.
        SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS = 0x401E;
        /// PLE_Gap, §25.6.13.
        PLE_GAP = 0x4020;
        /// PLE_Window, §25.6.13.
        PLE_WINDOW = 0x4022;
        /// Instruction-timeout control, §25.6.25.
        INSTRUCTION_TIMEOUT_CONTROL = 0x4024;
    }
    /// SDM Vol. 3D §B.3.2, "32-Bit Read-Only Data Fields".
    group (Bits32, ExitInformation) {
        /// VM-instruction error, §25.9.5.
        VM_INSTRUCTION_ERROR = 0x4400;
        /// Exit reason, §25.9.1.
        EXIT_REASON = 0x4402;
        /// VM-exit interruption information, §25.9.2.
        VM_EXIT_INTERRUPTION_INFORMATION = 0x4404;
        /// VM-exit interruption error code, §25.9.2.
        VM_EXIT_INTERRUPTION_ERROR_CODE = 0x4406;
        /// IDT-vectoring information, §25.9.3.
        IDT_VECTORING_INFORMATION = 0x4408;
        /// IDT-vectoring error code, §25.9.3.
        IDT_VECTORING_ERROR_CODE = 0x440A;
        /// VM-exit instruction length, §25.9.4.
        VM_EXIT_INSTRUCTION_LENGTH = 0x440C;
        /// VM-exit instruction information, §25.9.4.
        VM_EXIT_INSTRUCTION_INFORMATION = 0x440E;
    }
    /// SDM Vol. 3D §B.3.3, "32-Bit Guest-State Fields".
    group (Bits32, GuestState) {
        /// Guest ES limit, §25.4.1.
        GUEST_ES_LIMIT = 0x4800;
        /// Guest CS limit.
        GUEST_CS_LIMIT = 0x4802;
        /// Guest SS limit.
        GUEST_SS_LIMIT = 0x4804;
        /// Guest DS limit.
        GUEST_DS_LIMIT = 0x4806;
        /// Guest FS limit.
        GUEST_FS_LIMIT = 0x4808;
        /// Guest GS limit.
        GUEST_GS_LIMIT = 0x480A;
        /// Guest LDTR limit.
        GUEST_LDTR_LIMIT = 0x480C;
        /// Guest TR limit.
        GUEST_TR_LIMIT = 0x480E;
        /// Guest GDTR limit.
        GUEST_GDTR_LIMIT = 0x4810;
        /// Guest IDTR limit.
        GUEST_IDTR_LIMIT = 0x4812;
        /// Guest ES access rights (format: §25.4.1).
        GUEST_ES_ACCESS_RIGHTS = 0x4814;
        /// Guest CS access rights.
        GUEST_CS_ACCESS_RIGHTS = 0x4816;
        /// Guest SS access rights.
        GUEST_SS_ACCESS_RIGHTS = 0x4818;
        /// Guest DS access rights.
        GUEST_DS_ACCESS_RIGHTS = 0x481A;
        /// Guest FS access rights.
        GUEST_FS_ACCESS_RIGHTS = 0x481C;
        /// Guest GS access rights.
        GUEST_GS_ACCESS_RIGHTS = 0x481E;
        /// Guest LDTR access rights.
        GUEST_LDTR_ACCESS_RIGHTS = 0x4820;
        /// Guest TR access rights.
        GUEST_TR_ACCESS_RIGHTS = 0x4822;
        /// Guest interruptibility state, §25.4.2 (see [`Interruptibility`]).
        GUEST_INTERRUPTIBILITY_STATE = 0x4824;
        /// Guest activity state, §25.4.2 (see [`ActivityState`]).
        GUEST_ACTIVITY_STATE = 0x4826;
        /// Guest SMBASE.
        GUEST_SMBASE = 0x4828;
        /// Guest IA32_SYSENTER_CS.
        GUEST_IA32_SYSENTER_CS = 0x482A;
        /// VMX-preemption timer value, §25.4.2.
        VMX_PREEMPTION_TIMER_VALUE = 0x482E;
    }
    /// SDM Vol. 3D §B.3.4, "32-Bit Host-State Field".
    group (Bits32, HostState) {
        /// Host IA32_SYSENTER_CS.
        HOST_IA32_SYSENTER_CS = 0x4C00;
    }
    /// SDM Vol. 3D §B.4.1, "Natural-Width Control Fields".
    group (Natural, Control) {
        /// CR0 guest/host mask, §25.6.6.
        CR0_GUEST_HOST_MASK = 0x6000;
        /// CR4 guest/host mask.
        CR4_GUEST_HOST_MASK = 0x6002;
        /// CR0 read shadow.
        CR0_READ_SHADOW = 0x6004;
        /// CR4 read shadow.
        CR4_READ_SHADOW = 0x6006;
        /// CR3-target value 0, §25.6.7.
        CR3_TARGET_VALUE_0 = 0x6008;
        /// CR3-target value 1.
        CR3_TARGET_VALUE_1 = 0x600A;
        /// CR3-target value 2.
        CR3_TARGET_VALUE_2 = 0x600C;
        /// CR3-target value 3.
        CR3_TARGET_VALUE_3 = 0x600E;
    }
    /// SDM Vol. 3D §B.4.2, "Natural-Width Read-Only Data Fields".
    group (Natural, ExitInformation) {
        /// Exit qualification, §25.9.1 (formats: Vol. 3C §28.2.1).
        EXIT_QUALIFICATION = 0x6400;
        /// I/O RCX (SMIs after I/O instructions), §25.9.4.
        IO_RCX = 0x6402;
        /// I/O RSI.
        IO_RSI = 0x6404;
        /// I/O RDI.
        IO_RDI = 0x6406;
        /// I/O RIP.
        IO_RIP = 0x6408;
        /// Guest-linear address, §25.9.1.
        GUEST_LINEAR_ADDRESS = 0x640A;
    }
    /// SDM Vol. 3D §B.4.3, "Natural-Width Guest-State Fields".
    group (Natural, GuestState) {
        /// Guest CR0, §25.4.1.
        GUEST_CR0 = 0x6800;
        /// Guest CR3.
        GUEST_CR3 = 0x6802;
        /// Guest CR4.
        GUEST_CR4 = 0x6804;
        /// Guest ES base.
        GUEST_ES_BASE = 0x6806;
        /// Guest CS base.
        GUEST_CS_BASE = 0x6808;
        /// Guest SS base.
        GUEST_SS_BASE = 0x680A;
        /// Guest DS base.
        GUEST_DS_BASE = 0x680C;
        /// Guest FS base.
        GUEST_FS_BASE = 0x680E;
        /// Guest GS base.
        GUEST_GS_BASE = 0x6810;
        /// Guest LDTR base.
        GUEST_LDTR_BASE = 0x6812;
        /// Guest TR base.
        GUEST_TR_BASE = 0x6814;
        /// Guest GDTR base.
        GUEST_GDTR_BASE = 0x6816;
        /// Guest IDTR base.
        GUEST_IDTR_BASE = 0x6818;
        /// Guest DR7.
        GUEST_DR7 = 0x681A;
        /// Guest RSP.
        GUEST_RSP = 0x681C;
        /// Guest RIP.
        GUEST_RIP = 0x681E;
        /// Guest RFLAGS.
        GUEST_RFLAGS = 0x6820;
        /// Guest pending debug exceptions, §25.4.2.
        GUEST_PENDING_DEBUG_EXCEPTIONS = 0x6822;
        /// Guest IA32_SYSENTER_ESP.
        GUEST_IA32_SYSENTER_ESP = 0x6824;
        /// Guest IA32_SYSENTER_EIP.
        GUEST_IA32_SYSENTER_EIP = 0x6826;
        /// Guest IA32_S_CET.
        GUEST_IA32_S_CET = 0x6828;
        /// Guest SSP.
        GUEST_SSP = 0x682A;
        /// Guest IA32_INTERRUPT_SSP_TABLE_ADDR.
        GUEST_IA32_INTERRUPT_SSP_TABLE_ADDR = 0x682C;
    }
    /// SDM Vol. 3D §B.4.4, "Natural-Width Host-State Fields".
    group (Natural, HostState) {
        /// Host CR0, §25.5.
        HOST_CR0 = 0x6C00;
        /// Host CR3.
        HOST_CR3 = 0x6C02;
        /// Host CR4.
        HOST_CR4 = 0x6C04;
        /// Host FS base.
        HOST_FS_BASE = 0x6C06;
        /// Host GS base.
        HOST_GS_BASE = 0x6C08;
        /// Host TR base.
        HOST_TR_BASE = 0x6C0A;
        /// Host GDTR base.
        HOST_GDTR_BASE = 0x6C0C;
        /// Host IDTR base.
        HOST_IDTR_BASE = 0x6C0E;
        /// Host IA32_SYSENTER_ESP.
        HOST_IA32_SYSENTER_ESP = 0x6C10;
        /// Host IA32_SYSENTER_EIP.
        HOST_IA32_SYSENTER_EIP = 0x6C12;
        /// Host RSP.
        HOST_RSP = 0x6C14;
        /// Host RIP.
        HOST_RIP = 0x6C16;
        /// Host IA32_S_CET.
        HOST_IA32_S_CET = 0x6C18;
        /// Host SSP.
        HOST_SSP = 0x6C1A;
        /// Host IA32_INTERRUPT_SSP_TABLE_ADDR.
        HOST_IA32_INTERRUPT_SSP_TABLE_ADDR = 0x6C1C;
    }
}

impl VmcsField {
    /// Bits that must be zero in every encoding: bit 12 and bits 31:15 (§25.11.2).
    pub const RESERVED_ENCODING_BITS: u32 = 0xffff_8000 | (1 << 12);

    /// Builds the encoding of a component from its parts (SDM Vol. 3C §25.11.2).
    pub const fn compose(
        width: FieldWidth,
        field_type: FieldType,
        index: u16,
        access: AccessType,
    ) -> u32 {
        ((width as u32) << 13)
            | ((field_type as u32) << 10)
            | (((index & 0x1ff) as u32) << 1)
            | access as u32
    }

    /// The 32-bit encoding, as the VMREAD/VMWRITE register operand.
    pub const fn encoding(self) -> u32 {
        self.0
    }

    /// Width, bits 14:13.
    pub const fn width(self) -> FieldWidth {
        match (self.0 >> 13) & 3 {
            0 => FieldWidth::Bits16,
            1 => FieldWidth::Bits64,
            2 => FieldWidth::Bits32,
            _ => FieldWidth::Natural,
        }
    }

    /// Type, bits 11:10.
    pub const fn field_type(self) -> FieldType {
        match (self.0 >> 10) & 3 {
            0 => FieldType::Control,
            1 => FieldType::ExitInformation,
            2 => FieldType::GuestState,
            _ => FieldType::HostState,
        }
    }

    /// Access type, bit 0.
    pub const fn access_type(self) -> AccessType {
        if self.0 & 1 == 0 {
            AccessType::Full
        } else {
            AccessType::High
        }
    }

    /// Index, bits 9:1 (IA32_VMX_VMCS_ENUM reports the highest index in use, SDM Vol. 3D §A.9).
    pub const fn index(self) -> u16 {
        ((self.0 >> 1) & 0x1ff) as u16
    }

    /// Whether the field is a read-only VM-exit information field (VMWRITE to it fails with
    /// error 13 unless IA32_VMX_MISC\[29\] is set).
    pub const fn is_read_only(self) -> bool {
        matches!(self.field_type(), FieldType::ExitInformation)
    }

    /// Mask of the bits an access of this component transfers: the width's mask, or 32 bits for
    /// the high half of a 64-bit field.
    pub const fn value_mask(self) -> u64 {
        match self.access_type() {
            AccessType::High => 0xffff_ffff,
            AccessType::Full => self.width().value_mask(),
        }
    }

    /// The `_HIGH` encoding (bits 63:32) of a 64-bit field; `None` for other widths and for a
    /// high encoding itself.
    pub const fn high(self) -> Option<VmcsField> {
        match (self.width(), self.access_type()) {
            (FieldWidth::Bits64, AccessType::Full) => Some(VmcsField(self.0 | 1)),
            _ => None,
        }
    }

    /// The full field this component belongs to (itself unless it is a high half).
    pub const fn full(self) -> VmcsField {
        VmcsField(self.0 & !1)
    }

    /// Validates a field encoding, e.g. the register operand of an L1 VMREAD/VMWRITE: `Some`
    /// for the full encoding of every field in [`ALL_FIELDS`] and the high encoding of its 64-bit
    /// fields, `None` otherwise (for VMREAD/VMWRITE that is
    /// [`VmInstructionError::UnsupportedVmcsComponent`], error 12).
    pub fn from_encoding(encoding: u32) -> Option<VmcsField> {
        if encoding & Self::RESERVED_ENCODING_BITS != 0 {
            return None;
        }
        let full = VmcsField(encoding & !1);
        let position = full.position()?;
        let field = ALL_FIELDS[position];
        if encoding & 1 == 0 {
            Some(field)
        } else {
            field.high()
        }
    }

    /// Position of the (full) field in [`ALL_FIELDS`] and [`FIELD_DESCRIPTORS`]: one table
    /// lookup ([`POSITIONS`]), as every VMREAD and VMWRITE of an in-memory VMCS needs it.
    pub fn position(self) -> Option<usize> {
        let key = position_key(self.0)?;
        match POSITIONS[key] {
            NO_POSITION => None,
            p => Some(p as usize),
        }
    }

    /// The field's descriptor (that of the full field for a high half).
    pub fn descriptor(self) -> Option<&'static FieldDescriptor> {
        self.position().map(|p| &FIELD_DESCRIPTORS[p])
    }

    /// The name of the field's constant (`"?"` cannot occur for a constructed field).
    pub fn name(self) -> &'static str {
        self.descriptor().map_or("?", |d| d.name)
    }
}

/// Index bits [`POSITIONS`] covers (every defined field's index is below 64; IA32_VMX_VMCS_ENUM
/// of current processors reports at most 0x32).
const POSITION_INDEX_BITS: u32 = 6;
const NO_POSITION: u8 = u8::MAX;

/// The [`POSITIONS`] slot of an encoding: width, type and index (the access-type bit and the
/// reserved bits ignored); `None` for an index beyond the table.
const fn position_key(encoding: u32) -> Option<usize> {
    let index = (encoding >> 1) & 0x1ff;
    if index >= 1 << POSITION_INDEX_BITS || encoding & VmcsField::RESERVED_ENCODING_BITS != 0 {
        return None;
    }
    let class = (((encoding >> 13) & 3) << 2) | ((encoding >> 10) & 3);
    Some(((class << POSITION_INDEX_BITS) | index) as usize)
}

/// Encoding (width, type, index) -> position in [`ALL_FIELDS`], built at compile time.
static POSITIONS: [u8; 16 << POSITION_INDEX_BITS] = {
    assert!(ALL_FIELDS.len() < NO_POSITION as usize);
    let mut table = [NO_POSITION; 16 << POSITION_INDEX_BITS];
    let mut i = 0;
    while i < ALL_FIELDS.len() {
        match position_key(ALL_FIELDS[i].0) {
            Some(key) => table[key] = i as u8,
            None => panic!("a VMCS field index beyond the position table"),
        }
        i += 1;
    }
    table
};

impl fmt::Debug for VmcsField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.access_type() {
            AccessType::Full => write!(f, "{}({:#06x})", self.name(), self.0),
            AccessType::High => write!(f, "{}_HIGH({:#06x})", self.name(), self.0),
        }
    }
}

/// Reads and writes of the current VMCS, shared by the kernel (VMREAD/VMWRITE in its hardware
/// module) and by everything that works on VMCS contents: servers' host tests, the nested
/// server's in-memory VMCS of an L1 hypervisor ([`VmcsImage`]).
///
/// Values are zero-extended; writes of a narrower field ignore the high bits of `value`, as
/// VMWRITE does (SDM Vol. 3C §31.3, VMWRITE).
pub trait VmcsAccess {
    /// Reads a field (VMREAD).
    fn read(&self, field: VmcsField) -> u64;
    /// Writes a field (VMWRITE).
    fn write(&mut self, field: VmcsField, value: u64);

    /// Reads a 32-bit field.
    fn read32(&self, field: VmcsField) -> u32 {
        self.read(field) as u32
    }

    /// Reads a 16-bit field.
    fn read16(&self, field: VmcsField) -> u16 {
        self.read(field) as u16
    }

    /// Read-modify-write of a field.
    fn update(&mut self, field: VmcsField, f: impl FnOnce(u64) -> u64)
    where
        Self: Sized,
    {
        let value = f(self.read(field));
        self.write(field, value);
    }
}

/// A VMCS held in ordinary memory, one slot per field of [`ALL_FIELDS`]: the fake VMCS of host
/// tests and the nested server's image of an L1 hypervisor's VMCS. `no_std`, no allocation.
#[derive(Clone, PartialEq, Eq)]
pub struct VmcsImage {
    values: [u64; ALL_FIELDS.len()],
}

impl VmcsImage {
    /// An image with every field zero.
    pub const fn new() -> Self {
        VmcsImage {
            values: [0; ALL_FIELDS.len()],
        }
    }

    /// The value of the full field at `position` in [`ALL_FIELDS`] ([`VmcsField::position`]):
    /// what `read` of that field gives, for a caller that looked the position up once.
    pub fn value_at(&self, position: usize) -> Option<u64> {
        self.values.get(position).copied()
    }
}

impl Default for VmcsImage {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for VmcsImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (field, value) in ALL_FIELDS.iter().zip(self.values.iter()) {
            if *value != 0 {
                map.entry(field, value);
            }
        }
        map.finish()
    }
}

impl VmcsAccess for VmcsImage {
    fn read(&self, field: VmcsField) -> u64 {
        let Some(position) = field.position() else {
            return 0;
        };
        let value = self.values[position];
        match field.access_type() {
            AccessType::Full => value,
            AccessType::High => value >> 32,
        }
    }

    fn write(&mut self, field: VmcsField, value: u64) {
        let Some(position) = field.position() else {
            return;
        };
        let slot = &mut self.values[position];
        match field.access_type() {
            AccessType::Full => *slot = value & field.value_mask(),
            AccessType::High => *slot = (*slot & 0xffff_ffff) | (value << 32),
        }
    }
}

bitflags::bitflags! {
    /// Guest interruptibility state (SDM Vol. 3C §25.4.2, "Guest Non-Register State").
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct Interruptibility: u32 {
        /// Blocking by STI.
        const BLOCKING_BY_STI = 1 << 0;
        /// Blocking by MOV SS.
        const BLOCKING_BY_MOV_SS = 1 << 1;
        /// Blocking by SMI.
        const BLOCKING_BY_SMI = 1 << 2;
        /// Blocking by NMI.
        const BLOCKING_BY_NMI = 1 << 3;
        /// Enclave interruption.
        const ENCLAVE_INTERRUPTION = 1 << 4;
    }
}

/// Guest activity state (SDM Vol. 3C §25.4.2); support for states other than active is
/// reported in IA32_VMX_MISC bits 8:6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActivityState {
    /// 0: active.
    Active = 0,
    /// 1: HLT.
    Hlt = 1,
    /// 2: shutdown.
    Shutdown = 2,
    /// 3: wait-for-SIPI.
    WaitForSipi = 3,
}

impl ActivityState {
    /// Decodes the activity-state field; `None` for values the SDM does not define.
    pub const fn from_raw(value: u32) -> Option<ActivityState> {
        match value {
            0 => Some(ActivityState::Active),
            1 => Some(ActivityState::Hlt),
            2 => Some(ActivityState::Shutdown),
            3 => Some(ActivityState::WaitForSipi),
            _ => None,
        }
    }
}

macro_rules! instruction_errors {
    ($( $(#[$doc:meta])* $name:ident = $number:literal, $text:literal; )*) => {
        /// VM-instruction error numbers (SDM Vol. 3C §31.4, "VM Instruction Error Numbers"), as
        /// read from the VM-instruction error field after VMfailValid, and as the nested server
        /// reports them to an L1 hypervisor.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum VmInstructionError {
            $( $(#[$doc])* $name = $number, )*
        }

        impl VmInstructionError {
            /// Every defined error, in ascending order.
            pub const ALL: &'static [VmInstructionError] = &[$(VmInstructionError::$name,)*];

            /// Decodes an error number; `None` for reserved numbers (14, 21, 27, >28).
            pub const fn from_number(number: u32) -> Option<VmInstructionError> {
                match number {
                    $( $number => Some(VmInstructionError::$name), )*
                    _ => None,
                }
            }

            /// The SDM's description of the error.
            pub const fn description(self) -> &'static str {
                match self {
                    $( VmInstructionError::$name => $text, )*
                }
            }
        }
    };
}

instruction_errors! {
    /// 1.
    VmcallInVmxRoot = 1, "VMCALL executed in VMX root operation";
    /// 2.
    VmclearInvalidAddress = 2, "VMCLEAR with invalid physical address";
    /// 3.
    VmclearVmxonPointer = 3, "VMCLEAR with VMXON pointer";
    /// 4.
    VmlaunchNonClearVmcs = 4, "VMLAUNCH with non-clear VMCS";
    /// 5.
    VmresumeNonLaunchedVmcs = 5, "VMRESUME with non-launched VMCS";
    /// 6.
    VmresumeAfterVmxoff = 6, "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)";
    /// 7.
    EntryInvalidControlFields = 7, "VM entry with invalid control field(s)";
    /// 8.
    EntryInvalidHostStateFields = 8, "VM entry with invalid host-state field(s)";
    /// 9.
    VmptrldInvalidAddress = 9, "VMPTRLD with invalid physical address";
    /// 10.
    VmptrldVmxonPointer = 10, "VMPTRLD with VMXON pointer";
    /// 11.
    VmptrldIncorrectRevision = 11, "VMPTRLD with incorrect VMCS revision identifier";
    /// 12.
    UnsupportedVmcsComponent = 12, "VMREAD/VMWRITE from/to unsupported VMCS component";
    /// 13.
    VmwriteReadOnlyComponent = 13, "VMWRITE to read-only VMCS component";
    /// 15.
    VmxonInVmxRoot = 15, "VMXON executed in VMX root operation";
    /// 16.
    EntryInvalidExecutiveVmcsPointer = 16, "VM entry with invalid executive-VMCS pointer";
    /// 17.
    EntryNonLaunchedExecutiveVmcs = 17, "VM entry with non-launched executive VMCS";
    /// 18.
    EntryExecutiveVmcsNotVmxonPointer = 18, "VM entry with executive-VMCS pointer not VMXON pointer";
    /// 19.
    VmcallNonClearVmcs = 19, "VMCALL with non-clear VMCS";
    /// 20.
    VmcallInvalidExitControls = 20, "VMCALL with invalid VM-exit control fields";
    /// 22.
    VmcallIncorrectMsegRevision = 22, "VMCALL with incorrect MSEG revision identifier";
    /// 23.
    VmxoffUnderDualMonitor = 23, "VMXOFF under dual-monitor treatment of SMIs and SMM";
    /// 24.
    VmcallInvalidSmmMonitorFeatures = 24, "VMCALL with invalid SMM-monitor features";
    /// 25.
    EntryInvalidExecutiveControls = 25, "VM entry with invalid VM-execution control fields in executive VMCS";
    /// 26.
    EntryEventsBlockedByMovSs = 26, "VM entry with events blocked by MOV SS";
    /// 28.
    InvalidInveptInvvpidOperand = 28, "Invalid operand to INVEPT/INVVPID";
}

impl VmInstructionError {
    /// The error number.
    pub const fn number(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VM-instruction error {}: {}",
            self.number(),
            self.description()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_fields_are_sorted_and_unique() {
        assert!(ALL_FIELDS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ALL_FIELDS.len(), FIELD_DESCRIPTORS.len());
    }

    #[test]
    fn the_position_table_agrees_with_a_search_for_every_16_bit_encoding() {
        for encoding in 0..=0xffffu32 {
            let field = VmcsField(encoding);
            let searched = ALL_FIELDS.iter().position(|&f| f == field.full());
            assert_eq!(field.position(), searched, "{encoding:#x}");
        }
        assert_eq!(VmcsField(0x1_0000 | 0x681e).position(), None);
    }

    #[test]
    fn every_field_decodes_to_the_width_and_type_of_its_appendix_b_table() {
        for d in FIELD_DESCRIPTORS {
            let f = d.field;
            assert_eq!(f.width(), d.width, "{}", d.name);
            assert_eq!(f.field_type(), d.field_type, "{}", d.name);
            assert_eq!(f.access_type(), AccessType::Full, "{}", d.name);
            assert_eq!(
                f.encoding() & VmcsField::RESERVED_ENCODING_BITS,
                0,
                "{}",
                d.name
            );
            assert_eq!(
                VmcsField::compose(d.width, d.field_type, f.index(), AccessType::Full),
                f.encoding(),
                "{}",
                d.name
            );
            assert_eq!(
                VmcsField::from_encoding(f.encoding()),
                Some(f),
                "{}",
                d.name
            );
            assert_eq!(f.name(), d.name);
            // Names follow the type: host fields say HOST, guest fields are guest state.
            if d.name.starts_with("HOST_") {
                assert_eq!(d.field_type, FieldType::HostState, "{}", d.name);
            }
            let exit_information = ["GUEST_PHYSICAL_ADDRESS", "GUEST_LINEAR_ADDRESS"];
            if d.name.starts_with("GUEST_") && !exit_information.contains(&d.name) {
                assert!(
                    matches!(d.field_type, FieldType::GuestState),
                    "{} is not guest state",
                    d.name
                );
            }
        }
    }

    #[test]
    fn high_halves_exist_only_for_64_bit_fields() {
        for &f in ALL_FIELDS {
            match f.width() {
                FieldWidth::Bits64 => {
                    let high = f.high().unwrap();
                    assert_eq!(high.encoding(), f.encoding() | 1);
                    assert_eq!(high.access_type(), AccessType::High);
                    assert_eq!(high.full(), f);
                    assert_eq!(high.high(), None);
                    assert_eq!(VmcsField::from_encoding(f.encoding() | 1), Some(high));
                    assert_eq!(high.value_mask(), 0xffff_ffff);
                }
                _ => {
                    assert_eq!(f.high(), None);
                    assert_eq!(VmcsField::from_encoding(f.encoding() | 1), None);
                }
            }
        }
    }

    #[test]
    fn encodings_match_sdm_appendix_b_for_representative_fields() {
        let table: &[(VmcsField, u32, FieldWidth, FieldType, u16)] = &[
            (
                VmcsField::VIRTUAL_PROCESSOR_ID,
                0x0000,
                FieldWidth::Bits16,
                FieldType::Control,
                0,
            ),
            (
                VmcsField::GUEST_TR_SELECTOR,
                0x080E,
                FieldWidth::Bits16,
                FieldType::GuestState,
                7,
            ),
            (
                VmcsField::PML_INDEX,
                0x0812,
                FieldWidth::Bits16,
                FieldType::GuestState,
                9,
            ),
            (
                VmcsField::HOST_TR_SELECTOR,
                0x0C0C,
                FieldWidth::Bits16,
                FieldType::HostState,
                6,
            ),
            (
                VmcsField::IO_BITMAP_A_ADDRESS,
                0x2000,
                FieldWidth::Bits64,
                FieldType::Control,
                0,
            ),
            (
                VmcsField::MSR_BITMAPS_ADDRESS,
                0x2004,
                FieldWidth::Bits64,
                FieldType::Control,
                2,
            ),
            (
                VmcsField::PML_ADDRESS,
                0x200E,
                FieldWidth::Bits64,
                FieldType::Control,
                7,
            ),
            (
                VmcsField::POSTED_INTERRUPT_DESCRIPTOR_ADDRESS,
                0x2016,
                FieldWidth::Bits64,
                FieldType::Control,
                11,
            ),
            (
                VmcsField::EPT_POINTER,
                0x201A,
                FieldWidth::Bits64,
                FieldType::Control,
                13,
            ),
            (
                VmcsField::VMREAD_BITMAP_ADDRESS,
                0x2026,
                FieldWidth::Bits64,
                FieldType::Control,
                19,
            ),
            (
                VmcsField::VMWRITE_BITMAP_ADDRESS,
                0x2028,
                FieldWidth::Bits64,
                FieldType::Control,
                20,
            ),
            (
                VmcsField::GUEST_PHYSICAL_ADDRESS,
                0x2400,
                FieldWidth::Bits64,
                FieldType::ExitInformation,
                0,
            ),
            (
                VmcsField::VMCS_LINK_POINTER,
                0x2800,
                FieldWidth::Bits64,
                FieldType::GuestState,
                0,
            ),
            (
                VmcsField::GUEST_IA32_EFER,
                0x2806,
                FieldWidth::Bits64,
                FieldType::GuestState,
                3,
            ),
            (
                VmcsField::HOST_IA32_EFER,
                0x2C02,
                FieldWidth::Bits64,
                FieldType::HostState,
                1,
            ),
            (
                VmcsField::PIN_BASED_VM_EXECUTION_CONTROLS,
                0x4000,
                FieldWidth::Bits32,
                FieldType::Control,
                0,
            ),
            (
                VmcsField::SECONDARY_PROCESSOR_BASED_VM_EXECUTION_CONTROLS,
                0x401E,
                FieldWidth::Bits32,
                FieldType::Control,
                15,
            ),
            (
                VmcsField::VM_INSTRUCTION_ERROR,
                0x4400,
                FieldWidth::Bits32,
                FieldType::ExitInformation,
                0,
            ),
            (
                VmcsField::EXIT_REASON,
                0x4402,
                FieldWidth::Bits32,
                FieldType::ExitInformation,
                1,
            ),
            (
                VmcsField::VM_EXIT_INSTRUCTION_INFORMATION,
                0x440E,
                FieldWidth::Bits32,
                FieldType::ExitInformation,
                7,
            ),
            (
                VmcsField::GUEST_INTERRUPTIBILITY_STATE,
                0x4824,
                FieldWidth::Bits32,
                FieldType::GuestState,
                18,
            ),
            (
                VmcsField::GUEST_ACTIVITY_STATE,
                0x4826,
                FieldWidth::Bits32,
                FieldType::GuestState,
                19,
            ),
            (
                VmcsField::VMX_PREEMPTION_TIMER_VALUE,
                0x482E,
                FieldWidth::Bits32,
                FieldType::GuestState,
                23,
            ),
            (
                VmcsField::HOST_IA32_SYSENTER_CS,
                0x4C00,
                FieldWidth::Bits32,
                FieldType::HostState,
                0,
            ),
            (
                VmcsField::CR0_GUEST_HOST_MASK,
                0x6000,
                FieldWidth::Natural,
                FieldType::Control,
                0,
            ),
            (
                VmcsField::EXIT_QUALIFICATION,
                0x6400,
                FieldWidth::Natural,
                FieldType::ExitInformation,
                0,
            ),
            (
                VmcsField::GUEST_LINEAR_ADDRESS,
                0x640A,
                FieldWidth::Natural,
                FieldType::ExitInformation,
                5,
            ),
            (
                VmcsField::GUEST_CR0,
                0x6800,
                FieldWidth::Natural,
                FieldType::GuestState,
                0,
            ),
            (
                VmcsField::GUEST_RIP,
                0x681E,
                FieldWidth::Natural,
                FieldType::GuestState,
                15,
            ),
            (
                VmcsField::GUEST_PENDING_DEBUG_EXCEPTIONS,
                0x6822,
                FieldWidth::Natural,
                FieldType::GuestState,
                17,
            ),
            (
                VmcsField::HOST_RIP,
                0x6C16,
                FieldWidth::Natural,
                FieldType::HostState,
                11,
            ),
        ];
        for &(field, encoding, width, ty, index) in table {
            assert_eq!(field.encoding(), encoding, "{field:?}");
            assert_eq!(field.width(), width, "{field:?}");
            assert_eq!(field.field_type(), ty, "{field:?}");
            assert_eq!(field.index(), index, "{field:?}");
        }
    }

    #[test]
    fn unsupported_or_malformed_encodings_are_rejected_like_vmfail_12() {
        // Reserved bit 12, bits 31:15, an unlisted index, the gap at 0x482C.
        for enc in [
            0x1000,
            0x0000_8000,
            0x8000_0000,
            0x4826 | 0x1000,
            0x482C,
            0x0816,
            0x6C1E,
        ] {
            assert_eq!(VmcsField::from_encoding(enc), None, "{enc:#x}");
        }
    }

    #[test]
    fn read_only_fields_are_exactly_the_exit_information_type() {
        for &f in ALL_FIELDS {
            assert_eq!(
                f.is_read_only(),
                f.field_type() == FieldType::ExitInformation
            );
        }
        assert!(VmcsField::EXIT_REASON.is_read_only());
        assert!(!VmcsField::GUEST_RIP.is_read_only());
    }

    #[test]
    fn vmcs_image_truncates_to_the_field_width_and_splits_64_bit_halves() {
        let mut vmcs = VmcsImage::new();
        vmcs.write(VmcsField::GUEST_CS_SELECTOR, 0xdead_beef);
        assert_eq!(vmcs.read(VmcsField::GUEST_CS_SELECTOR), 0xbeef);
        vmcs.write(VmcsField::EXCEPTION_BITMAP, u64::MAX);
        assert_eq!(vmcs.read(VmcsField::EXCEPTION_BITMAP), 0xffff_ffff);
        vmcs.write(VmcsField::EPT_POINTER, 0x1122_3344_5566_7788);
        let high = VmcsField::EPT_POINTER.high().unwrap();
        assert_eq!(vmcs.read(high), 0x1122_3344);
        vmcs.write(high, 0xaabb_ccdd);
        assert_eq!(vmcs.read(VmcsField::EPT_POINTER), 0xaabb_ccdd_5566_7788);
        vmcs.update(VmcsField::GUEST_RIP, |rip| rip + 3);
        assert_eq!(vmcs.read(VmcsField::GUEST_RIP), 3);
    }

    #[test]
    fn instruction_error_numbers_match_sdm_31_4() {
        use VmInstructionError as E;
        let table = [
            (1, E::VmcallInVmxRoot),
            (2, E::VmclearInvalidAddress),
            (3, E::VmclearVmxonPointer),
            (4, E::VmlaunchNonClearVmcs),
            (5, E::VmresumeNonLaunchedVmcs),
            (6, E::VmresumeAfterVmxoff),
            (7, E::EntryInvalidControlFields),
            (8, E::EntryInvalidHostStateFields),
            (9, E::VmptrldInvalidAddress),
            (10, E::VmptrldVmxonPointer),
            (11, E::VmptrldIncorrectRevision),
            (12, E::UnsupportedVmcsComponent),
            (13, E::VmwriteReadOnlyComponent),
            (15, E::VmxonInVmxRoot),
            (26, E::EntryEventsBlockedByMovSs),
            (28, E::InvalidInveptInvvpidOperand),
        ];
        for (n, e) in table {
            assert_eq!(e.number(), n);
            assert_eq!(E::from_number(n), Some(e));
        }
        for reserved in [0, 14, 21, 27, 29, u32::MAX] {
            assert_eq!(E::from_number(reserved), None);
        }
        assert_eq!(E::ALL.len(), 25);
        assert!(
            E::ALL
                .iter()
                .all(|e| E::from_number(e.number()) == Some(*e))
        );
    }

    #[test]
    fn activity_state_decodes_only_sdm_values() {
        assert_eq!(ActivityState::from_raw(1), Some(ActivityState::Hlt));
        assert_eq!(ActivityState::from_raw(3), Some(ActivityState::WaitForSipi));
        assert_eq!(ActivityState::from_raw(4), None);
    }
}
