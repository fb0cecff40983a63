//! Random instruction sequences for the differential test.
//!
//! The instruction forms come from iced's `Code` table: a form's name (`Add_rm32_imm8`,
//! `Pshufd_xmm_xmmm128_imm8`) spells its operands, so parsing the names gives every
//! encoding of every mnemonic we test without a hand-written table. Operands are then
//! filled in at random: registers from a small per-case "hot" set so that instructions
//! depend on each other, memory operands relative to R15 (which points into the data
//! buffer and is never written), immediates with interesting values. Some instructions need
//! a few setup instructions to stay inside the buffer or away from #DE most of the time;
//! those are emitted before them and are part of the tested sequence.

use iced_x86::{Code, Encoder, Instruction, MemoryOperand, OpKind, Register, RepPrefixKind};

use super::native::DATA_ADDR;

/// Register that holds the data-buffer base; the generator never writes it.
pub const BASE_REG_INDEX: usize = 15;
/// R15 points into the middle of the buffer so that negative displacements are usable.
pub const BASE_VALUE: u64 = DATA_ADDR + 0x800;
/// Memory operands stay inside [base - HALF, base + HALF).
const HALF: i64 = 0x800;

/// A small deterministic PRNG (SplitMix64): reproducible cases without the rand crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Alu,
    Shift,
    MulDiv,
    Bit,
    Exchange,
    Move,
    Cond,
    Str,
    SseInt,
    SseFp,
    SseMove,
}

/// Relative frequency of each category in generated sequences.
const WEIGHTS: [(Category, u64); 11] = [
    (Category::Alu, 16),
    (Category::Shift, 14),
    (Category::MulDiv, 8),
    (Category::Bit, 7),
    (Category::Exchange, 5),
    (Category::Move, 8),
    (Category::Cond, 6),
    (Category::Str, 7),
    (Category::SseInt, 13),
    (Category::SseFp, 12),
    (Category::SseMove, 5),
];

const ALU: &[&str] = &[
    "Add", "Or", "Adc", "Sbb", "And", "Sub", "Xor", "Cmp", "Test", "Inc", "Dec", "Neg", "Not",
];
const SHIFT: &[&str] = &[
    "Rol", "Ror", "Rcl", "Rcr", "Shl", "Sal", "Shr", "Sar", "Shld", "Shrd",
];
const MULDIV: &[&str] = &["Mul", "Imul", "Div", "Idiv"];
const BIT: &[&str] = &["Bt", "Bts", "Btr", "Btc", "Bsf", "Bsr", "Bswap"];
const EXCHANGE: &[&str] = &["Xchg", "Xadd", "Cmpxchg"];
const MOVE: &[&str] = &[
    "Mov", "Movzx", "Movsx", "Movsxd", "Lea", "Cbw", "Cwde", "Cdqe", "Cwd", "Cdq", "Cqo", "Stc",
    "Clc", "Cmc", "Cld", "Std",
];
const CONDITIONS: &[&str] = &[
    "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g",
];
const SSE_INT: &[&str] = &[
    "Pxor",
    "Pand",
    "Por",
    "Pandn",
    "Paddb",
    "Paddw",
    "Paddd",
    "Paddq",
    "Paddsb",
    "Paddsw",
    "Paddusb",
    "Paddusw",
    "Psubb",
    "Psubw",
    "Psubd",
    "Psubq",
    "Psubsb",
    "Psubsw",
    "Psubusb",
    "Psubusw",
    "Pcmpeqb",
    "Pcmpeqw",
    "Pcmpeqd",
    "Pcmpgtb",
    "Pcmpgtw",
    "Pcmpgtd",
    "Pmovmskb",
    "Pshufd",
    "Pshuflw",
    "Pshufhw",
    "Punpcklbw",
    "Punpcklwd",
    "Punpckldq",
    "Punpcklqdq",
    "Punpckhbw",
    "Punpckhwd",
    "Punpckhdq",
    "Punpckhqdq",
    "Packsswb",
    "Packssdw",
    "Packuswb",
    "Psllw",
    "Pslld",
    "Psllq",
    "Psrlw",
    "Psrld",
    "Psrlq",
    "Psraw",
    "Psrad",
    "Pslldq",
    "Psrldq",
    "Pmullw",
    "Pmuludq",
    "Pmulhw",
    "Pmulhuw",
    "Pmaddwd",
    "Pminub",
    "Pmaxub",
    "Pminsw",
    "Pmaxsw",
    "Pavgb",
    "Pavgw",
    "Psadbw",
    "Pextrw",
    "Pinsrw",
];
const SSE_FP: &[&str] = &[
    "Addss",
    "Addsd",
    "Addps",
    "Addpd",
    "Subss",
    "Subsd",
    "Subps",
    "Subpd",
    "Mulss",
    "Mulsd",
    "Mulps",
    "Mulpd",
    "Divss",
    "Divsd",
    "Divps",
    "Divpd",
    "Sqrtss",
    "Sqrtsd",
    "Sqrtps",
    "Sqrtpd",
    "Minss",
    "Minsd",
    "Minps",
    "Minpd",
    "Maxss",
    "Maxsd",
    "Maxps",
    "Maxpd",
    "Cvtsi2ss",
    "Cvtsi2sd",
    "Cvttss2si",
    "Cvttsd2si",
    "Cvtss2si",
    "Cvtsd2si",
    "Cvtss2sd",
    "Cvtsd2ss",
    "Ucomiss",
    "Ucomisd",
    "Comiss",
    "Comisd",
    "Andps",
    "Andpd",
    "Andnps",
    "Andnpd",
    "Orps",
    "Orpd",
    "Xorps",
    "Xorpd",
    "Cmpss",
    "Cmpsd",
    "Cmpps",
    "Cmppd",
    "Shufps",
    "Shufpd",
    "Unpcklps",
    "Unpckhps",
    "Unpcklpd",
    "Unpckhpd",
    "Cvtdq2ps",
    "Cvtdq2pd",
    "Cvtps2dq",
    "Cvttps2dq",
    "Cvtpd2dq",
    "Cvttpd2dq",
    "Cvtps2pd",
    "Cvtpd2ps",
];
const SSE_MOVE: &[&str] = &[
    "Movd", "Movq", "Movdqa", "Movdqu", "Movaps", "Movups", "Movapd", "Movupd", "Movss", "Movsd",
    "Movhlps", "Movlhps", "Movlps", "Movhps", "Movlpd", "Movhpd", "Movmskps", "Movmskpd",
];
/// Forms whose names parse but that we must not generate.
const EXCLUDED: &[&str] = &[
    "Bswap_r16",              // undefined result
    "Movsxd_r16_rm16",        // vendor-specific
    "Pextrw_r32m16_xmm_imm8", // SSE4.1
    "Pextrw_r64m16_xmm_imm8",
];
/// SSE forms whose 16-byte memory operand need not be aligned.
const UNALIGNED_OK: &[&str] = &["Movups", "Movupd", "Movdqu"];

