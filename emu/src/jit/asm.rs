//! A small x86-64 encoder for the fixed set of host instructions the block compiler emits.
//!
//! Every form takes an operand size in bytes (1, 2, 4, 8) and picks the 0x66 prefix, REX.W
//! and the byte opcode from it. Byte-sized forms always carry a REX prefix, so register
//! numbers 4..7 name SPL..DIL, never AH..BH (the compiler uses AL..BL only anyway).
//! A memory operand's displacement takes one byte when it fits (guest registers, TLB
//! entries and the context's fields all sit within 128 bytes of their base), else four:
//! compiled code is mostly such operands, and its size is what fills the code arena.
//! Branches go to labels resolved in [`Asm::finish`].

/// Host register numbers (encoding order).
pub const RAX: u8 = 0;
pub const RCX: u8 = 1;
pub const RDX: u8 = 2;
pub const RBX: u8 = 3;
pub const RSP: u8 = 4;
pub const RBP: u8 = 5;
pub const RSI: u8 = 6;
pub const RDI: u8 = 7;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
pub const R12: u8 = 12;
pub const R13: u8 = 13;
pub const R14: u8 = 14;
pub const R15: u8 = 15;

/// A register or memory operand.
#[derive(Debug, Clone, Copy)]
pub enum Rm {
    Reg(u8),
    /// `[base + disp]`
    Mem(u8, i32),
    /// `[base + index * (1 << scale_log) + disp]`
    Sib(u8, u8, u8, i32),
}

/// The x86 condition-code nibble (0 = O ... 15 = G).
pub type Cond = u8;

/// A forward or backward branch target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

#[derive(Default)]
pub struct Asm {
    pub buf: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (position of a rel32 field, label it refers to)
    fixups: Vec<(usize, Label)>,
    /// (position of a 64-bit field, label whose absolute address it holds)
    absolute: Vec<(usize, Label)>,
    /// Where the code will run (for absolute addresses).
    base: u64,
}

