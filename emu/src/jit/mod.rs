//! A block compiler for hot 64-bit code: the decode cache's fast forms become host x86-64
//! code, so that tight loops (bignum arithmetic, hashing, symbol scans) stop paying the
//! interpreter's dispatch for every instruction.
//!
//! A decoded block that has been entered [`Jit::threshold`] times is compiled (see
//! [`compile`]) into this CPU's code arena. The compiled code runs the longest prefix of the
//! block made of forms it handles, against the same `CpuState` and the same TLB as the
//! interpreter, and returns how far it got: either the block was left (RIP set), or the
//! interpreter must go on from a given instruction (a form it does not handle, a TLB miss,
//! MMIO, a store to code). Registers and flags are exact at every exit, so the interpreter
//! can always take over.
//!
//! `EMU_JIT=0` in the environment turns the compiler off; `EMU_JIT_THRESHOLD=N` compiles
//! blocks after N entries instead of [`DEFAULT_THRESHOLD`]. `EMU_PERF_MAP=1` writes
//! `/tmp/perf-<pid>.map`, so that `perf report` names compiled code by the guest address
//! of its block.

mod arena;
mod asm;
pub mod compile;

use crate::state::CpuState;

pub use arena::Arena;

/// Exit kind: the block was left with RIP set.
pub const EXIT_DONE: u64 = 0;
/// Exit kind: RIP is at instruction `low half` of the block `JitCtx::exit_block`, which
/// the interpreter runs.
pub const EXIT_INTERPRET: u64 = 1;

/// Block entries before a block is compiled.
pub const DEFAULT_THRESHOLD: u16 = 16;

/// What compiled code reads besides the CPU state (`repr(C)`: it reads fixed offsets).
#[repr(C)]
pub struct JitCtx {
    pub(crate) tlb: *const crate::mmu::TlbEntry,
    pub(crate) code_bits: *const u64,
    pub(crate) need_read: u32,
    pub(crate) need_write: u32,
    pub(crate) fs_base: u64,
    pub(crate) gs_base: u64,
    /// The jump cache (`JUMP_ENTRIES` entries), the RAM page generations, and the key of
    /// live jump-cache entries.
    pub(crate) jumps: *const crate::mmu::JumpEntry,
    pub(crate) generations: *const u32,
    pub(crate) jump_key: u32,
    pub(crate) _pad: u32,
    /// In: how many instructions may run (at least the first block's length). Out: how
    /// many were left.
    pub budget: u64,
    /// Out, on [`Exit::Interpret`]: the IP of the first instruction of the block that
    /// left (compiled code may have gone on to other blocks).
    pub exit_block: u64,
}

impl JitCtx {
    pub(crate) fn from_view(v: &crate::mmu::JitView) -> JitCtx {
        JitCtx {
            tlb: v.tlb,
            code_bits: v.code_bits,
            need_read: u32::from(v.need_read),
            // A bit no TLB entry has (perms are a byte): every compiled store misses.
            need_write: u32::from(v.need_write) | if v.dirty_logging { 0x100 } else { 0 },
            fs_base: v.fs_base,
            gs_base: v.gs_base,
            jumps: v.jumps,
            generations: v.generations,
            jump_key: v.jump_key,
            _pad: 0,
            budget: 0,
            exit_block: 0,
        }
    }
}

/// How a compiled run ended. The instructions run are what it took from
/// `JitCtx::budget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A block was left (or the budget had no room for the next one); RIP is set.
    Done,
    /// The interpreter goes on from this index of the block `JitCtx::exit_block` (RIP is
    /// at it).
    Interpret(u32),
}

/// Compiled code: an offset into its arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code(pub(crate) u32);

type Entry = unsafe extern "sysv64" fn(*mut CpuState, *mut JitCtx) -> u64;

/// The compiler state of one CPU.
pub struct Jit {
    arena: Arena,
    /// Entries of a block before it is compiled.
    pub threshold: u16,
    /// The perf map being written (`EMU_PERF_MAP`).
    perf_map: Option<std::fs::File>,
}

impl Jit {
    /// A compiler with its code arena, or None when disabled (`EMU_JIT=0`) or when no
    /// executable memory can be had.
    pub fn from_env() -> Option<Jit> {
        if std::env::var("EMU_JIT").is_ok_and(|v| v == "0" || v == "off") {
            return None;
        }
        let threshold = std::env::var("EMU_JIT_THRESHOLD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_THRESHOLD);
        Self::new(threshold)
    }

    pub fn new(threshold: u16) -> Option<Jit> {
        if !host_has_lahf() {
            tracing::warn!("emu: the host lacks LAHF/SAHF in 64-bit mode; interpreting only");
            return None;
        }
        match Arena::new(arena::DEFAULT_SIZE) {
            Ok(arena) => Some(Jit {
                arena,
                threshold,
                perf_map: std::env::var_os("EMU_PERF_MAP").and_then(|_| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(format!("/tmp/perf-{}.map", std::process::id()))
                        .ok()
                }),
            }),
            Err(e) => {
                tracing::warn!(
                    "emu: no executable memory for the block compiler ({e}); interpreting only"
                );
                None
            }
        }
    }

