//! SSE tests: integer SIMD results are checked against the host's SSE2 intrinsics on
//! random inputs; floating point against Rust's f32/f64 arithmetic.

use super::*;
use crate::access::test_util::FlatMemory;
use crate::state::{CR0_PE, CS, EFER_LMA, EFER_LME};
use core::arch::x86_64::*;
type BinOp = fn(f64, f64) -> f64;

use iced_x86::{Decoder, DecoderOptions};

fn cpu() -> CpuState {
    let mut s = CpuState::power_on();
    s.cr0 |= CR0_PE;
    s.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LMA | EFER_LME;
    s.seg[CS].l = true;
    s
}

fn decode(bytes: &[u8]) -> Instruction {
    let i = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode();
    assert!(!i.is_invalid(), "bad encoding {bytes:02x?}");
    i
}

fn exec(s: &mut CpuState, m: &mut FlatMemory, bytes: &[u8]) -> ExResult<()> {
    let i = decode(bytes);
    execute(s, m, &i).unwrap_or_else(|| panic!("not implemented: {i}"))
}

fn v(x: __m128i) -> u128 {
    // SAFETY: plain 16-byte reinterpretation.
    unsafe { core::mem::transmute(x) }
}
fn m(x: u128) -> __m128i {
    // SAFETY: plain 16-byte reinterpretation.
    unsafe { core::mem::transmute(x) }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Random 128 bits with a bias towards edge values in some lanes.
    fn xmm(&mut self) -> u128 {
        let mut x = (u128::from(self.next()) << 64) | u128::from(self.next());
        match self.next() % 4 {
            0 => x |= 0x8000_7fff_ff00_0080_8000_7fff_ff00_0080,
            1 => x &= 0x00ff_00ff_7fff_0000_ffff_ffff_0000_8000,
            _ => {}
        }
        x
    }
}

type Oracle = unsafe fn(__m128i, __m128i) -> __m128i;

#[test]
fn integer_ops_match_host_sse2() {
    let table: &[(u8, Oracle)] = &[
        (0xfc, _mm_add_epi8),
        (0xfd, _mm_add_epi16),
        (0xfe, _mm_add_epi32),
        (0xd4, _mm_add_epi64),
        (0xf8, _mm_sub_epi8),
        (0xf9, _mm_sub_epi16),
        (0xfa, _mm_sub_epi32),
        (0xfb, _mm_sub_epi64),
        (0xec, _mm_adds_epi8),
        (0xed, _mm_adds_epi16),
        (0xe8, _mm_subs_epi8),
        (0xe9, _mm_subs_epi16),
        (0xdc, _mm_adds_epu8),
        (0xdd, _mm_adds_epu16),
        (0xd8, _mm_subs_epu8),
        (0xd9, _mm_subs_epu16),
        (0x74, _mm_cmpeq_epi8),
        (0x75, _mm_cmpeq_epi16),
        (0x76, _mm_cmpeq_epi32),
        (0x64, _mm_cmpgt_epi8),
        (0x65, _mm_cmpgt_epi16),
        (0x66, _mm_cmpgt_epi32),
        (0xdb, _mm_and_si128),
        (0xdf, _mm_andnot_si128),
        (0xeb, _mm_or_si128),
        (0xef, _mm_xor_si128),
        (0xda, _mm_min_epu8),
        (0xde, _mm_max_epu8),
        (0xea, _mm_min_epi16),
        (0xee, _mm_max_epi16),
        (0xe0, _mm_avg_epu8),
        (0xe3, _mm_avg_epu16),
        (0xd5, _mm_mullo_epi16),
        (0xe5, _mm_mulhi_epi16),
        (0xe4, _mm_mulhi_epu16),
        (0xf4, _mm_mul_epu32),
        (0xf5, _mm_madd_epi16),
        (0xf6, _mm_sad_epu8),
        (0x60, _mm_unpacklo_epi8),
        (0x61, _mm_unpacklo_epi16),
        (0x62, _mm_unpacklo_epi32),
        (0x6c, _mm_unpacklo_epi64),
        (0x68, _mm_unpackhi_epi8),
        (0x69, _mm_unpackhi_epi16),
        (0x6a, _mm_unpackhi_epi32),
        (0x6d, _mm_unpackhi_epi64),
        (0x63, _mm_packs_epi16),
        (0x6b, _mm_packs_epi32),
        (0x67, _mm_packus_epi16),
        (0xf1, _mm_sll_epi16),
        (0xf2, _mm_sll_epi32),
        (0xf3, _mm_sll_epi64),
        (0xd1, _mm_srl_epi16),
        (0xd2, _mm_srl_epi32),
        (0xd3, _mm_srl_epi64),
        (0xe1, _mm_sra_epi16),
        (0xe2, _mm_sra_epi32),
    ];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    for &(opcode, oracle) in table {
        for round in 0..200 {
            let a = rng.xmm();
            let mut b = rng.xmm();
            if [0xd1, 0xd2, 0xd3, 0xe1, 0xe2, 0xf1, 0xf2, 0xf3].contains(&opcode) {
                // Shift counts: mostly in range, sometimes huge.
                b = if round % 5 == 0 {
                    b
                } else {
                    u128::from(rng.next() % 70)
                };
            }
            s.xmm[0] = a;
            s.xmm[1] = b;
            // op xmm0, xmm1
            exec(&mut s, &mut mem, &[0x66, 0x0f, opcode, 0xc1]).unwrap();
            // SAFETY: SSE2 is part of the x86-64 baseline.
            let want = v(unsafe { oracle(m(a), m(b)) });
            assert_eq!(s.xmm[0], want, "opcode {opcode:#x} a={a:#x} b={b:#x}");
            assert_eq!(s.xmm[1], b);
        }
    }
}