impl Asm {
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Code that will run at `base`.
    pub fn new_at(base: u64) -> Self {
        Asm {
            base,
            ..Self::default()
        }
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.buf.len());
    }

    /// The code, with every branch resolved; None if a label was never bound.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        for (pos, l) in std::mem::take(&mut self.fixups) {
            let target = self.labels[l.0]?;
            let rel = target as i64 - (pos as i64 + 4);
            self.buf[pos..pos + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        for (pos, l) in std::mem::take(&mut self.absolute) {
            let target = self.base.wrapping_add(self.labels[l.0]? as u64);
            self.buf[pos..pos + 8].copy_from_slice(&target.to_le_bytes());
        }
        Some(self.buf)
    }

    fn byte(&mut self, b: u8) {
        self.buf.push(b);
    }

    fn imm32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Prefixes, opcode and ModRM (with SIB and displacement) of a `reg, r/m` form.
    /// `opcode` is the full opcode for this size (byte forms pass their own opcode).
    pub fn op(&mut self, size: u8, opcode: &[u8], reg: u8, rm: Rm) {
        if size == 2 {
            self.byte(0x66);
        }
        let (b, x) = match rm {
            Rm::Reg(r) => (r, 0),
            Rm::Mem(base, _) => (base, 0),
            Rm::Sib(base, index, _, _) => (base, index),
        };
        let rex = 0x40
            | if size == 8 { 8 } else { 0 }
            | if reg >= 8 { 4 } else { 0 }
            | if x >= 8 { 2 } else { 0 }
            | if b >= 8 { 1 } else { 0 };
        if rex != 0x40 || size == 1 {
            self.byte(rex);
        }
        self.buf.extend_from_slice(opcode);
        let reg = (reg & 7) << 3;
        match rm {
            Rm::Reg(r) => self.byte(0xc0 | reg | (r & 7)),
            Rm::Mem(base, disp) => {
                let mode = Self::displacement_mode(disp);
                if base & 7 == RSP {
                    self.byte(mode | reg | 4);
                    self.byte(0x24);
                } else {
                    self.byte(mode | reg | (base & 7));
                }
                self.displacement(disp);
            }
            Rm::Sib(base, index, scale, disp) => {
                self.byte(Self::displacement_mode(disp) | reg | 4);
                self.byte((scale << 6) | ((index & 7) << 3) | (base & 7));
                self.displacement(disp);
            }
        }
    }

    /// ModRM's mod field for a displacement: one byte (0x40) or four (0x80). Never none
    /// (0x00), which would need the RBP/R13 exception.
    fn displacement_mode(disp: i32) -> u8 {
        if i8::try_from(disp).is_ok() {
            0x40
        } else {
            0x80
        }
    }

    fn displacement(&mut self, disp: i32) {
        match i8::try_from(disp) {
            Ok(d) => self.byte(d as u8),
            Err(_) => self.imm32(disp),
        }
    }

    /// `opcode` for sizes 2..8, `opcode8` for bytes.
    fn sized(&mut self, size: u8, opcode8: u8, opcode: u8, reg: u8, rm: Rm) {
        if size == 1 {
            self.op(1, &[opcode8], reg, rm);
        } else {
            self.op(size, &[opcode], reg, rm);
        }
    }

    /// `mov reg, r/m` of `size` bytes (4 zero-extends into the full register).
    pub fn load(&mut self, size: u8, reg: u8, rm: Rm) {
        self.sized(size, 0x8a, 0x8b, reg, rm);
    }

    /// `mov r/m, reg` of `size` bytes.
    pub fn store(&mut self, size: u8, rm: Rm, reg: u8) {
        self.sized(size, 0x88, 0x89, reg, rm);
    }

    /// Zero-extending load of `size` bytes into the full 64-bit `reg`.
    pub fn load_zx(&mut self, size: u8, reg: u8, rm: Rm) {
        match size {
            1 => self.op(4, &[0x0f, 0xb6], reg, rm),
            2 => self.op(4, &[0x0f, 0xb7], reg, rm),
            4 => self.op(4, &[0x8b], reg, rm),
            _ => self.op(8, &[0x8b], reg, rm),
        }
    }

    /// Sign-extending load of `size` bytes into the full 64-bit `reg`.
    pub fn load_sx(&mut self, size: u8, reg: u8, rm: Rm) {
        match size {
            1 => self.op(8, &[0x0f, 0xbe], reg, rm),
            2 => self.op(8, &[0x0f, 0xbf], reg, rm),
            4 => self.op(8, &[0x63], reg, rm),
            _ => self.op(8, &[0x8b], reg, rm),
        }
    }

    /// `lea reg64, [mem]`
    pub fn lea(&mut self, reg: u8, rm: Rm) {
        self.op(8, &[0x8d], reg, rm);
    }

    /// Two-operand ALU op `rm op= reg`: `code` is the group number (0 ADD, 1 OR, 2 ADC,
    /// 3 SBB, 4 AND, 5 SUB, 6 XOR, 7 CMP).
    pub fn alu(&mut self, size: u8, code: u8, rm: Rm, reg: u8) {
        let base = code << 3;
        self.sized(size, base, base + 1, reg, rm);
    }

    /// `test rm, reg`
    pub fn test(&mut self, size: u8, rm: Rm, reg: u8) {
        self.sized(size, 0x84, 0x85, reg, rm);
    }

    /// ALU group op with a sign-extended 32-bit immediate (sizes 4 and 8).
    pub fn alu_imm(&mut self, size: u8, code: u8, rm: Rm, imm: i32) {
        self.op(size, &[0x81], code, rm);
        self.imm32(imm);
    }

    /// `mov reg64, imm64` (the short form when it fits).
    pub fn mov_imm(&mut self, reg: u8, imm: u64) {
        if imm <= u64::from(u32::MAX) {
            // mov r32, imm32 zero-extends.
            if reg >= 8 {
                self.byte(0x41);
            }
            self.byte(0xb8 + (reg & 7));
            self.imm32(imm as u32 as i32);
        } else if imm as i64 >= i64::from(i32::MIN) && imm as i64 <= i64::from(i32::MAX) {
            self.op(8, &[0xc7], 0, Rm::Reg(reg));
            self.imm32(imm as i32);
        } else {
            self.byte(0x48 | if reg >= 8 { 1 } else { 0 });
            self.byte(0xb8 + (reg & 7));
            self.buf.extend_from_slice(&imm.to_le_bytes());
        }
    }

    /// Shift or rotate group (`/n`: 0 ROL, 1 ROR, 4 SHL, 5 SHR, 7 SAR) by an immediate.
    pub fn shift_imm(&mut self, size: u8, n: u8, rm: Rm, count: u8) {
        self.sized(size, 0xc0, 0xc1, n, rm);
        self.byte(count);
    }

    /// INC (`dec` false) or DEC of `rm`.
    pub fn inc_dec(&mut self, size: u8, dec: bool, rm: Rm) {
        self.sized(size, 0xfe, 0xff, u8::from(dec), rm);
    }

    /// `imul reg, rm` (sizes 2..8).
    pub fn imul(&mut self, size: u8, reg: u8, rm: Rm) {
        self.op(size, &[0x0f, 0xaf], reg, rm);
    }

    /// `cmovcc reg, rm` (sizes 2..8).
    pub fn cmov(&mut self, size: u8, cc: Cond, reg: u8, rm: Rm) {
        self.op(size, &[0x0f, 0x40 + cc], reg, rm);
    }

    /// `setcc rm8`
    pub fn setcc(&mut self, cc: Cond, rm: Rm) {
        self.op(1, &[0x0f, 0x90 + cc], 0, rm);
    }

    /// `bswap reg` (sizes 4 and 8).
    pub fn bswap(&mut self, size: u8, reg: u8) {
        let rex = if size == 8 { 0x48 } else { 0x40 } | if reg >= 8 { 1 } else { 0 };
        if rex != 0x40 {
            self.byte(rex);
        }
        self.byte(0x0f);
        self.byte(0xc8 + (reg & 7));
    }

    /// `bt reg64, reg64`
    pub fn bt(&mut self, rm: u8, bit: u8) {
        self.op(8, &[0x0f, 0xa3], bit, Rm::Reg(rm));
    }

    pub fn jcc(&mut self, cc: Cond, l: Label) {
        self.byte(0x0f);
        self.byte(0x80 + cc);
        self.fixups.push((self.buf.len(), l));
        self.imm32(0);
    }

    pub fn jmp(&mut self, l: Label) {
        self.byte(0xe9);
        self.fixups.push((self.buf.len(), l));
        self.imm32(0);
    }

    /// A group-3 (`F7 /n`: 2 NOT, 3 NEG, 4 MUL, 6 DIV) operation on `rm`.
    pub fn group3(&mut self, size: u8, n: u8, rm: Rm) {
        self.sized(size, 0xf6, 0xf7, n, rm);
    }

    /// Shift or rotate group by CL.
    pub fn shift_cl(&mut self, size: u8, n: u8, rm: Rm) {
        self.sized(size, 0xd2, 0xd3, n, rm);
    }

    /// `bt`/`bts`/`btr`/`btc` (`n` 4..7) of `rm` by an immediate.
    pub fn bit_imm(&mut self, size: u8, n: u8, rm: Rm, bit: u8) {
        self.op(size, &[0x0f, 0xba], n, rm);
        self.byte(bit);
    }

    /// `bt`/`bts`/`btr`/`btc` (`n` 4..7) of the register `rm` by register `bit`.
    pub fn bit_reg(&mut self, size: u8, n: u8, rm: u8, bit: u8) {
        let opcode = [0xa3, 0xab, 0xb3, 0xbb][usize::from(n & 3)];
        self.op(size, &[0x0f, opcode], bit, Rm::Reg(rm));
    }

    /// CBW/CWDE/CDQE (`to_rdx` false) or CWD/CDQ/CQO, of operand size `size`.
    pub fn sign_extend_rax(&mut self, size: u8, to_rdx: bool) {
        match size {
            2 => self.byte(0x66),
            8 => self.byte(0x48),
            _ => {}
        }
        self.byte(if to_rdx { 0x99 } else { 0x98 });
    }

    /// `jmp qword [rip + l]`
    pub fn jmp_rip(&mut self, l: Label) {
        self.byte(0xff);
        self.byte(0x25);
        self.fixups.push((self.buf.len(), l));
        self.imm32(0);
    }

    /// `lea reg, [rip + l]`
    pub fn lea_rip(&mut self, reg: u8, l: Label) {
        self.byte(0x48 | if reg >= 8 { 4 } else { 0 });
        self.byte(0x8d);
        self.byte(((reg & 7) << 3) | 5);
        self.fixups.push((self.buf.len(), l));
        self.imm32(0);
    }

    /// Eight bytes of data: the absolute address of `l`.
    pub fn address_of(&mut self, l: Label) {
        self.absolute.push((self.buf.len(), l));
        self.buf.extend_from_slice(&[0; 8]);
    }

    /// `jmp qword [mem]`
    pub fn jmp_indirect(&mut self, rm: Rm) {
        self.op(4, &[0xff], 4, rm);
    }

    pub fn push(&mut self, reg: u8) {
        if reg >= 8 {
            self.byte(0x41);
        }
        self.byte(0x50 + (reg & 7));
    }

    pub fn pop(&mut self, reg: u8) {
        if reg >= 8 {
            self.byte(0x41);
        }
        self.byte(0x58 + (reg & 7));
    }

    pub fn pushfq(&mut self) {
        self.byte(0x9c);
    }

    pub fn ret(&mut self) {
        self.byte(0xc3);
    }

    /// AH = SF:ZF:0:AF:0:PF:1:CF
    pub fn lahf(&mut self) {
        self.byte(0x9f);
    }

    pub fn sahf(&mut self) {
        self.byte(0x9e);
    }

    /// `add al, imm8`
    pub fn add_al(&mut self, imm: u8) {
        self.byte(0x04);
        self.byte(imm);
    }

    /// `mov ah, al`
    pub fn mov_ah_al(&mut self) {
        self.byte(0x88);
        self.byte(0xc4);
    }
}

