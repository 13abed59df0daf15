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
//! - [`readings`]: sensor readings (`readings_batch`): rows, filters, rendering.
//! - [`listen`]: the single LISTEN connection, the batched processor, resync after a gap.
//! - [`hub`]: the subscription index, per-socket bounded queues with coalescing.
//! - [`batch`]: `state_batch` groups shared by every socket asking for the same batch.
//! - [`ws`]: the WebSocket endpoint: protocol parsing, Atmosphere framing, the socket task.
//! - [`access`]: which trackers a session may see (shared by the socket and the HTTP API).
//! - [`http`]: `/health`, `/ready`, `/metrics`, `/openapi.json` and the Navixy-style JSON API
//!   (`/v2/user/…`, `/v2/tracker/…`, operator `/v2/admin/…`).
//! - [`service`]: account, session and operator actions shared by the HTTP API and the commands.
//! - [`metrics`]: the Prometheus registry; hot paths touch only its atomics.
//! - [`web`]: the live fleet page at `/` (embedded files; a reference client of the protocol).
//! - [`commands`]: demo fleet, traffic simulator, operator actions.

pub mod access;
pub mod batch;
pub mod cli;
pub mod commands;
pub mod config;
pub mod db;
pub mod http;
pub mod hub;
pub mod listen;
pub mod metrics;
pub mod model;
pub mod readings;
pub mod service;
pub mod startup;
pub mod telemetry;
pub mod web;
pub mod ws;
