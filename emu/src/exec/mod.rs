//! Instruction semantics, one module per group. Each group's `execute` returns None for
//! instructions it does not implement; the core's dispatcher tries the groups in turn.

pub mod integer;
pub mod sse;
pub mod x87;
