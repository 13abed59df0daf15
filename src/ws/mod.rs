//! The WebSocket endpoint. `protocol` parses client messages and renders responses,
//! `atmosphere` frames them for Atmosphere clients, `session` is the task that owns one socket.

pub mod atmosphere;
pub mod protocol;
pub mod session;
pub mod writer;

pub use session::subscription;
