//! Decoded-instruction cache: straight-line blocks of decoded instructions, keyed by the
//! physical address of their first instruction.
//!
//! A block runs from its first instruction to the first unconditional control transfer,
//! system instruction (which may change the mode or the mappings), page end, or
//! [`MAX_BLOCK`] instructions; a taken conditional branch leaves it early. It remembers the
//! RAM page and that page's generation when it was decoded, and a lookup requires the
//! generation to still match, so any write to a code page (by this CPU, another one or a
//! device) invalidates its cached decodes (see [`crate::ram`]); a write by this CPU also
//! stops the running block at once (`Mmu::code_written`). Instructions that cross a page
//! boundary or live outside RAM are decoded from a gathered buffer into a one-instruction
//! block that is not cached.

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};

use crate::exception::{ExResult, Exception};
use crate::exec::fast::{self, Fast};
use crate::jit::{self, ArenaFull, Jit};
use crate::mmu::Mmu;

/// Direct-mapped block slots.
const BLOCK_SLOTS: usize = 1 << 16;
/// Longest block.
pub const MAX_BLOCK: usize = 64;
/// `Block::page` of a block that is not cached (no generation to check).
pub const UNCACHED: u32 = u32::MAX;
/// `Block::jit` of a block that has no compiled code.
const NO_CODE: u32 = u32::MAX;
/// `Block::heat` of a block that is not worth compiling (its first form has no compiled
/// version).
const COLD: u16 = u16::MAX;

/// Straight-line decoded code. One cache line: entering a block touches only this and the
/// ops it runs.
#[repr(align(64))]
pub struct Block {
    /// Physical address of the first instruction, `u64::MAX` when empty.
    pa: u64,
    /// Linear IP of the first instruction (decodes depend on it).
    ip: u64,
    bitness: u8,
    /// Offset of the chained entry in its compiled code.
    chain: u8,
    /// Entries since it was decoded, until it is compiled (or [`COLD`]).
    heat: u16,
    /// Global RAM page index of the code, or [`UNCACHED`].
    pub page: u32,
    /// That page's generation when decoded.
    pub generation: u32,
    /// Offset of its compiled code in the CPU's arena, or [`NO_CODE`].
    jit: u32,
    pub instrs: Box<[Instruction]>,
    /// The same instructions as the run loop takes them.
    pub ops: Box<[Op]>,
}

/// One instruction of a block as the run loop takes it: the fast form ([`Fast::Generic`]
/// where none applies) and what the loop needs without touching the decoded instruction.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub fast: Fast,
    /// Length in bytes (the next instruction follows it).
    pub len: u8,
    /// Whether the block may have to stop after it (a branch, a memory access that may be
    /// MMIO or a code write, a generic instruction); the others always fall through.
    pub exits: bool,
}

impl Op {
    /// The op of `instr` lowered to `fast`.
    pub fn new(instr: &Instruction, fast: Fast) -> Op {
        Op {
            fast,
            len: instr.len() as u8,
            exits: fast::may_leave(&fast),
        }
    }
}

impl Block {
    fn empty() -> Self {
        Block {
            pa: u64::MAX,
            ip: 0,
            bitness: 0,
            chain: 0,
            heat: 0,
            page: UNCACHED,
            generation: 0,
            jit: NO_CODE,
            instrs: Box::new([]),
            ops: Box::new([]),
        }
    }

    /// Linear IP of its first instruction.
    pub fn ip(&self) -> u64 {
        self.ip
    }

    /// Its compiled code, if it has been compiled.
    pub fn code(&self) -> Option<jit::Code> {
        (self.jit != NO_CODE).then_some(jit::Code(self.jit))
    }

    /// Fill the block with `instrs` (decoded in `bitness`): lower them, and prune the
    /// flags that the block overwrites unread.
    fn fill(&mut self, instrs: &[Instruction], bitness: u32, forms: &mut Vec<Fast>) {
        self.heat = 0;
        self.jit = NO_CODE;
        forms.clear();
        forms.extend(instrs.iter().map(|i| fast::lower(i, bitness)));
        fast::prune_dead_flags(forms);
        self.ops = instrs
            .iter()
            .zip(forms.iter())
            .map(|(i, f)| Op::new(i, *f))
            .collect();
        self.instrs = instrs.into();
    }
}

