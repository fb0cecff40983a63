//! How instruction semantics reach memory and operands.
//!
//! The CPU core implements [`DataAccess`] (segmentation, paging, the TLB, MMIO, the local
//! APIC page); every instruction group (integer, SSE, x87, system) is written against it
//! and against [`CpuState`], so the groups do not depend on the core's internals.
//!
//! Conventions every instruction's semantics follow:
//! - The core sets `state.rip` to the instruction's `next_ip()` before running it; a
//!   branch writes `state.rip`. On an exception the core puts `rip` back itself.
//! - An instruction does every access that can fault before it changes architectural
//!   state (write memory first, then update RSP/registers/flags), so that a faulting
//!   instruction can be restarted.
//! - LOCK-prefixed read-modify-writes go through [`DataAccess::compare_exchange`] in a
//!   loop, so they are atomic against other vCPUs on shared guest RAM.

use iced_x86::{Instruction, MemorySize, OpKind, Register};

use crate::exception::{ExResult, Exception};
use crate::state::{CpuState, SS};

/// Guest memory as seen through a segment register, with the CPU's current mode.
pub trait DataAccess {
    /// Read a 1, 2, 4 or 8-byte little-endian value at `seg:offset` (seg is an index:
    /// ES..GS from `state`). Faults (#GP/#SS on limits or non-canonical addresses, #PF)
    /// are returned as errors.
    fn read(&mut self, seg: usize, offset: u64, size: usize) -> ExResult<u64>;
    /// Write a 1, 2, 4 or 8-byte little-endian value at `seg:offset`.
    fn write(&mut self, seg: usize, offset: u64, size: usize, value: u64) -> ExResult<()>;
    /// Read any number of bytes (x87 80-bit values, SSE 16-byte values, FXSAVE areas).
    fn read_bytes(&mut self, seg: usize, offset: u64, buf: &mut [u8]) -> ExResult<()>;
    /// Write any number of bytes. Either every byte is written or, on a fault, none is.
    fn write_bytes(&mut self, seg: usize, offset: u64, buf: &[u8]) -> ExResult<()>;
    /// Atomically replace the `size`-byte value at `seg:offset` with `new` if it equals
    /// `expected`. Returns the value found (equal to `expected` on success). Faults as a
    /// write would (a locked access is a write even when the comparison fails).
    fn compare_exchange(
        &mut self,
        seg: usize,
        offset: u64,
        size: usize,
        expected: u64,
        new: u64,
    ) -> ExResult<u64>;
    /// The 16-byte form, for CMPXCHG16B.
    fn compare_exchange16(
        &mut self,
        seg: usize,
        offset: u64,
        expected: u128,
        new: u128,
    ) -> ExResult<u128>;
}

/// Address-size mask for the instruction's effective address.
fn address_mask(instr: &Instruction) -> u64 {
    let base = instr.memory_base();
    let index = instr.memory_index();
    let reg = if base != Register::None { base } else { index };
    match reg.size() {
        2 => 0xffff,
        4 => 0xffff_ffff,
        8 => u64::MAX,
        // No base or index: the displacement's own size decides.
        _ => match instr.memory_displ_size() {
            2 => 0xffff,
            4 => 0xffff_ffff,
            _ => u64::MAX,
        },
    }
}

/// The offset (within its segment) of the instruction's memory operand.
pub fn effective_address(state: &CpuState, instr: &Instruction) -> u64 {
    let base = instr.memory_base();
    if base == Register::RIP || base == Register::EIP {
        // The decoder already resolved RIP-relative operands against next_ip.
        let mask = if base == Register::EIP {
            0xffff_ffff
        } else {
            u64::MAX
        };
        return instr.memory_displacement64() & mask;
    }
    let mut ea = instr.memory_displacement64();
    if base != Register::None {
        ea = ea.wrapping_add(state.read_gpr(base).unwrap_or(0));
    }
    let index = instr.memory_index();
    if index != Register::None {
        let scale = u64::from(instr.memory_index_scale());
        ea = ea.wrapping_add(state.read_gpr(index).unwrap_or(0).wrapping_mul(scale));
    }
    ea & address_mask(instr)
}

/// Segment index (ES..GS) of the instruction's memory operand.
pub fn memory_segment(instr: &Instruction) -> usize {
    CpuState::seg_index(instr.memory_segment()).unwrap_or(crate::state::DS)
}

/// Size in bytes of operand `op`.
pub fn operand_size(instr: &Instruction, op: u32) -> usize {
    match instr.op_kind(op) {
        OpKind::Register => instr.op_register(op).size(),
        OpKind::Memory => instr.memory_size().size(),
        OpKind::Immediate8 => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        OpKind::Immediate64 | OpKind::Immediate8to64 | OpKind::Immediate32to64 => 8,
        _ => 0,
    }
}

