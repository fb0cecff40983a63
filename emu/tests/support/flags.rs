//! Which arithmetic flags an instruction writes and which of those the architecture leaves
//! undefined, so that the comparison only looks at defined flags.
//!
//! Counts (shifts, REP) are taken from the interpreter's state just before the instruction;
//! when that state is already wrong the case fails on the registers anyway. Where Intel and
//! AMD document different behaviour the flag is treated as undefined.

use emu::state::{CpuState, AF, CF, OF, PF, SF, STATUS_FLAGS, ZF};
use iced_x86::{Code, Instruction, Mnemonic, OpKind};

/// (flags the instruction writes, flags among them that are undefined afterwards).
pub fn effect(instr: &Instruction, state: &CpuState) -> (u64, u64) {
    use Mnemonic as M;
    const ALL: u64 = STATUS_FLAGS;
    let bits = operand_bits(instr);
    let count_mask = if bits == 64 { 0x3f } else { 0x1f };
    match instr.mnemonic() {
        M::Add | M::Adc | M::Sub | M::Sbb | M::Cmp | M::Neg | M::Xadd | M::Cmpxchg => (ALL, 0),
        M::Cmpsb | M::Cmpsw | M::Cmpsq | M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
            string_effect(instr, state)
        }
        M::Cmpsd if instr.code() == Code::Cmpsd_m32_m32 => string_effect(instr, state),
        M::Inc | M::Dec => (ALL & !CF, 0),
        M::And | M::Or | M::Xor | M::Test => (ALL, AF),
        M::Shl | M::Sal | M::Shr | M::Sar => {
            let c = shift_count(instr, state, 1) & count_mask;
            if c == 0 {
                return (0, 0);
            }
            let mut undef = AF;
            if c != 1 {
                undef |= OF;
            }
            if instr.mnemonic() != M::Sar && c >= u64::from(bits) {
                undef |= CF;
            }
            (ALL, undef)
        }
        M::Rol | M::Ror | M::Rcl | M::Rcr => {
            let c = shift_count(instr, state, 1) & count_mask;
            match c {
                0 => (0, 0),
                1 => (CF | OF, 0),
                _ => (CF | OF, OF),
            }
        }
        M::Shld | M::Shrd => {
            let c = shift_count(instr, state, 2) & count_mask;
            if c == 0 {
                return (0, 0);
            }
            let mut undef = AF;
            if c != 1 {
                undef |= OF;
            }
            if c > u64::from(bits) {
                undef |= ALL;
            }
            (ALL, undef)
        }
        M::Mul | M::Imul => (ALL, SF | ZF | AF | PF),
        M::Div | M::Idiv => (ALL, ALL),
        // Intel leaves ZF alone, AMD documents it as undefined.
        M::Bt | M::Bts | M::Btr | M::Btc => (ALL, ALL & !CF),
        M::Bsf | M::Bsr => (ALL, ALL & !ZF),
        M::Ucomiss | M::Ucomisd | M::Comiss | M::Comisd => (ALL, 0),
        M::Stc | M::Clc | M::Cmc => (CF, 0),
        _ => (0, 0),
    }
}

/// A REP CMPS/SCAS with a zero count leaves the flags alone.
fn string_effect(instr: &Instruction, state: &CpuState) -> (u64, u64) {
    if instr.has_repe_prefix() || instr.has_repne_prefix() {
        let a32 = (0..instr.op_count())
            .any(|i| matches!(instr.op_kind(i), OpKind::MemorySegESI | OpKind::MemoryESEDI));
        let count = if a32 {
            state.gpr[1] & 0xffff_ffff
        } else {
            state.gpr[1]
        };
        if count == 0 {
            return (0, 0);
        }
    }
    (STATUS_FLAGS, 0)
}

fn operand_bits(instr: &Instruction) -> u32 {
    if instr.op_count() == 0 {
        return 0;
    }
    let bytes = match instr.op_kind(0) {
        OpKind::Register => instr.op_register(0).size(),
        OpKind::Memory => instr.memory_size().size(),
        _ => 0,
    };
    bytes as u32 * 8
}

fn shift_count(instr: &Instruction, state: &CpuState, op: u32) -> u64 {
    match instr.op_kind(op) {
        OpKind::Register => state.gpr[1] & 0xff,
        _ => instr.immediate(op),
    }
}
