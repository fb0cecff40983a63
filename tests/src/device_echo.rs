//! The protocol of `device-echo` (tests/src/bin), the stand-in device process that the
//! supervisor tests start: shared by the program and the tests that talk to it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Echo(String),
    OpenFds,
    Exit(i32),
    /// Try to open a path for reading; the reply says whether it worked.
    TryOpen(String),
    /// Try to connect to a TCP address.
    TryConnect(String),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Echo(String),
    OpenFds(Vec<i32>),
    Outcome(Result<(), String>),
}
