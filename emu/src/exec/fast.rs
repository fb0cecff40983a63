//! Fast forms: the hottest 64-bit-mode instructions lowered once, at decode time, into a
//! compact operation with its operands already extracted.
//!
//! The generic path asks iced for the mnemonic, operand kinds, registers and immediates
//! every time an instruction runs. A kernel spends most of its instructions in a few forms
//! (MOV, the ALU group, CMP/TEST, LEA, MOVZX/MOVSX, INC/DEC, shifts by a constant, IMUL,
//! CMOVcc/SETcc, PUSH/POP, CALL/RET/JMP/Jcc), so the decode cache stores a [`Fast`] beside each decoded
//! instruction and the run loop executes it directly. Anything else (LOCK prefixes,
//! AH..BH, 32-bit addressing, other modes) lowers to [`Fast::Generic`] and takes the
//! ordinary path. Semantics (exact flags, zero extension, fault ordering: memory is
//! written before registers and flags change) are those of the generic path, and the
//! differential suite runs every instruction through both.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

use super::integer::alu::{self, ShiftOp};
use crate::access::{peek, push, DataAccess};
use crate::exception::{ExResult, Exception};
use crate::state::{gpr_info, CpuState, CF, OF, STATUS_FLAGS};

/// No base or index register in a [`MemRef`].
pub(crate) const NO_REG: u8 = 0xff;
/// A [`MemRef`] base that is RIP (the address of the next instruction).
pub(crate) const RIP_REG: u8 = 0xfe;

/// A 64-bit-addressing memory operand: `seg:[base + index*scale + disp]`, eight bytes so
/// that decoded blocks stay small. RIP-relative operands have [`RIP_REG`] as base: when a
/// fast form runs, RIP already holds the next instruction's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRef {
    pub(crate) disp: i32,
    pub(crate) base: u8,
    pub(crate) index: u8,
    pub(crate) scale: u8,
    pub(crate) seg: u8,
}

impl MemRef {
    #[inline(always)]
    fn offset(&self, state: &CpuState) -> u64 {
        let mut ea = self.disp as i64 as u64;
        if usize::from(self.base) < state.gpr.len() {
            ea = ea.wrapping_add(state.gpr[self.base as usize]);
        } else if self.base == RIP_REG {
            ea = ea.wrapping_add(state.rip);
        }
        if self.index != NO_REG {
            ea =
                ea.wrapping_add(state.gpr[self.index as usize].wrapping_mul(u64::from(self.scale)));
        }
        ea
    }
}

/// An operand of a fast form. Register operands are general-purpose registers other than
/// AH..BH, so every width is the low bytes of `gpr[index]`. An immediate is kept as the
/// 32 bits that sign-extend to it (a 64-bit one that does not fit stays generic, or becomes
/// [`Fast::AluRI`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    Reg(u8),
    Imm(i32),
    Mem(MemRef),
}

/// An immediate of `size` bytes as an [`Operand::Imm`], if it has one.
fn imm_operand(value: u64, size: usize) -> Option<Operand> {
    let value = value & alu::mask(size);
    if size < 8 {
        return Some(Operand::Imm(value as u32 as i32));
    }
    i32::try_from(value as i64).ok().map(Operand::Imm)
}

/// The two-operand ALU group (and MOV, which shares its operand forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AluOp {
    Mov,
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
    Cmp,
    Test,
}

/// A lowered instruction. `size` is the operand size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fast {
    Generic,
    /// `dst op= src` (MOV, ADD, ..., CMP and TEST without writeback). `flags`: whether
    /// the status flags are computed (see [`prune_dead_flags`]).
    Alu {
        op: AluOp,
        size: u8,
        dst: Operand,
        src: Operand,
        flags: bool,
    },
    /// [`Fast::Alu`] with two registers (the commonest form, without operand decoding).
    AluRR {
        op: AluOp,
        size: u8,
        dst: u8,
        src: u8,
        flags: bool,
    },
    /// [`Fast::Alu`] of a register with an immediate.
    AluRI {
        op: AluOp,
        size: u8,
        dst: u8,
        imm: u64,
        flags: bool,
    },
    /// INC/DEC of a register or memory operand (`delta` is +1 or -1).
    IncDec {
        size: u8,
        dst: Operand,
        inc: bool,
        flags: bool,
    },
    /// SHL/SHR/SAR/ROL/ROR by an immediate count.
    Shift {
        op: ShiftOp,
        size: u8,
        dst: Operand,
        count: u8,
        flags: bool,
    },
    /// BSWAP of a 32- or 64-bit register (flags untouched).
    Bswap {
        dst: u8,
        size: u8,
    },
    /// MOVZX/MOVSX/MOVSXD from `src_size` bytes into a register.
    Extend {
        dst: u8,
        size: u8,
        src: Operand,
        src_size: u8,
        signed: bool,
    },
    Lea {
        dst: u8,
        size: u8,
        mem: MemRef,
    },
    /// Two- and three-operand IMUL: `dst = a * b`, truncated.
    Imul {
        dst: u8,
        size: u8,
        a: Operand,
        b: Operand,
        flags: bool,
    },
    /// CMOVcc into a register (the source is read even when the move is not taken).
    Cmov {
        cc: ConditionCode,
        dst: u8,
        size: u8,
        src: Operand,
    },
    /// SETcc of a byte register or memory.
    Set {
        cc: ConditionCode,
        dst: Operand,
    },
    /// 64-bit PUSH of a register, immediate or memory operand.
    Push {
        src: Operand,
    },
    /// 64-bit POP into a register.
    Pop {
        dst: u8,
    },
    /// Relative CALL (the return address is the RIP after the instruction).
    Call {
        target: u64,
    },
    Ret,
    Jmp {
        target: u64,
    },
    Jcc {
        cc: ConditionCode,
        target: u64,
    },
    Nop,
}