/// Read operand `op` (register, memory or immediate), zero-extended to 64 bits.
/// Immediates of the `...to...` kinds come sign-extended to the operand size.
pub fn read_operand<M: DataAccess>(
    state: &CpuState,
    mem: &mut M,
    instr: &Instruction,
    op: u32,
) -> ExResult<u64> {
    match instr.op_kind(op) {
        OpKind::Register => {
            let reg = instr.op_register(op);
            state.read_gpr(reg).ok_or(Exception::InvalidOpcode)
        }
        OpKind::Memory => {
            let size = instr.memory_size().size();
            mem.read(memory_segment(instr), effective_address(state, instr), size)
        }
        OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate64 => {
            Ok(instr.immediate(op))
        }
        OpKind::Immediate8to16 => Ok(instr.immediate(op) & 0xffff),
        OpKind::Immediate8to32 => Ok(instr.immediate(op) & 0xffff_ffff),
        OpKind::Immediate8to64 | OpKind::Immediate32to64 => Ok(instr.immediate(op)),
        _ => Err(Exception::InvalidOpcode),
    }
}

/// Write operand `op` (register or memory). `value` is truncated to the operand size;
/// 32-bit register writes zero-extend, as x86 does.
pub fn write_operand<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    op: u32,
    value: u64,
) -> ExResult<()> {
    match instr.op_kind(op) {
        OpKind::Register => {
            if state.write_gpr(instr.op_register(op), value) {
                Ok(())
            } else {
                Err(Exception::InvalidOpcode)
            }
        }
        OpKind::Memory => {
            let size = instr.memory_size().size();
            let ea = effective_address(state, instr);
            mem.write(memory_segment(instr), ea, size, value)
        }
        _ => Err(Exception::InvalidOpcode),
    }
}

/// Stack width in bytes for pushes of the given operand size: 64-bit code uses RSP,
/// otherwise SS.B chooses ESP or SP.
fn stack_pointer_mask(state: &CpuState) -> u64 {
    if state.code64() {
        u64::MAX
    } else if state.seg[SS].db {
        0xffff_ffff
    } else {
        0xffff
    }
}

/// Push `size` bytes of `value`. RSP changes only if the write succeeds.
pub fn push<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    value: u64,
    size: usize,
) -> ExResult<()> {
    let mask = stack_pointer_mask(state);
    let rsp = state.gpr[4];
    let new_sp = rsp.wrapping_sub(size as u64) & mask;
    mem.write(SS, new_sp, size, value)?;
    state.gpr[4] = (rsp & !mask) | new_sp;
    Ok(())
}

/// Pop `size` bytes. RSP changes only if the read succeeds.
pub fn pop<M: DataAccess>(state: &mut CpuState, mem: &mut M, size: usize) -> ExResult<u64> {
    let value = peek(state, mem, 0, size)?;
    let mask = stack_pointer_mask(state);
    let rsp = state.gpr[4];
    state.gpr[4] = (rsp & !mask) | (rsp.wrapping_add(size as u64) & mask);
    Ok(value)
}

/// Read `size` bytes at stack offset `offset` from RSP without popping.
pub fn peek<M: DataAccess>(
    state: &CpuState,
    mem: &mut M,
    offset: u64,
    size: usize,
) -> ExResult<u64> {
    let mask = stack_pointer_mask(state);
    let sp = state.gpr[4].wrapping_add(offset) & mask;
    mem.read(SS, sp, size)
}

/// Bytes of a memory size, for operands the helpers above do not cover.
pub fn memory_size_bytes(size: MemorySize) -> usize {
    size.size()
}

#[cfg(test)]
pub(crate) mod test_util {
    //! A flat-memory [`DataAccess`] for unit tests of instruction semantics: segment
    //! bases are ignored and every address is an index into a byte vector.

    use super::*;

    pub struct FlatMemory {
        pub bytes: Vec<u8>,
    }

    impl FlatMemory {
        pub fn new(size: usize) -> Self {
            FlatMemory {
                bytes: vec![0; size],
            }
        }

        fn range(&self, offset: u64, len: usize) -> ExResult<std::ops::Range<usize>> {
            let start = usize::try_from(offset).map_err(|_| Exception::GeneralProtection(0))?;
            let end = start
                .checked_add(len)
                .ok_or(Exception::GeneralProtection(0))?;
            if end > self.bytes.len() {
                return Err(Exception::PageFault {
                    error_code: 0,
                    address: offset,
                });
            }
            Ok(start..end)
        }
    }

