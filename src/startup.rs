//! Building the application (pool, migrations, hub, LISTEN tasks, bound listener) separately from
//! running it, so that tests start it on port 0 and learn the real port.

use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{dev::Server, web, App, HttpServer};
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::http::limit::{LoginLimiter, SessionLimiter};
use crate::hub::Hub;
use crate::ws::slots::{self, SocketSlots};
use crate::{db, http, listen, service, ws};

/// Process-wide settings, applied as `serve` starts: transparent huge pages are turned off for
/// this process unless `server.transparent_huge_pages` allows them. The allocator
/// (mimalloc) asks for huge pages on its arenas, and where the kernel grants them every first
/// touch of a 2 MiB page is zeroed (after a compaction, if memory is fragmented) in the page
/// fault: a growing heap then stalls the thread that touches it for milliseconds (Redis
/// disables them for the same reason).
pub fn tune_process(settings: &crate::config::ServerSettings) {
    if settings.transparent_huge_pages {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl(PR_SET_THP_DISABLE) takes integer arguments only and sets a flag of
        // this process's memory map; it reads and writes no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "could not turn transparent huge pages off"
            );
        }
    }
}

/// Whether transparent huge pages are off for this process (Linux's `THP_enabled` of
/// `/proc/self/status`); `None` where the kernel does not say.
pub fn transparent_huge_pages_disabled() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"))?;
    Some(line.split_whitespace().nth(1)? == "0")
}

/// What every request handler and socket task shares.
#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub shutdown: watch::Receiver<bool>,
    /// `user/auth` attempts per login and per address, shared by every worker.
    pub login_limiter: Arc<LoginLimiter>,
    /// Calls per session hash (`tracker/…`, `user/get_info`, `user/logout`).
    pub session_limiter: Arc<SessionLimiter>,
    /// The processor's work queue (see [`listen`]): a subscribe whose snapshot could not be
    /// read hands its trackers to the processor, which sends their current states.
    pub inbox: Arc<listen::Inbox>,
    /// The sockets held against `websocket.max_sockets` and `max_sockets_per_address`.
    pub sockets: Arc<SocketSlots>,
}

/// Sets `TCP_USER_TIMEOUT` on an accepted connection (see `Application::build`). Not a plain
/// TCP stream (none other is served), or refused by the kernel: left as it is.
fn limit_unacked(io: &dyn std::any::Any, limit: Duration) {
    if let Some(stream) = io.downcast_ref::<actix_web::rt::net::TcpStream>() {
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(limit)) {
            tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
        }
    }
}

/// The connections the HTTP server holds (sockets and plain requests alike), counted by a guard
/// in each connection's data, which actix drops with the connection. Shutdown waits for this
/// count rather than for actix's own: that one is looked at once a second, so every stop with a
/// socket open took a second, whatever `server.shutdown_timeout_secs` said.
#[derive(Clone)]
struct OpenConnections(Arc<watch::Sender<usize>>);

struct Open(Arc<watch::Sender<usize>>);

impl OpenConnections {
    fn opened(&self) -> Open {
        self.0.send_modify(|n| *n += 1);
        Open(self.0.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// actix's per-worker connection limit for a process that holds at most `max_sockets`
/// WebSockets (0: no limit): above it, with room for HTTP requests, since one worker may be
/// given all of them.
fn connections_per_worker(max_sockets: usize) -> usize {
    if max_sockets == 0 {
        1 << 24
    } else {
        max_sockets.saturating_add(1024)
    }
}

/// The process's socket limit: `websocket.max_sockets`, or for 0 the open-file limit less a
/// reserve (see [`slots::automatic_max`]); no limit if the open-file limit cannot be read.
pub fn socket_limit(settings: &Settings) -> usize {
    let automatic = automatic_socket_limit(settings);
    let set = settings.websocket.max_sockets;
    if set > 0 {
        if automatic > 0 && set > automatic {
            tracing::warn!(
                max_sockets = set,
                open_file_limit_allows = automatic,
                "websocket.max_sockets is above what the open-file limit allows: past that, \
                 new connections (HTTP and database ones included) fail for want of \
                 descriptors instead of sockets being refused with code 15"
            );
        }
        return set;
    }
    automatic
}

/// The sockets the open-file limit leaves room for (see [`slots::automatic_max`]); 0 (no
/// limit) if it cannot be read or is unlimited.
pub fn automatic_socket_limit(settings: &Settings) -> usize {
    let db = settings.database.max_connections + settings.database.event_connections + 1;
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, _)) if soft != rlimit::INFINITY => slots::automatic_max(soft, u64::from(db)),
        Ok(_) => 0,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open-file limit: sockets not limited");
            0
        }
    }
}