impl Fast {
    /// Whether this form computes its status flags, for the forms that can skip them.
    fn flags_mut(&mut self) -> Option<&mut bool> {
        match self {
            Fast::Alu { flags, .. }
            | Fast::AluRR { flags, .. }
            | Fast::AluRI { flags, .. }
            | Fast::IncDec { flags, .. }
            | Fast::Shift { flags, .. }
            | Fast::Imul { flags, .. } => Some(flags),
            _ => None,
        }
    }
}

/// General-purpose register index, or None for AH..BH and non-GPRs.
pub(crate) fn gpr(reg: Register) -> Option<(u8, u8)> {
    match gpr_info(reg) {
        Some((index, width, false)) => Some((index as u8, width)),
        _ => None,
    }
}

pub(crate) fn mem_ref(instr: &Instruction) -> Option<MemRef> {
    let seg = CpuState::seg_index(instr.memory_segment())? as u8;
    let base = instr.memory_base();
    let index = instr.memory_index();
    if base == Register::RIP {
        let relative = instr.memory_displacement64().wrapping_sub(instr.next_ip()) as i64;
        return (index == Register::None).then_some(MemRef {
            disp: i32::try_from(relative).ok()?,
            base: RIP_REG,
            index: NO_REG,
            scale: 1,
            seg,
        });
    }
    let reg64 = |r: Register| -> Option<u8> {
        if r == Register::None {
            return Some(NO_REG);
        }
        match gpr_info(r) {
            Some((i, 8, false)) => Some(i as u8),
            _ => None,
        }
    };
    // With neither base nor index, iced gives a 64-bit-addressing displacement
    // sign-extended and a 32-bit one (0x67) zero-extended: one above 2 GiB does not
    // sign-extend from 32 bits, so that rare form stays generic.
    Some(MemRef {
        disp: i32::try_from(instr.memory_displacement64() as i64).ok()?,
        base: reg64(base)?,
        index: reg64(index)?,
        scale: instr.memory_index_scale() as u8,
        seg,
    })
}

/// Operand `n` as a fast operand of `size` bytes.
pub(crate) fn operand(instr: &Instruction, n: u32, size: u8) -> Option<Operand> {
    match instr.op_kind(n) {
        OpKind::Register => {
            let (i, w) = gpr(instr.op_register(n))?;
            (w == size).then_some(Operand::Reg(i))
        }
        OpKind::Memory => {
            (instr.memory_size().size() == usize::from(size)).then_some(())?;
            mem_ref(instr).map(Operand::Mem)
        }
        kind if is_immediate(kind) => imm_operand(instr.immediate(n), usize::from(size)),
        _ => None,
    }
}