/// The cache of one CPU.
pub struct DecodeCache {
    blocks: Vec<Block>,
    /// Holds uncacheable decodes (MMIO, page-crossing) for the borrow `block` returns.
    scratch: Block,
    /// Decoding buffers, kept to spare allocations.
    decoded: Vec<Instruction>,
    forms: Vec<Fast>,
    /// The block compiler, unless disabled.
    jit: Option<Jit>,
}

impl Default for DecodeCache {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a block ends after `instr`. A conditional branch does not: when it is taken
/// the run loop sees RIP leave the block and stops there, and when it is not, the block
/// goes on (fewer lookups on the common fall-through path).
fn ends_block(instr: &Instruction) -> bool {
    !matches!(
        instr.flow_control(),
        FlowControl::Next | FlowControl::ConditionalBranch
    ) || crate::exec::system::handles(instr.code())
}

impl DecodeCache {
    pub fn new() -> Self {
        DecodeCache {
            blocks: (0..BLOCK_SLOTS).map(|_| Block::empty()).collect(),
            scratch: Block::empty(),
            decoded: Vec::with_capacity(MAX_BLOCK),
            forms: Vec::with_capacity(MAX_BLOCK),
            jit: Jit::from_env(),
        }
    }

    /// Compile blocks after `threshold` entries, or never (None). The caller drops the
    /// jump cache (its entries may point into a dropped arena).
    pub fn set_jit_threshold(&mut self, threshold: Option<u16>) {
        match threshold {
            None => self.jit = None,
            Some(t) => match &mut self.jit {
                Some(jit) => jit.threshold = t,
                None => self.jit = Jit::new(t),
            },
        }
        for b in self.blocks.iter_mut() {
            b.pa = u64::MAX;
        }
    }

    /// Count an entry into block `index`, and compile it once it is hot. A compiled block
    /// goes (back) into the jump cache, for other compiled blocks to go on to it.
    #[inline]
    fn heat(&mut self, index: usize, mmu: &mut Mmu) {
        let Some(jit) = &mut self.jit else {
            return;
        };
        let b = &mut self.blocks[index];
        if b.jit != NO_CODE {
            let entry = jit.chain_entry(jit::Code(b.jit), b.chain);
            mmu.remember_jump(b.ip, entry, b.page, b.generation);
            return;
        }
        if b.heat == COLD {
            return;
        }
        if b.heat < jit.threshold {
            b.heat += 1;
            return;
        }
        match jit.compile(&b.instrs, &b.ops) {
            Ok(Some((code, chain))) => {
                b.jit = code.0;
                b.chain = chain;
                mmu.remember_jump(b.ip, jit.chain_entry(code, chain), b.page, b.generation);
            }
            Ok(None) => b.heat = COLD,
            Err(ArenaFull) => {
                // Start over: every block compiles again once it is hot again.
                jit.reset();
                mmu.invalidate_jumps();
                for b in self.blocks.iter_mut() {
                    b.jit = NO_CODE;
                    b.heat = 0;
                }
            }
        }
    }

    /// Forget everything (reset).
    pub fn flush(&mut self) {
        for b in self.blocks.iter_mut() {
            b.pa = u64::MAX;
        }
    }