    /// Compile a block: its code and the offset of the entry that other compiled blocks
    /// jump to. None if nothing of it compiles; an error when the arena is full (then the
    /// caller drops every compiled block with [`Jit::reset`] and may try again).
    pub fn compile(
        &mut self,
        instrs: &[iced_x86::Instruction],
        ops: &[crate::decode::Op],
    ) -> Result<Option<(Code, u8)>, ArenaFull> {
        let base = self
            .arena
            .address(self.arena.next_offset().min(u32::MAX as usize) as u32);
        let Some(c) = compile::compile(instrs, ops, base as u64) else {
            return Ok(None);
        };
        let Ok(chain) = u8::try_from(c.chain_offset) else {
            return Ok(None);
        };
        let code = self.arena.install(&c.code).ok_or(ArenaFull)?;
        if let (Some(map), Some(first)) = (&mut self.perf_map, instrs.first()) {
            use std::io::Write;
            let _ = writeln!(
                map,
                "{:x} {:x} guest_{:x}",
                self.arena.address(code.0) as usize,
                c.code.len(),
                first.ip()
            );
        }
        Ok(Some((code, chain)))
    }

    /// Host address of the chained entry of `code` (`chain` from [`Jit::compile`]).
    pub(crate) fn chain_entry(&self, code: Code, chain: u8) -> *const u8 {
        self.arena.address(code.0).wrapping_add(usize::from(chain))
    }

    /// Forget all compiled code (every `Code` handed out is invalid afterwards).
    pub fn reset(&mut self) {
        self.arena.reset();
    }

    /// Run compiled code on `state` with the memory view `ctx`.
    ///
    /// # Safety
    /// `code` must come from this `Jit` since its last reset, and `ctx` must describe live
    /// memory: a TLB of `TLB_ENTRIES` entries whose host pointers are valid pages, and a
    /// code bitmap covering every page index those entries name.
    pub unsafe fn run(&self, code: Code, state: &mut CpuState, ctx: &mut JitCtx) -> Exit {
        // SAFETY: the arena holds compiled code at this offset (the caller's contract);
        // the code follows the sysv64 convention and touches only `state` and what `ctx`
        // points to.
        let r = unsafe {
            let entry: Entry = std::mem::transmute(self.arena.address(code.0));
            entry(state, ctx)
        };
        if r >> 32 == EXIT_INTERPRET {
            Exit::Interpret(r as u32)
        } else {
            Exit::Done
        }
    }
}

/// Whether the host runs LAHF and SAHF in 64-bit mode (CPUID 0x8000_0001 ECX bit 0), which
/// compiled code uses to move the guest flags.
fn host_has_lahf() -> bool {
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0001 && std::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
}

/// The code arena has no room left.
#[derive(Debug)]
pub struct ArenaFull;

/// For tests outside this crate: a TLB that maps the user pages at `linear` (a multiple of
/// 4 KiB) onto `host`, read-write, with no code pages and an empty jump cache, and the
/// context pointing at it.
pub struct TestMemory {
    tlb: Vec<crate::mmu::TlbEntry>,
    code_bits: Vec<u64>,
    jumps: Vec<crate::mmu::JumpEntry>,
    generations: Vec<u32>,
}

impl TestMemory {
    /// # Safety
    /// `host..host + len` must stay valid for reads and writes while compiled code runs
    /// with this memory, and `len` must be a multiple of 4096.
    pub unsafe fn new(linear: u64, host: *mut u8, len: usize) -> Self {
        let mut tlb = vec![crate::mmu::EMPTY; crate::mmu::TLB_ENTRIES];
        for p in 0..len / 4096 {
            let vpn = (linear >> 12) + p as u64;
            tlb[vpn as usize % crate::mmu::TLB_ENTRIES] = crate::mmu::TlbEntry {
                tag: vpn,
                host: host.wrapping_add(p * 4096),
                pa: 0,
                page: 0,
                perms: crate::mmu::T_ALL_RAM,
                size_mask: u64::MAX,
            };
        }
        TestMemory {
            tlb,
            code_bits: vec![0],
            jumps: vec![crate::mmu::EMPTY_JUMP; crate::mmu::JUMP_ENTRIES],
            generations: vec![0],
        }
    }

    /// The context of a user-mode (CPL 3) run with FS and GS bases of zero and room for
    /// `budget` instructions.
    pub fn ctx(&self, budget: u64) -> JitCtx {
        let (need_read, need_write) = crate::mmu::jit_needs(true);
        JitCtx {
            tlb: self.tlb.as_ptr(),
            code_bits: self.code_bits.as_ptr(),
            need_read: u32::from(need_read),
            need_write: u32::from(need_write),
            fs_base: 0,
            gs_base: 0,
            jumps: self.jumps.as_ptr(),
            generations: self.generations.as_ptr(),
            jump_key: 3,
            _pad: 0,
            budget,
            exit_block: 0,
        }
    }
}