#[test]
fn float_bitwise_ops() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    s.xmm[2] = 0xf0f0;
    s.xmm[3] = 0x0ff0;
    exec(&mut s, &mut mem, &[0x0f, 0x57, 0xd3]).unwrap(); // xorps xmm2, xmm3
    assert_eq!(s.xmm[2], 0xff00);
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0x54, 0xd3]).unwrap(); // andpd xmm2, xmm3
    assert_eq!(s.xmm[2], 0x0f00);
    exec(&mut s, &mut mem, &[0x0f, 0x55, 0xd3]).unwrap(); // andnps xmm2, xmm3
    assert_eq!(s.xmm[2], 0x00f0);
    exec(&mut s, &mut mem, &[0x0f, 0x56, 0xd3]).unwrap(); // orps xmm2, xmm3
    assert_eq!(s.xmm[2], 0x0ff0);
}

#[test]
fn immediate_shifts_and_shuffles() {
    let mut rng = Rng(99);
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    for _ in 0..100 {
        let a = rng.xmm();
        let run = |s: &mut CpuState, mem: &mut FlatMemory, bytes: &[u8]| {
            s.xmm[0] = a;
            s.xmm[1] = a;
            exec(s, mem, bytes).unwrap();
            s.xmm[0]
        };
        // SAFETY: SSE2 intrinsics on the x86-64 baseline.
        unsafe {
            let x = m(a);
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x70, 0xc1, 0x1b]),
                v(_mm_shuffle_epi32::<0x1b>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0xf2, 0x0f, 0x70, 0xc1, 0x9c]),
                v(_mm_shufflelo_epi16::<0x9c>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0xf3, 0x0f, 0x70, 0xc1, 0x4e]),
                v(_mm_shufflehi_epi16::<0x4e>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x71, 0xf0, 0x03]),
                v(_mm_slli_epi16::<3>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x71, 0xd0, 0x11]),
                v(_mm_srli_epi16::<17>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x71, 0xe0, 0x0f]),
                v(_mm_srai_epi16::<15>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x72, 0xe0, 0x40]),
                v(_mm_srai_epi32::<64>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x72, 0xf0, 0x1f]),
                v(_mm_slli_epi32::<31>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x73, 0xd0, 0x21]),
                v(_mm_srli_epi64::<33>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x73, 0xd8, 0x05]),
                v(_mm_srli_si128::<5>(x))
            );
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0x73, 0xf8, 0x0b]),
                v(_mm_slli_si128::<11>(x))
            );
            assert_eq!(run(&mut s, &mut mem, &[0x66, 0x0f, 0x73, 0xf8, 0x10]), 0);
            let y = _mm_castsi128_ps(x);
            assert_eq!(
                run(&mut s, &mut mem, &[0x0f, 0xc6, 0xc1, 0xb1]),
                v(_mm_castps_si128(_mm_shuffle_ps::<0xb1>(y, y)))
            );
            let d = _mm_castsi128_pd(x);
            assert_eq!(
                run(&mut s, &mut mem, &[0x66, 0x0f, 0xc6, 0xc1, 0x01]),
                v(_mm_castpd_si128(_mm_shuffle_pd::<1>(d, d)))
            );
            // pmovmskb eax, xmm1
            s.xmm[1] = a;
            exec(&mut s, &mut mem, &[0x66, 0x0f, 0xd7, 0xc1]).unwrap();
            assert_eq!(s.gpr[0], _mm_movemask_epi8(x) as u32 as u64);
            // movmskps ecx, xmm1 / movmskpd edx, xmm1
            exec(&mut s, &mut mem, &[0x0f, 0x50, 0xc9]).unwrap();
            assert_eq!(s.gpr[1], _mm_movemask_ps(y) as u64);
            exec(&mut s, &mut mem, &[0x66, 0x0f, 0x50, 0xd1]).unwrap();
            assert_eq!(s.gpr[2], _mm_movemask_pd(d) as u64);
            // pextrw eax, xmm1, 5
            exec(&mut s, &mut mem, &[0x66, 0x0f, 0xc5, 0xc1, 0x05]).unwrap();
            assert_eq!(s.gpr[0], _mm_extract_epi16::<5>(x) as u32 as u64);
        }
    }
}

