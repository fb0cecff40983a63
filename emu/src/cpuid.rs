//! The CPUID model: a conservative Intel family-6 CPU that advertises only what the
//! emulator implements, plus the KVM paravirtual leaves so Linux uses kvmclock.

/// Brand string shown in /proc/cpuinfo (48 bytes, NUL padded).
pub const BRAND: &str = "vmm emu x86-64 CPU";

const FAMILY: u32 = 6;
const MODEL: u32 = 0x3a;
const STEPPING: u32 = 9;

// Leaf 1 EDX.
const FPU: u32 = 1 << 0;
const PSE: u32 = 1 << 3;
const TSC: u32 = 1 << 4;
const MSR: u32 = 1 << 5;
const PAE: u32 = 1 << 6;
const CX8: u32 = 1 << 8;
const APIC: u32 = 1 << 9;
const SEP: u32 = 1 << 11;
const MTRR: u32 = 1 << 12;
const PGE: u32 = 1 << 13;
const CMOV: u32 = 1 << 15;
const PAT: u32 = 1 << 16;
const PSE36: u32 = 1 << 17;
const CLFSH: u32 = 1 << 19;
const MMX: u32 = 1 << 23;
const FXSR: u32 = 1 << 24;
const SSE: u32 = 1 << 25;
const SSE2: u32 = 1 << 26;
const HTT: u32 = 1 << 28;
// Leaf 1 ECX.
const CX16: u32 = 1 << 13;
const X2APIC: u32 = 1 << 21;
const TSC_DEADLINE: u32 = 1 << 24;
const HYPERVISOR: u32 = 1 << 31;
// Leaf 7 EDX.
const ARCH_CAPABILITIES: u32 = 1 << 29;
// Leaf 0x80000001.
const LAHF_LM: u32 = 1 << 0;
const SYSCALL: u32 = 1 << 11;
const NX: u32 = 1 << 20;
const PAGE1GB: u32 = 1 << 26;
const RDTSCP: u32 = 1 << 27;
const LM: u32 = 1 << 29;
// KVM features (leaf 0x40000001 EAX).
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

const MAX_BASIC: u32 = 0xb;
const MAX_EXTENDED: u32 = 0x8000_0008;

/// Bits needed to number `n` logical CPUs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn ascii_regs(s: &[u8; 12]) -> [u32; 3] {
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// Four registers of the brand string for leaf 0x80000002 + `part`.
fn brand(part: u32) -> [u32; 4] {
    let mut bytes = [0u8; 48];
    let b = BRAND.as_bytes();
    bytes[..b.len()].copy_from_slice(b);
    let base = part as usize * 16;
    let word = |i: usize| {
        let o = base + i * 4;
        u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
    };
    [word(0), word(1), word(2), word(3)]
}

/// CPUID for `leaf`/`subleaf` on the CPU with `apic_id` in a machine of `num_cpus`.
/// Returns [EAX, EBX, ECX, EDX].
pub fn cpuid(leaf: u32, subleaf: u32, apic_id: u32, num_cpus: u32) -> [u32; 4] {
    let num_cpus = num_cpus.max(1);
    match leaf {
        0 => {
            let v = ascii_regs(b"GenuineIntel");
            // EBX, EDX, ECX order: "Genu" "ineI" "ntel".
            [MAX_BASIC, v[0], v[2], v[1]]
        }
        1 => {
            let eax =
                (STEPPING & 0xf) | ((MODEL & 0xf) << 4) | (FAMILY << 8) | ((MODEL >> 4) << 16);
            let mut edx = FPU
                | PSE
                | TSC
                | MSR
                | PAE
                | CX8
                | APIC
                | SEP
                | MTRR
                | PGE
                | CMOV
                | PAT
                | PSE36
                | CLFSH
                | MMX
                | FXSR
                | SSE
                | SSE2;
            if num_cpus > 1 {
                edx |= HTT;
            }
            let ecx = CX16 | X2APIC | TSC_DEADLINE | HYPERVISOR;
            let logical = num_cpus.next_power_of_two().min(255);
            let ebx = (8 << 8) | (logical << 16) | ((apic_id & 0xff) << 24);
            [eax, ebx, ecx, edx]
        }
        // No cache descriptors in leaf 2 ("use leaf 4"), and leaf 4 lists no caches.
        2 => [1, 0, 0, 0],
        7 if subleaf == 0 => [0, 0, 0, ARCH_CAPABILITIES],
        0xb => {
            let bits = id_bits(num_cpus);
            match subleaf {
                // SMT level: one thread per core.
                0 => [0, 1, 1 << 8, apic_id],
                // Core level: every CPU is a core of one package.
                1 => [bits, num_cpus, 1 | (2 << 8), apic_id],
                _ => [0, 0, subleaf & 0xff, apic_id],
            }
        }
        0x4000_0000 => {
            let v = ascii_regs(b"KVMKVMKVM\0\0\0");
            [0x4000_0001, v[0], v[1], v[2]]
        }
        0x4000_0001 => [
            KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
            0,
            0,
            0,
        ],
        0x8000_0000 => [MAX_EXTENDED, 0, 0, 0],
        0x8000_0001 => [0, 0, LAHF_LM, SYSCALL | NX | PAGE1GB | RDTSCP | LM],
        0x8000_0002..=0x8000_0004 => brand(leaf - 0x8000_0002),
        // Invariant TSC.
        0x8000_0007 => [0, 0, 0, 1 << 8],
        0x8000_0008 => [crate::mmu::PHYS_ADDR_BITS | (48 << 8), 0, 0, 0],
        _ => [0, 0, 0, 0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_brand_and_features() {
        let r = cpuid(0, 0, 0, 1);
        let mut v = Vec::new();
        for reg in [r[1], r[3], r[2]] {
            v.extend_from_slice(&reg.to_le_bytes());
        }
        assert_eq!(&v, b"GenuineIntel");
        let mut b = Vec::new();
        for leaf in 0x8000_0002..=0x8000_0004 {
            for reg in cpuid(leaf, 0, 0, 1) {
                b.extend_from_slice(&reg.to_le_bytes());
            }
        }
        assert!(b.starts_with(BRAND.as_bytes()));
        let l1 = cpuid(1, 0, 3, 4);
        assert_eq!(l1[1] >> 24, 3, "initial APIC id");
        assert_ne!(l1[3] & HTT, 0);
        assert_eq!(cpuid(1, 0, 0, 1)[3] & HTT, 0);
        assert_eq!(l1[2] & (1 << 28), 0, "no AVX");
        assert_eq!(l1[2] & (1 << 26), 0, "no XSAVE");
        assert_eq!(cpuid(0x4000_0001, 0, 0, 1)[0], (1 << 3) | (1 << 24));
        assert_eq!(cpuid(0xb, 1, 2, 4)[0..2], [2, 4]);
    }
}
