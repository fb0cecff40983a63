//! Fast forms to host code.
//!
//! Guest registers stay in `CpuState::gpr` (RBX points at the state), so the state is
//! exact after every instruction and any exit needs no register write-back. Guest status
//! flags live in the host's RFLAGS: the host runs the very ALU instruction the guest did, so
//! every defined flag comes out exact at no cost. Only the inline TLB lookup clobbers the
//! host flags; an instruction with a memory operand saves them first (LAHF and SETO into
//! R14) and puts them back once the address is translated (unless it sets them all anew).
//! Some instructions without a fast form (NOT, NEG, shifts by CL, MUL, DIV, BTx, LEAVE,
//! indirect CALL, ...) are compiled from the decoded instruction (`Extra`).
//!
//! Memory operands go through this CPU's TLB inline, with the checks of
//! `Mmu::fast_host`: canonical, inside one page, a matching entry with a RAM page and the
//! permission bits. A store also requires that the page holds no decoded code. Anything
//! else (a TLB miss, MMIO, a page-crossing access, a store to code, a return to a
//! non-canonical address) leaves the compiled code *before* that instruction, with the
//! state exact, and the interpreter runs it: it raises the fault, walks the page tables,
//! does the MMIO, or invalidates the code. The same exit ends the compiled prefix at the
//! first form the compiler does not handle.
//!
//! Compiled blocks chain: a block that is left looks its target up in the CPU's jump cache
//! (`Mmu::remember_jump`; for a constant target the slot is known at compile time) and, on
//! a hit whose key and code-page generation are current, jumps straight into that block's
//! chained entry, the guest flags crossing in R14. A constant target on the block's own
//! page is linked after the first hit (see `Compiler::exit_to`). `JitCtx::budget` bounds
//! the instructions of a chained run (a block is entered only if all of it fits), so the
//! run loop still polls interrupts every batch. A block with a branch back to its own start
//! goes round in place (only the first such branch, so every pass is as long).
//!
//! Register use: RBX = `&mut CpuState`, R12 = `&mut JitCtx`, R13 = the TLB, R15 = the
//! code-page bitmap, R14 = saved guest flags, RBP = instructions left in the budget; RAX and
//! RCX hold operands, RSI an address, RDX, RDI, R8 and R9 are scratch for the lookup.

use std::mem::offset_of;

use iced_x86::{ConditionCode, Instruction};

use super::asm::*;
use super::{JitCtx, EXIT_DONE, EXIT_INTERPRET};
use crate::decode::Op;
use crate::exec::fast::{self, AluOp, Fast, MemRef, Operand, NO_REG, RIP_REG};
use crate::exec::integer::alu::ShiftOp;
use crate::mmu::{is_canonical, jump_slot, JumpEntry, TlbEntry, JUMP_ENTRIES, TLB_ENTRIES};
use crate::state::{CpuState, FS, GS};

const _: () = assert!(std::mem::size_of::<TlbEntry>() == 40);

const RIP: Rm = Rm::Mem(RBX, offset_of!(CpuState, rip) as i32);
const RFLAGS: Rm = Rm::Mem(RBX, offset_of!(CpuState, rflags) as i32);
/// The status flags (OF, SF, ZF, AF, PF, CF) as they sit in RFLAGS.
const STATUS: i32 = 0x8d5;

fn gpr(i: u8) -> Rm {
    Rm::Mem(RBX, (offset_of!(CpuState, gpr) + 8 * usize::from(i)) as i32)
}

fn ctx(offset: usize) -> Rm {
    Rm::Mem(R12, offset as i32)
}

/// Host condition nibble of an iced condition code.
fn cond(cc: ConditionCode) -> Option<Cond> {
    match cc {
        ConditionCode::None => None,
        cc => Some(cc as u8 - 1),
    }
}

/// ALU group number of an [`AluOp`] (MOV and TEST are handled apart).
fn group(op: AluOp) -> u8 {
    match op {
        AluOp::Add => 0,
        AluOp::Or => 1,
        AluOp::Adc => 2,
        AluOp::Sbb => 3,
        AluOp::And => 4,
        AluOp::Sub => 5,
        AluOp::Xor => 6,
        AluOp::Cmp | AluOp::Test | AluOp::Mov => 7,
    }
}

/// Instructions without a fast form that the compiler still handles, taken from the
/// decoded instruction.
#[derive(Debug, Clone, Copy)]
enum Extra {
    /// NOT (`n` 2) or NEG (3).
    Unary {
        n: u8,
        size: u8,
        dst: Operand,
    },
    /// A shift or rotate group op (`n` as in the encoding) by CL.
    ShiftCl {
        n: u8,
        size: u8,
        dst: Operand,
    },
    /// CWDE/CDQE (`to_rdx` false) or CDQ/CQO.
    SignExtend {
        size: u8,
        to_rdx: bool,
    },
    /// MUL (`n` 4) or DIV (6) of EDX:EAX / RDX:RAX by `src`.
    MulDiv {
        n: u8,
        size: u8,
        src: Operand,
    },
    /// BT/BTS/BTR/BTC (`n` 4..7) of a register by an immediate or a register, or of
    /// memory by an immediate.
    Bit {
        n: u8,
        size: u8,
        dst: Operand,
        bit: Operand,
    },
    Leave,
    /// CALL through a register or memory.
    CallIndirect {
        target: Operand,
    },
    /// PREFETCHh: no architectural effect.
    Nop,
}