/// Below this open-file limit the gateway warns at start-up: each socket takes a descriptor.
const OPEN_FILES_WARN: u64 = 10_000;

/// Raises the soft open-file limit to the hard one and returns (before, after). Each socket
/// costs the process a descriptor, and the usual soft default (1024, for programs that still
/// use `select`) would cap the gateway at about a thousand sockets whatever the hard limit.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let (before, _) = rlimit::Resource::NOFILE.get()?;
    let after = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((before, after))
}

/// [`raise_open_file_limit`], logged: raised, or too low for many sockets.
pub fn log_open_file_limit() {
    match raise_open_file_limit() {
        Ok((before, after)) => {
            if after > before {
                tracing::info!(from = before, to = after, "open-file limit raised");
            }
            if after < OPEN_FILES_WARN {
                tracing::warn!(
                    limit = after,
                    "the open-file limit caps the sockets this process can hold (one descriptor \
                     each); raise the hard limit (`ulimit -Hn`, `LimitNOFILE=` under systemd) or \
                     run several processes"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
}

pub struct Application {
    port: u16,
    server: Server,
    /// How many connections are open (see [`OpenConnections`]).
    connections: watch::Receiver<usize>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub state: AppState,
}

impl Application {
    /// Connects (creating and migrating the database if configured), starts the LISTEN stream and
    /// binds the HTTP server to `listener`. Must be called inside a tokio runtime.
    pub async fn build(settings: Settings, listener: TcpListener) -> anyhow::Result<Application> {
        // Created and migrated if needed, unless the operator migrates on its own: then the
        // schema must be there already.
        if settings.database.migrate_on_start {
            db::ensure_database(&settings.database.url).await?;
        }
        let pool = db::connect(&settings.database).await?;
        if settings.database.migrate_on_start {
            db::migrate(&pool).await?;
        } else {
            db::check_schema(&pool).await?;
        }
        Self::build_with_pool(settings, pool, listener)
    }

    pub fn build_with_pool(
        settings: Settings,
        pool: PgPool,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        let settings = Arc::new(settings);
        let hub = Hub::new();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let inbox = Arc::new(listen::Inbox::default());
        let events = {
            let (pool, hub, inbox, settings, shutdown) = (
                db::events_pool(
                    &pool,
                    &settings.database,
                    Duration::from_secs(settings.listen.round_timeout_secs.max(1) * 8),
                ),
                hub.clone(),
                inbox.clone(),
                settings.clone(),
                shutdown_rx.clone(),
            );
            spawn_event_thread(hub.clone(), shutdown.clone(), move || {
                vec![
                    (
                        "LISTEN connection",
                        listen::run_listener(
                            settings.database.url.clone(),
                            hub.clone(),
                            inbox.clone(),
                            settings.listen.clone(),
                            shutdown.clone(),
                        )
                        .boxed(),
                    ),
                    (
                        "event processor",
                        listen::run_processor(pool, hub, inbox, settings.listen.clone(), shutdown)
                            .boxed(),
                    ),
                ]
            })?
        };
        let tasks = vec![
            events,
            tokio::spawn(listen::run_expiry(
                pool.clone(),
                hub.clone(),
                settings.sessions.clone(),
                shutdown_rx.clone(),
            )),
        ];
        let state = AppState {
            hub,
            pool,
            settings: settings.clone(),
            shutdown: shutdown_rx,
            login_limiter: Arc::new(LoginLimiter::new(&settings.api)),
            session_limiter: Arc::new(SessionLimiter::new(&settings.api)),
            inbox,
            sockets: SocketSlots::new(
                socket_limit(&settings),
                settings.websocket.max_sockets_per_address,
            ),
        };
        tracing::info!(
            max_sockets = state.sockets.max(),
            max_sockets_per_address = settings.websocket.max_sockets_per_address,
            "socket limits"
        );
        // The dummy password hash that unknown logins are checked against, ahead of the first.
        tokio::task::spawn_blocking(service::warm_up);
        let port = listener.local_addr()?.port();
        let data = web::Data::new(state.clone());
        // (At least a second: below that, ordinary packet loss would reset healthy connections.)
        let unacked_limit = settings
            .websocket
            .idle_timeout()
            .max(Duration::from_secs(1));
        let (open, connections) = watch::channel(0usize);
        let open = OpenConnections(Arc::new(open));
        let mut server =
            HttpServer::new(move || App::new().app_data(data.clone()).configure(routes))
                .disable_signals()
                // A peer that stops reading keeps what the gateway wrote unacknowledged (its
                // window shut): the socket gives up on it after the idle timeout, but the
                // connection (and its descriptor, outside the socket limits) lived on, its
                // last bytes waiting to be flushed, for as long as the peer's kernel answered
                // the window probes: for ever. The kernel now drops the connection once data
                // has waited unacknowledged for the idle timeout.
                .on_connect(move |io, data| {
                    limit_unacked(io, unacked_limit);
                    data.insert(open.opened());
                })
                // Events are small frames written as they come: with Nagle's algorithm a frame
                // written while the previous one is unacknowledged waits for the peer's delayed
                // ACK (up to 40 ms on Linux), which the benchmark showed as a p95 of ~45 ms.
                .tcp_nodelay(true)
                // How much actix-http gathers from a socket's body before writing it to the
                // connection (its default is 32 KiB). Sockets are fed in chunks of at most
                // `writer::CHUNK` bytes, so a busy socket holds at most 32 KiB here; our patched
                // actix-http (vendor/README.md) releases the buffer as soon as everything is
                // written, so an idle one holds none. 8 KiB cost about a fifth of `fanout`'s
                // throughput in write calls (docs/performance.md, "What changed").
                .h1_write_buffer_size(32 * 1024 - crate::ws::writer::CHUNK)
                // actix stops accepting on a worker that holds 25,000 connections (its default),
                // HTTP requests included: with one worker that capped the process at 25,000
                // sockets whatever the open-file limit, and stalled `/health` with them. The
                // socket limit governs instead (see `ws::slots`).
                .max_connections(connections_per_worker(state.sockets.max()));
        if settings.server.workers > 0 {
            server = server.workers(settings.server.workers);
        }
        let server = server.listen(listener)?.run();
        Ok(Application {
            port,
            server,
            connections,
            shutdown: shutdown_tx,
            tasks,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A sender that stops the application when `true` is sent.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Runs until the shutdown handle fires: then the server stops accepting, sockets get a
    /// close frame, the connections are given `server.shutdown_timeout_secs` to close (those
    /// still open then are dropped), the LISTEN tasks end, and the pool closes last.
    pub async fn run_until_stopped(mut self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let mut stop = self.shutdown.subscribe();
        let server = tokio::spawn(self.server);
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
        tracing::info!("shutting down");
        // The sockets saw the same signal and are closing with 1001 ("going away").
        handle.pause().await;
        let limit = Duration::from_secs(self.state.settings.server.shutdown_timeout_secs);
        let all_closed = self.connections.wait_for(|&n| n == 0);
        let closed = tokio::time::timeout(limit, all_closed).await.is_ok();
        if closed {
            tracing::info!("connections closed");
        } else {
            tracing::info!(
                open = *self.connections.borrow(),
                "shutdown timeout: dropping the connections still open"
            );
        }
        handle.stop(false).await;
        let _ = server.await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        self.state.pool.close().await;
        Ok(())
    }
}

/// The server `serve` runs on `listener` while it waits for its database at start
/// ([`http::configure_waiting`]): one worker, stopped as soon as the application is built.
pub fn waiting_server(listener: TcpListener) -> std::io::Result<Server> {
    Ok(
        HttpServer::new(|| App::new().configure(http::configure_waiting))
            .disable_signals()
            .workers(1)
            .shutdown_timeout(1)
            .listen(listener)?
            .run(),
    )
}

/// The event tasks: the LISTEN connection and the event processor, each named for the log.
type EventTasks = Vec<(&'static str, BoxFuture<'static, ()>)>;

/// Runs the LISTEN connection and the event processor on a thread of their own, with a
/// single-threaded runtime. The processor is one task that alternates between waiting for its
/// reads and publishing what they return; on the shared multi-threaded runtime each of its
/// wake-ups could also wake an idle worker to look for work to steal, which cost about a tenth
/// of the gateway's CPU time in `ingest` (docs/performance.md, "What changed"). Its own thread
/// also keeps it off the cores' queue behind batch groups' renderings.
///
/// The tasks return only once `shutdown` is sent. One that ends before (a panic: a bug) leaves
/// a gateway that no longer delivers events, so it is logged as an error and the LISTEN stream
/// is marked down for good: `/ready` fails and an orchestrator can replace the process. The
/// returned task ends when every event task has.
fn spawn_event_thread(
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
    tasks: impl FnOnce() -> EventTasks + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("fleetgate-event".into())
        .spawn(move || {
            runtime.block_on(async move {
                // Polled here rather than spawned: the runtime has nothing else to run.
                let mut running: FuturesUnordered<_> = tasks()
                    .into_iter()
                    .map(|(name, task)| {
                        AssertUnwindSafe(task)
                            .catch_unwind()
                            .map(move |r| (name, r))
                    })
                    .collect();
                while let Some((name, result)) = running.next().await {
                    if *shutdown.borrow() {
                        continue;
                    }
                    hub.set_events_stopped();
                    let cause = if result.is_err() { "panicked" } else { "ended" };
                    tracing::error!(
                        task = name,
                        "event task {cause}: this gateway delivers no more events and reports \
                         itself not ready; restart it"
                    );
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _ = done_rx.await;
    }))
}

/// Every route of the gateway.
pub fn routes(cfg: &mut web::ServiceConfig) {
    for path in [
        "/event/subscription",
        "/event/subscription/",
        "/v2/event/subscription",
        "/v2/event/subscription/",
    ] {
        cfg.service(
            web::resource(path)
                .route(web::get().to(ws::subscription))
                .default_service(web::to(http::wrong_method)),
        );
    }
    http::configure(cfg);
    crate::web::configure(cfg);
    cfg.default_service(web::to(http::wrong_handler));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_may_take_every_socket_the_limit_allows() {
        // actix's default, 25,000 per worker, stopped a one-worker process there.
        assert_eq!(connections_per_worker(100_000), 101_024);
        assert_eq!(connections_per_worker(19_733), 20_757);
        assert!(connections_per_worker(0) >= 1 << 24);
    }

    /// Polls `f` until it holds or ten seconds pass.
    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await; // poll interval, not a sync
        }
        true
    }

    /// A task that runs until shutdown, as the LISTEN connection and the processor do.
    fn until_shutdown(mut shutdown: watch::Receiver<bool>) -> BoxFuture<'static, ()> {
        async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    return;
                }
            }
        }
        .boxed()
    }

    #[tokio::test]
    async fn an_event_task_that_panics_marks_the_gateway_not_ready_for_good() {
        let hub = Hub::new();
        hub.set_stream_up(true);
        let (stop, shutdown) = watch::channel(false);
        let rx = shutdown.clone();
        let done = spawn_event_thread(hub.clone(), shutdown, move || {
            vec![
                ("steady", until_shutdown(rx)),
                ("faulty", async { panic!("a bug in an event task") }.boxed()),
            ]
        })
        .expect("spawn the event thread");
        assert!(eventually(|| !hub.stream_up()).await, "still reported up");
        // A LISTEN connection that comes back does not make it ready again.
        hub.set_stream_up(true);
        assert!(!hub.stream_up());
        // The other task still stops on shutdown, and with it the thread.
        let _ = stop.send(true);
        let ended = tokio::time::timeout(Duration::from_secs(10), done).await;
        assert!(matches!(ended, Ok(Ok(()))), "the event thread did not end");
    }

    #[tokio::test]
    async fn event_tasks_ending_on_shutdown_are_no_failure() {
        let hub = Hub::new();
        hub.set_stream_up(true);
        let (stop, shutdown) = watch::channel(false);
        let (a, b) = (shutdown.clone(), shutdown.clone());
        let done = spawn_event_thread(hub.clone(), shutdown, move || {
            vec![("one", until_shutdown(a)), ("two", until_shutdown(b))]
        })
        .expect("spawn the event thread");
        let _ = stop.send(true);
        let ended = tokio::time::timeout(Duration::from_secs(10), done).await;
        assert!(matches!(ended, Ok(Ok(()))), "the event thread did not end");
        assert!(hub.stream_up(), "a clean shutdown is not a failure");
    }

    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() -> std::io::Result<()> {
        let (_, hard) = rlimit::Resource::NOFILE.get()?;
        if hard < 2 || hard == rlimit::INFINITY {
            return Ok(());
        }
        // Lowered by one (harmless to tests running beside this one), then raised again.
        rlimit::Resource::NOFILE.set(hard - 1, hard)?;
        assert_eq!(raise_open_file_limit()?, (hard - 1, hard));
        assert_eq!(rlimit::Resource::NOFILE.get()?, (hard, hard));
        Ok(())
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn transparent_huge_pages_are_turned_off_unless_allowed() {
        use crate::config::ServerSettings;
        let allowed = ServerSettings {
            transparent_huge_pages: true,
            ..ServerSettings::default()
        };
        let before = transparent_huge_pages_disabled();
        tune_process(&allowed);
        assert_eq!(
            transparent_huge_pages_disabled(),
            before,
            "allowed: left alone"
        );
        tune_process(&ServerSettings::default());
        assert_eq!(transparent_huge_pages_disabled(), Some(true));
    }
}