#[test]
fn moves_between_registers_and_memory() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    for i in 0..0x40 {
        mem.bytes[0x100 + i] = i as u8;
    }
    let pattern = u128::from_le_bytes(core::array::from_fn(|i| i as u8));
    s.gpr[3] = 0x100; // rbx
                      // movdqa xmm0, [rbx]
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0x6f, 0x03]).unwrap();
    assert_eq!(s.xmm[0], pattern);
    // movdqa xmm0, [rbx+1]: misaligned -> #GP(0)
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0x6f, 0x43, 0x01]),
        Err(Exception::GeneralProtection(0))
    );
    // movdqu xmm1, [rbx+1] is fine
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x6f, 0x4b, 0x01]).unwrap();
    assert_eq!(s.xmm[1], pattern >> 8 | (0x10u128 << 120));
    // pxor xmm2, [rbx+8]: misaligned legacy SSE memory operand faults
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0xef, 0x53, 0x08]),
        Err(Exception::GeneralProtection(0))
    );
    // movups [rbx+0x21], xmm1 then read back
    exec(&mut s, &mut mem, &[0x0f, 0x11, 0x4b, 0x21]).unwrap();
    assert_eq!(mem.bytes[0x121], 1);
    assert_eq!(mem.bytes[0x130], 0x10);
    // movss xmm3, [rbx] zero-extends; movss xmm3, xmm0 merges
    s.xmm[3] = u128::MAX;
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x10, 0x1b]).unwrap();
    assert_eq!(s.xmm[3], 0x0302_0100);
    s.xmm[3] = u128::MAX;
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x10, 0xd8]).unwrap();
    assert_eq!(s.xmm[3], (u128::MAX << 32) | 0x0302_0100);
    // movsd xmm3, [rbx]
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x10, 0x1b]).unwrap();
    assert_eq!(s.xmm[3], 0x0706_0504_0302_0100);
    // movd xmm4, eax ; movq xmm4, rax ; movd ecx, xmm0 ; movq rdx, xmm0
    s.gpr[0] = 0x1122_3344_5566_7788;
    s.xmm[4] = u128::MAX;
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0x6e, 0xe0]).unwrap();
    assert_eq!(s.xmm[4], 0x5566_7788);
    exec(&mut s, &mut mem, &[0x66, 0x48, 0x0f, 0x6e, 0xe0]).unwrap();
    assert_eq!(s.xmm[4], 0x1122_3344_5566_7788);
    s.gpr[1] = u64::MAX;
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0x7e, 0xc1]).unwrap();
    assert_eq!(s.gpr[1], 0x0302_0100);
    exec(&mut s, &mut mem, &[0x66, 0x48, 0x0f, 0x7e, 0xc2]).unwrap();
    assert_eq!(s.gpr[2], 0x0706_0504_0302_0100);
    // movq xmm5, xmm0 (f3 0f 7e) zeroes the high half; movq [rbx+0x40], xmm4 (66 0f d6)
    s.xmm[5] = u128::MAX;
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x7e, 0xe8]).unwrap();
    assert_eq!(s.xmm[5], 0x0706_0504_0302_0100);
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0xd6, 0x63, 0x40]).unwrap();
    assert_eq!(mem.read(0, 0x140, 8).unwrap(), 0x1122_3344_5566_7788);
    // movhps xmm0, [rbx+0x40] ; movlps [rbx+0x48], xmm0 ; movhlps xmm6, xmm0 ; movlhps xmm6, xmm4
    exec(&mut s, &mut mem, &[0x0f, 0x16, 0x43, 0x40]).unwrap();
    assert_eq!(s.xmm[0] >> 64, 0x1122_3344_5566_7788);
    assert_eq!(s.xmm[0] as u64, 0x0706_0504_0302_0100);
    exec(&mut s, &mut mem, &[0x0f, 0x13, 0x43, 0x48]).unwrap();
    assert_eq!(mem.read(0, 0x148, 8).unwrap(), 0x0706_0504_0302_0100);
    s.xmm[6] = 0;
    exec(&mut s, &mut mem, &[0x0f, 0x12, 0xf0]).unwrap();
    assert_eq!(s.xmm[6], 0x1122_3344_5566_7788);
    exec(&mut s, &mut mem, &[0x0f, 0x16, 0xf4]).unwrap();
    assert_eq!(s.xmm[6] >> 64, 0x1122_3344_5566_7788);
    // pinsrw xmm6, ecx, 7
    s.gpr[1] = 0xabcd;
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0xc4, 0xf1, 0x07]).unwrap();
    assert_eq!(s.xmm[6] >> 112, 0xabcd);
    // movnti [rbx+0x50], eax
    exec(&mut s, &mut mem, &[0x0f, 0xc3, 0x43, 0x50]).unwrap();
    assert_eq!(mem.read(0, 0x150, 8).unwrap(), 0x5566_7788);
    // maskmovdqu xmm0, xmm7 with rdi = 0x180: only bytes whose mask byte has bit 7
    s.gpr[7] = 0x180;
    s.xmm[7] = 0x80 | (0xff << 16);
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0xf7, 0xc7]).unwrap();
    assert_eq!(&mem.bytes[0x180..0x184], &[0x00, 0, 0x02, 0]);
}

