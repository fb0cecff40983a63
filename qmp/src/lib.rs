//! QMP protocol layer, compatible on the wire with QEMU 7.2: the JSON stream
//! parser (`stream`), QEMU-style output (`writer`), messages and negotiation
//! (`protocol`), argument specs from the seed (`schema`) and the tokio server
//! (`server`). It knows nothing about the machine: the VMM implements
//! `server::Dispatcher`.

pub mod protocol;
pub mod schema;
pub mod server;
pub mod stream;
pub mod writer;

pub use protocol::{ErrorClass, GreetingInfo, QmpError};
pub use schema::{ArgType, CommandSpec, ParamSpec, Schema};
pub use server::{ConnectionContext, Dispatcher, EventSender, Server, ServerConfig};
