//! x87 tests: 80-bit results are checked against known encodings and against Rust's f64
//! arithmetic with the precision control set to double.

use super::*;
use crate::access::test_util::FlatMemory;
use crate::state::{CR0_PE, CS, EFER_LMA, EFER_LME};
type BinOp = fn(f64, f64) -> f64;

use iced_x86::{Decoder, DecoderOptions};

fn cpu() -> CpuState {
    let mut s = CpuState::power_on();
    s.cr0 |= CR0_PE | CR0_NE;
    s.efer = EFER_LMA | EFER_LME;
    s.seg[CS].l = true;
    s.gpr[3] = 0x100; // rbx: scratch memory
    s
}

fn exec(s: &mut CpuState, m: &mut FlatMemory, bytes: &[u8]) -> ExResult<()> {
    let i = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode();
    assert!(!i.is_invalid(), "bad encoding {bytes:02x?}");
    execute(s, m, &i).unwrap_or_else(|| panic!("not implemented: {i}"))
}

fn ext(exponent: u16, mantissa: u64) -> Reg {
    let mut r = [0u8; 10];
    r[..8].copy_from_slice(&mantissa.to_le_bytes());
    r[8..].copy_from_slice(&exponent.to_le_bytes());
    r
}

fn st0(s: &CpuState) -> Reg {
    st(s, 0).expect("ST(0) empty")
}

const FLD_M80: [u8; 2] = [0xdb, 0x2b]; // fld tbyte [rbx]
const FSTP_M80: [u8; 2] = [0xdb, 0x3b]; // fstp tbyte [rbx]
const FLD_M64: [u8; 2] = [0xdd, 0x03]; // fld qword [rbx]
const FSTP_M64: [u8; 2] = [0xdd, 0x1b]; // fstp qword [rbx]
const FILD_M64: [u8; 2] = [0xdf, 0x2b]; // fild qword [rbx]
const FISTP_M64: [u8; 2] = [0xdf, 0x3b]; // fistp qword [rbx]

#[test]
fn m80_loads_and_stores_are_bit_exact() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    let odd = [
        ext(0x7fff, 0x8000_0000_0000_0001), // signalling NaN
        ext(0x0000, 0x8000_0000_0000_0000), // pseudo-denormal
        ext(0x4000, 0x4000_0000_0000_0000), // unnormal
        ext(0xffff, 0x8000_0000_0000_0000), // -inf
        ext(0x3fff, 0x8000_0000_0000_0001),
    ];
    for value in odd {
        mem.bytes[0x100..0x10a].copy_from_slice(&value);
        exec(&mut s, &mut mem, &FLD_M80).unwrap();
        mem.bytes[0x100..0x10a].fill(0);
        exec(&mut s, &mut mem, &FSTP_M80).unwrap();
        assert_eq!(&mem.bytes[0x100..0x10a], &value);
    }
    assert_eq!(s.x87.fsw & 0x3f, 0, "m80 moves raise nothing");
    assert_eq!(s.x87.ftw, 0xffff);
    assert_eq!(s.x87.top, 0);
}

#[test]
fn extended_precision_division_and_precision_control() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    mem.write(0, 0x100, 8, 3).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0xe8]).unwrap(); // fld1
    exec(&mut s, &mut mem, &FILD_M64).unwrap(); // fild qword [rbx] = 3
    exec(&mut s, &mut mem, &[0xde, 0xf9]).unwrap(); // fdivp st(1), st(0): 1/3
    assert_eq!(st0(&s), ext(0x3ffd, 0xaaaa_aaaa_aaaa_aaab));
    assert_ne!(s.x87.fsw & 0x20, 0, "inexact");
    // With PC = double the significand is rounded to 53 bits.
    exec(&mut s, &mut mem, &[0xdb, 0xe3]).unwrap(); // fninit
    mem.write(0, 0x110, 2, 0x27f).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0x6b, 0x10]).unwrap(); // fldcw [rbx+0x10]
    exec(&mut s, &mut mem, &[0xd9, 0xe8]).unwrap();
    exec(&mut s, &mut mem, &FILD_M64).unwrap();
    exec(&mut s, &mut mem, &[0xde, 0xf9]).unwrap();
    assert_eq!(st0(&s), ext(0x3ffd, 0xaaaa_aaaa_aaaa_a800));
    // fldpi
    exec(&mut s, &mut mem, &[0xdb, 0xe3]).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0xeb]).unwrap();
    assert_eq!(st0(&s), ext(0x4000, 0xc90f_daa2_2168_c235));
}

