//! End-to-end and data-layer tests, in one binary (one link on a small machine). Each module is
//! one feature; `common` starts the real server against a fresh database.

mod api;
mod batch;
mod browser;
mod churn;
mod common;
mod compression;
mod db;
mod errors;
mod events;
mod logout;
mod logs;
mod memory;
mod races;
mod readings;
mod resync;
mod slow;
mod subscribe;
mod transport;
// The benchmark's WebSocket client with compression, shared rather than copied.
#[allow(dead_code)]
#[path = "../../bench/src/wsraw.rs"]
mod wsraw;
