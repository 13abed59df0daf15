//! End-to-end and data-layer tests, in one binary (one link on a small machine). Each module is
//! one feature; `common` starts the real server against a fresh database.

mod api;
mod batch;
mod browser;
mod common;
mod db;
mod errors;
mod events;
mod logout;
mod memory;
mod readings;
mod resync;
mod slow;
mod subscribe;
mod transport;
