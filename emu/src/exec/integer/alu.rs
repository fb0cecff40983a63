//! Pure arithmetic with x86 flag results, shared by every integer instruction. Values are
//! carried in `u64` and truncated to the operand size (1, 2, 4 or 8 bytes); the functions
//! return the result and the new RFLAGS (only status bits change).

use crate::state::{AF, CF, OF, PF, SF, STATUS_FLAGS, ZF};

/// All-ones for an operand of `size` bytes.
#[inline(always)]
pub fn mask(size: usize) -> u64 {
    // Branch-free: the size changes from one instruction to the next.
    u64::MAX >> (64 - size.clamp(1, 8) * 8)
}

/// The sign bit of an operand of `size` bytes.
#[inline(always)]
pub fn sign_bit(size: usize) -> u64 {
    1u64 << (size * 8 - 1)
}

/// Sign-extend a `size`-byte value to 64 bits.
#[inline(always)]
pub fn sign_extend(value: u64, size: usize) -> u64 {
    let shift = 64 - size * 8;
    (((value << shift) as i64) >> shift) as u64
}

/// PF: set when the low byte has an even number of ones.
#[inline(always)]
pub fn parity(value: u64) -> u64 {
    let b = value as u8;
    let nibble = (b ^ (b >> 4)) & 0xf;
    if (0x6996u16 >> nibble) & 1 == 0 {
        PF
    } else {
        0
    }
}

/// SF, ZF and PF of a result.
#[inline(always)]
pub fn szp(result: u64, size: usize) -> u64 {
    let r = result & mask(size);
    let mut f = parity(r);
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(size) != 0 {
        f |= SF;
    }
    f
}

#[inline(always)]
fn with_status(rflags: u64, status: u64) -> u64 {
    (rflags & !STATUS_FLAGS) | status
}

/// a + b + carry.
#[inline(always)]
pub fn add(a: u64, b: u64, carry: bool, size: usize, rflags: u64) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_add(b).wrapping_add(carry as u64) & m;
    let sb = sign_bit(size);
    let mut f = szp(r, size) | ((a ^ b ^ r) & AF);
    if ((a & b) | ((a | b) & !r)) & sb != 0 {
        f |= CF;
    }
    if (a ^ r) & (b ^ r) & sb != 0 {
        f |= OF;
    }
    (r, with_status(rflags, f))
}

/// a - b - borrow.
#[inline(always)]
pub fn sub(a: u64, b: u64, borrow: bool, size: usize, rflags: u64) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b).wrapping_sub(borrow as u64) & m;
    let sb = sign_bit(size);
    let mut f = szp(r, size) | ((a ^ b ^ r) & AF);
    if ((!a & b) | ((!a | b) & r)) & sb != 0 {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & sb != 0 {
        f |= OF;
    }
    (r, with_status(rflags, f))
}

/// Flags of AND/OR/XOR/TEST: CF, OF and AF cleared.
#[inline(always)]
pub fn logic(result: u64, size: usize, rflags: u64) -> (u64, u64) {
    let r = result & mask(size);
    (r, with_status(rflags, szp(r, size)))
}

/// INC: like ADD 1 but CF is kept.
#[inline(always)]
pub fn inc(a: u64, size: usize, rflags: u64) -> (u64, u64) {
    let (r, f) = add(a, 1, false, size, rflags);
    (r, (f & !CF) | (rflags & CF))
}

/// DEC: like SUB 1 but CF is kept.
#[inline(always)]
pub fn dec(a: u64, size: usize, rflags: u64) -> (u64, u64) {
    let (r, f) = sub(a, 1, false, size, rflags);
    (r, (f & !CF) | (rflags & CF))
}

/// The shift and rotate group (C0/C1/D0-D3 /0../7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShiftOp {
    Rol,
    Ror,
    Rcl,
    Rcr,
    Shl,
    Shr,
    Sar,
}

