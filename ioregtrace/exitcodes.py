"""Names of exit reasons, by ISA, written from the architecture manuals:
VMX basic exit reasons from Intel's SDM (vol. 3, appendix C, "VMX Basic
Exit Reasons"), SVM exit codes from AMD's APM (vol. 2, appendix C, "SVM
Intercept Exit Codes"), and KVM's own kvm_run.exit_reason values from its
uapi (include/uapi/linux/kvm.h, KVM_EXIT_*).

The BPF side stores the numbers; only the views name them."""

import errno

ISA_VMX = 1        # KVM_ISA_VMX, kvm_exit's `isa` field
ISA_SVM = 2        # KVM_ISA_SVM
ISA_NAMES = {ISA_VMX: "vmx", ISA_SVM: "svm"}

VMX_ENTRY_FAILED = 1 << 31       # bit 31 of the exit reason: VM entry failed

VMX_BASIC = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT", 3: "INIT_SIGNAL",
    4: "SIPI", 5: "IO_SMI", 6: "OTHER_SMI", 7: "INTERRUPT_WINDOW", 8: "NMI_WINDOW",
    9: "TASK_SWITCH", 10: "CPUID", 11: "GETSEC", 12: "HLT", 13: "INVD", 14: "INVLPG",
    15: "RDPMC", 16: "RDTSC", 17: "RSM", 18: "VMCALL", 19: "VMCLEAR", 20: "VMLAUNCH",
    21: "VMPTRLD", 22: "VMPTRST", 23: "VMREAD", 24: "VMRESUME", 25: "VMWRITE",
    26: "VMXOFF", 27: "VMXON", 28: "CR_ACCESS", 29: "DR_ACCESS", 30: "IO_INSTRUCTION",
    31: "RDMSR", 32: "WRMSR", 33: "INVALID_GUEST_STATE", 34: "MSR_LOADING",
    36: "MWAIT", 37: "MONITOR_TRAP_FLAG", 39: "MONITOR", 40: "PAUSE",
    41: "MACHINE_CHECK_ON_ENTRY", 43: "TPR_BELOW_THRESHOLD", 44: "APIC_ACCESS",
    45: "VIRTUALIZED_EOI", 46: "GDTR_IDTR_ACCESS", 47: "LDTR_TR_ACCESS",
    48: "EPT_VIOLATION", 49: "EPT_MISCONFIG", 50: "INVEPT", 51: "RDTSCP",
    52: "PREEMPTION_TIMER", 53: "INVVPID", 54: "WBINVD", 55: "XSETBV", 56: "APIC_WRITE",
    57: "RDRAND", 58: "INVPCID", 59: "VMFUNC", 60: "ENCLS", 61: "RDSEED",
    62: "PAGE_MODIFICATION_LOG_FULL", 63: "XSAVES", 64: "XRSTORS", 65: "PCONFIG",
    66: "SPP_EVENT", 67: "UMWAIT", 68: "TPAUSE", 69: "LOADIWKEY", 70: "ENCLV",
    72: "ENQCMD_PASID_FAILURE", 73: "ENQCMDS_PASID_FAILURE", 74: "BUS_LOCK",
    75: "INSTRUCTION_TIMEOUT", 76: "SEAMCALL", 77: "TDCALL", 78: "RDMSRLIST",
    79: "WRMSRLIST",
}

# Exception vectors (APM vol. 2, 8.2), for the EXCP intercepts 0x40 + vector.
VECTORS = {0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM",
           8: "DF", 10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF",
           17: "AC", 18: "MC", 19: "XF", 20: "VE", 21: "CP", 28: "HV", 29: "VC",
           30: "SX"}


