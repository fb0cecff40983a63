//! Helpers of the differential test: sequence generation, the host runner, the interpreter
//! runner and the flag rules.

pub mod flags;
pub mod gen;
pub mod interp;
pub mod native;