    impl DataAccess for FlatMemory {
        fn read(&mut self, _seg: usize, offset: u64, size: usize) -> ExResult<u64> {
            let r = self.range(offset, size)?;
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(&self.bytes[r]);
            Ok(u64::from_le_bytes(b))
        }
        fn write(&mut self, _seg: usize, offset: u64, size: usize, value: u64) -> ExResult<()> {
            let r = self.range(offset, size)?;
            self.bytes[r].copy_from_slice(&value.to_le_bytes()[..size]);
            Ok(())
        }
        fn read_bytes(&mut self, _seg: usize, offset: u64, buf: &mut [u8]) -> ExResult<()> {
            let r = self.range(offset, buf.len())?;
            buf.copy_from_slice(&self.bytes[r]);
            Ok(())
        }
        fn write_bytes(&mut self, _seg: usize, offset: u64, buf: &[u8]) -> ExResult<()> {
            let r = self.range(offset, buf.len())?;
            self.bytes[r].copy_from_slice(buf);
            Ok(())
        }
        fn compare_exchange(
            &mut self,
            seg: usize,
            offset: u64,
            size: usize,
            expected: u64,
            new: u64,
        ) -> ExResult<u64> {
            let old = self.read(seg, offset, size)?;
            if old == expected {
                self.write(seg, offset, size, new)?;
            }
            Ok(old)
        }
        fn compare_exchange16(
            &mut self,
            seg: usize,
            offset: u64,
            expected: u128,
            new: u128,
        ) -> ExResult<u128> {
            let mut b = [0u8; 16];
            self.read_bytes(seg, offset, &mut b)?;
            let old = u128::from_le_bytes(b);
            if old == expected {
                self.write_bytes(seg, offset, &new.to_le_bytes())?;
            }
            Ok(old)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::FlatMemory;
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode64(bytes: &[u8], ip: u64) -> Instruction {
        Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode()
    }

    #[test]
    fn effective_addresses() {
        let mut s = CpuState::power_on();
        s.gpr[3] = 0x1000; // rbx
        s.gpr[6] = 0x10; // rsi
                         // mov eax, [rbx+rsi*4+8]
        let i = decode64(&[0x8b, 0x44, 0xb3, 0x08], 0);
        assert_eq!(effective_address(&s, &i), 0x1048);
        // mov eax, [rip+0x100] at 0x5000 (6 bytes long)
        let i = decode64(&[0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], 0x5000);
        assert_eq!(effective_address(&s, &i), 0x5106);
        // mov eax, [ebx-1] wraps at 32 bits (67 prefix)
        s.gpr[3] = 0;
        let i = decode64(&[0x67, 0x8b, 0x43, 0xff], 0);
        assert_eq!(effective_address(&s, &i), 0xffff_ffff);
    }

    #[test]
    fn operands_and_stack() {
        let mut s = CpuState::power_on();
        // 64-bit flat long mode for the stack helpers.
        s.efer = crate::state::EFER_LMA | crate::state::EFER_LME;
        s.seg[crate::state::CS].l = true;
        s.gpr[4] = 0x800;
        let mut m = FlatMemory::new(0x1000);
        push(&mut s, &mut m, 0x1122_3344_5566_7788, 8).unwrap();
        assert_eq!(s.gpr[4], 0x7f8);
        assert_eq!(pop(&mut s, &mut m, 8).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(s.gpr[4], 0x800);
        // A push that faults leaves RSP alone.
        s.gpr[4] = 0x2000_0000;
        assert!(push(&mut s, &mut m, 1, 8).is_err());
        assert_eq!(s.gpr[4], 0x2000_0000);
        // add qword [rbx], 0x7f ; reads memory operand and the sign-extended immediate
        s.gpr[3] = 0x100;
        m.write(0, 0x100, 8, 5).unwrap();
        let i = decode64(&[0x48, 0x83, 0x03, 0x7f], 0);
        assert_eq!(read_operand(&s, &mut m, &i, 0).unwrap(), 5);
        assert_eq!(read_operand(&s, &mut m, &i, 1).unwrap(), 0x7f);
        write_operand(&mut s, &mut m, &i, 0, 0x84).unwrap();
        assert_eq!(m.read(0, 0x100, 8).unwrap(), 0x84);
        // add eax, -1 (83 c0 ff): Immediate8to32 is sign-extended to 32 bits.
        let i = decode64(&[0x83, 0xc0, 0xff], 0);
        assert_eq!(read_operand(&s, &mut m, &i, 1).unwrap(), 0xffff_ffff);
    }
}