fn extra(instr: &Instruction) -> Option<Extra> {
    use iced_x86::{Code as C, Mnemonic as Mn, OpKind, Register};
    if instr.has_lock_prefix() || instr.has_rep_prefix() || instr.has_repne_prefix() {
        return None;
    }
    let mn = instr.mnemonic();
    match mn {
        Mn::Not | Mn::Neg if instr.op_count() == 1 => {
            let size = fast::size0(instr)?;
            Some(Extra::Unary {
                n: if mn == Mn::Not { 2 } else { 3 },
                size,
                dst: fast::operand(instr, 0, size)?,
            })
        }
        Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar | Mn::Rol | Mn::Ror
            if instr.op_count() == 2
                && instr.op1_kind() == OpKind::Register
                && instr.op1_register() == Register::CL =>
        {
            let size = fast::size0(instr)?;
            let n = match mn {
                Mn::Rol => 0,
                Mn::Ror => 1,
                Mn::Shl | Mn::Sal => 4,
                Mn::Shr => 5,
                _ => 7,
            };
            Some(Extra::ShiftCl {
                n,
                size,
                dst: fast::operand(instr, 0, size)?,
            })
        }
        _ => match instr.code() {
            code @ (C::Cwde | C::Cdqe | C::Cdq | C::Cqo) => Some(Extra::SignExtend {
                size: if matches!(code, C::Cdqe | C::Cqo) {
                    8
                } else {
                    4
                },
                to_rdx: matches!(code, C::Cdq | C::Cqo),
            }),
            C::Mul_rm32 | C::Mul_rm64 | C::Div_rm32 | C::Div_rm64 => {
                let size = fast::size0(instr)?;
                Some(Extra::MulDiv {
                    n: if mn == Mn::Mul { 4 } else { 6 },
                    size,
                    src: fast::operand(instr, 0, size)?,
                })
            }
            C::Bt_rm16_imm8
            | C::Bt_rm32_imm8
            | C::Bt_rm64_imm8
            | C::Bts_rm16_imm8
            | C::Bts_rm32_imm8
            | C::Bts_rm64_imm8
            | C::Btr_rm16_imm8
            | C::Btr_rm32_imm8
            | C::Btr_rm64_imm8
            | C::Btc_rm16_imm8
            | C::Btc_rm32_imm8
            | C::Btc_rm64_imm8
            | C::Bt_rm16_r16
            | C::Bt_rm32_r32
            | C::Bt_rm64_r64
            | C::Bts_rm16_r16
            | C::Bts_rm32_r32
            | C::Bts_rm64_r64
            | C::Btr_rm16_r16
            | C::Btr_rm32_r32
            | C::Btr_rm64_r64
            | C::Btc_rm16_r16
            | C::Btc_rm32_r32
            | C::Btc_rm64_r64 => {
                let size = fast::size0(instr)?;
                let n = match mn {
                    Mn::Bt => 4,
                    Mn::Bts => 5,
                    Mn::Btr => 6,
                    _ => 7,
                };
                let dst = fast::operand(instr, 0, size)?;
                let bit = match instr.op1_kind() {
                    OpKind::Immediate8 => Operand::Imm(i32::from(instr.immediate8())),
                    // A register bit offset reaches beyond a memory operand: not here.
                    _ if matches!(dst, Operand::Mem(_)) => return None,
                    _ => fast::operand(instr, 1, size)?,
                };
                Some(Extra::Bit { n, size, dst, bit })
            }
            C::Leaveq => Some(Extra::Leave),
            C::Call_rm64 => Some(Extra::CallIndirect {
                target: fast::operand(instr, 0, 8)?,
            }),
            C::Prefetcht0_m8
            | C::Prefetcht1_m8
            | C::Prefetcht2_m8
            | C::Prefetchnta_m8
            | C::Prefetchw_m8 => Some(Extra::Nop),
            _ => None,
        },
    }
}

/// Whether the compiler handles this form (the compiled prefix of a block stops at the first
/// one it does not).
fn supported(f: &Fast, instr: &Instruction) -> bool {
    match f {
        Fast::Generic => extra(instr).is_some(),
        Fast::Push { src } => !matches!(src, Operand::Mem(_)),
        Fast::Shift { op, .. } => !matches!(op, ShiftOp::Rcl | ShiftOp::Rcr),
        Fast::Call { target } | Fast::Jmp { target } => is_canonical(*target),
        Fast::Jcc { cc, target } => is_canonical(*target) && cond(*cc).is_some(),
        Fast::Cmov { cc, .. } | Fast::Set { cc, .. } => cond(*cc).is_some(),
        Fast::Imul { size, .. } => *size >= 2,
        _ => true,
    }
}

/// Out-of-line code, emitted after the body.
enum Stub {
    /// Leave before instruction `index` at `ip` (flags saved in R14) for the interpreter.
    Miss { index: u32, ip: u64 },
    /// A taken branch: `done` instructions ran, RIP goes to `target`.
    Taken { done: u32, target: u64 },
    /// The branch back to the block's start: run the block again while the budget (RBP)
    /// has room for it, else leave like [`Stub::Taken`].
    Loop { done: u32, target: u64 },
    /// The chained entry found no room in the budget for the block.
    Bail,
}