#[test]
fn double_arithmetic_matches_rust_with_pc_double() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    let values: [f64; 7] = [0.1, 0.2, -3.75, 1.0e300, 7.0e-300, 123.456, -0.0];
    let ops: [([u8; 2], BinOp); 4] = [
        ([0xdc, 0x43], |a, b| a + b), // fadd qword [rbx+8]
        ([0xdc, 0x63], |a, b| a - b), // fsub qword [rbx+8]
        ([0xdc, 0x4b], |a, b| a * b), // fmul qword [rbx+8]
        ([0xdc, 0x73], |a, b| a / b), // fdiv qword [rbx+8]
    ];
    for &a in &values {
        for &b in &values {
            for (op, f) in ops {
                exec(&mut s, &mut mem, &[0xdb, 0xe3]).unwrap();
                s.x87.fcw = 0x27f;
                mem.write(0, 0x100, 8, a.to_bits()).unwrap();
                mem.write(0, 0x108, 8, b.to_bits()).unwrap();
                exec(&mut s, &mut mem, &FLD_M64).unwrap();
                exec(&mut s, &mut mem, &[op[0], op[1], 0x08]).unwrap();
                exec(&mut s, &mut mem, &FSTP_M64).unwrap();
                let got = f64::from_bits(mem.read(0, 0x100, 8).unwrap());
                assert_eq!(got.to_bits(), f(a, b).to_bits(), "{a} op {b}");
                assert_eq!(s.x87.top, 0);
            }
        }
    }
}

#[test]
fn integer_loads_and_stores() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    for v in [i64::MIN, i64::MAX, -1, 0, 1 << 62, 12345] {
        mem.write(0, 0x100, 8, v as u64).unwrap();
        exec(&mut s, &mut mem, &FILD_M64).unwrap();
        mem.write(0, 0x100, 8, 0).unwrap();
        exec(&mut s, &mut mem, &FISTP_M64).unwrap();
        assert_eq!(mem.read(0, 0x100, 8).unwrap() as i64, v);
    }
    // 2.5 rounds to even; fisttp truncates -2.75 to -2; word overflow gives 0x8000 + IE.
    mem.write(0, 0x100, 8, 2.5f64.to_bits()).unwrap();
    exec(&mut s, &mut mem, &FLD_M64).unwrap();
    exec(&mut s, &mut mem, &[0xdb, 0x1b]).unwrap(); // fistp dword [rbx]
    assert_eq!(mem.read(0, 0x100, 4).unwrap(), 2);
    mem.write(0, 0x100, 8, (-2.75f64).to_bits()).unwrap();
    exec(&mut s, &mut mem, &FLD_M64).unwrap();
    exec(&mut s, &mut mem, &[0xdd, 0x0b]).unwrap(); // fisttp qword [rbx]
    assert_eq!(mem.read(0, 0x100, 8).unwrap() as i64, -2);
    mem.write(0, 0x100, 8, 1.0e6f64.to_bits()).unwrap();
    exec(&mut s, &mut mem, &FLD_M64).unwrap();
    exec(&mut s, &mut mem, &[0xdf, 0x1b]).unwrap(); // fistp word [rbx]
    assert_eq!(mem.read(0, 0x100, 2).unwrap(), 0x8000);
    assert_ne!(s.x87.fsw & IE, 0);
    assert_eq!(s.x87.top, 0);
    assert_eq!(s.x87.ftw, 0xffff);
}