/// The condition nibbles the compiler names.
pub const CC_O: Cond = 0;
pub const CC_NE: Cond = 5;
pub const CC_B: Cond = 2;
pub const CC_E: Cond = 4;
pub const CC_AE: Cond = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn text(a: Asm) -> String {
        let code = a.finish().unwrap_or_default();
        let mut d = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        f.options_mut().set_space_after_operand_separator(true);
        let mut out = Vec::new();
        for i in &mut d {
            assert!(!i.is_invalid(), "{code:02x?}");
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out.join("; ")
    }

    fn one(f: impl FnOnce(&mut Asm)) -> String {
        let mut a = Asm::new();
        f(&mut a);
        text(a)
    }

    #[test]
    fn encodings_decode_to_what_was_meant() {
        assert_eq!(one(|a| a.alu(4, 0, Rm::Reg(RAX), RCX)), "add eax, ecx");
        assert_eq!(one(|a| a.alu(8, 5, Rm::Reg(RAX), RCX)), "sub rax, rcx");
        assert_eq!(one(|a| a.alu(2, 2, Rm::Reg(RAX), RCX)), "adc ax, cx");
        assert_eq!(one(|a| a.alu(1, 7, Rm::Reg(RAX), RCX)), "cmp al, cl");
        assert_eq!(one(|a| a.test(1, Rm::Reg(RAX), RCX)), "test al, cl");
        assert_eq!(
            one(|a| a.load(8, RAX, Rm::Mem(RBX, 0x68))),
            "mov rax, [rbx+68h]"
        );
        assert_eq!(one(|a| a.store(2, Rm::Mem(RBX, 8), RCX)), "mov [rbx+8], cx");
        assert_eq!(one(|a| a.store(1, Rm::Mem(RSI, 0), RAX)), "mov [rsi], al");
        assert_eq!(
            one(|a| a.load(8, R8, Rm::Mem(R12, 16))),
            "mov r8, [r12+10h]"
        );
        assert_eq!(
            one(|a| a.lea(RDI, Rm::Sib(R13, RDI, 3, 0))),
            "lea rdi, [r13+rdi*8]"
        );
        assert_eq!(
            one(|a| a.load_zx(1, RAX, Rm::Mem(RSI, 0))),
            "movzx eax, byte ptr [rsi]"
        );
        assert_eq!(one(|a| a.load_sx(4, RCX, Rm::Reg(RCX))), "movsxd rcx, ecx");
        assert_eq!(one(|a| a.load_sx(2, RAX, Rm::Reg(RCX))), "movsx rax, cx");
        assert_eq!(one(|a| a.mov_imm(RSI, 0x1234)), "mov esi, 1234h");
        assert_eq!(
            one(|a| a.mov_imm(RCX, u64::MAX)),
            "mov rcx, 0FFFFFFFFFFFFFFFFh"
        );
        assert_eq!(
            one(|a| a.mov_imm(R9, 0x8000_0000_0000)),
            "mov r9, 800000000000h"
        );
        assert_eq!(one(|a| a.shift_imm(8, 5, Rm::Reg(RDX), 12)), "shr rdx, 0Ch");
        assert_eq!(one(|a| a.shift_imm(1, 0, Rm::Reg(RAX), 3)), "rol al, 3");
        assert_eq!(one(|a| a.inc_dec(2, true, Rm::Reg(RAX))), "dec ax");
        assert_eq!(one(|a| a.imul(8, RAX, Rm::Reg(RCX))), "imul rax, rcx");
        assert_eq!(one(|a| a.cmov(4, 3, RAX, Rm::Reg(RCX))), "cmovae eax, ecx");
        assert_eq!(one(|a| a.setcc(2, Rm::Reg(RAX))), "setb al");
        assert_eq!(one(|a| a.bswap(8, RAX)), "bswap rax");
        assert_eq!(one(|a| a.bswap(4, RAX)), "bswap eax");
        assert_eq!(one(|a| a.bt(R9, RDX)), "bt r9, rdx");
        assert_eq!(one(|a| a.group3(8, 2, Rm::Reg(RAX))), "not rax");
        assert_eq!(one(|a| a.group3(1, 3, Rm::Reg(RAX))), "neg al");
        assert_eq!(one(|a| a.group3(8, 6, Rm::Reg(RCX))), "div rcx");
        assert_eq!(one(|a| a.group3(4, 4, Rm::Reg(RCX))), "mul ecx");
        assert_eq!(one(|a| a.shift_cl(4, 4, Rm::Reg(RAX))), "shl eax, cl");
        assert_eq!(one(|a| a.shift_cl(1, 7, Rm::Reg(RAX))), "sar al, cl");
        assert_eq!(one(|a| a.bit_imm(8, 6, Rm::Reg(RAX), 9)), "btr rax, 9");
        assert_eq!(one(|a| a.bit_reg(4, 5, RAX, RCX)), "bts eax, ecx");
        assert_eq!(one(|a| a.sign_extend_rax(8, false)), "cdqe");
        assert_eq!(one(|a| a.sign_extend_rax(8, true)), "cqo");
        assert_eq!(one(|a| a.sign_extend_rax(2, false)), "cbw");
        assert_eq!(one(|a| a.sign_extend_rax(4, true)), "cdq");
        assert_eq!(
            one(|a| a.jmp_indirect(Rm::Mem(RCX, 8))),
            "jmp qword ptr [rcx+8]"
        );
        assert_eq!(
            one(|a| a.load(4, RDX, Rm::Sib(RSI, RDX, 2, 0))),
            "mov edx, [rsi+rdx*4]"
        );
        assert_eq!(
            one(|a| a.alu_imm(8, 4, Rm::Mem(RBX, 0x88), -0x8d6)),
            "and qword ptr [rbx+88h], 0FFFFFFFFFFFFF72Ah"
        );
        assert_eq!(
            one(|a| {
                a.push(R15);
                a.pop(R12);
                a.pushfq();
                a.lahf();
                a.sahf();
                a.add_al(0x7f);
                a.mov_ah_al();
                a.ret();
            }),
            "push r15; pop r12; pushfq; lahf; sahf; add al, 7Fh; mov ah, al; ret"
        );
        assert_eq!(one(|a| a.load(8, RAX, Rm::Mem(RSP, 8))), "mov rax, [rsp+8]");
    }

    /// Displacements: one byte from -128 to 127, four beyond, with every base (RSP and R12
    /// need a SIB byte, RBP and R13 a displacement even when it is zero).
    #[test]
    fn displacements_take_one_byte_when_they_fit() {
        let len = |f: &dyn Fn(&mut Asm)| {
            let mut a = Asm::new();
            f(&mut a);
            a.finish().unwrap().len()
        };
        assert_eq!(len(&|a| a.load(8, RAX, Rm::Mem(RBX, 0x78))), 4);
        assert_eq!(len(&|a| a.load(8, RAX, Rm::Mem(RBX, 0x80))), 7);
        assert_eq!(len(&|a| a.load(8, RAX, Rm::Mem(RBX, -128))), 4);
        assert_eq!(len(&|a| a.load(8, RAX, Rm::Mem(RBX, -129))), 7);
        for (base, name) in [
            (RAX, "rax"),
            (RSP, "rsp"),
            (RBP, "rbp"),
            (RSI, "rsi"),
            (R12, "r12"),
            (R13, "r13"),
            (R15, "r15"),
        ] {
            for (disp, text) in [
                (0, String::new()),
                (0x7f, "+7Fh".to_string()),
                (-0x80, "-80h".to_string()),
                (0x80, "+80h".to_string()),
                (-0x1234, "-1234h".to_string()),
            ] {
                assert_eq!(
                    one(|a| a.load(8, RCX, Rm::Mem(base, disp))),
                    format!("mov rcx, [{name}{text}]")
                );
                assert_eq!(
                    one(|a| a.lea(RDX, Rm::Sib(base, RDI, 3, disp))),
                    format!("lea rdx, [{name}+rdi*8{text}]")
                );
            }
        }
    }

    #[test]
    fn branches_resolve_to_their_labels() {
        let mut a = Asm::new();
        let l = a.label();
        a.jcc(CC_NE, l);
        a.jmp(l);
        a.bind(l);
        a.ret();
        let code = a.finish().unwrap_or_default();
        assert_eq!(code[2..6], 5i32.to_le_bytes());
        assert_eq!(code[7..11], 0i32.to_le_bytes());
        let mut a = Asm::new();
        let l = a.label();
        a.jmp(l);
        assert!(a.finish().is_none(), "an unbound label is refused");
        // RIP-relative forms and an absolute address of a label.
        let mut a = Asm::new_at(0x1000);
        let slot = a.label();
        a.jmp_rip(slot);
        a.lea_rip(RDI, slot);
        a.bind(slot);
        a.address_of(slot);
        let code = a.finish().unwrap_or_default();
        assert_eq!(code[..2], [0xff, 0x25]);
        assert_eq!(
            code[2..6],
            7i32.to_le_bytes(),
            "jmp [rip+7] reaches the slot"
        );
        assert_eq!(code[6..9], [0x48, 0x8d, 0x3d]);
        assert_eq!(code[9..13], 0i32.to_le_bytes());
        assert_eq!(code[13..21], 0x100du64.to_le_bytes());
    }
}
