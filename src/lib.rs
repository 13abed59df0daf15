//! fleetgate: a WebSocket gateway that pushes live GPS-tracker state from PostgreSQL to fleet
//! dashboards, speaking Navixy's event subscription protocol.
//!
//! Data flow: writers commit → triggers stamp a change number and NOTIFY → [`listen`] reads what
//! changed in batches → [`hub`] serializes each event once and queues it for every subscriber →
//! [`ws`] writes the frames, one task per socket.
//!
//! Modules:
//! - [`cli`]: the command line (serve, migrate, seed-demo, simulate, operator commands).
//! - [`config`]: typed, layered settings.
//! - [`telemetry`]: tracing set-up.
//! - [`startup`]: building the application (pool, tasks, bound server) and running it.
//! - [`db`]: connection, migrations, and every SQL query.
//! - [`model`]: tracker state and its rendering into protocol events.
//! - [`listen`]: the single LISTEN connection, the batched processor, resync after a gap.
//! - [`hub`]: the subscription index, per-socket bounded queues with coalescing.
//! - [`batch`]: `state_batch` groups shared by every socket asking for the same batch.
//! - [`ws`]: the WebSocket endpoint: protocol parsing, Atmosphere framing, the socket task.
//! - [`http`]: `/health` and `/ready`.
//! - [`commands`]: demo fleet, traffic simulator, operator actions.

pub mod batch;
pub mod cli;
pub mod commands;
pub mod config;
pub mod db;
pub mod http;
pub mod hub;
pub mod listen;
pub mod model;
pub mod startup;
pub mod telemetry;
pub mod ws;