#[test]
fn compares_set_condition_codes_and_eflags() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    mem.write(0, 0x100, 8, 2).unwrap();
    exec(&mut s, &mut mem, &FILD_M64).unwrap(); // ST1 = 2 after next push
    exec(&mut s, &mut mem, &[0xd9, 0xe8]).unwrap(); // ST0 = 1
    exec(&mut s, &mut mem, &[0xdb, 0xf1]).unwrap(); // fcomi st0, st1: 1 < 2
    assert!(s.flag(CF) && !s.flag(ZF) && !s.flag(PF));
    exec(&mut s, &mut mem, &[0xd8, 0xd1]).unwrap(); // fcom st1
    exec(&mut s, &mut mem, &[0xdf, 0xe0]).unwrap(); // fnstsw ax
    assert_eq!(s.gpr[0] as u16 & (C0 | C2 | C3), C0);
    assert_eq!((s.gpr[0] as u16 >> 11) & 7, 6, "TOP in the status word");
    exec(&mut s, &mut mem, &[0xd9, 0xc9]).unwrap(); // fxch st1
    exec(&mut s, &mut mem, &[0xdf, 0xe9]).unwrap(); // fucomip st0, st1: 2 > 1
    assert!(!s.flag(CF) && !s.flag(ZF) && !s.flag(PF));
    assert_eq!(s.x87.top, 7);
    // fcmovb st0, st1 not taken (CF clear); fcmovnb taken... only one register left: underflow
    s.set_flag(CF, true);
    exec(&mut s, &mut mem, &[0xd9, 0xee]).unwrap(); // fldz: ST0 = 0, ST1 = 1
    exec(&mut s, &mut mem, &[0xda, 0xc1]).unwrap(); // fcmovb st0, st1
    assert_eq!(st0(&s), ext(0x3fff, 1 << 63));
    exec(&mut s, &mut mem, &[0xde, 0xd9]).unwrap(); // fcompp: equal
    assert_eq!(s.x87.fsw & (C0 | C2 | C3), C3);
    assert_eq!(s.x87.ftw, 0xffff);
    // fxam of an empty register: C3|C0
    exec(&mut s, &mut mem, &[0xd9, 0xe5]).unwrap();
    assert_eq!(s.x87.fsw & (C0 | C2 | C3), C3 | C0);
}

#[test]
fn stack_faults_use_the_masked_response() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    for _ in 0..8 {
        exec(&mut s, &mut mem, &[0xd9, 0xe8]).unwrap();
    }
    assert_eq!(s.x87.fsw & 0x7f, 0);
    exec(&mut s, &mut mem, &[0xd9, 0xee]).unwrap(); // ninth push overflows
    assert_eq!(s.x87.fsw & (IE | STACK_FAULT | C1), IE | STACK_FAULT | C1);
    assert_eq!(st0(&s), INDEFINITE);
    exec(&mut s, &mut mem, &[0xdb, 0xe3]).unwrap(); // fninit
    exec(&mut s, &mut mem, &[0xde, 0xc1]).unwrap(); // faddp on an empty stack
    assert_eq!(s.x87.fsw & (IE | STACK_FAULT | C1), IE | STACK_FAULT);
    assert_eq!(s.x87.top, 1);
}

#[test]
fn unmasked_exceptions_are_reported_at_the_next_waiting_instruction() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    mem.write(0, 0x110, 2, 0x37b).unwrap(); // ZE unmasked
    exec(&mut s, &mut mem, &[0xd9, 0x6b, 0x10]).unwrap(); // fldcw
    exec(&mut s, &mut mem, &[0xd9, 0xe8]).unwrap(); // fld1
    exec(&mut s, &mut mem, &[0xd9, 0xee]).unwrap(); // fldz
    exec(&mut s, &mut mem, &[0xde, 0xf9]).unwrap(); // fdivp: 1/0
    assert_eq!(s.x87.fsw & (ZE | ES), ZE | ES);
    assert_eq!(s.x87.top, 7);
    assert_eq!(st0(&s), ext(0x3fff, 1 << 63), "destination unchanged");
    assert_eq!(
        exec(&mut s, &mut mem, &[0x9b]),
        Err(Exception::FloatingPoint)
    );
    assert_eq!(
        exec(&mut s, &mut mem, &[0xd9, 0xe0]),
        Err(Exception::FloatingPoint)
    );
    exec(&mut s, &mut mem, &[0xdf, 0xe0]).unwrap(); // fnstsw ax is non-waiting
    assert_ne!(s.gpr[0] & 0x80, 0);
    exec(&mut s, &mut mem, &[0xdb, 0xe2]).unwrap(); // fnclex
    exec(&mut s, &mut mem, &[0x9b]).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0xe0]).unwrap(); // fchs
    assert_eq!(st0(&s), ext(0xbfff, 1 << 63));
    // CR0.TS: #NM
    s.cr0 |= CR0_TS;
    assert_eq!(
        exec(&mut s, &mut mem, &[0xd9, 0xe0]),
        Err(Exception::DeviceNotAvailable)
    );
}