struct Compiler {
    a: Asm,
    /// Leave for a computed target (RIP set, the budget charged): go on to the next
    /// compiled block if the jump cache has it, else return.
    exit: Label,
    /// Return to the caller with the guest flags saved in R14 and RIP set.
    return_saved: Label,
    /// Leave for the interpreter (RAX = exit code, RIP at the instruction).
    exit_interpret: Label,
    /// Return to the caller (RAX = exit code, guest flags already in the state).
    exit_return: Label,
    /// Instructions in the block.
    len: u32,
    /// The first instruction, flags loaded (a loop back to the block start comes here).
    body: Label,
    /// IP of the block's first instruction.
    start: u64,
    /// A branch back to the start already loops in place (only the first one does).
    looped: bool,
    stubs: Vec<(Label, Stub)>,
}

/// Compiled code (position-independent: all branches are internal, the only jumps out
/// go through the jump cache) and the offset of its chained entry.
pub struct Compiled {
    pub code: Vec<u8>,
    pub chain_offset: usize,
}

/// Bytes from a block's linked entry to its chained entry (the linked entry only saves the
/// host flags into R14).
pub const LINKED_DELTA: usize = 8;

/// Compile the longest prefix of the block that the compiler handles, for code that runs at
/// `base`; None if that prefix is empty.
pub fn compile(instrs: &[Instruction], ops: &[Op], base: u64) -> Option<Compiled> {
    if instrs
        .first()
        .zip(ops.first())
        .is_none_or(|(i, op)| !supported(&op.fast, i))
    {
        return None;
    }
    let mut a = Asm::new_at(base);
    let exit = a.label();
    let exit_interpret = a.label();
    let exit_return = a.label();
    let return_saved = a.label();
    let body = a.label();
    let mut c = Compiler {
        a,
        exit,
        exit_interpret,
        exit_return,
        return_saved,
        len: u32::try_from(ops.len()).ok()?,
        body,
        start: instrs.first()?.ip(),
        looped: false,
        stubs: Vec::new(),
    };
    let chain_offset = c.prologue()?;
    let mut ended = false;
    for (index, (instr, op)) in instrs.iter().zip(ops).enumerate() {
        let index = index as u32;
        if !supported(&op.fast, instr) {
            // The interpreter takes over here.
            c.set_rip(instr.ip());
            c.a.mov_imm(RAX, (EXIT_INTERPRET << 32) | u64::from(index));
            c.a.jmp(c.exit_interpret);
            ended = true;
            break;
        }
        if c.instruction(index, instr, &op.fast) {
            ended = true;
            break;
        }
    }
    if !ended {
        // Fell off the end of the block.
        let last = instrs.get(ops.len().checked_sub(1)?)?;
        c.exit_to(c.len, last.next_ip());
    }
    c.epilogue();
    Some(Compiled {
        code: c.a.finish()?,
        chain_offset,
    })
}

impl Compiler {
    /// The entry from the caller, then the linked and chained entries (the offset of the
    /// chained one is returned): room for the whole block in the budget, or return with RIP
    /// at the block.
    fn prologue(&mut self) -> Option<usize> {
        let load = self.body;
        let a = &mut self.a;
        for r in [RBX, RBP, R12, R13, R14, R15] {
            a.push(r);
        }
        a.op(8, &[0x8b], RBX, Rm::Reg(RDI));
        a.op(8, &[0x8b], R12, Rm::Reg(RSI));
        a.load(8, R13, ctx(offset_of!(JitCtx, tlb)));
        a.load(8, R15, ctx(offset_of!(JitCtx, code_bits)));
        a.load(8, RBP, ctx(offset_of!(JitCtx, budget)));
        // Guest status flags into the host's: SF ZF AF PF CF through AH, OF by an add.
        a.load(8, RAX, RFLAGS);
        a.load(4, RCX, Rm::Reg(RAX));
        a.shift_imm(4, 5, Rm::Reg(RCX), 11);
        a.alu_imm(4, 4, Rm::Reg(RCX), 1);
        a.mov_ah_al();
        a.store(1, Rm::Reg(RAX), RCX);
        a.add_al(0x7f);
        a.sahf();
        a.jmp(load);
        // The linked entry, from a block of the same page whose exit jumps here directly:
        // the guest flags are in the host's.
        let linked = a.buf.len();
        self.save_flags();
        // The chained entry: the guest flags are in R14 (as `save_flags` leaves them).
        let a = &mut self.a;
        let chain = a.buf.len();
        if chain - linked != LINKED_DELTA {
            return None;
        }
        let bail = a.label();
        a.alu_imm(8, 7, Rm::Reg(RBP), self.len as i32);
        a.jcc(CC_B, bail);
        self.stubs.push((bail, Stub::Bail));
        self.restore_flags();
        self.a.bind(load);
        Some(chain)
    }