/// One operand slot of a form, as its name spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gpr(u32),
    GprOrMem(u32),
    /// `r32m16`: a register of the first size or memory of the second.
    GprOrMemMixed(u32, u32),
    /// Memory of this many bits; 0 is LEA's operand (never accessed).
    Mem(u32),
    Imm(u32),
    /// The implicit count 1 of the D0/D1 shifts.
    One,
    Fixed(Register),
    Xmm,
    XmmOrMem(u32),
}

pub struct Form {
    pub code: Code,
    /// The mnemonic part of the name, e.g. "Add".
    pub mnemonic: String,
    pub ops: Vec<Op>,
}

pub struct Tables {
    pub forms: Vec<Form>,
    /// Per category: groups of form indices, one group per mnemonic.
    groups: Vec<(Category, Vec<Vec<usize>>)>,
    /// Forms that never encoded in 64-bit mode (reported for visibility).
    pub dropped: Vec<String>,
    pub strings: bool,
}

fn category_of(mnemonic: &str) -> Option<Category> {
    let in_list = |l: &[&str]| l.contains(&mnemonic);
    if in_list(ALU) {
        Some(Category::Alu)
    } else if in_list(SHIFT) {
        Some(Category::Shift)
    } else if in_list(MULDIV) {
        Some(Category::MulDiv)
    } else if in_list(BIT) {
        Some(Category::Bit)
    } else if in_list(EXCHANGE) {
        Some(Category::Exchange)
    } else if in_list(MOVE) {
        Some(Category::Move)
    } else if in_list(SSE_INT) {
        Some(Category::SseInt)
    } else if in_list(SSE_FP) {
        Some(Category::SseFp)
    } else if in_list(SSE_MOVE) {
        Some(Category::SseMove)
    } else {
        let cond = mnemonic
            .strip_prefix("Cmov")
            .or_else(|| mnemonic.strip_prefix("Set"))?;
        CONDITIONS.contains(&cond).then_some(Category::Cond)
    }
}

fn parse_token(tok: &str) -> Option<Op> {
    let fixed = |r| Some(Op::Fixed(r));
    match tok {
        "AL" => fixed(Register::AL),
        "AX" => fixed(Register::AX),
        "EAX" => fixed(Register::EAX),
        "RAX" => fixed(Register::RAX),
        "CL" => fixed(Register::CL),
        "1" => Some(Op::One),
        "m" => Some(Op::Mem(0)),
        "xmm" => Some(Op::Xmm),
        _ => {
            let num = |s: &str| s.parse::<u32>().ok();
            if let Some(rest) = tok.strip_prefix("xmmm") {
                num(rest).map(Op::XmmOrMem)
            } else if let Some(rest) = tok.strip_prefix("imm") {
                num(rest).map(Op::Imm)
            } else if let Some(rest) = tok.strip_prefix("rm") {
                num(rest).map(Op::GprOrMem)
            } else if let Some(rest) = tok.strip_prefix('r') {
                if let Some((r, m)) = rest.split_once('m') {
                    Some(Op::GprOrMemMixed(num(r)?, num(m)?))
                } else {
                    num(rest).map(Op::Gpr)
                }
            } else if let Some(rest) = tok.strip_prefix('m') {
                num(rest).map(Op::Mem)
            } else {
                None
            }
        }
    }
}

impl Tables {
    /// Builds the form table. `only`: lowercase mnemonics to restrict to (empty: all).
    pub fn new(only: &[String]) -> Self {
        let wanted = |m: &str| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(m));
        let mut forms = Vec::new();
        let mut dropped = Vec::new();
        let mut rng = Rng::new(1);
        for code in Code::values() {
            let name = format!("{code:?}");
            if EXCLUDED.contains(&name.as_str()) {
                continue;
            }
            let mut parts = name.split('_');
            let mnemonic = parts.next().unwrap_or("").to_string();
            if category_of(&mnemonic).is_none() || !wanted(&mnemonic) {
                continue;
            }
            let Some(ops) = parts.map(parse_token).collect::<Option<Vec<Op>>>() else {
                continue;
            };
            // String forms (Movsb_m8_m8, Cmpsd_m32_m32) are generated separately.
            if ops
                .iter()
                .filter(|o| matches!(o, Op::Mem(b) if *b > 0))
                .count()
                > 1
            {
                continue;
            }
            let form = Form {
                code,
                mnemonic,
                ops,
            };
            // Keep the form only if it encodes in 64-bit mode with some operands.
            let mut gen = CaseGen::new(&mut rng);
            let ok = (0..40).any(|_| gen.build(&form).is_some());
            if ok {
                forms.push(form);
            } else {
                dropped.push(name);
            }
        }
        let mut groups: Vec<(Category, Vec<Vec<usize>>)> = Vec::new();
        for (i, f) in forms.iter().enumerate() {
            let cat = category_of(&f.mnemonic).unwrap_or(Category::Move);
            let pos = match groups.iter().position(|(c, _)| *c == cat) {
                Some(p) => p,
                None => {
                    groups.push((cat, Vec::new()));
                    groups.len() - 1
                }
            };
            let by_mn = &mut groups[pos].1;
            match by_mn
                .iter_mut()
                .find(|g| forms[g[0]].mnemonic == f.mnemonic)
            {
                Some(g) => g.push(i),
                None => by_mn.push(vec![i]),
            }
        }
        let strings = only.is_empty()
            || only.iter().any(|o| {
                ["movs", "stos", "lods", "cmps", "scas", "string"]
                    .iter()
                    .any(|s| o.to_ascii_lowercase().starts_with(s))
            });
        Tables {
            forms,
            groups,
            dropped,
            strings,
        }
    }

    pub fn mnemonic_count(&self) -> usize {
        self.groups.iter().map(|(_, g)| g.len()).sum()
    }
}