#[test]
fn environment_save_and_restore() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    exec(&mut s, &mut mem, &[0xd9, 0xe8]).unwrap(); // fld1
    s.x87.fsw |= 0x20;
    s.x87.fcw = 0x0f7f;
    exec(&mut s, &mut mem, &[0xd9, 0x33]).unwrap(); // fnstenv [rbx]
    assert_eq!(mem.read(0, 0x100, 2).unwrap(), 0x0f7f);
    assert_eq!(mem.read(0, 0x104, 2).unwrap(), 0x3820);
    assert_eq!(mem.read(0, 0x108, 2).unwrap(), 0x3fff);
    assert_eq!(
        mem.read(0, 0x10c, 4).unwrap(),
        0x1000,
        "FIP of the last fld1"
    );
    exec(&mut s, &mut mem, &[0xdb, 0xe3]).unwrap(); // fninit
                                                    // glibc's feraiseexcept-style: modify the saved status word, reload it.
    mem.write(0, 0x104, 2, 0x3801).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0x23]).unwrap(); // fldenv [rbx]
    assert_eq!(s.x87.fcw, 0x0f7f);
    assert_eq!(s.x87.top, 7);
    assert_eq!(s.x87.fsw & 0x3f, 1);
    assert_eq!(s.x87.ftw, 0x3fff);
    // fnsave/frstor round trip of the register stack
    exec(&mut s, &mut mem, &[0xdd, 0x33]).unwrap(); // fnsave [rbx]
    assert_eq!(s.x87.ftw, 0xffff);
    exec(&mut s, &mut mem, &[0xdd, 0x23]).unwrap(); // frstor [rbx]
    assert_eq!(st0(&s), ext(0x3fff, 1 << 63));
}

#[test]
fn transcendental_and_misc_ops() {
    let mut s = cpu();
    let mut mem = FlatMemory::new(0x200);
    mem.write(0, 0x100, 8, 2.0f64.to_bits()).unwrap();
    exec(&mut s, &mut mem, &FLD_M64).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0xfa]).unwrap(); // fsqrt
    assert_eq!(st0(&s), ext(0x3fff, 0xb504_f333_f9de_6484));
    exec(&mut s, &mut mem, &[0xd9, 0xfc]).unwrap(); // frndint
    assert_eq!(st0(&s), ext(0x3fff, 1 << 63));
    // fscale: 1 * 2^3
    mem.write(0, 0x100, 8, 3.0f64.to_bits()).unwrap();
    exec(&mut s, &mut mem, &FLD_M64).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0xc9]).unwrap(); // fxch
    exec(&mut s, &mut mem, &[0xd9, 0xfd]).unwrap(); // fscale
    assert_eq!(st0(&s), ext(0x4002, 1 << 63));
    // fprem: 8 mod 3 = 2, quotient 2 -> C1 = q0 = 0, C3 = q1 = 1, C0 = q2 = 0
    exec(&mut s, &mut mem, &[0xd9, 0xc9]).unwrap(); // fxch: ST0 = 3, ST1 = 8
    exec(&mut s, &mut mem, &[0xd9, 0xc9]).unwrap(); // back: ST0 = 8, ST1 = 3
    exec(&mut s, &mut mem, &[0xd9, 0xf8]).unwrap();
    assert_eq!(st0(&s), ext(0x4000, 1 << 63));
    assert_eq!(s.x87.fsw & CONDITION, C3);
    // fptan pushes 1.0
    exec(&mut s, &mut mem, &[0xdb, 0xe3]).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0xee]).unwrap(); // fldz
    exec(&mut s, &mut mem, &[0xd9, 0xf2]).unwrap(); // fptan
    assert_eq!(st0(&s), ext(0x3fff, 1 << 63));
    assert_eq!(st(&s, 1), Some(ext(0, 0)));
    assert_eq!(s.x87.top, 6);
    // fabs of -0 after fchs
    exec(&mut s, &mut mem, &[0xd9, 0xe0]).unwrap();
    exec(&mut s, &mut mem, &[0xd9, 0xe1]).unwrap();
    assert_eq!(st0(&s), ext(0x3fff, 1 << 63));
    // fstp st(0) pops; emms empties the tags
    exec(&mut s, &mut mem, &[0xdd, 0xd8]).unwrap();
    assert_eq!(s.x87.top, 7);
    exec(&mut s, &mut mem, &[0x0f, 0x77]).unwrap();
    assert_eq!(s.x87.ftw, 0xffff);
}
