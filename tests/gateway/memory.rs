//! Memory per socket, measured on a gateway process of its own (`fleetgate serve`, the binary
//! cargo built for these tests) so that nothing else in this test binary counts. An idle
//! subscribed socket must not hold the HTTP layer's 8 KiB read and write buffers
//! (vendor/README.md): with them a socket costs over 20 KiB, without them about 8.

use crate::common::*;

/// Sockets measured, beyond the warm-up ones (below the usual open-file limit of 1,024 of the
/// test process, which holds the client ends).
const SOCKETS: usize = 400;
const WARM_UP: usize = 40;
/// The bound asserted, per socket. Upstream actix-http's buffers alone are 16 KiB.
const LIMIT_KIB: f64 = 14.0;

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

async fn subscribed_client(url: &str) -> Client {
    let mut c = Client::connect(url).await;
    let resp = c.subscribe(ACME, &[101, 102]).await;
    assert_eq!(resp["type"], "response", "{resp}");
    c
}

#[tokio::test]
async fn an_idle_subscribed_socket_holds_no_connection_buffers() {
    let app = spawn_app().await; // a database with the fleet fixture
    let server = Server::start(&app, &[]);
    let pid = server.pid();
    let url = server.ws_url();

    server.wait_started().await;

    let mut clients = Vec::with_capacity(WARM_UP + SOCKETS);
    for _ in 0..WARM_UP {
        clients.push(subscribed_client(&url).await);
    }
    let before = rss_kib(pid);
    for _ in 0..SOCKETS {
        clients.push(subscribed_client(&url).await);
    }
    let per_socket = (rss_kib(pid) - before) / SOCKETS as f64;
    eprintln!("gateway RSS per subscribed socket: {per_socket:.1} KiB");
    assert!(
        per_socket < LIMIT_KIB,
        "{per_socket:.1} KiB per idle subscribed socket (bound {LIMIT_KIB} KiB): are the HTTP \
         connection buffers released while idle (vendor/README.md)?"
    );
    drop(clients);
}