/// Initial architectural state of a case.
#[derive(Clone)]
pub struct Init {
    pub gpr: [u64; 16],
    /// Arithmetic flags and DF only.
    pub rflags: u64,
    pub mxcsr: u32,
    pub xmm: [u128; 16],
    pub data: Vec<u8>,
}

pub struct Case {
    pub init: Init,
    /// The sequence, in order (setup instructions included), not yet encoded.
    pub instrs: Vec<Instruction>,
}

const INTERESTING: [u64; 16] = [
    0,
    1,
    u64::MAX,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0x1_0000_0000,
    0xffff_ffff_ffff_ff80,
];

const F64S: [u64; 28] = [
    0,
    0x8000_0000_0000_0000,
    0x3ff0_0000_0000_0000, // 1.0
    0xbff0_0000_0000_0000, // -1.0
    0x4000_0000_0000_0000, // 2.0
    0x3fe0_0000_0000_0000, // 0.5
    0x3ff8_0000_0000_0000, // 1.5
    0x4004_0000_0000_0000, // 2.5
    0xc004_0000_0000_0000, // -2.5
    0x7ff0_0000_0000_0000, // inf
    0xfff0_0000_0000_0000, // -inf
    0x7ff8_0000_0000_0000, // qNaN
    0xfff8_0000_0000_0000, // -qNaN
    0x7ff4_0000_0000_0000, // sNaN
    0x7ff0_0000_0000_0001, // sNaN
    0x7ff8_0000_dead_beef, // qNaN with payload
    0x0000_0000_0000_0001, // smallest denormal
    0x000f_ffff_ffff_ffff, // largest denormal
    0x0010_0000_0000_0000, // smallest normal
    0x7fef_ffff_ffff_ffff, // largest finite
    0x41e0_0000_0000_0000, // 2^31
    0xc1e0_0000_0000_0000, // -2^31
    0x43e0_0000_0000_0000, // 2^63
    0xc3e0_0000_0000_0000, // -2^63
    0x41df_ffff_ffe0_0000, // 2^31 - 0.5
    0x41f0_0000_0000_0000, // 2^32
    0x3fdf_ffff_ffff_ffff, // 0.49999999999999994
    0x4202_a05f_2000_0000, // 1e10
];

const F32S: [u32; 24] = [
    0,
    0x8000_0000,
    0x3f80_0000, // 1.0
    0xbf80_0000, // -1.0
    0x4000_0000, // 2.0
    0x3f00_0000, // 0.5
    0x3fc0_0000, // 1.5
    0x4020_0000, // 2.5
    0xc020_0000, // -2.5
    0x7f80_0000, // inf
    0xff80_0000, // -inf
    0x7fc0_0000, // qNaN
    0xffc0_0000, // -qNaN
    0x7fa0_0000, // sNaN
    0x7f80_0001, // sNaN
    0x0000_0001, // denormal
    0x007f_ffff, // largest denormal
    0x0080_0000, // smallest normal
    0x7f7f_ffff, // largest finite
    0x4f00_0000, // 2^31
    0xcf00_0000, // -2^31
    0x5f00_0000, // 2^63
    0xdf00_0000, // -2^63
    0x4effffff,  // just below 2^31
];

fn random_f64(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=3 => rng.pick(&F64S),
        4..=7 => {
            let v = (rng.range(-100_000, 100_000) as f64) / (1 << rng.below(12)) as f64;
            v.to_bits()
        }
        _ => rng.next_u64(),
    }
}

fn random_f32(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0..=3 => rng.pick(&F32S),
        4..=7 => {
            let v = (rng.range(-100_000, 100_000) as f32) / (1 << rng.below(12)) as f32;
            v.to_bits()
        }
        _ => rng.next_u64() as u32,
    }
}

fn random_xmm(rng: &mut Rng) -> u128 {
    match rng.below(4) {
        0 => u128::from(rng.next_u64()) | u128::from(rng.next_u64()) << 64,
        1 => (0..4).fold(0u128, |acc, i| {
            acc | u128::from(random_f32(rng)) << (32 * i)
        }),
        2 => u128::from(random_f64(rng)) | u128::from(random_f64(rng)) << 64,
        _ => u128::from(random_f64(rng)) | u128::from(rng.next_u64()) << 64,
    }
}

fn random_gpr_value(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=2 => rng.pick(&INTERESTING),
        3 => rng.below(64),
        _ => rng.next_u64(),
    }
}

