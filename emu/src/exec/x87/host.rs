//! x87 computation kernels, executed by the host's own x87 unit.
//!
//! Each kernel loads its 80-bit (or memory-format) operands into the host's x87 stack
//! under the guest's control word (precision and rounding control; every exception
//! masked), runs the one instruction, stores the status word and results, and leaves the
//! host's x87 unit empty with its control word restored. Results are therefore bit-exact
//! to real hardware, including precision control, rounding, NaN propagation and the
//! exception/condition flags. The emu accelerator needs an x86-64 host for this.

use core::arch::asm;

/// Operands and results of one kernel, at the fixed offsets the asm templates use.
#[repr(C, align(16))]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Io {
    /// Offset 0: the first operand (80-bit), usually ST(0) or the destination.
    pub a: [u8; 16],
    /// Offset 16: the second operand (80-bit).
    pub b: [u8; 16],
    /// Offset 32: the first result (80-bit).
    pub r0: [u8; 16],
    /// Offset 48: the second result (80-bit).
    pub r1: [u8; 16],
    /// Offset 64: a memory-format value (float32/64, int16/32/64) loaded or stored.
    pub m: [u8; 16],
    /// Offset 80: the control word to run with.
    pub cw: u16,
    /// Offset 82: the host's control word, saved and restored.
    pub saved: u16,
    /// Offset 84: the status word after the operation.
    pub sw: u16,
    pad: [u8; 10],
}

impl Io {
    /// An operand block with `cw` (the guest's control word, exceptions masked).
    pub(crate) fn new(cw: u16) -> Self {
        Io {
            cw: cw | 0x3f,
            ..Default::default()
        }
    }

    pub(crate) fn with_a(mut self, a: &[u8; 10]) -> Self {
        self.a[..10].copy_from_slice(a);
        self
    }

    pub(crate) fn with_b(mut self, b: &[u8; 10]) -> Self {
        self.b[..10].copy_from_slice(b);
        self
    }

    pub(crate) fn with_m(mut self, m: u64) -> Self {
        self.m[..8].copy_from_slice(&m.to_le_bytes());
        self
    }

    pub(crate) fn r0(&self) -> [u8; 10] {
        let mut r = [0u8; 10];
        r.copy_from_slice(&self.r0[..10]);
        r
    }

    pub(crate) fn r1(&self) -> [u8; 10] {
        let mut r = [0u8; 10];
        r.copy_from_slice(&self.r1[..10]);
        r
    }

    pub(crate) fn m(&self) -> u64 {
        let mut r = [0u8; 8];
        r.copy_from_slice(&self.m[..8]);
        u64::from_le_bytes(r)
    }
}

macro_rules! run {
    ($io:expr, $($line:literal),+ $(,)?) => {{
        let io: *mut Io = $io;
        // SAFETY: the block reads and writes only the `Io` it is given (offsets below 96
        // of a 96-byte struct); it clobbers the whole x87 stack, which Rust guarantees
        // empty on entry, and empties it again (FNINIT) with the host control word
        // restored before it ends.
        unsafe {
            asm!(
                "fnstcw word ptr [{p} + 82]",
                "fnclex",
                "fldcw word ptr [{p} + 80]",
                $($line,)+
                "fninit",
                "fldcw word ptr [{p} + 82]",
                p = in(reg) io,
                out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                options(nostack),
            );
        }
    }};
}

macro_rules! kernels {
    ($($name:ident => [$($line:literal),+ $(,)?],)*) => {
        /// Host kernels; `a`/`b`/`m` in, `r0`/`r1`/`m`/`sw` out as each one describes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Kernel { $($name,)* }

        /// Runs `kernel` on `io`.
        pub(crate) fn run(kernel: Kernel, io: &mut Io) {
            match kernel { $(Kernel::$name => run!(io, $($line),+),)* }
        }
    };
}

kernels! {
    // m -> r0
    LoadF32 => ["fld dword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    LoadF64 => ["fld qword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    LoadI16 => ["fild word ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    LoadI32 => ["fild dword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    LoadI64 => ["fild qword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    // constant -> r0
    Fld1 => ["fld1", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fldz => ["fldz", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fldpi => ["fldpi", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fldl2t => ["fldl2t", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fldl2e => ["fldl2e", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fldlg2 => ["fldlg2", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fldln2 => ["fldln2", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    // a -> m
    StoreF32 => ["fld tbyte ptr [{p}]", "fstp dword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    StoreF64 => ["fld tbyte ptr [{p}]", "fstp qword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    StoreI16 => ["fld tbyte ptr [{p}]", "fistp word ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    StoreI32 => ["fld tbyte ptr [{p}]", "fistp dword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    StoreI64 => ["fld tbyte ptr [{p}]", "fistp qword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    TruncI16 => ["fld tbyte ptr [{p}]", "fisttp word ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    TruncI32 => ["fld tbyte ptr [{p}]", "fisttp dword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    TruncI64 => ["fld tbyte ptr [{p}]", "fisttp qword ptr [{p} + 64]", "fnstsw word ptr [{p} + 84]"],
    // a op b -> r0
    Add => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fadd st(0), st(1)", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Sub => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fsub st(0), st(1)", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Subr => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fsubr st(0), st(1)", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Mul => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fmul st(0), st(1)", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Div => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fdiv st(0), st(1)", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Divr => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fdivr st(0), st(1)", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    // a compared with b -> sw (C0, C2, C3)
    Fcom => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fcom st(1)", "fnstsw word ptr [{p} + 84]"],
    Fucom => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fucom st(1)", "fnstsw word ptr [{p} + 84]"],
    Ftst => ["fld tbyte ptr [{p}]", "ftst", "fnstsw word ptr [{p} + 84]"],
    Fxam => ["fld tbyte ptr [{p}]", "fxam", "fnstsw word ptr [{p} + 84]"],
    // a -> r0
    Fsqrt => ["fld tbyte ptr [{p}]", "fsqrt", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Frndint => ["fld tbyte ptr [{p}]", "frndint", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fsin => ["fld tbyte ptr [{p}]", "fsin", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fcos => ["fld tbyte ptr [{p}]", "fcos", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    F2xm1 => ["fld tbyte ptr [{p}]", "f2xm1", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    // a -> r0 (new ST(0)), r1 (new ST(1)); with C2 set (out of range) nothing is pushed
    Fptan => ["fld tbyte ptr [{p}]", "fptan", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]", "fstp tbyte ptr [{p} + 48]"],
    Fsincos => ["fld tbyte ptr [{p}]", "fsincos", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]", "fstp tbyte ptr [{p} + 48]"],
    Fxtract => ["fld tbyte ptr [{p}]", "fxtract", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]", "fstp tbyte ptr [{p} + 48]"],
    // ST(0) = a, ST(1) = b -> r0 (new ST(0))
    Fscale => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fscale", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fprem => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fprem", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fprem1 => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fprem1", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    // ST(0) = a, ST(1) = b -> r0 (replaces ST(1), then pop)
    Fyl2x => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fyl2x", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fyl2xp1 => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fyl2xp1", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
    Fpatan => ["fld tbyte ptr [{p} + 16]", "fld tbyte ptr [{p}]", "fpatan", "fnstsw word ptr [{p} + 84]", "fstp tbyte ptr [{p} + 32]"],
}

/// Runs `kernel` with the given operands and control word and returns the block.
pub(crate) fn exec(kernel: Kernel, mut io: Io) -> Io {
    run(kernel, &mut io);
    io
}