def _svm_codes():
    codes = {}
    for cr in range(16):
        codes[0x00 + cr] = f"CR{cr}_READ"
        codes[0x10 + cr] = f"CR{cr}_WRITE"
        codes[0x20 + cr] = f"DR{cr}_READ"
        codes[0x30 + cr] = f"DR{cr}_WRITE"
        codes[0x90 + cr] = f"CR{cr}_WRITE_TRAP"
    for vector in range(32):
        codes[0x40 + vector] = f"EXCP_{VECTORS.get(vector, vector)}"
    for code, name in enumerate((
            "INTR", "NMI", "SMI", "INIT", "VINTR", "CR0_SEL_WRITE", "IDTR_READ",
            "GDTR_READ", "LDTR_READ", "TR_READ", "IDTR_WRITE", "GDTR_WRITE", "LDTR_WRITE",
            "TR_WRITE", "RDTSC", "RDPMC", "PUSHF", "POPF", "CPUID", "RSM", "IRET", "SWINT",
            "INVD", "PAUSE", "HLT", "INVLPG", "INVLPGA", "IOIO", "MSR", "TASK_SWITCH",
            "FERR_FREEZE", "SHUTDOWN", "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI",
            "CLGI", "SKINIT", "RDTSCP", "ICEBP", "WBINVD", "MONITOR", "MWAIT",
            "MWAIT_CONDITIONAL", "XSETBV", "RDPRU", "EFER_WRITE_TRAP"), start=0x60):
        codes[code] = name
    for code, name in enumerate(("INVLPGB", "INVLPGB_ILLEGAL", "INVPCID", "MCOMMIT",
                                 "TLBSYNC", "BUSLOCK", "IDLE_HLT"), start=0xA0):
        codes[code] = name
    codes.update({0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI",
                  0x402: "AVIC_NOACCEL", 0x403: "VMGEXIT",
                  0xFFFFFFFF: "INVALID", 0xFFFFFFFE: "BUSY"})
    return codes


SVM_CODES = _svm_codes()

# kvm_run.exit_reason (KVM_EXIT_*), the reasons KVM_RUN returns to the VMM.
KVM_EXITS = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
    6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
    11: "SET_TPR", 12: "TPR_ACCESS", 13: "S390_SIEIC", 14: "S390_RESET", 15: "DCR",
    16: "NMI", 17: "INTERNAL_ERROR", 18: "OSI", 19: "PAPR_HCALL", 20: "S390_UCONTROL",
    21: "WATCHDOG", 22: "S390_TSCH", 23: "EPR", 24: "SYSTEM_EVENT", 25: "S390_STSI",
    26: "IOAPIC_EOI", 27: "HYPERV", 28: "ARM_NISV", 29: "X86_RDMSR", 30: "X86_WRMSR",
    31: "DIRTY_RING_FULL", 32: "AP_RESET_HOLD", 33: "X86_BUS_LOCK", 34: "XEN",
    35: "RISCV_SBI", 36: "RISCV_CSR", 37: "NOTIFY", 38: "LOONGARCH_IOCSR",
    39: "MEMORY_FAULT", 40: "IOREGIONFD_FAILED",
}
KVM_EXIT_INTR = 10


def hw_reason_name(isa, reason):
    """A hardware exit's name: the VMX basic reason (plus "+FAILED_ENTRY"
    when bit 31 says the VM entry failed), or the SVM exit code."""
    if isa == ISA_VMX:
        basic = reason & 0xFFFF
        name = VMX_BASIC.get(basic, f"VMX_{basic}")
        return name + ("+FAILED_ENTRY" if reason & VMX_ENTRY_FAILED else "")
    if isa == ISA_SVM:
        return SVM_CODES.get(reason, f"SVM_{reason:#x}")
    return f"ISA{isa}_{reason:#x}"


def user_reason_name(reason, err=0):
    """A return from KVM_RUN: kvm_run.exit_reason, and the errno of a
    failed KVM_RUN (a signal: -EINTR with KVM_EXIT_INTR, shown as INTR)."""
    if err and not (err == errno.EINTR and reason == KVM_EXIT_INTR):
        # kvm_run.exit_reason is then what an earlier return left there
        return f"ERROR_{errno.errorcode.get(err, err)}"
    return KVM_EXITS.get(reason, f"EXIT_{reason}")