/// The data buffer: random bytes mixed with runs of one byte (so that REPE CMPS/SCAS run
/// for a while) and floating-point values (so that memory operands of SSE ops are varied).
fn random_data(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(size);
    while d.len() < size {
        let len = rng.range(16, 256) as usize;
        match rng.below(5) {
            0 | 1 => (0..len).for_each(|_| d.push(rng.next_u64() as u8)),
            2 => {
                let any = rng.next_u64() as u8;
                let b = rng.pick(&[0u8, 0xff, 0x41, any]);
                d.extend(std::iter::repeat_n(b, len));
            }
            3 => (0..len / 8).for_each(|_| d.extend_from_slice(&random_f64(rng).to_le_bytes())),
            _ => (0..len / 4).for_each(|_| d.extend_from_slice(&random_f32(rng).to_le_bytes())),
        }
    }
    d.truncate(size);
    d
}

/// Registers the generator may pick for operands: everything except RSP and the base.
const GPR_CANDIDATES: [usize; 14] = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
/// Index registers for memory operands: none of the implicit operands of DIV/MUL/strings.
const INDEX_CANDIDATES: [usize; 9] = [3, 5, 8, 9, 10, 11, 12, 13, 14];

pub fn gpr(index: usize, bits: u32) -> Register {
    const R8: [Register; 16] = [
        Register::AL,
        Register::CL,
        Register::DL,
        Register::BL,
        Register::SPL,
        Register::BPL,
        Register::SIL,
        Register::DIL,
        Register::R8L,
        Register::R9L,
        Register::R10L,
        Register::R11L,
        Register::R12L,
        Register::R13L,
        Register::R14L,
        Register::R15L,
    ];
    let base = match bits {
        8 => return R8[index],
        16 => Register::AX,
        32 => Register::EAX,
        _ => Register::RAX,
    };
    base + index as u32
}

fn high8(index: usize) -> Register {
    Register::AH + index as u32
}

/// One operand value.
#[derive(Clone, Copy, Debug)]
enum Val {
    Reg(Register),
    Mem(MemoryOperand),
    Imm(OpKind, u64),
}

fn make(code: Code, ops: &[Val]) -> Instruction {
    let mut i = Instruction::default();
    i.set_code(code);
    for (n, op) in ops.iter().enumerate() {
        let n = n as u32;
        match *op {
            Val::Reg(r) => {
                i.set_op_kind(n, OpKind::Register);
                i.set_op_register(n, r);
            }
            Val::Mem(m) => {
                i.set_op_kind(n, OpKind::Memory);
                i.set_memory_base(m.base);
                i.set_memory_index(m.index);
                i.set_memory_index_scale(m.scale);
                i.set_memory_displ_size(m.displ_size);
                i.set_memory_displacement64(m.displacement as u64);
                i.set_segment_prefix(Register::None);
            }
            Val::Imm(kind, v) => {
                i.set_op_kind(n, kind);
                match kind {
                    OpKind::Immediate16 => i.set_immediate16(v as u16),
                    OpKind::Immediate32 | OpKind::Immediate32to64 => i.set_immediate32(v as u32),
                    OpKind::Immediate64 => i.set_immediate64(v),
                    _ => i.set_immediate8(v as u8),
                }
            }
        }
    }
    i
}

fn mem_base_disp(base: Register, disp: i64) -> MemoryOperand {
    let size = if (-128..=127).contains(&disp) { 1 } else { 4 };
    MemoryOperand::new(base, Register::None, 1, disp, size, false, Register::None)
}

fn encodes(instrs: &[Instruction]) -> bool {
    let mut enc = Encoder::new(64);
    instrs
        .iter()
        .all(|i| enc.encode(i, super::native::CODE_ADDR).is_ok())
}

/// Generator state for one case.
pub struct CaseGen<'r> {
    rng: &'r mut Rng,
    hot_gpr: Vec<usize>,
    hot_xmm: Vec<usize>,
    /// Flags that may be undefined at this point of the sequence (conservative).
    maybe_undefined: u64,
}

const CF: u64 = 1;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

/// (flags read, flags certainly defined afterwards, flags possibly undefined afterwards)
/// for the generator's bookkeeping: an instruction must never consume an undefined flag,
/// or its result would legitimately differ between CPUs.
fn static_flags(instr: &Instruction) -> (u64, u64, u64) {
    use iced_x86::{ConditionCode as C, Mnemonic as M};
    let cc_reads = match instr.condition_code() {
        C::o | C::no => OF,
        C::b | C::ae => CF,
        C::e | C::ne => ZF,
        C::be | C::a => CF | ZF,
        C::s | C::ns => SF,
        C::p | C::np => PF,
        C::l | C::ge => SF | OF,
        C::le | C::g => ZF | SF | OF,
        _ => 0,
    };
    match instr.mnemonic() {
        M::Add | M::Sub | M::Cmp | M::Neg | M::Xadd | M::Cmpxchg => (0, STATUS, 0),
        M::Ucomiss | M::Ucomisd | M::Comiss | M::Comisd => (0, STATUS, 0),
        M::Adc | M::Sbb => (CF, STATUS, 0),
        M::And | M::Or | M::Xor | M::Test => (0, STATUS & !AF, AF),
        M::Inc | M::Dec => (0, STATUS & !CF, 0),
        M::Stc | M::Clc => (0, CF, 0),
        M::Cmc => (CF, CF, 0),
        M::Mul | M::Imul => (0, CF | OF, SF | ZF | AF | PF),
        M::Div | M::Idiv => (0, 0, STATUS),
        M::Bt | M::Bts | M::Btr | M::Btc => (0, CF, STATUS & !CF),
        M::Bsf | M::Bsr => (0, ZF, STATUS & !ZF),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Shld | M::Shrd => (0, 0, CF | AF | OF),
        M::Rol | M::Ror => (0, 0, OF),
        M::Rcl | M::Rcr => (CF, 0, OF),
        M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg
        | M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Sete
        | M::Setne
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg => (cc_reads, 0, 0),
        // CMPS/SCAS define everything, but not when a REP count is zero.
        M::Cmpsb | M::Cmpsw | M::Cmpsq | M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
            if instr.has_repe_prefix() || instr.has_repne_prefix() {
                (0, 0, 0)
            } else {
                (0, STATUS, 0)
            }
        }
        M::Cmpsd if instr.code() == Code::Cmpsd_m32_m32 => {
            if instr.has_repe_prefix() || instr.has_repne_prefix() {
                (0, 0, 0)
            } else {
                (0, STATUS, 0)
            }
        }
        _ => (0, 0, 0),
    }
}