fn is_immediate(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// Operand size of a form whose operand 0 is a register or memory.
pub(crate) fn size0(instr: &Instruction) -> Option<u8> {
    match instr.op0_kind() {
        OpKind::Register => gpr(instr.op0_register()).map(|(_, w)| w),
        OpKind::Memory => u8::try_from(instr.memory_size().size()).ok(),
        _ => None,
    }
}

/// Lower `instr` (decoded with `bitness`) to a fast form, or [`Fast::Generic`].
pub fn lower(instr: &Instruction, bitness: u32) -> Fast {
    if bitness != 64 || instr.has_lock_prefix() {
        return Fast::Generic;
    }
    lower64(instr).unwrap_or(Fast::Generic)
}

fn lower64(instr: &Instruction) -> Option<Fast> {
    use Mnemonic as Mn;
    let mn = instr.mnemonic();
    let alu_op = match mn {
        Mn::Mov => Some(AluOp::Mov),
        Mn::Add => Some(AluOp::Add),
        Mn::Adc => Some(AluOp::Adc),
        Mn::Sub => Some(AluOp::Sub),
        Mn::Sbb => Some(AluOp::Sbb),
        Mn::And => Some(AluOp::And),
        Mn::Or => Some(AluOp::Or),
        Mn::Xor => Some(AluOp::Xor),
        Mn::Cmp => Some(AluOp::Cmp),
        Mn::Test => Some(AluOp::Test),
        _ => None,
    };
    if let Some(op) = alu_op {
        if instr.op_count() != 2 {
            return None;
        }
        let size = size0(instr)?;
        if let (OpKind::Register, true) = (instr.op0_kind(), is_immediate(instr.op1_kind())) {
            // A register and an immediate of any width (MOV r64, imm64 included).
            let (dst, width) = gpr(instr.op0_register())?;
            return (width == size).then_some(Fast::AluRI {
                op,
                size,
                dst,
                imm: instr.immediate(1) & alu::mask(usize::from(size)),
                flags: true,
            });
        }
        let dst = operand(instr, 0, size)?;
        let src = operand(instr, 1, size)?;
        if matches!(dst, Operand::Imm(_)) {
            return None;
        }
        return Some(match (dst, src) {
            (Operand::Reg(dst), Operand::Reg(src)) => Fast::AluRR {
                op,
                size,
                dst,
                src,
                flags: true,
            },
            _ => Fast::Alu {
                op,
                size,
                dst,
                src,
                flags: true,
            },
        });
    }
    match mn {
        Mn::Inc | Mn::Dec if instr.op_count() == 1 => {
            let size = size0(instr)?;
            Some(Fast::IncDec {
                size,
                dst: operand(instr, 0, size)?,
                inc: mn == Mn::Inc,
                flags: true,
            })
        }
        Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar | Mn::Rol | Mn::Ror => {
            if instr.op_count() != 2 || instr.op1_kind() != OpKind::Immediate8 {
                return None;
            }
            let op = match mn {
                Mn::Shl | Mn::Sal => ShiftOp::Shl,
                Mn::Shr => ShiftOp::Shr,
                Mn::Sar => ShiftOp::Sar,
                Mn::Rol => ShiftOp::Rol,
                _ => ShiftOp::Ror,
            };
            let size = size0(instr)?;
            Some(Fast::Shift {
                op,
                size,
                dst: operand(instr, 0, size)?,
                count: instr.immediate8(),
                flags: true,
            })
        }
        Mn::Bswap => match gpr(instr.op0_register())? {
            (dst, size @ (4 | 8)) => Some(Fast::Bswap { dst, size }),
            _ => None,
        },
        Mn::Movzx | Mn::Movsx | Mn::Movsxd => {
            let (dst, size) = gpr(instr.op0_register())?;
            let src_size = match instr.op1_kind() {
                OpKind::Register => gpr(instr.op1_register())?.1,
                OpKind::Memory => u8::try_from(instr.memory_size().size()).ok()?,
                _ => return None,
            };
            if src_size > size {
                return None;
            }
            Some(Fast::Extend {
                dst,
                size,
                src: operand(instr, 1, src_size)?,
                src_size,
                signed: mn != Mn::Movzx,
            })
        }
        Mn::Imul if instr.op_count() >= 2 => {
            let (dst, size) = gpr(instr.op0_register())?;
            let (a, b) = if instr.op_count() == 3 {
                (operand(instr, 1, size)?, operand(instr, 2, size)?)
            } else {
                (Operand::Reg(dst), operand(instr, 1, size)?)
            };
            Some(Fast::Imul {
                dst,
                size,
                a,
                b,
                flags: true,
            })
        }
        _ if instr.op_count() == 2 && alu::is_cmov(mn) => {
            let (dst, size) = gpr(instr.op0_register())?;
            Some(Fast::Cmov {
                cc: instr.condition_code(),
                dst,
                size,
                src: operand(instr, 1, size)?,
            })
        }
        _ if instr.op_count() == 1 && alu::is_setcc(mn) => Some(Fast::Set {
            cc: instr.condition_code(),
            dst: operand(instr, 0, 1)?,
        }),
        Mn::Lea => {
            let (dst, size) = gpr(instr.op0_register())?;
            if size < 4 {
                return None;
            }
            Some(Fast::Lea {
                dst,
                size,
                mem: mem_ref(instr)?,
            })
        }
        Mn::Push if instr.op_count() == 1 => {
            let src = match instr.op0_kind() {
                OpKind::Register => match gpr(instr.op0_register())? {
                    (i, 8) => Operand::Reg(i),
                    _ => return None,
                },
                OpKind::Memory if instr.memory_size().size() == 8 => Operand::Mem(mem_ref(instr)?),
                OpKind::Immediate8to64 | OpKind::Immediate32to64 => {
                    imm_operand(instr.immediate(0), 8)?
                }
                _ => return None,
            };
            Some(Fast::Push { src })
        }
        Mn::Pop if instr.op0_kind() == OpKind::Register => match gpr(instr.op0_register())? {
            (dst, 8) => Some(Fast::Pop { dst }),
            _ => None,
        },
        Mn::Call if instr.op0_kind() == OpKind::NearBranch64 => Some(Fast::Call {
            target: instr.near_branch64(),
        }),
        Mn::Jmp if instr.op0_kind() == OpKind::NearBranch64 => Some(Fast::Jmp {
            target: instr.near_branch64(),
        }),
        Mn::Ret if instr.op_count() == 0 && instr.code() == iced_x86::Code::Retnq => {
            Some(Fast::Ret)
        }
        Mn::Nop => Some(Fast::Nop),
        _ if instr.is_jcc_short_or_near() && instr.op0_kind() == OpKind::NearBranch64 => {
            Some(Fast::Jcc {
                cc: instr.condition_code(),
                target: instr.near_branch64(),
            })
        }
        _ => None,
    }
}

#[inline(always)]
fn read<M: DataAccess>(state: &CpuState, mem: &mut M, op: &Operand, size: usize) -> ExResult<u64> {
    match op {
        Operand::Reg(i) => Ok(state.gpr[*i as usize] & alu::mask(size)),
        Operand::Imm(v) => Ok((*v as i64 as u64) & alu::mask(size)),
        Operand::Mem(m) => mem.read(m.seg as usize, m.offset(state), size),
    }
}

/// Register write with x86 width rules (32-bit writes zero-extend).
#[inline(always)]
fn set_reg(state: &mut CpuState, index: u8, size: usize, value: u64) {
    let r = &mut state.gpr[index as usize];
    *r = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        _ => {
            let m = alu::mask(size);
            (*r & !m) | (value & m)
        }
    };
}