    /// The block starting at CS:`ip` in the given code bitness (decoded if needed). A
    /// fault fetching the first instruction is returned; later instructions that cannot
    /// be fetched simply end the block.
    #[inline]
    pub fn block(
        &mut self,
        mmu: &mut Mmu,
        ip: u64,
        bitness: u32,
    ) -> ExResult<(&Block, Option<&Jit>)> {
        let t = mmu.fetch_translate(ip)?;
        if t.host.is_null() {
            return Ok((self.single(mmu, ip, bitness)?, None));
        }
        let index = (t.pa as usize ^ (t.pa >> 14) as usize) & (BLOCK_SLOTS - 1);
        let b = &self.blocks[index];
        if b.pa == t.pa
            && b.ip == ip
            && u32::from(b.bitness) == bitness
            && b.page as usize == t.page
            && b.generation == mmu.ram.generation(t.page)
        {
            self.heat(index, mmu);
            return Ok((&self.blocks[index], self.jit.as_ref()));
        }
        // Mark before reading the bytes, so a racing write bumps the generation we take.
        mmu.ram.mark_code(t.page);
        let generation = mmu.ram.generation(t.page);
        let page_start = t.host.wrapping_sub((t.pa & 0xfff) as usize);
        let mut off = (t.pa & 0xfff) as usize;
        let mut cur_ip = ip;
        let decoded = &mut self.decoded;
        decoded.clear();
        while decoded.len() < MAX_BLOCK {
            let instr = if off + 15 <= 0x1000 {
                let mut bytes = [0u8; 15];
                // SAFETY: 15 bytes from the page start + off stay inside the RAM page.
                unsafe {
                    std::ptr::copy_nonoverlapping(page_start.add(off), bytes.as_mut_ptr(), 15)
                };
                match decode_bytes(&bytes, cur_ip, bitness) {
                    Ok(i) => i,
                    Err(e) if decoded.is_empty() => return Err(e),
                    Err(_) => break,
                }
            } else {
                // Near the page end: only instructions that end inside the page join.
                let mut bytes = [0u8; 15];
                let n = 0x1000 - off;
                // SAFETY: n bytes from page start + off stay inside the RAM page.
                unsafe {
                    std::ptr::copy_nonoverlapping(page_start.add(off), bytes.as_mut_ptr(), n)
                };
                let mut decoder =
                    Decoder::with_ip(bitness, &bytes[..n], cur_ip, DecoderOptions::NONE);
                let instr = decoder.decode();
                if instr.code() == Code::INVALID {
                    if decoded.is_empty() {
                        self.blocks[index].pa = u64::MAX;
                        return Ok((self.single(mmu, ip, bitness)?, None));
                    }
                    break;
                }
                instr
            };
            off += instr.len();
            cur_ip = instr.next_ip();
            let end = ends_block(&instr);
            decoded.push(instr);
            if end || off >= 0x1000 {
                break;
            }
        }
        let block = &mut self.blocks[index];
        block.fill(&self.decoded, bitness, &mut self.forms);
        block.pa = t.pa;
        block.ip = ip;
        block.bitness = bitness as u8;
        block.page = t.page as u32;
        block.generation = generation;
        // Only 64-bit code compiles.
        if bitness == 64 {
            self.heat(index, mmu);
        } else {
            self.blocks[index].heat = COLD;
        }
        Ok((&self.blocks[index], self.jit.as_ref()))
    }

    /// A one-instruction uncached block (MMIO or page-crossing code).
    fn single(&mut self, mmu: &mut Mmu, ip: u64, bitness: u32) -> ExResult<&Block> {
        let instr = decode_gathered(mmu, ip, bitness)?;
        let b = &mut self.scratch;
        b.fill(&[instr], bitness, &mut self.forms);
        b.page = UNCACHED;
        b.ip = ip;
        b.bitness = bitness as u8;
        Ok(&self.scratch)
    }
}

fn decode_bytes(bytes: &[u8], ip: u64, bitness: u32) -> ExResult<Instruction> {
    let mut decoder = Decoder::with_ip(bitness, bytes, ip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.code() == Code::INVALID {
        return Err(match decoder.last_error() {
            // More than 15 bytes of prefixes and opcode.
            DecoderError::NoMoreBytes if bytes.len() >= 15 => Exception::GeneralProtection(0),
            _ => Exception::InvalidOpcode,
        });
    }
    Ok(instr)
}

/// Decode from bytes gathered through the MMU (page-crossing or MMIO instructions).
fn decode_gathered(mmu: &mut Mmu, ip: u64, bitness: u32) -> ExResult<Instruction> {
    let mut bytes = [0u8; 15];
    let got = mmu.fetch(ip, &mut bytes)?;
    let mut decoder = Decoder::with_ip(bitness, &bytes[..got], ip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.code() == Code::INVALID {
        if decoder.last_error() == DecoderError::NoMoreBytes && got < 15 {
            // The rest of the instruction is on a page that faults: report that fault.
            mmu.fetch_translate(ip.wrapping_add(got as u64))?;
            return Err(Exception::GeneralProtection(0));
        }
        return Err(Exception::InvalidOpcode);
    }
    Ok(instr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entering a block touches one cache line for its header, and each op is 40 bytes.
    #[test]
    fn block_header_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Block>(), 64);
        assert_eq!(std::mem::size_of::<Op>(), 40);
    }
}