impl<'r> CaseGen<'r> {
    pub fn new(rng: &'r mut Rng) -> Self {
        let n = rng.range(3, 6) as usize;
        let hot_gpr = (0..n).map(|_| rng.pick(&GPR_CANDIDATES)).collect();
        let hot_xmm = (0..4).map(|_| rng.below(16) as usize).collect();
        CaseGen {
            rng,
            hot_gpr,
            hot_xmm,
            maybe_undefined: 0,
        }
    }

    fn gpr_index(&mut self, exclude: &[usize]) -> usize {
        for _ in 0..20 {
            let i = if self.rng.chance(80) {
                self.rng.pick(&self.hot_gpr)
            } else {
                self.rng.pick(&GPR_CANDIDATES)
            };
            if !exclude.contains(&i) {
                return i;
            }
        }
        *GPR_CANDIDATES
            .iter()
            .find(|i| !exclude.contains(i))
            .unwrap_or(&3)
    }

    fn reg(&mut self, bits: u32, exclude: &[usize]) -> Register {
        let i = self.gpr_index(exclude);
        if bits == 8 && i < 4 && self.rng.chance(25) {
            high8(i)
        } else {
            gpr(i, bits)
        }
    }

    fn xmm(&mut self) -> Register {
        let i = if self.rng.chance(80) {
            self.rng.pick(&self.hot_xmm)
        } else {
            self.rng.below(16) as usize
        };
        Register::XMM0 + i as u32
    }

    /// A memory operand of `bytes` inside the buffer (`align`: required alignment). Setup
    /// instructions that bound an index register are appended to `setup`.
    fn mem(
        &mut self,
        bytes: i64,
        align: i64,
        allow_index: bool,
        setup: &mut Vec<Instruction>,
    ) -> MemoryOperand {
        let bytes = bytes.max(1);
        let misalign = align > 1 && self.rng.chance(3);
        let a32 = self.rng.chance(10);
        let base = if a32 { Register::R15D } else { Register::R15 };
        if allow_index && self.rng.chance(25) {
            let idx = self.rng.pick(&INDEX_CANDIDATES);
            let (mask, scale) = if align > 1 {
                (0xf0i64, 1)
            } else {
                (0xff, self.rng.pick(&[1i64, 2, 4, 8]))
            };
            setup.push(make(
                Code::And_rm32_imm32,
                &[
                    Val::Reg(gpr(idx, 32)),
                    Val::Imm(OpKind::Immediate32, mask as u64),
                ],
            ));
            let mut disp = self.rng.range(-HALF, HALF - bytes - mask * scale);
            if align > 1 {
                disp &= !(align - 1);
            }
            if misalign {
                disp += self.rng.range(1, align - 1);
            }
            let size = if (-128..=127).contains(&disp) { 1 } else { 4 };
            let index = gpr(idx, if a32 { 32 } else { 64 });
            return MemoryOperand::new(
                base,
                index,
                scale as u32,
                disp,
                size,
                false,
                Register::None,
            );
        }
        let mut disp = self.rng.range(-HALF, HALF - bytes);
        if align > 1 {
            disp &= !(align - 1);
        }
        if misalign {
            disp += self.rng.range(1, align - 1);
        }
        mem_base_disp(base, disp)
    }

    /// LEA's operand: any registers, any scale and displacement (never accessed).
    fn lea_mem(&mut self) -> MemoryOperand {
        if self.rng.chance(5) {
            let target =
                super::native::CODE_ADDR.wrapping_add(self.rng.range(-0x10000, 0x10000) as u64);
            return MemoryOperand::new(
                Register::RIP,
                Register::None,
                1,
                target as i64,
                8,
                false,
                Register::None,
            );
        }
        let bits = if self.rng.chance(20) { 32 } else { 64 };
        let base = if self.rng.chance(90) {
            gpr(self.gpr_index(&[]), bits)
        } else {
            Register::None
        };
        let index = if self.rng.chance(50) || base == Register::None {
            gpr(self.gpr_index(&[]), bits)
        } else {
            Register::None
        };
        let scale = self.rng.pick(&[1u32, 2, 4, 8]);
        let disp = match self.rng.below(4) {
            0 => 0,
            1 => self.rng.range(-128, 127),
            2 => self.rng.next_u64() as i32 as i64,
            _ => self
                .rng
                .pick(&[i32::MIN as i64, i32::MAX as i64, -1, 0x7f, -0x80]),
        };
        let size = if base == Register::None || !(-128..=127).contains(&disp) {
            4
        } else {
            1
        };
        MemoryOperand::new(base, index, scale, disp, size, false, Register::None)
    }

    fn imm_value(&mut self, bits: u32) -> u64 {
        let v = match self.rng.below(10) {
            0..=2 => self.rng.range(-3, 3) as u64,
            3 | 4 => self.rng.pick(&INTERESTING),
            _ => self.rng.next_u64(),
        };
        if bits == 64 {
            v
        } else {
            v & ((1u64 << bits) - 1)
        }
    }

