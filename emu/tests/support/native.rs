//! Runs instruction sequences on the host CPU, the reference the interpreter is compared
//! against.
//!
//! The sequences run in a forked child so that a fault (#DE, #GP, a bug in the generator)
//! cannot take the test down. The code page, the register context block and the data
//! buffer sit at fixed addresses so that the interpreter can use the same addresses and the
//! trampoline can use absolute addressing while every general-purpose register holds test
//! data. A fault is caught by a signal handler that stores the register state of the
//! faulting instruction, so faults are compared like normal results.

use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicPtr, Ordering};

use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

/// Code page: trampoline prologue, the sequence, the epilogue.
pub const CODE_ADDR: u64 = 0x0f00_0000;
pub const CODE_SIZE: usize = 0x1_0000;
/// Register context block the trampoline loads and stores.
pub const CTX_ADDR: u64 = 0x0f80_0000;
const CTX_MAP_SIZE: usize = 0x1000;
/// The data buffer memory operands point into.
pub const DATA_ADDR: u64 = 0x1000_0000;
pub const DATA_SIZE: usize = 0x1000;

/// Register state handed to and returned by the trampoline.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// RAX..R15 in encoding order (RSP is neither loaded nor meaningful).
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub mxcsr: u32,
    host_mxcsr: u32,
    saved_rsp: u64,
    _pad: u64,
    pub xmm: [u128; 16],
}

const OFF_GPR: u64 = 0;
const OFF_RFLAGS: u64 = 128;
const OFF_MXCSR: u64 = 136;
const OFF_HOST_MXCSR: u64 = 140;
const OFF_SAVED_RSP: u64 = 144;
const OFF_XMM: u64 = 160;

/// Outcome of one job.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    NotRun = 0,
    Completed = 1,
    /// The sequence raised an exception; `trapno` and `fault_rip` tell which and where.
    Faulted = 2,
    /// The child died without reporting (timeout, a crash outside the sequence).
    Died = 3,
}

/// What the child reports for one job.
#[repr(C)]
pub struct NativeResult {
    status: u64,
    /// Exception vector (REG_TRAPNO) when faulted; the killing signal when died.
    pub trapno: u64,
    pub fault_rip: u64,
    pub ctx: Context,
    pub data: [u8; DATA_SIZE],
}

impl NativeResult {
    pub fn status(&self) -> Status {
        match self.status {
            1 => Status::Completed,
            2 => Status::Faulted,
            3 => Status::Died,
            _ => Status::NotRun,
        }
    }
}

/// One sequence to run: its encoded bytes (placed at [`seq_addr`]) and the initial state.
pub struct Job {
    pub seq: Vec<u8>,
    pub ctx: Context,
    pub data: Vec<u8>,
}

/// Where sequences start in the code page (after the prologue).
pub fn seq_addr() -> u64 {
    CODE_ADDR + runner().prologue.len() as u64
}

struct Runner {
    prologue: Vec<u8>,
    epilogue: Vec<u8>,
}

static RUNNER: std::sync::OnceLock<Runner> = std::sync::OnceLock::new();

fn runner() -> &'static Runner {
    RUNNER.get_or_init(|| {
        map_fixed(
            CODE_ADDR,
            CODE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        );
        map_fixed(CTX_ADDR, CTX_MAP_SIZE, libc::PROT_READ | libc::PROT_WRITE);
        map_fixed(DATA_ADDR, DATA_SIZE, libc::PROT_READ | libc::PROT_WRITE);
        let (prologue, epilogue) = trampoline();
        Runner { prologue, epilogue }
    })
}

fn map_fixed(addr: u64, size: usize, prot: i32) {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the range is checked.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            size,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(
        p as u64,
        addr,
        "cannot map the fixed test region at {addr:#x}: {}",
        std::io::Error::last_os_error()
    );
}

/// `[abs32]` operand into the context block.
fn ctx_mem(offset: u64) -> MemoryOperand {
    MemoryOperand::new(
        Register::None,
        Register::None,
        1,
        (CTX_ADDR + offset) as i64,
        4,
        false,
        Register::None,
    )
}

const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

fn xmm(i: usize) -> Register {
    Register::XMM0 + i as u32
}

fn encode_all(instrs: &[Instruction]) -> Vec<u8> {
    let mut enc = Encoder::new(64);
    for i in instrs {
        enc.encode(i, 0).expect("trampoline instruction encodes");
    }
    enc.take_buffer()
}