#[inline(always)]
fn write<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    op: &Operand,
    size: usize,
    value: u64,
) -> ExResult<()> {
    match op {
        Operand::Reg(i) => {
            set_reg(state, *i, size, value);
            Ok(())
        }
        Operand::Mem(m) => mem.write(m.seg as usize, m.offset(state), size, value),
        Operand::Imm(_) => Err(Exception::InvalidOpcode),
    }
}

#[inline(always)]
fn set_status(state: &mut CpuState, rflags: u64) {
    state.rflags = (state.rflags & !STATUS_FLAGS) | (rflags & STATUS_FLAGS);
}

/// A branch target must be canonical; otherwise #GP with RIP at the branch.
#[inline(always)]
fn jump(state: &mut CpuState, target: u64) -> ExResult<()> {
    jump_check(target)?;
    state.rip = target;
    Ok(())
}

/// Run a fast form. RIP already points past the instruction (the return address of a
/// CALL); a fault leaves registers, flags and memory as they were. `force_flags` computes
/// the status flags of forms whose flags [`prune_dead_flags`] found dead (for a run that may
/// stop inside the block).
#[inline(always)]
pub fn execute<M: DataAccess>(
    f: &Fast,
    state: &mut CpuState,
    mem: &mut M,
    force_flags: bool,
) -> ExResult<()> {
    match f {
        Fast::Generic => Err(Exception::InvalidOpcode),
        Fast::Alu {
            op,
            size,
            dst,
            src,
            flags,
        } => {
            let size = usize::from(*size);
            let b = read(state, mem, src, size)?;
            if *op == AluOp::Mov {
                return write(state, mem, dst, size, b);
            }
            let a = read(state, mem, dst, size)?;
            let (r, f) = alu_op(*op, a, b, size, state.rflags, *flags || force_flags);
            // Memory first: a faulting write leaves the flags as they were.
            if let Some(r) = r {
                write(state, mem, dst, size, r)?;
            }
            if let Some(f) = f {
                set_status(state, f);
            }
            Ok(())
        }
        Fast::AluRR {
            op,
            size,
            dst,
            src,
            flags,
        } => {
            let size = usize::from(*size);
            let b = state.gpr[*src as usize] & alu::mask(size);
            alu_reg(state, *op, size, *dst, b, *flags || force_flags);
            Ok(())
        }
        Fast::AluRI {
            op,
            size,
            dst,
            imm,
            flags,
        } => {
            alu_reg(
                state,
                *op,
                usize::from(*size),
                *dst,
                *imm,
                *flags || force_flags,
            );
            Ok(())
        }
        Fast::IncDec {
            size,
            dst,
            inc,
            flags,
        } => {
            let size = usize::from(*size);
            let a = read(state, mem, dst, size)?;
            if !(*flags || force_flags) {
                let r = if *inc {
                    a.wrapping_add(1)
                } else {
                    a.wrapping_sub(1)
                };
                return write(state, mem, dst, size, r & alu::mask(size));
            }
            let rf = state.rflags;
            let (r, f) = if *inc {
                alu::inc(a, size, rf)
            } else {
                alu::dec(a, size, rf)
            };
            write(state, mem, dst, size, r)?;
            set_status(state, f);
            Ok(())
        }
        Fast::Shift {
            op,
            size,
            dst,
            count,
            flags,
        } => {
            let size = usize::from(*size);
            if let (Operand::Reg(reg), false) = (dst, *flags || force_flags) {
                // The commonest case (rotates in hash rounds): no operand decoding.
                let a = state.gpr[*reg as usize];
                set_reg(
                    state,
                    *reg,
                    size,
                    shift_result(*op, a, *count, size, state.rflags),
                );
                return Ok(());
            }
            let a = read(state, mem, dst, size)?;
            if !(*flags || force_flags) {
                let r = shift_result(*op, a, *count, size, state.rflags);
                return write(state, mem, dst, size, r);
            }
            let (c, rf) = (u64::from(*count), state.rflags);
            // One call per constant op, so each inlines to its own straight-line code.
            let (r, f) = match op {
                ShiftOp::Shl => alu::shift(ShiftOp::Shl, a, c, size, rf),
                ShiftOp::Shr => alu::shift(ShiftOp::Shr, a, c, size, rf),
                ShiftOp::Sar => alu::shift(ShiftOp::Sar, a, c, size, rf),
                other => alu::shift(*other, a, c, size, rf),
            };
            write(state, mem, dst, size, r & alu::mask(size))?;
            set_status(state, f);
            Ok(())
        }
        Fast::Extend {
            dst,
            size,
            src,
            src_size,
            signed,
        } => {
            let src_size = usize::from(*src_size);
            let v = read(state, mem, src, src_size)?;
            let v = if *signed {
                alu::sign_extend(v, src_size)
            } else {
                v
            };
            set_reg(state, *dst, usize::from(*size), v);
            Ok(())
        }
        Fast::Bswap { dst, size } => {
            let v = state.gpr[*dst as usize];
            state.gpr[*dst as usize] = if *size == 8 {
                v.swap_bytes()
            } else {
                u64::from((v as u32).swap_bytes())
            };
            Ok(())
        }
        Fast::Lea { dst, size, mem: m } => {
            set_reg(state, *dst, usize::from(*size), m.offset(state));
            Ok(())
        }
        Fast::Imul {
            dst,
            size,
            a,
            b,
            flags,
        } => {
            let size = usize::from(*size);
            let a = read(state, mem, a, size)?;
            let b = read(state, mem, b, size)?;
            if !(*flags || force_flags) {
                set_reg(state, *dst, size, a.wrapping_mul(b) & alu::mask(size));
                return Ok(());
            }
            let p = i128::from(alu::sign_extend(a, size) as i64)
                * i128::from(alu::sign_extend(b, size) as i64);
            let low = p as u64 & alu::mask(size);
            let overflow = i128::from(alu::sign_extend(low, size) as i64) != p;
            set_reg(state, *dst, size, low);
            state.rflags &= !(CF | OF);
            if overflow {
                state.rflags |= CF | OF;
            }
            Ok(())
        }
        Fast::Cmov { cc, dst, size, src } => {
            let size = usize::from(*size);
            let v = read(state, mem, src, size)?;
            if alu::condition(*cc, state.rflags) {
                set_reg(state, *dst, size, v);
            } else if size == 4 {
                state.gpr[*dst as usize] &= 0xffff_ffff;
            }
            Ok(())
        }
        Fast::Set { cc, dst } => {
            let on = alu::condition(*cc, state.rflags);
            write(state, mem, dst, 1, u64::from(on))
        }
        Fast::Push { src } => {
            let v = read(state, mem, src, 8)?;
            push(state, mem, v, 8)
        }
        Fast::Pop { dst } => {
            let v = peek(state, mem, 0, 8)?;
            // POP RSP loads the popped value; any other register sees RSP move first.
            state.gpr[4] = state.gpr[4].wrapping_add(8);
            state.gpr[*dst as usize] = v;
            Ok(())
        }
        Fast::Call { target } => {
            jump_check(*target)?;
            push(state, mem, state.rip, 8)?;
            state.rip = *target;
            Ok(())
        }
        Fast::Ret => {
            let target = peek(state, mem, 0, 8)?;
            jump_check(target)?;
            state.gpr[4] = state.gpr[4].wrapping_add(8);
            state.rip = target;
            Ok(())
        }
        Fast::Jmp { target } => jump(state, *target),
        Fast::Jcc { cc, target } => {
            if alu::condition(*cc, state.rflags) {
                jump(state, *target)
            } else {
                Ok(())
            }
        }
        Fast::Nop => Ok(()),
    }
}