    /// Builds one instruction of `form` with its setup, or None if the random operands
    /// do not encode (the caller retries).
    pub fn build(&mut self, form: &Form) -> Option<Vec<Instruction>> {
        let m = form.mnemonic.as_str();
        let mut setup = Vec::new();
        let mut vals: Vec<Val> = Vec::new();
        // The size (bits) of the first GPR-like operand, for immediates and setups.
        let mut gpr_bits = 0u32;
        let is_div = m == "Div" || m == "Idiv";
        let safe_div = is_div && self.rng.chance(85);
        let bt_reg_mem = matches!(m, "Bt" | "Bts" | "Btr" | "Btc")
            && matches!(form.ops.get(1), Some(Op::Gpr(_)));
        let shld16 = (m == "Shld" || m == "Shrd") && matches!(form.ops[0], Op::GprOrMem(16));
        let mem_allowed = !bt_reg_mem;
        for op in &form.ops {
            let v = match *op {
                Op::Gpr(bits) => {
                    if gpr_bits == 0 {
                        gpr_bits = bits;
                    }
                    Val::Reg(self.reg(bits, &[]))
                }
                Op::GprOrMem(bits) | Op::GprOrMemMixed(_, bits)
                    if self.rng.chance(35) || (bt_reg_mem && self.rng.chance(40)) =>
                {
                    if gpr_bits == 0 {
                        gpr_bits = bits;
                    }
                    let mut s = Vec::new();
                    let mo = self.mem(i64::from(bits / 8), 1, mem_allowed, &mut s);
                    setup.extend(s);
                    Val::Mem(mo)
                }
                Op::GprOrMem(bits) => {
                    if gpr_bits == 0 {
                        gpr_bits = bits;
                    }
                    // DIV's divisor must not be the high half of the dividend.
                    let exclude: &[usize] = if safe_div && bits > 8 { &[2] } else { &[] };
                    if safe_div && bits == 8 {
                        Val::Reg(self.reg_no_high8(exclude))
                    } else {
                        Val::Reg(self.reg(bits, exclude))
                    }
                }
                Op::GprOrMemMixed(reg_bits, _) => Val::Reg(self.reg(reg_bits, &[])),
                Op::Mem(0) => Val::Mem(self.lea_mem()),
                Op::Mem(bits) => {
                    let mut s = Vec::new();
                    let mo = self.mem(i64::from(bits / 8), 1, true, &mut s);
                    setup.extend(s);
                    Val::Mem(mo)
                }
                Op::Imm(bits) => self.immediate(form, bits, gpr_bits, shld16),
                Op::One => Val::Imm(OpKind::Immediate8, 1),
                Op::Fixed(r) => {
                    if gpr_bits == 0 {
                        gpr_bits = r.size() as u32 * 8;
                    }
                    Val::Reg(r)
                }
                Op::Xmm => Val::Reg(self.xmm()),
                Op::XmmOrMem(bits) => {
                    if self.rng.chance(35) {
                        let align = if bits == 128 && !UNALIGNED_OK.contains(&m) {
                            16
                        } else {
                            1
                        };
                        let mut s = Vec::new();
                        let mo = self.mem(i64::from(bits / 8), align, true, &mut s);
                        setup.extend(s);
                        Val::Mem(mo)
                    } else {
                        Val::Reg(self.xmm())
                    }
                }
            };
            vals.push(v);
        }

        // Count in CL: usually 0..=65 so that the masked and unmasked cases all show up.
        if form.ops.contains(&Op::Fixed(Register::CL)) && (shld16 || self.rng.chance(70)) {
            let count = if shld16 {
                let c = self.rng.range(0, 65);
                if c & 31 > 16 {
                    c & 15
                } else {
                    c
                }
            } else {
                self.rng.range(0, 65)
            };
            setup.push(make(
                Code::Mov_r8_imm8,
                &[
                    Val::Reg(Register::CL),
                    Val::Imm(OpKind::Immediate8, count as u64),
                ],
            ));
        }
        if bt_reg_mem {
            if let (Val::Mem(_), Val::Reg(r)) = (vals[0], vals[1]) {
                // Keep the bit offset within the buffer (the memory form addresses a bit
                // string).
                let idx = r.full_register().number();
                let off = self.rng.range(-0x3000, 0x3000);
                setup.push(make(
                    Code::Mov_rm64_imm32,
                    &[
                        Val::Reg(gpr(idx, 64)),
                        Val::Imm(OpKind::Immediate32to64, off as u64),
                    ],
                ));
                if let Val::Mem(mo) = &mut vals[0] {
                    mo.displacement = self.rng.range(-0x100, 0x100);
                    mo.displ_size = if (-128..=127).contains(&mo.displacement) {
                        1
                    } else {
                        4
                    };
                }
            }
        }
        if safe_div {
            self.div_setup(m, &vals[0], gpr_bits, &mut setup);
        }
        let mut main = make(form.code, &vals);
        let lockable = matches!(
            m,
            "Add"
                | "Or"
                | "Adc"
                | "Sbb"
                | "And"
                | "Sub"
                | "Xor"
                | "Inc"
                | "Dec"
                | "Neg"
                | "Not"
                | "Bts"
                | "Btr"
                | "Btc"
                | "Xadd"
                | "Cmpxchg"
                | "Xchg"
        );
        if lockable && matches!(vals.first(), Some(Val::Mem(_))) && self.rng.chance(25) {
            main.set_has_lock_prefix(true);
        }
        setup.push(main);
        encodes(&setup).then_some(setup)
    }

    /// An 8-bit register that is not AH (DIV r/m8's divisor must differ from AH).
    fn reg_no_high8(&mut self, exclude: &[usize]) -> Register {
        let i = self.gpr_index(exclude);
        if i != 0 && i < 4 && self.rng.chance(25) {
            high8(i)
        } else {
            gpr(i, 8)
        }
    }