#[test]
fn availability_checks() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    s.cr4 &= !CR4_OSFXSR;
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0xef, 0xc0]),
        Err(Exception::InvalidOpcode)
    );
    s.cr4 |= CR4_OSFXSR;
    s.cr0 |= CR0_TS;
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0xef, 0xc0]),
        Err(Exception::DeviceNotAvailable)
    );
    s.cr0 &= !CR0_TS;
    // An MMX form and a string MOVSD are not ours.
    assert!(execute(&mut s, &mut mem, &decode(&[0x0f, 0xef, 0xc0])).is_none());
    assert!(execute(&mut s, &mut mem, &decode(&[0xa5])).is_none());
    // VEX forms are not ours either.
    assert!(execute(&mut s, &mut mem, &decode(&[0xc5, 0xf9, 0xef, 0xc0])).is_none());
}

fn f64s(x: u128) -> [f64; 2] {
    [f64::from_bits(x as u64), f64::from_bits((x >> 64) as u64)]
}
fn pd(a: f64, b: f64) -> u128 {
    u128::from(a.to_bits()) | (u128::from(b.to_bits()) << 64)
}
fn ps(a: [f32; 4]) -> u128 {
    a.iter()
        .enumerate()
        .fold(0, |acc, (i, x)| acc | (u128::from(x.to_bits()) << (32 * i)))
}