/// `reg op= b` for the register forms: no operand decoding and nothing that can fault.
#[inline(always)]
fn alu_reg(state: &mut CpuState, op: AluOp, size: usize, dst: u8, b: u64, flags: bool) {
    if op == AluOp::Mov {
        set_reg(state, dst, size, b);
        return;
    }
    let a = state.gpr[dst as usize] & alu::mask(size);
    let (r, f) = alu_op(op, a, b, size, state.rflags, flags);
    if let Some(r) = r {
        set_reg(state, dst, size, r);
    }
    if let Some(f) = f {
        set_status(state, f);
    }
}

/// `a op b` for the two-operand ALU group: the result to write back (none for CMP and TEST)
/// and the new RFLAGS (none when `flags` is false, the flags being dead).
#[inline(always)]
fn alu_op(
    op: AluOp,
    a: u64,
    b: u64,
    size: usize,
    rflags: u64,
    flags: bool,
) -> (Option<u64>, Option<u64>) {
    let cf = rflags & CF != 0;
    if !flags {
        let r = match op {
            AluOp::Add => a.wrapping_add(b),
            AluOp::Adc => a.wrapping_add(b).wrapping_add(u64::from(cf)),
            AluOp::Sub => a.wrapping_sub(b),
            AluOp::Sbb => a.wrapping_sub(b).wrapping_sub(u64::from(cf)),
            AluOp::And => a & b,
            AluOp::Or => a | b,
            AluOp::Xor => a ^ b,
            AluOp::Mov => b,
            // Only flags, and they are dead: nothing to do.
            AluOp::Cmp | AluOp::Test => return (None, None),
        };
        return (Some(r & alu::mask(size)), None);
    }
    let (r, f) = match op {
        AluOp::Add => alu::add(a, b, false, size, rflags),
        AluOp::Adc => alu::add(a, b, cf, size, rflags),
        AluOp::Sub => alu::sub(a, b, false, size, rflags),
        AluOp::Sbb => alu::sub(a, b, cf, size, rflags),
        AluOp::And => alu::logic(a & b, size, rflags),
        AluOp::Or => alu::logic(a | b, size, rflags),
        AluOp::Xor => alu::logic(a ^ b, size, rflags),
        AluOp::Cmp => return (None, Some(alu::sub(a, b, false, size, rflags).1)),
        AluOp::Test => return (None, Some(alu::logic(a & b, size, rflags).1)),
        AluOp::Mov => return (Some(b), None),
    };
    (Some(r), Some(f))
}