    /// Setup that keeps DIV/IDIV from #DE: a non-zero divisor and a high half smaller
    /// than it (DIV) or a sign-extended dividend (IDIV).
    fn div_setup(&mut self, m: &str, divisor: &Val, bits: u32, setup: &mut Vec<Instruction>) {
        let (or_code, mov_code, shr_code, high) = match bits {
            8 => (
                Code::Or_rm8_imm8,
                Code::Mov_r8_rm8,
                Code::Shr_rm8_imm8,
                Register::AH,
            ),
            16 => (
                Code::Or_rm16_imm8,
                Code::Mov_r16_rm16,
                Code::Shr_rm16_imm8,
                Register::DX,
            ),
            32 => (
                Code::Or_rm32_imm8,
                Code::Mov_r32_rm32,
                Code::Shr_rm32_imm8,
                Register::EDX,
            ),
            _ => (
                Code::Or_rm64_imm8,
                Code::Mov_r64_rm64,
                Code::Shr_rm64_imm8,
                Register::RDX,
            ),
        };
        let or_kind = match bits {
            8 => OpKind::Immediate8,
            16 => OpKind::Immediate8to16,
            32 => OpKind::Immediate8to32,
            _ => OpKind::Immediate8to64,
        };
        setup.push(make(or_code, &[*divisor, Val::Imm(or_kind, 1)]));
        if m == "Idiv" {
            let code = match bits {
                8 => Code::Cbw,
                16 => Code::Cwd,
                32 => Code::Cdq,
                _ => Code::Cqo,
            };
            setup.push(Instruction::with(code));
            return;
        }
        let k = self.rng.range(1, i64::from(bits) - 1) as u64;
        let legacy8 = |r: Register| {
            matches!(
                r,
                Register::AL
                    | Register::CL
                    | Register::DL
                    | Register::BL
                    | Register::CH
                    | Register::DH
                    | Register::BH
            )
        };
        match divisor {
            Val::Reg(r) if bits == 8 && !legacy8(*r) => {
                setup.push(make(
                    Code::Mov_r8_imm8,
                    &[Val::Reg(high), Val::Imm(OpKind::Immediate8, 0)],
                ));
            }
            Val::Mem(_) if bits == 8 => {
                // `mov ah, [r15+..]` needs REX, which excludes AH.
                setup.push(make(
                    Code::Mov_r8_imm8,
                    &[Val::Reg(high), Val::Imm(OpKind::Immediate8, 0)],
                ));
            }
            _ => {
                setup.push(make(mov_code, &[Val::Reg(high), *divisor]));
                setup.push(make(
                    shr_code,
                    &[Val::Reg(high), Val::Imm(OpKind::Immediate8, k)],
                ));
            }
        }
    }

    fn immediate(&mut self, form: &Form, bits: u32, gpr_bits: u32, shld16: bool) -> Val {
        let m = form.mnemonic.as_str();
        let sign_extended = ALU.contains(&m) || m == "Imul";
        let kind = match bits {
            8 if sign_extended && gpr_bits > 8 => match gpr_bits {
                16 => OpKind::Immediate8to16,
                32 => OpKind::Immediate8to32,
                _ => OpKind::Immediate8to64,
            },
            8 => OpKind::Immediate8,
            16 => OpKind::Immediate16,
            32 if gpr_bits == 64 => OpKind::Immediate32to64,
            32 => OpKind::Immediate32,
            _ => OpKind::Immediate64,
        };
        let value = if SHIFT.contains(&m) {
            let c = if self.rng.chance(75) {
                self.rng.range(0, 65) as u64
            } else {
                self.rng.below(256)
            };
            if shld16 && c & 31 > 16 {
                c & 15
            } else {
                c
            }
        } else if m.starts_with("Psll") || m.starts_with("Psrl") || m.starts_with("Psra") {
            // PSLL/PSRL/PSRA/PSLLDQ/PSRLDQ immediates: mostly within the element size.
            match self.rng.below(10) {
                0..=5 => self.rng.range(0, 17) as u64,
                6 | 7 => self.rng.range(0, 70) as u64,
                _ => self.rng.below(256),
            }
        } else if m.starts_with("Cmp") && m != "Cmp" {
            self.rng.below(8)
        } else {
            self.imm_value(bits)
        };
        Val::Imm(kind, value)
    }

    /// A string instruction with its setup: direction, RSI/RDI into the buffer, a small
    /// count for REP forms.
    fn build_string(&mut self) -> Option<Vec<Instruction>> {
        let kind = self.rng.below(5);
        let size = self.rng.pick(&[1u32, 2, 4, 8]);
        let a32 = self.rng.chance(15);
        let addr_size = if a32 { 32 } else { 64 };
        let rep = self.rng.chance(65);
        let mut setup = Vec::new();
        setup.push(Instruction::with(if self.rng.chance(35) {
            Code::Std
        } else {
            Code::Cld
        }));
        let span = 41 * 8;
        for r in [Register::RSI, Register::RDI] {
            let d = self.rng.range(-HALF + span, HALF - span - 8);
            setup.push(make(
                Code::Lea_r64_m,
                &[Val::Reg(r), Val::Mem(mem_base_disp(Register::R15, d))],
            ));
        }
        if rep {
            let n = self.rng.range(0, 40) as u64;
            if a32 {
                // Only ECX counts; the upper half must not matter.
                let v = (self.rng.next_u64() << 32) | n;
                setup.push(make(
                    Code::Mov_r64_imm64,
                    &[Val::Reg(Register::RCX), Val::Imm(OpKind::Immediate64, v)],
                ));
            } else {
                setup.push(make(
                    Code::Mov_r32_imm32,
                    &[Val::Reg(Register::ECX), Val::Imm(OpKind::Immediate32, n)],
                ));
            }
        }
        let plain = if rep {
            RepPrefixKind::Repe
        } else {
            RepPrefixKind::None
        };
        let cond = if !rep {
            RepPrefixKind::None
        } else if self.rng.chance(50) {
            RepPrefixKind::Repe
        } else {
            RepPrefixKind::Repne
        };
        let none = Register::None;
        let main = match (kind, size) {
            (0, 1) => Instruction::with_movsb(addr_size, none, plain),
            (0, 2) => Instruction::with_movsw(addr_size, none, plain),
            (0, 4) => Instruction::with_movsd(addr_size, none, plain),
            (0, _) => Instruction::with_movsq(addr_size, none, plain),
            (1, 1) => Instruction::with_stosb(addr_size, plain),
            (1, 2) => Instruction::with_stosw(addr_size, plain),
            (1, 4) => Instruction::with_stosd(addr_size, plain),
            (1, _) => Instruction::with_stosq(addr_size, plain),
            (2, 1) => Instruction::with_lodsb(addr_size, none, plain),
            (2, 2) => Instruction::with_lodsw(addr_size, none, plain),
            (2, 4) => Instruction::with_lodsd(addr_size, none, plain),
            (2, _) => Instruction::with_lodsq(addr_size, none, plain),
            (3, 1) => Instruction::with_cmpsb(addr_size, none, cond),
            (3, 2) => Instruction::with_cmpsw(addr_size, none, cond),
            (3, 4) => Instruction::with_cmpsd(addr_size, none, cond),
            (3, _) => Instruction::with_cmpsq(addr_size, none, cond),
            (_, 1) => Instruction::with_scasb(addr_size, cond),
            (_, 2) => Instruction::with_scasw(addr_size, cond),
            (_, 4) => Instruction::with_scasd(addr_size, cond),
            (_, _) => Instruction::with_scasq(addr_size, cond),
        }
        .ok()?;
        setup.push(main);
        encodes(&setup).then_some(setup)
    }