#[test]
fn float_arithmetic_matches_rust() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    let values = [
        1.5,
        -0.1,
        3.0e300,
        1.0e-310,
        7.0,
        -0.0,
        1.0 / 3.0,
        123456.789,
    ];
    for &a in &values {
        for &b in &values {
            let ops: [(u8, BinOp); 4] = [
                (0x58, |a, b| a + b),
                (0x5c, |a, b| a - b),
                (0x59, |a, b| a * b),
                (0x5e, |a, b| a / b),
            ];
            for (op, f) in ops {
                // xxxpd xmm0, xmm1
                s.xmm[0] = pd(a, b);
                s.xmm[1] = pd(b, a);
                exec(&mut s, &mut mem, &[0x66, 0x0f, op, 0xc1]).unwrap();
                let r = f64s(s.xmm[0]);
                assert_eq!(r[0].to_bits(), f(a, b).to_bits(), "op {op:#x} {a} {b}");
                assert_eq!(r[1].to_bits(), f(b, a).to_bits());
                // xxxsd xmm0, xmm1 keeps the high half
                s.xmm[0] = pd(a, 42.0);
                s.xmm[1] = pd(b, 1.0);
                exec(&mut s, &mut mem, &[0xf2, 0x0f, op, 0xc1]).unwrap();
                let r = f64s(s.xmm[0]);
                assert_eq!(r[0].to_bits(), f(a, b).to_bits());
                assert_eq!(r[1], 42.0);
                // xxxss xmm0, xmm1
                let (x, y) = (a as f32, b as f32);
                s.xmm[0] = ps([x, 5.0, 6.0, 7.0]);
                s.xmm[1] = ps([y, 0.0, 0.0, 0.0]);
                exec(&mut s, &mut mem, &[0xf3, 0x0f, op, 0xc1]).unwrap();
                let want: f32 = match op {
                    0x58 => x + y,
                    0x5c => x - y,
                    0x59 => x * y,
                    _ => x / y,
                };
                assert_eq!(s.xmm[0], ps([want, 5.0, 6.0, 7.0]));
            }
        }
    }
    // sqrtsd, minsd/maxsd return the second operand for NaN and equal zeros
    s.xmm[1] = pd(2.0, 0.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x51, 0xc1]).unwrap();
    assert_eq!(f64s(s.xmm[0])[0], 2f64.sqrt());
    s.xmm[0] = pd(0.0, 0.0);
    s.xmm[1] = pd(-0.0, 0.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x5d, 0xc1]).unwrap();
    assert_eq!(f64s(s.xmm[0])[0].to_bits(), (-0.0f64).to_bits());
    s.xmm[0] = pd(f64::NAN, 0.0);
    s.xmm[1] = pd(1.0, 0.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x5f, 0xc1]).unwrap();
    assert_eq!(f64s(s.xmm[0])[0], 1.0);
}

#[test]
fn float_flags_and_unmasked_exceptions() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    // divsd 1/0 -> ZE, result +inf
    s.xmm[0] = pd(1.0, 0.0);
    s.xmm[1] = pd(0.0, 0.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x5e, 0xc1]).unwrap();
    assert_eq!(f64s(s.xmm[0])[0], f64::INFINITY);
    assert_eq!(s.mxcsr & 0x3f, 0x04);
    // 1/3 is inexact -> PE
    s.mxcsr = 0x1f80;
    s.xmm[0] = pd(1.0, 0.0);
    s.xmm[1] = pd(3.0, 0.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x5e, 0xc1]).unwrap();
    assert_eq!(s.mxcsr & 0x3f, 0x20);
    // 0/0 -> IE and the default NaN (negative QNaN)
    s.mxcsr = 0x1f80;
    s.xmm[0] = pd(0.0, 0.0);
    s.xmm[1] = pd(0.0, 0.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x5e, 0xc1]).unwrap();
    assert_eq!(s.xmm[0] as u64, 0xfff8_0000_0000_0000);
    assert_eq!(s.mxcsr & 0x3f, 0x01);
    // Unmask ZE: 1/0 raises #XM and leaves xmm0 alone.
    s.mxcsr = 0x1f80 & !(1 << 9);
    s.xmm[0] = pd(1.0, 0.0);
    s.xmm[1] = pd(0.0, 0.0);
    assert_eq!(
        exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x5e, 0xc1]),
        Err(Exception::SimdFloatingPoint)
    );
    assert_eq!(f64s(s.xmm[0])[0], 1.0);
    assert_eq!(s.mxcsr & 0x3f, 0x04);
}