/// The value of a lowered shift or rotate by an immediate, without its flags.
#[inline(always)]
fn shift_result(op: ShiftOp, a: u64, count: u8, size: usize, rflags: u64) -> u64 {
    let a = a & alu::mask(size);
    let c = u32::from(count) & if size == 8 { 0x3f } else { 0x1f };
    match op {
        _ if c == 0 => a,
        ShiftOp::Rcl | ShiftOp::Rcr => alu::shift(op, a, u64::from(count), size, rflags).0,
        _ => alu::shift_value(op, a, c, size),
    }
}

/// How a fast form touches the status flags, for [`prune_dead_flags`]: the flags it reads
/// (a form that can leave the block early, by a fault, an MMIO or code write, or a branch,
/// counts as reading them all, so they are exact wherever the block can be left), the flags
/// it computes afresh, and whether its own flags must be computed anyway (it can leave).
fn flag_effects(f: &Fast) -> (u64, u64, bool) {
    const LEAVES: (u64, u64, bool) = (STATUS_FLAGS, 0, true);
    let is_mem = |op: &Operand| matches!(op, Operand::Mem(_));
    match f {
        Fast::Alu { dst, src, .. } if is_mem(dst) || is_mem(src) => LEAVES,
        Fast::Alu { op: AluOp::Mov, .. } => (0, 0, false),
        Fast::Alu {
            op: AluOp::Adc | AluOp::Sbb,
            ..
        } => (CF, STATUS_FLAGS, false),
        Fast::Alu { .. } => (0, STATUS_FLAGS, false),
        Fast::AluRR { op, .. } | Fast::AluRI { op, .. } => match op {
            AluOp::Mov => (0, 0, false),
            AluOp::Adc | AluOp::Sbb => (CF, STATUS_FLAGS, false),
            _ => (0, STATUS_FLAGS, false),
        },
        Fast::IncDec { dst, .. } if is_mem(dst) => LEAVES,
        Fast::IncDec { .. } => (0, STATUS_FLAGS & !CF, false),
        Fast::Shift { dst, .. } if is_mem(dst) => LEAVES,
        Fast::Shift {
            op, count, size, ..
        } => {
            let c = count & if *size == 8 { 0x3f } else { 0x1f };
            match op {
                // A zero count changes nothing.
                _ if c == 0 => (0, 0, false),
                ShiftOp::Shl | ShiftOp::Shr | ShiftOp::Sar => (0, STATUS_FLAGS, false),
                ShiftOp::Rol | ShiftOp::Ror => (0, CF | OF, false),
                ShiftOp::Rcl | ShiftOp::Rcr => LEAVES,
            }
        }
        Fast::Imul { a, b, .. } if is_mem(a) || is_mem(b) => LEAVES,
        Fast::Imul { .. } => (0, CF | OF, false),
        Fast::Extend { src, .. } if is_mem(src) => LEAVES,
        Fast::Extend { .. } | Fast::Lea { .. } | Fast::Bswap { .. } | Fast::Nop => (0, 0, false),
        Fast::Cmov { src, .. } if is_mem(src) => LEAVES,
        Fast::Cmov { .. } => (STATUS_FLAGS, 0, false),
        Fast::Set { dst, .. } if is_mem(dst) => LEAVES,
        Fast::Set { .. } => (STATUS_FLAGS, 0, false),
        Fast::Generic
        | Fast::Push { .. }
        | Fast::Pop { .. }
        | Fast::Call { .. }
        | Fast::Ret
        | Fast::Jmp { .. }
        | Fast::Jcc { .. } => LEAVES,
    }
}