    fn pick_category(&mut self, tables: &Tables) -> Category {
        let avail: Vec<(Category, u64)> = WEIGHTS
            .iter()
            .copied()
            .filter(|(c, _)| {
                if *c == Category::Str {
                    tables.strings
                } else {
                    tables.groups.iter().any(|(g, _)| g == c)
                }
            })
            .collect();
        let total: u64 = avail.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.below(total.max(1));
        for (c, w) in &avail {
            if x < *w {
                return *c;
            }
            x -= w;
        }
        Category::Str
    }

    /// Appends `instrs`, putting a flag-defining CMP in front of any instruction that
    /// would read a possibly undefined flag.
    fn append(&mut self, instrs: Vec<Instruction>, out: &mut Vec<Instruction>) {
        for instr in instrs {
            let (reads, defines, undefines) = static_flags(&instr);
            if reads & self.maybe_undefined != 0 {
                let r = gpr(self.gpr_index(&[]), 64);
                let imm = self.rng.range(-128, 127) as u64;
                out.push(make(
                    Code::Cmp_rm64_imm8,
                    &[Val::Reg(r), Val::Imm(OpKind::Immediate8to64, imm)],
                ));
                self.maybe_undefined = 0;
            }
            self.maybe_undefined = (self.maybe_undefined & !defines) | undefines;
            out.push(instr);
        }
    }

    /// One random instruction (with its setup) appended to `out`.
    fn emit(&mut self, tables: &Tables, out: &mut Vec<Instruction>) {
        loop {
            let cat = self.pick_category(tables);
            if cat == Category::Str {
                if let Some(v) = self.build_string() {
                    self.append(v, out);
                    return;
                }
                continue;
            }
            let Some((_, groups)) = tables.groups.iter().find(|(c, _)| *c == cat) else {
                continue;
            };
            let group = &groups[self.rng.below(groups.len() as u64) as usize];
            let form = &tables.forms[self.rng.pick(group)];
            for _ in 0..10 {
                if let Some(v) = self.build(form) {
                    self.append(v, out);
                    return;
                }
            }
        }
    }
}

/// A random case: initial state and a sequence of `1..=max_len` generated instructions.
/// `unmask_percent`: how often MXCSR starts with one exception unmasked (so that #XM and
/// its MXCSR rules are tested).
pub fn random_case(rng: &mut Rng, tables: &Tables, max_len: u64, unmask_percent: u64) -> Case {
    let mut gpr = [0u64; 16];
    for g in gpr.iter_mut() {
        *g = random_gpr_value(rng);
    }
    gpr[4] = 0;
    gpr[BASE_REG_INDEX] = BASE_VALUE;
    let status = rng.next_u64() & 0x8d5; // CF PF AF ZF SF OF
    let df = if rng.chance(25) { 1 << 10 } else { 0 };
    let mut mxcsr = 0x1f80u32;
    if rng.chance(25) {
        mxcsr = (mxcsr & !0x6000) | (rng.below(4) as u32) << 13;
    }
    if rng.chance(10) {
        mxcsr |= 1 << 15; // FTZ
    }
    if rng.chance(10) {
        mxcsr |= 1 << 6; // DAZ
    }
    if rng.chance(unmask_percent) {
        mxcsr &= !(1 << (7 + rng.below(6))); // unmask one exception
    }
    let mut xmm = [0u128; 16];
    for x in xmm.iter_mut() {
        *x = random_xmm(rng);
    }
    let data = random_data(rng, super::native::DATA_SIZE);
    let init = Init {
        gpr,
        rflags: status | df,
        mxcsr,
        xmm,
        data,
    };
    let n = 1 + rng.below(max_len);
    let mut instrs = Vec::new();
    let mut gen = CaseGen::new(rng);
    for _ in 0..n {
        gen.emit(tables, &mut instrs);
    }
    Case { init, instrs }
}

/// Encodes `instrs` starting at `ip`; returns the bytes and each instruction's offset.
pub fn encode(instrs: &[Instruction], ip: u64) -> (Vec<u8>, Vec<usize>) {
    let mut enc = Encoder::new(64);
    let mut offsets = Vec::with_capacity(instrs.len());
    let mut at = 0usize;
    for i in instrs {
        offsets.push(at);
        let len = enc
            .encode(i, ip + at as u64)
            .unwrap_or_else(|e| panic!("encoding {:?} failed: {e}", i.code()));
        at += len;
    }
    (enc.take_buffer(), offsets)
}