#[test]
fn compares_and_comis() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    // cmpltpd xmm0, xmm1
    s.xmm[0] = pd(1.0, 5.0);
    s.xmm[1] = pd(2.0, 3.0);
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0xc2, 0xc1, 0x01]).unwrap();
    assert_eq!(s.xmm[0], LOW64);
    // cmpunordss xmm0, xmm1
    s.xmm[0] = ps([f32::NAN, 1.0, 1.0, 1.0]);
    s.xmm[1] = ps([1.0, 1.0, 1.0, 1.0]);
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0xc2, 0xc1, 0x03]).unwrap();
    assert_eq!(s.xmm[0] as u32, u32::MAX);
    let cases = [
        (1.0, 2.0, (false, false, true)),
        (2.0, 1.0, (false, false, false)),
        (2.0, 2.0, (true, false, false)),
        (f64::NAN, 2.0, (true, true, true)),
    ];
    for (a, b, (zf, pf, cf)) in cases {
        s.rflags = crate::state::RFLAGS_FIXED | OF | SF | AF;
        s.xmm[0] = pd(a, 0.0);
        s.xmm[1] = pd(b, 0.0);
        // ucomisd xmm0, xmm1
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0x2e, 0xc1]).unwrap();
        assert_eq!(
            (s.flag(ZF), s.flag(PF), s.flag(CF)),
            (zf, pf, cf),
            "{a} vs {b}"
        );
        assert!(!s.flag(OF) && !s.flag(SF) && !s.flag(AF));
    }
    // comisd with a QNaN signals invalid, ucomisd does not
    s.mxcsr = 0x1f80;
    s.xmm[0] = pd(f64::NAN, 0.0);
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0x2e, 0xc1]).unwrap();
    assert_eq!(s.mxcsr & 1, 0);
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0x2f, 0xc1]).unwrap();
    assert_eq!(s.mxcsr & 1, 1);
}

#[test]
fn conversions_honour_mxcsr_rounding() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    s.xmm[1] = pd(-2.5, 0.0);
    // cvtsd2si rax, xmm1 : round to nearest even -> -2
    exec(&mut s, &mut mem, &[0xf2, 0x48, 0x0f, 0x2d, 0xc1]).unwrap();
    assert_eq!(s.gpr[0] as i64, -2);
    // round down -> -3
    s.mxcsr = 0x1f80 | (1 << 13);
    exec(&mut s, &mut mem, &[0xf2, 0x48, 0x0f, 0x2d, 0xc1]).unwrap();
    assert_eq!(s.gpr[0] as i64, -3);
    // cvttsd2si truncates regardless -> -2
    exec(&mut s, &mut mem, &[0xf2, 0x48, 0x0f, 0x2c, 0xc1]).unwrap();
    assert_eq!(s.gpr[0] as i64, -2);
    // overflow -> integer indefinite and IE; 32-bit form zero-extends
    s.mxcsr = 0x1f80;
    s.xmm[1] = pd(1.0e20, 0.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x2c, 0xc1]).unwrap();
    assert_eq!(s.gpr[0], 0x8000_0000);
    assert_eq!(s.mxcsr & 1, 1);
    // cvtsi2sd xmm2, rcx ; cvtsi2ss xmm3, ecx (round up mode for inexact)
    s.gpr[1] = (-7i64) as u64;
    s.xmm[2] = pd(0.0, 9.0);
    exec(&mut s, &mut mem, &[0xf2, 0x48, 0x0f, 0x2a, 0xd1]).unwrap();
    assert_eq!(f64s(s.xmm[2]), [-7.0, 9.0]);
    s.gpr[1] = 16_777_217;
    s.mxcsr = 0x1f80 | (2 << 13);
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x2a, 0xd9]).unwrap();
    assert_eq!(f32::from_bits(s.xmm[3] as u32), 16_777_218.0);
    s.mxcsr = 0x1f80;
    // cvtss2sd xmm4, xmm3 ; cvtsd2ss xmm5, xmm2 ; cvtdq2pd ; cvttps2dq
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x5a, 0xe3]).unwrap();
    assert_eq!(f64s(s.xmm[4])[0], 16_777_218.0);
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x5a, 0xea]).unwrap();
    assert_eq!(f32::from_bits(s.xmm[5] as u32), -7.0);
    s.xmm[6] = 0xffff_fffd_0000_0004;
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0xe6, 0xfe]).unwrap();
    assert_eq!(f64s(s.xmm[7]), [4.0, -3.0]);
    s.xmm[6] = ps([1.9, -1.9, 3.0e9, 0.5]);
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x5b, 0xfe]).unwrap();
    assert_eq!(dwords(s.xmm[7]), [1, (-1i32) as u32, 0x8000_0000, 0]);
}