/// The value of SHL, SHR, SAR, ROL or ROR of `a` (already masked to `size`) by a masked
/// count `c` of at least 1: what [`shift`] computes, without the flags (the fast forms whose
/// flags are dead use it alone). RCL and RCR need CF: [`shift`] handles them.
#[inline(always)]
pub fn shift_value(op: ShiftOp, a: u64, c: u32, size: usize) -> u64 {
    let bits = (size * 8) as u32;
    let m = mask(size);
    match op {
        ShiftOp::Shl => (a << c) & m,
        ShiftOp::Shr => a >> c,
        ShiftOp::Sar => ((sign_extend(a, size) as i64) >> c.min(63)) as u64 & m,
        ShiftOp::Rol | ShiftOp::Ror | ShiftOp::Rcl | ShiftOp::Rcr => {
            let n = c % bits;
            if n == 0 {
                a
            } else if op == ShiftOp::Rol {
                ((a << n) | (a >> (bits - n))) & m
            } else {
                ((a >> n) | (a << (bits - n))) & m
            }
        }
    }
}

/// Shift or rotate `a` by the raw `count` (masked here as the CPU does). A masked count of
/// zero leaves value and flags unchanged.
#[inline]
pub fn shift(op: ShiftOp, a: u64, count: u64, size: usize, rflags: u64) -> (u64, u64) {
    let bits = (size * 8) as u32;
    let m = mask(size);
    let a = a & m;
    let c = (count & if size == 8 { 0x3f } else { 0x1f }) as u32;
    if c == 0 {
        return (a, rflags);
    }
    let sb = sign_bit(size);
    let msb = |v: u64| v & sb != 0;
    match op {
        ShiftOp::Shl => {
            let r = shift_value(op, a, c, size);
            let cf = c <= bits && (a >> (bits - c)) & 1 != 0;
            let mut f = szp(r, size);
            if cf {
                f |= CF;
            }
            if msb(r) != cf {
                f |= OF;
            }
            (r, with_status(rflags, f))
        }
        ShiftOp::Shr => {
            let r = shift_value(op, a, c, size);
            let cf = c <= bits && (a >> (c - 1)) & 1 != 0;
            let mut f = szp(r, size);
            if cf {
                f |= CF;
            }
            if msb(a) {
                f |= OF;
            }
            (r, with_status(rflags, f))
        }
        ShiftOp::Sar => {
            let sa = sign_extend(a, size) as i64;
            let r = shift_value(op, a, c, size);
            let cf = (sa >> (c - 1).min(63)) & 1 != 0;
            let mut f = szp(r, size);
            if cf {
                f |= CF;
            }
            (r, with_status(rflags, f))
        }
        ShiftOp::Rol | ShiftOp::Ror => {
            let r = shift_value(op, a, c, size);
            let (cf, of) = if op == ShiftOp::Rol {
                let cf = r & 1 != 0;
                (cf, msb(r) != cf)
            } else {
                (msb(r), msb(r) != ((r >> (bits - 2)) & 1 != 0))
            };
            let mut f = rflags & !(CF | OF);
            if cf {
                f |= CF;
            }
            if of {
                f |= OF;
            }
            (r, f)
        }
        ShiftOp::Rcl | ShiftOp::Rcr => {
            let n = if size < 4 { c % (bits + 1) } else { c };
            if n == 0 {
                return (a, rflags);
            }
            let width = bits + 1;
            let wide_mask: u128 = (1u128 << width) - 1;
            let v = (u128::from(rflags & CF != 0) << bits) | u128::from(a);
            let rotated = if op == ShiftOp::Rcl {
                ((v << n) | (v >> (width - n))) & wide_mask
            } else {
                ((v >> n) | (v << (width - n))) & wide_mask
            };
            let r = rotated as u64 & m;
            let cf = (rotated >> bits) & 1 != 0;
            let of = if op == ShiftOp::Rcl {
                msb(r) != cf
            } else {
                msb(r) != ((r >> (bits - 2)) & 1 != 0)
            };
            let mut f = rflags & !(CF | OF);
            if cf {
                f |= CF;
            }
            if of {
                f |= OF;
            }
            (r, f)
        }
    }
}