    /// The guest status flags from the host's into the state.
    fn store_flags(&mut self) {
        let a = &mut self.a;
        a.pushfq();
        a.pop(RCX);
        a.alu_imm(4, 4, Rm::Reg(RCX), STATUS);
        a.alu_imm(8, 4, RFLAGS, !STATUS);
        a.alu(8, 1, RFLAGS, RCX);
    }

    /// The stubs, then the exits.
    fn epilogue(&mut self) {
        for (label, stub) in std::mem::take(&mut self.stubs) {
            self.a.bind(label);
            match stub {
                Stub::Miss { index, ip } => {
                    self.restore_flags();
                    self.set_rip(ip);
                    self.a
                        .mov_imm(RAX, (EXIT_INTERPRET << 32) | u64::from(index));
                    self.a.jmp(self.exit_interpret);
                }
                Stub::Taken { done, target } => self.exit_to(done, target),
                Stub::Loop { done, target } => {
                    // Count the pass; go round again if a whole block still fits.
                    let out = self.a.label();
                    self.save_flags();
                    self.a.alu_imm(8, 5, Rm::Reg(RBP), done as i32);
                    self.a.alu_imm(8, 7, Rm::Reg(RBP), self.len as i32);
                    self.a.jcc(CC_B, out);
                    self.restore_flags();
                    self.a.jmp(self.body);
                    self.a.bind(out);
                    self.set_rip(target);
                    self.a.jmp(self.return_saved);
                }
                Stub::Bail => {
                    self.set_rip(self.start);
                    self.a.jmp(self.return_saved);
                }
            }
        }
        // A computed target (RIP set, the budget charged): the jump cache by RIP.
        self.a.bind(self.exit);
        self.save_flags();
        let a = &mut self.a;
        let out = self.return_saved;
        a.load(8, RDX, RIP);
        a.load(8, RCX, Rm::Reg(RDX));
        a.shift_imm(8, 5, Rm::Reg(RCX), 10);
        a.alu(8, 6, Rm::Reg(RCX), RDX);
        a.alu_imm(4, 4, Rm::Reg(RCX), (JUMP_ENTRIES - 1) as i32);
        a.shift_imm(4, 4, Rm::Reg(RCX), 5);
        a.load(8, RSI, ctx(offset_of!(JitCtx, jumps)));
        a.alu(8, 0, Rm::Reg(RCX), RSI);
        a.alu(8, 7, Rm::Mem(RCX, offset_of!(JumpEntry, rip) as i32), RDX);
        a.jcc(CC_NE, out);
        a.load(4, RDX, ctx(offset_of!(JitCtx, jump_key)));
        a.alu(4, 7, Rm::Mem(RCX, offset_of!(JumpEntry, key) as i32), RDX);
        a.jcc(CC_NE, out);
        a.load(4, RDX, Rm::Mem(RCX, offset_of!(JumpEntry, page) as i32));
        a.load(8, RSI, ctx(offset_of!(JitCtx, generations)));
        a.load(4, RDX, Rm::Sib(RSI, RDX, 2, 0));
        a.alu(
            4,
            7,
            Rm::Mem(RCX, offset_of!(JumpEntry, generation) as i32),
            RDX,
        );
        a.jcc(CC_NE, out);
        a.jmp_indirect(Rm::Mem(RCX, offset_of!(JumpEntry, entry) as i32));

        // Back to the caller with the guest flags saved in R14 (RIP set).
        self.a.bind(self.return_saved);
        self.restore_flags();
        self.store_flags();
        self.a.mov_imm(RAX, EXIT_DONE);
        self.a.jmp(self.exit_return);

        self.a.bind(self.exit_interpret);
        self.store_flags();
        let a = &mut self.a;
        a.load(4, RCX, Rm::Reg(RAX));
        a.alu(8, 5, Rm::Reg(RBP), RCX);
        a.mov_imm(RCX, self.start);
        a.store(8, ctx(offset_of!(JitCtx, exit_block)), RCX);

        a.bind(self.exit_return);
        a.store(8, ctx(offset_of!(JitCtx, budget)), RBP);
        for r in [R15, R14, R13, R12, RBP, RBX] {
            a.pop(r);
        }
        a.ret();
    }

    /// A label that leaves for the interpreter before instruction `index` at `ip` (the
    /// flags saved in R14).
    fn miss(&mut self, index: u32, ip: u64) -> Label {
        let miss = self.a.label();
        self.stubs.push((miss, Stub::Miss { index, ip }));
        miss
    }

    /// Go to `miss` unless RCX is canonical (clobbers the flags and RDX).
    fn canonical_rcx(&mut self, miss: Label) {
        self.a.mov_imm(RDX, 1 << 47);
        self.a.alu(8, 0, Rm::Reg(RDX), RCX);
        self.a.shift_imm(8, 5, Rm::Reg(RDX), 48);
        self.a.jcc(CC_NE, miss);
    }

    /// `state.rip = ip` (flags untouched).
    fn set_rip(&mut self, ip: u64) {
        self.a.mov_imm(RCX, ip);
        self.a.store(8, RIP, RCX);
    }

    fn save_flags(&mut self) {
        self.a.lahf();
        self.a.setcc(CC_O, Rm::Reg(RAX));
        self.a.op(4, &[0x8b], R14, Rm::Reg(RAX));
    }