#[test]
fn mxcsr_and_fxsave_round_trip() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x1000);
    s.gpr[3] = 0x400;
    // ldmxcsr [rbx] with a reserved bit -> #GP(0)
    mem.write(0, 0x400, 4, 0x1_0000).unwrap();
    assert_eq!(
        exec(&mut s, &mut mem, &[0x0f, 0xae, 0x13]),
        Err(Exception::GeneralProtection(0))
    );
    mem.write(0, 0x400, 4, 0x7f80 | 0x3).unwrap();
    exec(&mut s, &mut mem, &[0x0f, 0xae, 0x13]).unwrap();
    assert_eq!(s.mxcsr, 0x7f83);
    // stmxcsr [rbx+4]
    exec(&mut s, &mut mem, &[0x0f, 0xae, 0x5b, 0x04]).unwrap();
    assert_eq!(mem.read(0, 0x404, 4).unwrap(), 0x7f83);

    for i in 0..16 {
        s.xmm[i] = (i as u128 + 1) * 0x0101_0101_0101_0101_0101_0101_0101_0101;
    }
    s.x87.fcw = 0x27f;
    s.x87.top = 6;
    s.x87.ftw = 0x0fff; // R6 valid, R7 zero... recomputed from contents on restore
    s.x87.regs[6] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f]; // 1.0
    s.x87.regs[7] = [0; 10];
    s.x87.fsw = 0x0021;
    // fxsave64 [rbx+0x200]  (48 0f ae 83 00 02 00 00)
    exec(
        &mut s,
        &mut mem,
        &[0x48, 0x0f, 0xae, 0x83, 0x00, 0x02, 0, 0],
    )
    .unwrap();
    assert_eq!(mem.read(0, 0x600, 2).unwrap(), 0x27f);
    assert_eq!(mem.read(0, 0x602, 2).unwrap(), 0x3021);
    assert_eq!(mem.read(0, 0x604, 1).unwrap(), 0xc0);
    assert_eq!(mem.read(0, 0x618, 4).unwrap(), 0x7f83);
    assert_eq!(mem.read(0, 0x61c, 4).unwrap(), 0xffff);
    assert_eq!(mem.read(0, 0x620 + 8, 2).unwrap(), 0x3fff); // ST0 = R6
    assert_eq!(
        mem.read(0, 0x600 + 160 + 16 * 15, 8).unwrap(),
        0x1010_1010_1010_1010
    );
    let saved = s.clone();
    s.xmm = [0; 16];
    s.x87 = Default::default();
    s.mxcsr = 0x1f80;
    // fxrstor64 [rbx+0x200]
    exec(
        &mut s,
        &mut mem,
        &[0x48, 0x0f, 0xae, 0x8b, 0x00, 0x02, 0, 0],
    )
    .unwrap();
    assert_eq!(s.xmm, saved.xmm);
    assert_eq!(s.mxcsr, saved.mxcsr);
    assert_eq!(s.x87.top, 6);
    assert_eq!(s.x87.ftw, 0x4fff, "R6 valid, R7 zero, the rest empty");
    assert_eq!(s.x87.regs[6], saved.x87.regs[6]);
    // Misaligned area -> #GP(0)
    assert_eq!(
        exec(
            &mut s,
            &mut mem,
            &[0x48, 0x0f, 0xae, 0x83, 0x08, 0x02, 0, 0]
        ),
        Err(Exception::GeneralProtection(0))
    );
}

#[test]
fn float_to_int_conversions_accept_memory_sources() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    s.gpr[3] = 0x20;
    mem.bytes[0x30..0x38].copy_from_slice(&42.9f64.to_bits().to_le_bytes());
    mem.bytes[0x20..0x24].copy_from_slice(&(-2.5f32).to_bits().to_le_bytes());
    s.gpr[0] = u64::MAX;
    // cvttsd2si eax, qword [rbx+0x10] truncates and zero-extends
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x2c, 0x43, 0x10]).unwrap();
    assert_eq!(s.gpr[0], 42);
    // cvtsd2si rcx, qword [rbx+0x10] rounds to nearest
    exec(&mut s, &mut mem, &[0xf2, 0x48, 0x0f, 0x2d, 0x4b, 0x10]).unwrap();
    assert_eq!(s.gpr[1], 43);
    // cvtss2si rax, dword [rbx] rounds to even; cvttss2si edx, dword [rbx] truncates
    exec(&mut s, &mut mem, &[0xf3, 0x48, 0x0f, 0x2d, 0x03]).unwrap();
    assert_eq!(s.gpr[0] as i64, -2);
    exec(&mut s, &mut mem, &[0xf3, 0x0f, 0x2c, 0x13]).unwrap();
    assert_eq!(s.gpr[2], 0xffff_fffe);
    // The string forms of MOVSD and CMPSD belong to the integer group.
    for bytes in [&[0xa5u8][..], &[0xa7]] {
        assert!(execute(&mut s, &mut mem, &decode(bytes)).is_none());
    }
}