/// The prologue (loads the context, saves the host stack) and the epilogue (stores the
/// context back, restores the host state and returns). Both use absolute addresses only, so
/// the epilogue can follow a sequence of any length.
fn trampoline() -> (Vec<u8>, Vec<u8>) {
    let callee_saved = [
        Register::RBX,
        Register::RBP,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    let mut pro = Vec::new();
    for r in callee_saved {
        pro.push(Instruction::with1(Code::Push_r64, r).unwrap());
    }
    pro.push(Instruction::with1(Code::Stmxcsr_m32, ctx_mem(OFF_HOST_MXCSR)).unwrap());
    pro.push(Instruction::with1(Code::Ldmxcsr_m32, ctx_mem(OFF_MXCSR)).unwrap());
    for i in 0..16 {
        let m = ctx_mem(OFF_XMM + 16 * i as u64);
        pro.push(Instruction::with2(Code::Movdqu_xmm_xmmm128, xmm(i), m).unwrap());
    }
    pro.push(Instruction::with1(Code::Push_rm64, ctx_mem(OFF_RFLAGS)).unwrap());
    pro.push(Instruction::with(Code::Popfq));
    pro.push(
        Instruction::with2(Code::Mov_rm64_r64, ctx_mem(OFF_SAVED_RSP), Register::RSP).unwrap(),
    );
    for (i, r) in GPR64.iter().enumerate() {
        if *r != Register::RSP {
            let m = ctx_mem(OFF_GPR + 8 * i as u64);
            pro.push(Instruction::with2(Code::Mov_r64_rm64, *r, m).unwrap());
        }
    }

    let mut epi = Vec::new();
    for (i, r) in GPR64.iter().enumerate() {
        if *r != Register::RSP {
            let m = ctx_mem(OFF_GPR + 8 * i as u64);
            epi.push(Instruction::with2(Code::Mov_rm64_r64, m, *r).unwrap());
        }
    }
    epi.push(Instruction::with(Code::Pushfq));
    epi.push(Instruction::with1(Code::Pop_rm64, ctx_mem(OFF_RFLAGS)).unwrap());
    epi.push(Instruction::with(Code::Cld));
    for i in 0..16 {
        let m = ctx_mem(OFF_XMM + 16 * i as u64);
        epi.push(Instruction::with2(Code::Movdqu_xmmm128_xmm, m, xmm(i)).unwrap());
    }
    epi.push(Instruction::with1(Code::Stmxcsr_m32, ctx_mem(OFF_MXCSR)).unwrap());
    epi.push(Instruction::with1(Code::Ldmxcsr_m32, ctx_mem(OFF_HOST_MXCSR)).unwrap());
    epi.push(
        Instruction::with2(Code::Mov_r64_rm64, Register::RSP, ctx_mem(OFF_SAVED_RSP)).unwrap(),
    );
    for r in callee_saved.iter().rev() {
        epi.push(Instruction::with1(Code::Pop_r64, *r).unwrap());
    }
    epi.push(Instruction::with(Code::Retnq));
    (encode_all(&pro), encode_all(&epi))
}

/// Shared (parent/child) area: a progress word, then one result per job.
struct Shared {
    base: *mut u8,
    len: usize,
    jobs: usize,
}

const HEADER: usize = 64;

impl Shared {
    fn new(jobs: usize) -> Self {
        let len = HEADER + jobs * std::mem::size_of::<NativeResult>();
        // SAFETY: a fresh anonymous shared mapping; checked for failure below.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap of the result area failed");
        Shared {
            base: base as *mut u8,
            len,
            jobs,
        }
    }

    fn progress(&self) -> *mut u64 {
        self.base as *mut u64
    }

    fn result(&self, i: usize) -> *mut NativeResult {
        assert!(i < self.jobs);
        // SAFETY: within the mapping (checked index); NativeResult is 16-byte aligned at
        // HEADER (64) plus multiples of its size (a multiple of 16).
        unsafe {
            self.base
                .add(HEADER + i * std::mem::size_of::<NativeResult>())
                as *mut NativeResult
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

/// The shared area of the running child, for the signal handler.
static CHILD_SHARED: AtomicPtr<u8> = AtomicPtr::new(ptr::null_mut());

/// Records the faulting state into the current job's result and ends the child.
extern "C" fn fault_handler(_sig: i32, _info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // SAFETY: only installed in the child, where CHILD_SHARED points at a live Shared
    // area and the progress word names the running job; `uctx` is the kernel's ucontext.
    // Only plain memory copies and _exit are used (async-signal-safe).
    unsafe {
        let base = CHILD_SHARED.load(Ordering::SeqCst);
        let index = *(base as *const u64) as usize;
        let res =
            base.add(HEADER + index * std::mem::size_of::<NativeResult>()) as *mut NativeResult;
        let uc = &*(uctx as *const libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        let order = [
            libc::REG_RAX,
            libc::REG_RCX,
            libc::REG_RDX,
            libc::REG_RBX,
            libc::REG_RSP,
            libc::REG_RBP,
            libc::REG_RSI,
            libc::REG_RDI,
            libc::REG_R8,
            libc::REG_R9,
            libc::REG_R10,
            libc::REG_R11,
            libc::REG_R12,
            libc::REG_R13,
            libc::REG_R14,
            libc::REG_R15,
        ];
        for (i, r) in order.iter().enumerate() {
            (*res).ctx.gpr[i] = g[*r as usize] as u64;
        }
        (*res).ctx.rflags = g[libc::REG_EFL as usize] as u64;
        (*res).fault_rip = g[libc::REG_RIP as usize] as u64;
        (*res).trapno = g[libc::REG_TRAPNO as usize] as u64;
        let fp = uc.uc_mcontext.fpregs;
        if !fp.is_null() {
            (*res).ctx.mxcsr = (*fp).mxcsr;
            for i in 0..16 {
                let e = (*fp)._xmm[i].element;
                (*res).ctx.xmm[i] = u128::from(e[0])
                    | u128::from(e[1]) << 32
                    | u128::from(e[2]) << 64
                    | u128::from(e[3]) << 96;
            }
        }
        ptr::copy_nonoverlapping(DATA_ADDR as *const u8, (*res).data.as_mut_ptr(), DATA_SIZE);
        (*res).status = Status::Faulted as u64;
        libc::_exit(0);
    }
}

/// Child side: run jobs `start..` and exit. Allocates nothing (the parent may have had
/// other threads holding the allocator lock at fork time).
fn child_main(shared: &Shared, jobs: &[Job], start: usize) -> ! {
    let r = runner();
    // SAFETY: we are the single-threaded child; installing handlers and an alarm only
    // affects this process. The fixed regions were mapped by the parent before the fork.
    unsafe {
        CHILD_SHARED.store(shared.base, Ordering::SeqCst);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = fault_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
        ] {
            libc::sigaction(sig, &sa, ptr::null_mut());
        }
        libc::alarm(60);
        for (i, job) in jobs.iter().enumerate().skip(start) {
            *shared.progress() = i as u64;
            let code = CODE_ADDR as *mut u8;
            let mut at = 0usize;
            for part in [&r.prologue[..], &job.seq[..], &r.epilogue[..]] {
                if at + part.len() > CODE_SIZE {
                    libc::_exit(3);
                }
                ptr::copy_nonoverlapping(part.as_ptr(), code.add(at), part.len());
                at += part.len();
            }
            let n = job.data.len().min(DATA_SIZE);
            ptr::copy_nonoverlapping(job.data.as_ptr(), DATA_ADDR as *mut u8, n);
            ptr::write_volatile(CTX_ADDR as *mut Context, job.ctx);
            compiler_fence(Ordering::SeqCst);
            let entry: extern "sysv64" fn() = std::mem::transmute(CODE_ADDR as usize);
            entry();
            compiler_fence(Ordering::SeqCst);
            let res = shared.result(i);
            (*res).ctx = ptr::read_volatile(CTX_ADDR as *const Context);
            ptr::copy_nonoverlapping(DATA_ADDR as *const u8, (*res).data.as_mut_ptr(), DATA_SIZE);
            (*res).status = Status::Completed as u64;
        }
        libc::_exit(0);
    }
}

/// The results of a batch, readable after the child has finished.
pub struct Results {
    shared: Shared,
}

impl Results {
    pub fn get(&self, i: usize) -> &NativeResult {
        // SAFETY: the child has exited; nothing writes the shared area any more.
        unsafe { &*self.shared.result(i) }
    }
}

/// Runs every job on the host CPU and returns their results.
pub fn run(jobs: &[Job]) -> Results {
    runner();
    let shared = Shared::new(jobs.len().max(1));
    let mut start = 0;
    while start < jobs.len() {
        // SAFETY: the child only runs `child_main`, which never returns and does not
        // allocate; the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
        if pid == 0 {
            child_main(&shared, jobs, start);
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let w = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(w, pid, "waitpid failed");
        // SAFETY: the child is gone; reading the shared area.
        let progress = unsafe { *shared.progress() } as usize;
        let progress = progress.max(start);
        // SAFETY: as above.
        let res = unsafe { &mut *shared.result(progress) };
        match res.status() {
            Status::Completed | Status::Faulted => {}
            _ => {
                res.status = Status::Died as u64;
                res.trapno = if libc::WIFSIGNALED(status) {
                    libc::WTERMSIG(status) as u64
                } else {
                    1000 + libc::WEXITSTATUS(status) as u64
                };
            }
        }
        start = progress + 1;
    }
    Results { shared }
}