    fn restore_flags(&mut self) {
        self.a.op(4, &[0x8b], RAX, Rm::Reg(R14));
        self.a.add_al(0x7f);
        self.a.sahf();
    }

    /// A register write with x86 width rules (4 bytes zero-extend, 1 and 2 merge).
    fn store_gpr(&mut self, index: u8, size: u8, reg: u8) {
        if size == 4 {
            self.a.op(4, &[0x8b], reg, Rm::Reg(reg));
            self.a.store(8, gpr(index), reg);
        } else {
            self.a.store(size, gpr(index), reg);
        }
    }

    /// RSI = the effective address of `m` (the linear address when `segment`), by MOV and
    /// LEA only, so the flags survive.
    fn address(&mut self, m: &MemRef, next_ip: u64, segment: bool) {
        let a = &mut self.a;
        if m.base == RIP_REG {
            a.mov_imm(RSI, next_ip.wrapping_add(m.disp as i64 as u64));
        } else {
            if m.base == NO_REG {
                a.mov_imm(RSI, 0);
            } else {
                a.load(8, RSI, gpr(m.base));
            }
            if m.index == NO_REG {
                a.lea(RSI, Rm::Mem(RSI, m.disp));
            } else {
                a.load(8, RDI, gpr(m.index));
                a.lea(
                    RSI,
                    Rm::Sib(RSI, RDI, m.scale.trailing_zeros() as u8, m.disp),
                );
            }
        }
        if segment && (m.seg as usize == FS || m.seg as usize == GS) {
            let base = if m.seg as usize == FS {
                offset_of!(JitCtx, fs_base)
            } else {
                offset_of!(JitCtx, gs_base)
            };
            a.load(8, RDX, ctx(base));
            a.lea(RSI, Rm::Sib(RSI, RDX, 0, 0));
        }
    }

    /// The linear address in RSI becomes the host address of a `size`-byte access, or the
    /// code leaves for the interpreter before instruction `index`. Clobbers the flags
    /// (saved by the caller), RDX, RDI, R8 and R9.
    fn translate(&mut self, index: u32, ip: u64, size: u8, write: bool) {
        let miss = self.miss(index, ip);
        let a = &mut self.a;
        // The entry of the first byte's page must carry the last byte's page number: a
        // tag matches only a canonical page, and an access that crosses a page (or wraps)
        // does not match.
        a.lea(RDX, Rm::Mem(RSI, i32::from(size) - 1));
        a.shift_imm(8, 5, Rm::Reg(RDX), 12);
        a.load(8, RDI, Rm::Reg(RSI));
        a.shift_imm(8, 5, Rm::Reg(RDI), 12);
        a.alu_imm(4, 4, Rm::Reg(RDI), (TLB_ENTRIES - 1) as i32);
        a.lea(RDI, Rm::Sib(RDI, RDI, 2, 0));
        a.lea(RDI, Rm::Sib(R13, RDI, 3, 0));
        a.alu(8, 7, Rm::Mem(RDI, offset_of!(TlbEntry, tag) as i32), RDX);
        a.jcc(CC_NE, miss);
        // Every needed permission bit (RAM included) is set.
        a.load_zx(1, RDX, Rm::Mem(RDI, offset_of!(TlbEntry, perms) as i32));
        a.group3(4, 2, Rm::Reg(RDX));
        let need = if write {
            offset_of!(JitCtx, need_write)
        } else {
            offset_of!(JitCtx, need_read)
        };
        a.test(4, ctx(need), RDX);
        a.jcc(CC_NE, miss);
        if write {
            // No store to a page holding decoded code.
            a.load(4, RDX, Rm::Mem(RDI, offset_of!(TlbEntry, page) as i32));
            a.load(4, R9, Rm::Reg(RDX));
            a.shift_imm(4, 5, Rm::Reg(R9), 6);
            a.load(8, R9, Rm::Sib(R15, R9, 3, 0));
            a.bt(R9, RDX);
            a.jcc(CC_B, miss);
        }
        a.load(8, R8, Rm::Mem(RDI, offset_of!(TlbEntry, host) as i32));
        a.alu_imm(4, 4, Rm::Reg(RSI), 0xfff);
        a.alu(8, 0, Rm::Reg(RSI), R8);
    }

    /// Translate memory operand `m` of instruction `index` (flags saved around the
    /// lookup, and restored unless `overwrites_flags`: the instruction neither reads the
    /// status flags nor leaves any of them unchanged): RSI is its host address afterwards.
    fn memory(
        &mut self,
        index: u32,
        instr: &Instruction,
        m: &MemRef,
        size: u8,
        write: bool,
        overwrites_flags: bool,
    ) {
        self.save_flags();
        self.address(m, instr.next_ip(), true);
        self.translate(index, instr.ip(), size, write);
        if !overwrites_flags {
            self.restore_flags();
        }
    }

    /// The stack slot at RSP + `delta`: RSI is its host address afterwards.
    fn stack(&mut self, index: u32, instr: &Instruction, delta: i32, write: bool) {
        self.save_flags();
        self.a.load(8, RSI, gpr(4));
        self.a.lea(RSI, Rm::Mem(RSI, delta));
        self.translate(index, instr.ip(), 8, write);
        self.restore_flags();
    }

