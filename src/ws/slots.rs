//! How many WebSockets the process holds, in all and per client address.
//!
//! Each socket takes a file descriptor. A process that has run out of them accepts nothing: the
//! accept loop fails with `EMFILE`, so the HTTP API, `/health` and `/ready` stop answering, and
//! after a database outage neither the LISTEN connection nor the pools can connect again; one
//! client opening sockets in a loop took the gateway down for every other client that way. An
//! upgrade is therefore given a slot first, and refused (HTTP 503, or 429 past the per-address
//! limit) when none is left, while the reserve of descriptors keeps everything else working.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Descriptors kept for everything but sockets (HTTP requests, the runtime's own, log files),
/// beside the database connections.
const RESERVE: u64 = 256;

/// Why an upgrade got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The process holds `websocket.max_sockets`.
    Full = 0,
    /// The address holds `websocket.max_sockets_per_address`.
    Address = 1,
}

impl Refused {
    /// The `limit` label of `fleetgate_sockets_refused_total`, and the log's word for it.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Full => "process",
            Refused::Address => "address",
        }
    }
}

pub struct SocketSlots {
    max: usize,
    per_address: u32,
    open: AtomicUsize,
    by_address: DashMap<Box<str>, u32>,
    /// Refusals are logged once a second at most.
    pub log_gate: crate::telemetry::LogGate,
}

/// One socket's slot, given back when dropped.
pub struct Slot {
    slots: Arc<SocketSlots>,
    address: Option<Box<str>>,
}

/// The socket limit for `websocket.max_sockets = 0`: the open-file limit less the reserve and
/// the database connections, and at least half of the limit (and one).
pub fn automatic_max(open_files: u64, db_connections: u64) -> usize {
    let reserve = (RESERVE + db_connections).min(open_files / 2);
    usize::try_from(open_files - reserve)
        .unwrap_or(usize::MAX)
        .max(1)
}

impl SocketSlots {
    /// `max` 0 is no limit (for tests; the server passes the automatic value).
    pub fn new(max: usize, per_address: u32) -> Arc<SocketSlots> {
        Arc::new(SocketSlots {
            max,
            per_address,
            open: AtomicUsize::new(0),
            by_address: DashMap::new(),
            log_gate: Default::default(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for a socket from `address`, or why there is none.
    pub fn take(self: &Arc<Self>, address: &str) -> Result<Slot, Refused> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if self.max > 0 && before >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        let mut slot = Slot {
            slots: self.clone(),
            address: None,
        };
        if self.per_address > 0 {
            let mut held = self.by_address.entry(address.into()).or_insert(0);
            if *held >= self.per_address {
                drop(held);
                return Err(Refused::Address); // `slot` gives the process's slot back
            }
            *held += 1;
            slot.address = Some(address.into());
        }
        Ok(slot)
    }

    /// Addresses holding at least one socket (when the per-address limit is on).
    pub fn addresses(&self) -> usize {
        self.by_address.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
        let Some(address) = self.address.take() else {
            return;
        };
        let emptied = match self.slots.by_address.get_mut(&address) {
            Some(mut held) => {
                *held = held.saturating_sub(1);
                *held == 0
            }
            None => false,
        };
        if emptied {
            self.slots
                .by_address
                .remove_if(&address, |_, held| *held == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_limit_refuses_past_it_and_frees_on_drop() {
        let slots = SocketSlots::new(2, 0);
        let a = slots.take("10.0.0.1").unwrap();
        let _b = slots.take("10.0.0.2").unwrap();
        assert_eq!(slots.take("10.0.0.3").err(), Some(Refused::Full));
        assert_eq!(slots.open(), 2);
        drop(a);
        let c = slots.take("10.0.0.3").unwrap();
        assert_eq!(slots.open(), 2);
        drop(c);
        assert_eq!(slots.open(), 1);
    }

    #[test]
    fn the_address_limit_counts_each_address_and_forgets_empty_ones() {
        let slots = SocketSlots::new(0, 2);
        let a1 = slots.take("10.0.0.1").unwrap();
        let a2 = slots.take("10.0.0.1").unwrap();
        assert_eq!(slots.take("10.0.0.1").err(), Some(Refused::Address));
        assert_eq!(slots.open(), 2, "a refused address holds no process slot");
        let b = slots.take("10.0.0.2").unwrap();
        drop(a1);
        let a3 = slots.take("10.0.0.1").unwrap();
        drop((a2, a3, b));
        assert_eq!(slots.open(), 0);
        assert_eq!(slots.addresses(), 0);
    }

    #[test]
    fn the_automatic_limit_keeps_a_reserve() {
        assert_eq!(automatic_max(20_000, 12), 20_000 - 268);
        assert_eq!(automatic_max(1_048_576, 12), 1_048_576 - 268);
        // A small limit keeps half for sockets rather than none.
        assert_eq!(automatic_max(200, 12), 100);
        assert_eq!(automatic_max(1, 12), 1);
    }
}
