//! The WebSocket endpoint. `protocol` parses client messages and renders responses,
//! `atmosphere` frames them for Atmosphere clients, `session` is the task that owns one socket;
//! `reader` and `writer` are its two halves on the wire, `deflate` their compression; `slots`
//! counts the sockets against the process's and each address's limit.

pub mod atmosphere;
pub mod deflate;
pub mod protocol;
pub mod reader;
pub mod session;
pub mod slots;
pub mod writer;

pub use session::subscription;