    /// RSP += delta, flags untouched.
    fn adjust_rsp(&mut self, delta: i32) {
        self.a.load(8, RDX, gpr(4));
        self.a.lea(RDX, Rm::Mem(RDX, delta));
        self.a.store(8, gpr(4), RDX);
    }

    /// Operand value into `reg` (an immediate sign-extended; memory at RSI, zero-extended).
    fn value(&mut self, op: &Operand, size: u8, reg: u8) {
        match op {
            Operand::Reg(r) => self.a.load(8, reg, gpr(*r)),
            Operand::Imm(v) => self.a.mov_imm(reg, *v as i64 as u64),
            Operand::Mem(_) => self.a.load_zx(size, reg, Rm::Mem(RSI, 0)),
        }
    }

    /// Write `reg` to a register or the memory operand at RSI.
    fn put(&mut self, op: &Operand, size: u8, reg: u8) {
        match op {
            Operand::Reg(r) => self.store_gpr(*r, size, reg),
            Operand::Mem(_) => self.a.store(size, Rm::Mem(RSI, 0), reg),
            Operand::Imm(_) => {}
        }
    }

    /// Translate the memory operand among `ops`, if any.
    fn operands(
        &mut self,
        index: u32,
        instr: &Instruction,
        ops: &[&Operand],
        size: u8,
        write: bool,
    ) {
        self.operands_of(index, instr, ops, size, write, false);
    }

    /// [`Compiler::operands`] for an instruction that sets every status flag without
    /// reading them (see [`Compiler::memory`]).
    fn operands_of(
        &mut self,
        index: u32,
        instr: &Instruction,
        ops: &[&Operand],
        size: u8,
        write: bool,
        overwrites_flags: bool,
    ) {
        if let Some(Operand::Mem(m)) = ops.iter().find(|o| matches!(o, Operand::Mem(_))) {
            self.memory(index, instr, m, size, write, overwrites_flags);
        }
    }

    /// Emit instruction `index`; true when it ends the compiled code (it always leaves).
    fn instruction(&mut self, index: u32, instr: &Instruction, f: &Fast) -> bool {
        match *f {
            Fast::Generic => {
                if let Some(e) = extra(instr) {
                    return self.extra(index, instr, e);
                }
            }
            Fast::Alu {
                op, size, dst, src, ..
            } => self.alu(index, instr, op, size, &dst, &src),
            Fast::AluRR {
                op, size, dst, src, ..
            } => self.alu(
                index,
                instr,
                op,
                size,
                &Operand::Reg(dst),
                &Operand::Reg(src),
            ),
            Fast::AluRI {
                op, size, dst, imm, ..
            } => {
                self.a.mov_imm(RCX, imm);
                self.alu_with_b(op, size, &Operand::Reg(dst));
            }
            Fast::IncDec { size, dst, inc, .. } => {
                self.operands(index, instr, &[&dst], size, true);
                self.value(&dst, size, RAX);
                self.a.inc_dec(size, !inc, Rm::Reg(RAX));
                self.put(&dst, size, RAX);
            }
            Fast::Shift {
                op,
                size,
                dst,
                count,
                ..
            } => {
                let n = match op {
                    ShiftOp::Rol => 0,
                    ShiftOp::Ror => 1,
                    ShiftOp::Shl => 4,
                    ShiftOp::Shr => 5,
                    _ => 7,
                };
                self.operands(index, instr, &[&dst], size, true);
                self.value(&dst, size, RAX);
                self.a.shift_imm(size, n, Rm::Reg(RAX), count);
                self.put(&dst, size, RAX);
            }
            Fast::Bswap { dst, size } => {
                self.a.load(8, RAX, gpr(dst));
                self.a.bswap(size, RAX);
                self.store_gpr(dst, size, RAX);
            }
            Fast::Extend {
                dst,
                size,
                src,
                src_size,
                signed,
            } => {
                self.operands(index, instr, &[&src], src_size, false);
                let rm = match src {
                    Operand::Reg(r) => gpr(r),
                    _ => Rm::Mem(RSI, 0),
                };
                if signed {
                    self.a.load_sx(src_size, RAX, rm);
                } else {
                    self.a.load_zx(src_size, RAX, rm);
                }
                self.store_gpr(dst, size, RAX);
            }
            Fast::Lea { dst, size, mem } => {
                self.address(&mem, instr.next_ip(), false);
                self.store_gpr(dst, size, RSI);
            }
            Fast::Imul {
                dst, size, a, b, ..
            } => {
                self.operands(index, instr, &[&a, &b], size, false);
                self.value(&a, size, RAX);
                self.value(&b, size, RCX);
                self.a.imul(size, RAX, Rm::Reg(RCX));
                self.store_gpr(dst, size, RAX);
            }
            Fast::Cmov { cc, dst, size, src } => {
                self.operands(index, instr, &[&src], size, false);
                self.a.load(8, RAX, gpr(dst));
                self.value(&src, size, RCX);
                self.a
                    .cmov(size, cond(cc).unwrap_or_default(), RAX, Rm::Reg(RCX));
                self.store_gpr(dst, size, RAX);
            }
            Fast::Set { cc, dst } => {
                self.operands(index, instr, &[&dst], 1, true);
                self.a.setcc(cond(cc).unwrap_or_default(), Rm::Reg(RAX));
                self.put(&dst, 1, RAX);
            }
            Fast::Push { src } => {
                self.stack(index, instr, -8, true);
                self.value(&src, 8, RCX);
                self.a.store(8, Rm::Mem(RSI, 0), RCX);
                self.adjust_rsp(-8);
            }
            Fast::Pop { dst } => {
                self.stack(index, instr, 0, false);
                self.a.load(8, RCX, Rm::Mem(RSI, 0));
                self.adjust_rsp(8);
                self.a.store(8, gpr(dst), RCX);
            }
            Fast::Call { target } => {
                self.stack(index, instr, -8, true);
                self.a.mov_imm(RCX, instr.next_ip());
                self.a.store(8, Rm::Mem(RSI, 0), RCX);
                self.adjust_rsp(-8);
                self.exit_to(index + 1, target);
                return true;
            }
            Fast::Ret => {
                let miss = self.miss(index, instr.ip());
                self.save_flags();
                self.a.load(8, RSI, gpr(4));
                self.translate(index, instr.ip(), 8, false);
                self.a.load(8, RCX, Rm::Mem(RSI, 0));
                // A non-canonical return address faults at the RET: the interpreter's.
                // (RCX survives restore_flags, which uses RAX only.)
                self.canonical_rcx(miss);
                self.restore_flags();
                self.adjust_rsp(8);
                self.exit_computed(index + 1);
                return true;
            }
            Fast::Jmp { target } => {
                let taken = self.branch(index + 1, target);
                self.a.jmp(taken);
                return true;
            }
            Fast::Jcc { cc, target } => {
                let taken = self.branch(index + 1, target);
                self.a.jcc(cond(cc).unwrap_or_default(), taken);
            }
            Fast::Nop => {}
        }
        false
    }