/// Whether a block may have to stop after this form: it branches, touches memory (which may
/// be MMIO or code) or is generic. The others only change registers and fall through.
pub fn may_leave(f: &Fast) -> bool {
    flag_effects(f).2
}

/// Dead-flag elimination over a decoded block: a form whose status flags every path through
/// the rest of the block overwrites before reading them (and before any point where the
/// block can be left) skips computing them. The flags are live at the end of the block, so
/// the state is exact wherever execution can observe it; only a run stopped inside the block
/// by its budget needs `force_flags`.
pub fn prune_dead_flags(block: &mut [Fast]) {
    let mut live = STATUS_FLAGS;
    for f in block.iter_mut().rev() {
        let (reads, writes, keep) = flag_effects(f);
        let dead = !keep && writes != 0 && live & writes == 0;
        if let Some(flags) = f.flags_mut() {
            *flags = !dead;
        }
        live = (live & !writes) | reads;
    }
}

#[inline(always)]
fn jump_check(target: u64) -> ExResult<()> {
    if !crate::mmu::is_canonical(target) {
        return Err(Exception::GeneralProtection(0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn hot_forms_lower_and_others_stay_generic() {
        // add rax, [rbx+rcx*8+0x10]
        assert!(matches!(
            lower(&decode(&[0x48, 0x03, 0x44, 0xcb, 0x10]), 64),
            Fast::Alu {
                op: AluOp::Add,
                size: 8,
                ..
            }
        ));
        // sub ecx, edx and add rax, 0x10: the register forms
        assert!(matches!(
            lower(&decode(&[0x29, 0xd1]), 64),
            Fast::AluRR {
                op: AluOp::Sub,
                size: 4,
                dst: 1,
                src: 2,
                ..
            }
        ));
        assert!(matches!(
            lower(&decode(&[0x48, 0x83, 0xc0, 0x10]), 64),
            Fast::AluRI {
                op: AluOp::Add,
                size: 8,
                dst: 0,
                imm: 0x10,
                ..
            }
        ));
        // lock add [rax], ebx
        assert_eq!(lower(&decode(&[0xf0, 0x01, 0x18]), 64), Fast::Generic);
        // mov ah, bl
        assert_eq!(lower(&decode(&[0x88, 0xdc]), 64), Fast::Generic);
        // add eax, [ebx] (32-bit addressing)
        assert_eq!(lower(&decode(&[0x67, 0x03, 0x03]), 64), Fast::Generic);
        // the same bytes in 32-bit code
        assert_eq!(lower(&decode(&[0x03, 0x03]), 32), Fast::Generic);
        // jne rel8
        assert!(matches!(
            lower(&decode(&[0x75, 0x10]), 64),
            Fast::Jcc { target: 0x1012, .. }
        ));
    }

    #[test]
    fn displacement_only_operands_keep_their_address_size() {
        // mov eax, gs:[0xfffffff0] with 64-bit addressing: sign-extended.
        let i = decode(&[0x65, 0x8b, 0x04, 0x25, 0xf0, 0xff, 0xff, 0xff]);
        let Fast::Alu {
            src: Operand::Mem(m),
            ..
        } = lower(&i, 64)
        else {
            panic!("not lowered");
        };
        assert_eq!(m.offset(&CpuState::power_on()), 0xffff_ffff_ffff_fff0);
        // The same with 0x67 is zero-extended, which a fast form does not hold: generic.
        let i = decode(&[0x67, 0x65, 0x8b, 0x04, 0x25, 0xf0, 0xff, 0xff, 0xff]);
        assert_eq!(lower(&i, 64), Fast::Generic);
        // mov rax, [rip+0x10] at 0x1000 (7 bytes): relative to the next instruction.
        let i = decode(&[0x48, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00]);
        let Fast::Alu {
            src: Operand::Mem(m),
            ..
        } = lower(&i, 64)
        else {
            panic!("not lowered");
        };
        let mut s = CpuState::power_on();
        s.rip = 0x1007;
        assert_eq!(m.offset(&s), 0x1017);
    }

    /// The flags of each form of a block, after the dead-flag pass.
    fn pruned(code: &[u8]) -> Vec<bool> {
        let mut fasts: Vec<Fast> = Decoder::with_ip(64, code, 0x1000, DecoderOptions::NONE)
            .into_iter()
            .map(|i| lower(&i, 64))
            .collect();
        prune_dead_flags(&mut fasts);
        fasts
            .iter_mut()
            .map(|f| f.flags_mut().is_none_or(|flags| *flags))
            .collect()
    }

    #[test]
    fn dead_flags_are_pruned_only_where_nothing_can_see_them() {
        // add rax,rbx; shr rcx,32; cmp rax,rcx: the ADD's and SHR's flags are dead, the
        // CMP's live out of the block.
        assert_eq!(
            pruned(&[0x48, 0x01, 0xd8, 0x48, 0xc1, 0xe9, 0x20, 0x48, 0x39, 0xc8]),
            [false, false, true]
        );
        // sub rax,rbx; adc rcx,rdx; xor esi,esi: the ADC reads the SUB's CF.
        assert_eq!(
            pruned(&[0x48, 0x29, 0xd8, 0x48, 0x11, 0xd1, 0x31, 0xf6]),
            [true, false, true]
        );
        // add rax,rbx; inc rcx; cmp rax,rcx: INC keeps CF, so the ADD's CF is dead only
        // because the CMP writes it too.
        assert_eq!(
            pruned(&[0x48, 0x01, 0xd8, 0x48, 0xff, 0xc1, 0x48, 0x39, 0xc8]),
            [false, false, true]
        );
        // add rax,rbx; mov rcx,[rdx]; cmp rax,rcx: the load can fault, so the flags
        // before it are exact.
        assert_eq!(
            pruned(&[0x48, 0x01, 0xd8, 0x48, 0x8b, 0x0a, 0x48, 0x39, 0xc8]),
            [true, true, true]
        );
        // add rax,rbx; jne +0; cmp rax,rcx: the branch reads them.
        assert_eq!(
            pruned(&[0x48, 0x01, 0xd8, 0x75, 0x00, 0x48, 0x39, 0xc8]),
            [true, true, true]
        );
        // add rax,rbx; imul rcx,rdx; cmp rax,rcx: IMUL computes only CF and OF, so the
        // ADD's are still dead (the CMP writes all); the IMUL's are dead too.
        assert_eq!(
            pruned(&[0x48, 0x01, 0xd8, 0x48, 0x0f, 0xaf, 0xca, 0x48, 0x39, 0xc8]),
            [false, false, true]
        );
    }

    #[test]
    fn pop_into_rsp_takes_the_popped_value() {
        let mut mem = crate::access::test_util::FlatMemory::new(0x100);
        let mut s = CpuState::power_on();
        s.gpr[4] = 0x40;
        mem.write(crate::state::SS, 0x40, 8, 0x1234).unwrap();
        execute(&Fast::Pop { dst: 4 }, &mut s, &mut mem, false).unwrap();
        assert_eq!(s.gpr[4], 0x1234);
    }
}
