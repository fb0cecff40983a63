//! Exceptions an instruction can raise, with their error codes.

/// An x86 exception (vector plus error code where the architecture defines one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// #DE: divide error.
    DivideError,
    /// #DB: debug.
    Debug,
    /// #BP: breakpoint (INT3), a trap.
    Breakpoint,
    /// #OF: overflow (INTO), a trap.
    Overflow,
    /// #BR: BOUND range exceeded.
    BoundRange,
    /// #UD: invalid opcode.
    InvalidOpcode,
    /// #NM: device not available.
    DeviceNotAvailable,
    /// #DF: double fault (error code 0).
    DoubleFault,
    /// #TS: invalid TSS.
    InvalidTss(u16),
    /// #NP: segment not present.
    SegmentNotPresent(u16),
    /// #SS: stack-segment fault.
    StackFault(u16),
    /// #GP: general protection.
    GeneralProtection(u16),
    /// #PF: page fault, with its error code and the faulting linear address (CR2).
    PageFault { error_code: u32, address: u64 },
    /// #MF: x87 floating-point error.
    FloatingPoint,
    /// #AC: alignment check.
    AlignmentCheck,
    /// #XM: SIMD floating-point exception.
    SimdFloatingPoint,
}

impl Exception {
    pub fn vector(self) -> u8 {
        match self {
            Exception::DivideError => 0,
            Exception::Debug => 1,
            Exception::Breakpoint => 3,
            Exception::Overflow => 4,
            Exception::BoundRange => 5,
            Exception::InvalidOpcode => 6,
            Exception::DeviceNotAvailable => 7,
            Exception::DoubleFault => 8,
            Exception::InvalidTss(_) => 10,
            Exception::SegmentNotPresent(_) => 11,
            Exception::StackFault(_) => 12,
            Exception::GeneralProtection(_) => 13,
            Exception::PageFault { .. } => 14,
            Exception::FloatingPoint => 16,
            Exception::AlignmentCheck => 17,
            Exception::SimdFloatingPoint => 19,
        }
    }

    /// The error code pushed on delivery, if this exception has one.
    pub fn error_code(self) -> Option<u32> {
        match self {
            Exception::DoubleFault | Exception::AlignmentCheck => Some(0),
            Exception::InvalidTss(e)
            | Exception::SegmentNotPresent(e)
            | Exception::StackFault(e)
            | Exception::GeneralProtection(e) => Some(u32::from(e)),
            Exception::PageFault { error_code, .. } => Some(error_code),
            _ => None,
        }
    }

    /// Traps are delivered with RIP after the instruction; faults with RIP at it.
    pub fn is_trap(self) -> bool {
        matches!(self, Exception::Breakpoint | Exception::Overflow)
    }

    /// Contributory exceptions (for the double-fault rules).
    pub fn is_contributory(self) -> bool {
        matches!(
            self,
            Exception::DivideError
                | Exception::InvalidTss(_)
                | Exception::SegmentNotPresent(_)
                | Exception::StackFault(_)
                | Exception::GeneralProtection(_)
        )
    }
}

pub type ExResult<T> = Result<T, Exception>;