    /// Emit an [`Extra`] form; true when it ends the compiled code.
    fn extra(&mut self, index: u32, instr: &Instruction, e: Extra) -> bool {
        match e {
            Extra::Unary { n, size, dst } => {
                self.operands(index, instr, &[&dst], size, true);
                self.value(&dst, size, RAX);
                self.a.group3(size, n, Rm::Reg(RAX));
                self.put(&dst, size, RAX);
            }
            Extra::ShiftCl { n, size, dst } => {
                self.operands(index, instr, &[&dst], size, true);
                self.value(&dst, size, RAX);
                self.a.load(8, RCX, gpr(1));
                self.a.shift_cl(size, n, Rm::Reg(RAX));
                self.put(&dst, size, RAX);
            }
            Extra::SignExtend { size, to_rdx } => {
                self.a.load(8, RAX, gpr(0));
                self.a.sign_extend_rax(size, to_rdx);
                if to_rdx {
                    self.store_gpr(2, size, RDX);
                } else {
                    self.store_gpr(0, size, RAX);
                }
            }
            Extra::MulDiv { n, size, src } => {
                self.operands(index, instr, &[&src], size, false);
                self.value(&src, size, RCX);
                self.a.load(8, RDX, gpr(2));
                if n == 6 {
                    // A zero divisor or a quotient that does not fit is the
                    // interpreter's #DE: the host must not fault.
                    let miss = self.miss(index, instr.ip());
                    self.save_flags();
                    self.a.test(size, Rm::Reg(RCX), RCX);
                    self.a.jcc(CC_E, miss);
                    self.a.alu(size, 7, Rm::Reg(RDX), RCX);
                    self.a.jcc(CC_AE, miss);
                    self.restore_flags();
                }
                self.a.load(8, RAX, gpr(0));
                self.a.group3(size, n, Rm::Reg(RCX));
                self.store_gpr(0, size, RAX);
                self.store_gpr(2, size, RDX);
            }
            Extra::Bit { n, size, dst, bit } => {
                self.operands(index, instr, &[&dst], size, n != 4);
                self.value(&dst, size, RAX);
                match bit {
                    Operand::Imm(b) => self.a.bit_imm(size, n, Rm::Reg(RAX), b as u8),
                    other => {
                        self.value(&other, size, RCX);
                        self.a.bit_reg(size, n, RAX, RCX);
                    }
                }
                if n != 4 {
                    self.put(&dst, size, RAX);
                }
            }
            Extra::Leave => {
                // RSP = RBP, then POP RBP.
                self.save_flags();
                self.a.load(8, RSI, gpr(5));
                self.translate(index, instr.ip(), 8, false);
                self.restore_flags();
                self.a.load(8, RCX, Rm::Mem(RSI, 0));
                self.a.load(8, RDX, gpr(5));
                self.a.lea(RDX, Rm::Mem(RDX, 8));
                self.a.store(8, gpr(4), RDX);
                self.a.store(8, gpr(5), RCX);
            }
            Extra::CallIndirect { target } => {
                let miss = self.miss(index, instr.ip());
                // The target (kept in RCX, which the lookups leave alone), checked
                // canonical, then the push.
                self.operands(index, instr, &[&target], 8, false);
                self.value(&target, 8, RCX);
                self.save_flags();
                self.canonical_rcx(miss);
                self.restore_flags();
                self.stack(index, instr, -8, true);
                self.a.mov_imm(RAX, instr.next_ip());
                self.a.store(8, Rm::Mem(RSI, 0), RAX);
                self.adjust_rsp(-8);
                self.exit_computed(index + 1);
                return true;
            }
            Extra::Nop => {}
        }
        false
    }

