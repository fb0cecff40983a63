//! RDMSR/WRMSR: the model-specific registers this CPU implements.
//!
//! Unknown MSRs raise #GP after a warning naming them (Linux probes optional MSRs with
//! rdmsr_safe/wrmsr_safe and copes). kvmclock: writing MSR_KVM_SYSTEM_TIME(_NEW) with the
//! enable bit stores a pvclock_vcpu_time_info at the given guest-physical address; since
//! the guest TSC and guest nanoseconds are one linear clock that stops while the VM is
//! paused, the structure stays valid and is only rewritten on request
//! ([`refresh_kvmclock`]).

use crate::exception::{ExResult, Exception};
use crate::exec::system::SystemState;
use crate::mmu::{is_canonical, Mmu};
use crate::state::*;

pub const IA32_TSC: u32 = 0x10;
pub const IA32_PLATFORM_ID: u32 = 0x17;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_SPEC_CTRL: u32 = 0x48;
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
pub const IA32_MTRRCAP: u32 = 0xfe;
pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
pub const MSR_MISC_FEATURES_ENABLES: u32 = 0x140;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_MTRR_PHYSBASE0: u32 = 0x200;
pub const IA32_MTRR_FIX64K_00000: u32 = 0x250;
pub const IA32_MTRR_FIX16K_80000: u32 = 0x258;
pub const IA32_MTRR_FIX16K_A0000: u32 = 0x259;
pub const IA32_MTRR_FIX4K_C0000: u32 = 0x268;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const IA32_EFER: u32 = 0xc000_0080;
pub const IA32_STAR: u32 = 0xc000_0081;
pub const IA32_LSTAR: u32 = 0xc000_0082;
pub const IA32_CSTAR: u32 = 0xc000_0083;
pub const IA32_FMASK: u32 = 0xc000_0084;
pub const IA32_FS_BASE: u32 = 0xc000_0100;
pub const IA32_GS_BASE: u32 = 0xc000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// MTRRcap: 8 variable ranges, fixed ranges, write-combining.
const MTRR_CAP: u64 = 8 | (1 << 8) | (1 << 10);
/// ARCH_CAPABILITIES: not affected by Meltdown, L1TF, MDS, TAA and friends — an
/// interpreter does not speculate.
const ARCH_CAPS: u64 = 1
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 26)
    | (1 << 27);

fn fixed_mtrr_index(msr: u32) -> Option<usize> {
    match msr {
        IA32_MTRR_FIX64K_00000 => Some(0),
        IA32_MTRR_FIX16K_80000 => Some(1),
        IA32_MTRR_FIX16K_A0000 => Some(2),
        0x268..=0x26f => Some(3 + (msr - IA32_MTRR_FIX4K_C0000) as usize),
        _ => None,
    }
}

/// RDMSR.
pub fn read(state: &CpuState, mmu: &mut Mmu, sys: &mut SystemState, msr: u32) -> ExResult<u64> {
    if let Some(r) = mmu.lapic.read_msr(msr) {
        return r.map_err(|()| Exception::GeneralProtection(0));
    }
    let m = &state.msr;
    Ok(match msr {
        IA32_TSC => sys.tsc(),
        IA32_PLATFORM_ID | IA32_BIOS_SIGN_ID | MSR_MISC_FEATURES_ENABLES => 0,
        // Locked, VMX off.
        IA32_FEATURE_CONTROL => 1,
        IA32_ARCH_CAPABILITIES => ARCH_CAPS,
        IA32_MTRRCAP => MTRR_CAP,
        IA32_SYSENTER_CS => m.sysenter_cs,
        IA32_SYSENTER_ESP => m.sysenter_esp,
        IA32_SYSENTER_EIP => m.sysenter_eip,
        IA32_MISC_ENABLE => m.misc_enable,
        0x200..=0x20f => m.mtrr_var[(msr - IA32_MTRR_PHYSBASE0) as usize],
        IA32_PAT => m.pat,
        IA32_MTRR_DEF_TYPE => m.mtrr_def_type,
        IA32_EFER => state.efer,
        IA32_STAR => m.star,
        IA32_LSTAR => m.lstar,
        IA32_CSTAR => m.cstar,
        IA32_FMASK => m.fmask,
        IA32_FS_BASE => state.seg[FS].base,
        IA32_GS_BASE => state.seg[GS].base,
        IA32_KERNEL_GS_BASE => m.kernel_gs_base,
        IA32_TSC_AUX => m.tsc_aux,
        MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW => sys.kvm_wall_clock,
        MSR_KVM_SYSTEM_TIME | MSR_KVM_SYSTEM_TIME_NEW => sys.kvm_system_time,
        0x4b56_4d02..=0x4b56_4d05 => 0,
        _ => match fixed_mtrr_index(msr) {
            Some(i) => m.mtrr_fixed[i],
            None => {
                tracing::warn!("rdmsr of unknown MSR {msr:#x}: #GP");
                return Err(Exception::GeneralProtection(0));
            }
        },
    })
}