fn f64_pow2(exponent: i32) -> f64 {
    f64::from_bits(((1023 + exponent) as u64) << 52)
}

#[test]
fn unmasked_pre_computation_exceptions_take_precedence() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    // Invalid unmasked: sqrtpd xmm6, xmm1 with one negative lane sets IE only, although
    // the other lane (sqrt 2) is inexact.
    s.mxcsr = 0x1f00;
    s.xmm[1] = pd(2.0, -1.0);
    s.xmm[6] = pd(7.0, 8.0);
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0x51, 0xf1]),
        Err(Exception::SimdFloatingPoint)
    );
    assert_eq!(s.mxcsr, 0x1f01);
    assert_eq!(f64s(s.xmm[6]), [7.0, 8.0]);
    // divpd xmm0, xmm1: 0/0 (IE unmasked) and 1/0 (ZE masked) in the two lanes set both.
    s.mxcsr = 0x1f00;
    s.xmm[0] = pd(0.0, 1.0);
    s.xmm[1] = pd(0.0, 0.0);
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0x5e, 0xc1]),
        Err(Exception::SimdFloatingPoint)
    );
    assert_eq!(s.mxcsr, 0x1f05);
    // Without CR4.OSXMMEXCPT the same thing is #UD.
    s.cr4 &= !CR4_OSXMMEXCPT;
    s.mxcsr = 0x1f00;
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0x5e, 0xc1]),
        Err(Exception::InvalidOpcode)
    );
}

#[test]
fn unmasked_underflow_and_overflow() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x100);
    // addsd xmm3, xmm3 on the smallest denormal: the exact tiny result still traps with
    // UM clear; DE (masked) is recorded, PE is not.
    s.mxcsr = 0x1780;
    s.xmm[3] = 1;
    assert_eq!(
        exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x58, 0xdb]),
        Err(Exception::SimdFloatingPoint)
    );
    assert_eq!(s.mxcsr, 0x1792);
    assert_eq!(s.xmm[3], 1);
    // The same with UM set completes with an exact denormal and no flag but DE.
    s.mxcsr = 0x1f80;
    exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x58, 0xdb]).unwrap();
    assert_eq!((s.xmm[3], s.mxcsr), (2, 0x1f82));
    // mulpd xmm0, xmm1: 3 * 2^-1075 loses a bit when denormalised but is exact with an
    // unbounded exponent, so an unmasked underflow reports UE without PE.
    s.mxcsr = 0x1780;
    s.xmm[0] = pd(3.0 * f64_pow2(-1000), 1.0);
    s.xmm[1] = pd(f64_pow2(-75), 3.0);
    assert_eq!(
        exec(&mut s, &mut mem, &[0x66, 0x0f, 0x59, 0xc1]),
        Err(Exception::SimdFloatingPoint)
    );
    assert_eq!(s.mxcsr, 0x1790);
    // With UM set the masked response rounds and reports UE and PE.
    s.mxcsr = 0x1f80;
    exec(&mut s, &mut mem, &[0x66, 0x0f, 0x59, 0xc1]).unwrap();
    assert_eq!(s.mxcsr, 0x1fb0);
    assert_eq!(f64s(s.xmm[0])[1], 3.0);
    // mulsd xmm0, xmm1 overflowing with OM clear: PE only if the significand is inexact.
    let one_ulp = 1.0 + f64::EPSILON;
    for (a, b, expected) in [
        (1.5 * f64_pow2(1000), f64_pow2(100), 0x1b88),
        (one_ulp * f64_pow2(1000), one_ulp * f64_pow2(100), 0x1ba8),
    ] {
        s.mxcsr = 0x1b80;
        s.xmm[0] = pd(a, 0.0);
        s.xmm[1] = pd(b, 0.0);
        assert_eq!(
            exec(&mut s, &mut mem, &[0xf2, 0x0f, 0x59, 0xc1]),
            Err(Exception::SimdFloatingPoint)
        );
        assert_eq!(s.mxcsr, expected);
        assert_eq!(f64s(s.xmm[0])[0], a);
    }
}