    /// Where a branch to `target` after `done` instructions goes: the in-place loop for the
    /// block's first branch back to its start (one loop point, so every pass runs the same
    /// instructions), else an exit to the target.
    fn branch(&mut self, done: u32, target: u64) -> Label {
        let stub = if target == self.start && !self.looped {
            self.looped = true;
            Stub::Loop { done, target }
        } else {
            Stub::Taken { done, target }
        };
        let label = self.a.label();
        self.stubs.push((label, stub));
        label
    }

    /// Leave for the constant `target` after `done` instructions: straight into its
    /// compiled block when the jump cache has it (the slot is known now), else back to the
    /// caller with RIP set.
    ///
    /// A target on the block's own page is linked once found: the exit jumps through a
    /// slot in the code, which starts at the lookup and is then pointed at the target's
    /// linked entry. No check is needed on that path: code runs only while its page maps
    /// the RAM page it was compiled from and that page keeps its generation, so a target
    /// on the same page is still what it was when linked.
    fn exit_to(&mut self, done: u32, target: u64) {
        let miss = self.a.label();
        let slot = (jump_slot(target) * std::mem::size_of::<JumpEntry>()) as i32;
        let field = |f: usize| slot + f as i32;
        self.a.lea(RBP, Rm::Mem(RBP, -(done as i32)));
        let link = (target >> 12 == self.start >> 12).then(|| {
            let link = self.a.label();
            let lookup = self.a.label();
            self.a.jmp_rip(link);
            self.a.bind(link);
            self.a.address_of(lookup);
            self.a.bind(lookup);
            self.a.lea_rip(RDI, link);
            link
        });
        self.save_flags();
        let a = &mut self.a;
        a.load(8, RCX, ctx(offset_of!(JitCtx, jumps)));
        let rip = Rm::Mem(RCX, field(offset_of!(JumpEntry, rip)));
        if let Ok(t) = i32::try_from(target as i64) {
            a.alu_imm(8, 7, rip, t);
        } else {
            a.mov_imm(RDX, target);
            a.alu(8, 7, rip, RDX);
        }
        a.jcc(CC_NE, miss);
        a.load(4, RDX, ctx(offset_of!(JitCtx, jump_key)));
        a.alu(4, 7, Rm::Mem(RCX, field(offset_of!(JumpEntry, key))), RDX);
        a.jcc(CC_NE, miss);
        a.load(4, RDX, Rm::Mem(RCX, field(offset_of!(JumpEntry, page))));
        a.load(8, RSI, ctx(offset_of!(JitCtx, generations)));
        a.load(4, RDX, Rm::Sib(RSI, RDX, 2, 0));
        a.alu(
            4,
            7,
            Rm::Mem(RCX, field(offset_of!(JumpEntry, generation))),
            RDX,
        );
        a.jcc(CC_NE, miss);
        let entry = Rm::Mem(RCX, field(offset_of!(JumpEntry, entry)));
        if link.is_some() {
            // From now on, straight to the target's linked entry.
            a.load(8, RDX, entry);
            a.lea(RDX, Rm::Mem(RDX, -(LINKED_DELTA as i32)));
            a.store(8, Rm::Mem(RDI, 0), RDX);
        }
        a.jmp_indirect(entry);
        a.bind(miss);
        self.set_rip(target);
        self.a.jmp(self.return_saved);
    }

    /// Leave for the target in RCX after `done` instructions.
    fn exit_computed(&mut self, done: u32) {
        self.a.store(8, RIP, RCX);
        self.a.lea(RBP, Rm::Mem(RBP, -(done as i32)));
        self.a.jmp(self.exit);
    }

    fn alu(
        &mut self,
        index: u32,
        instr: &Instruction,
        op: AluOp,
        size: u8,
        dst: &Operand,
        src: &Operand,
    ) {
        let writes = !matches!(op, AluOp::Cmp | AluOp::Test);
        // Every op but MOV, ADC and SBB sets all the status flags from its operands alone.
        let overwrites = !matches!(op, AluOp::Mov | AluOp::Adc | AluOp::Sbb);
        self.operands_of(
            index,
            instr,
            &[dst, src],
            size,
            writes && matches!(dst, Operand::Mem(_)),
            overwrites,
        );
        self.value(src, size, RCX);
        self.alu_with_b(op, size, dst);
    }

    /// `dst op= RCX` (the memory operand, if any, already at RSI).
    fn alu_with_b(&mut self, op: AluOp, size: u8, dst: &Operand) {
        if op == AluOp::Mov {
            self.put(dst, size, RCX);
            return;
        }
        self.value(dst, size, RAX);
        match op {
            AluOp::Test => self.a.test(size, Rm::Reg(RAX), RCX),
            op => self.a.alu(size, group(op), Rm::Reg(RAX), RCX),
        }
        if !matches!(op, AluOp::Cmp | AluOp::Test) {
            self.put(dst, size, RAX);
        }
    }
}