/// WRMSR.
pub fn write(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    msr: u32,
    value: u64,
) -> ExResult<()> {
    if let Some(r) = mmu.lapic.write_msr(msr, value) {
        return r.map_err(|()| Exception::GeneralProtection(0));
    }
    let gp = Err(Exception::GeneralProtection(0));
    let canonical = |v: u64| -> ExResult<u64> {
        if is_canonical(v) {
            Ok(v)
        } else {
            Err(Exception::GeneralProtection(0))
        }
    };
    match msr {
        IA32_TSC => sys.tsc_offset = value.wrapping_sub(sys.clock.tsc()),
        IA32_BIOS_SIGN_ID | IA32_PLATFORM_ID => {}
        MSR_MISC_FEATURES_ENABLES => {
            if value != 0 {
                return gp;
            }
        }
        IA32_SYSENTER_CS => state.msr.sysenter_cs = value & 0xffff,
        IA32_SYSENTER_ESP => state.msr.sysenter_esp = canonical(value)?,
        IA32_SYSENTER_EIP => state.msr.sysenter_eip = canonical(value)?,
        IA32_MISC_ENABLE => state.msr.misc_enable = value,
        0x200..=0x20f => state.msr.mtrr_var[(msr - IA32_MTRR_PHYSBASE0) as usize] = value,
        IA32_PAT => {
            // Each entry must be a valid memory type (0, 1, 4, 5, 6, 7).
            if (0..8).any(|i| matches!((value >> (i * 8)) & 0xff, 2 | 3 | 8..=255)) {
                return gp;
            }
            state.msr.pat = value;
        }
        IA32_MTRR_DEF_TYPE => {
            if value & !0xcff != 0 {
                return gp;
            }
            state.msr.mtrr_def_type = value;
        }
        IA32_EFER => {
            let writable = EFER_SCE | EFER_LME | EFER_NXE;
            if value & !(writable | EFER_LMA) != 0 {
                return gp;
            }
            // LME cannot change while paging is on.
            if state.cr0 & CR0_PG != 0 && (value ^ state.efer) & EFER_LME != 0 {
                return gp;
            }
            let old = state.efer;
            state.efer = (state.efer & EFER_LMA) | (value & writable);
            mmu.sync(state);
            if (old ^ state.efer) & EFER_NXE != 0 {
                mmu.flush_all();
            }
        }
        IA32_STAR => state.msr.star = value,
        IA32_LSTAR => state.msr.lstar = canonical(value)?,
        IA32_CSTAR => state.msr.cstar = canonical(value)?,
        IA32_FMASK => state.msr.fmask = value & 0xffff_ffff,
        IA32_FS_BASE => state.seg[FS].base = canonical(value)?,
        IA32_GS_BASE => state.seg[GS].base = canonical(value)?,
        IA32_KERNEL_GS_BASE => state.msr.kernel_gs_base = canonical(value)?,
        IA32_TSC_AUX => state.msr.tsc_aux = value & 0xffff_ffff,
        MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW => {
            sys.kvm_wall_clock = value;
            let data = sys.clock.pvclock_wall_clock(2);
            if !mmu.ram.write_bytes(value, &data) {
                tracing::warn!("kvmclock wall clock at {value:#x} is not in RAM");
            }
        }
        MSR_KVM_SYSTEM_TIME | MSR_KVM_SYSTEM_TIME_NEW => {
            sys.kvm_system_time = value;
            refresh_kvmclock(mmu, sys);
        }
        0x4b56_4d02..=0x4b56_4d05 => {}
        _ => match fixed_mtrr_index(msr) {
            Some(i) => state.msr.mtrr_fixed[i] = value,
            None => {
                tracing::warn!("wrmsr of unknown MSR {msr:#x} (value {value:#x}): #GP");
                return gp;
            }
        },
    }
    mmu.sync(state);
    Ok(())
}

/// (Re)write the kvmclock time structure if the guest enabled one.
pub fn refresh_kvmclock(mmu: &mut Mmu, sys: &mut SystemState) {
    let value = sys.kvm_system_time;
    if value & 1 == 0 {
        return;
    }
    let gpa = value & !1;
    sys.kvmclock_version = sys.kvmclock_version.wrapping_add(2);
    let mut data = sys.clock.pvclock_time_info(sys.kvmclock_version);
    // The structure maps the guest's TSC (host-derived TSC plus the guest's offset).
    let mut tsc = [0u8; 8];
    tsc.copy_from_slice(&data[8..16]);
    let tsc = u64::from_le_bytes(tsc).wrapping_add(sys.tsc_offset);
    data[8..16].copy_from_slice(&tsc.to_le_bytes());
    if !mmu.ram.write_bytes(gpa, &data) {
        tracing::warn!("kvmclock system time at {gpa:#x} is not in RAM");
    }
}

/// The VM was paused: set PVCLOCK_GUEST_STOPPED in this vCPU's kvmclock structure, which the
/// guest checks (and clears) before it blames the time jump on a lockup.
pub fn mark_guest_stopped(mmu: &mut Mmu, sys: &SystemState) {
    let value = sys.kvm_system_time;
    if value & 1 == 0 {
        return;
    }
    let flags = (value & !1) + crate::clock::PVCLOCK_FLAGS_OFFSET;
    let mut byte = [0u8];
    if mmu.ram.read_bytes(flags, &mut byte) {
        byte[0] |= crate::clock::PVCLOCK_GUEST_STOPPED;
        mmu.ram.write_bytes(flags, &byte);
    }
}