/// SHLD (left = true) or SHRD: shift `dest` filling from `src`.
pub fn double_shift(
    left: bool,
    dest: u64,
    src: u64,
    count: u64,
    size: usize,
    rflags: u64,
) -> (u64, u64) {
    let m = mask(size);
    let (d, s) = (dest & m, src & m);
    let c = (count & if size == 8 { 0x3f } else { 0x1f }) as u32;
    if c == 0 {
        return (d, rflags);
    }
    let bits = (size * 8) as u32;
    let (r, cf) = if size == 2 {
        // Counts above 16 behave as a shift of dest:src:dest (what Intel parts do).
        let x = (d << 32) | (s << 16) | d;
        if left {
            (((x << c) >> 32) & 0xffff, (x >> (48 - c)) & 1 != 0)
        } else {
            ((x >> c) & 0xffff, (x >> (c - 1)) & 1 != 0)
        }
    } else if left {
        (
            ((d << c) | (s >> (bits - c))) & m,
            (d >> (bits - c)) & 1 != 0,
        )
    } else {
        (((d >> c) | (s << (bits - c))) & m, (d >> (c - 1)) & 1 != 0)
    };
    let sb = sign_bit(size);
    let mut f = szp(r, size);
    if cf {
        f |= CF;
    }
    if (r ^ d) & sb != 0 {
        f |= OF;
    }
    (r, with_status(rflags, f))
}

/// Evaluate a condition code (iced's numbering: o, no, b, ae, e, ne, be, a, s, ns, p, np,
/// l, ge, le, g) against RFLAGS.
#[inline(always)]
pub fn condition(cc: iced_x86::ConditionCode, rflags: u64) -> bool {
    use iced_x86::ConditionCode as C;
    let cf = rflags & CF != 0;
    let zf = rflags & ZF != 0;
    let sf = rflags & SF != 0;
    let of = rflags & OF != 0;
    let pf = rflags & PF != 0;
    match cc {
        C::None => true,
        C::o => of,
        C::no => !of,
        C::b => cf,
        C::ae => !cf,
        C::e => zf,
        C::ne => !zf,
        C::be => cf || zf,
        C::a => !cf && !zf,
        C::s => sf,
        C::ns => !sf,
        C::p => pf,
        C::np => !pf,
        C::l => sf != of,
        C::ge => sf == of,
        C::le => zf || sf != of,
        C::g => !zf && sf == of,
    }
}

/// CMOVcc, any condition.
pub fn is_cmov(mn: iced_x86::Mnemonic) -> bool {
    use iced_x86::Mnemonic as Mn;
    matches!(
        mn,
        Mn::Cmovo
            | Mn::Cmovno
            | Mn::Cmovb
            | Mn::Cmovae
            | Mn::Cmove
            | Mn::Cmovne
            | Mn::Cmovbe
            | Mn::Cmova
            | Mn::Cmovs
            | Mn::Cmovns
            | Mn::Cmovp
            | Mn::Cmovnp
            | Mn::Cmovl
            | Mn::Cmovge
            | Mn::Cmovle
            | Mn::Cmovg
    )
}

/// SETcc, any condition.
pub fn is_setcc(mn: iced_x86::Mnemonic) -> bool {
    use iced_x86::Mnemonic as Mn;
    matches!(
        mn,
        Mn::Seto
            | Mn::Setno
            | Mn::Setb
            | Mn::Setae
            | Mn::Sete
            | Mn::Setne
            | Mn::Setbe
            | Mn::Seta
            | Mn::Sets
            | Mn::Setns
            | Mn::Setp
            | Mn::Setnp
            | Mn::Setl
            | Mn::Setge
            | Mn::Setle
            | Mn::Setg
    )
}
