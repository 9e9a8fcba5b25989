//! The tokio runtime both binaries run on.
//!
//! `AIRLOCK_WORKER_THREADS` picks the number of worker threads: `1` runs everything on the
//! calling thread (`current_thread`), `N` runs N workers, `0` one per CPU core. Unset: one thread
//! on machines with at most 2 cores, one per core above that.
//!
//! Why one thread on small machines: a tunnel hop is a chain of short tasks (client connection,
//! multiplexer, upstream connection). Spread over workers, each hand-off is a futex wake-up and a
//! context switch, which costs more than the work itself; measured on a 2-core machine with
//! `deploy/bench`, one thread gave 25–40 % more small requests per second at concurrency 1 and
//! 10–25 % more at concurrency 64.

/// Builds the runtime described in the module docs.
///
/// # Errors
/// An unparsable `AIRLOCK_WORKER_THREADS`, or the OS refusing threads.
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match std::env::var("AIRLOCK_WORKER_THREADS") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse::<usize>().map_err(|_| {
            std::io::Error::other(format!(
                "AIRLOCK_WORKER_THREADS must be a whole number, not '{v}'"
            ))
        })?,
        _ => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores <= 2 {
                1
            } else {
                0
            }
        }
    };
    match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

/// Heap settings for a process that forwards large bodies (the relay): glibc's malloc serves
/// blocks up to 1 MiB from the heap instead of mapping each one afresh, and keeps up to 4 MiB of
/// free space at the top of the heap instead of handing it back to the OS after every large free.
/// Does nothing with other C libraries.
///
/// Why: with glibc's defaults the relay forwarding 1 MiB bodies at concurrency 4 took about 120
/// page faults per request (each a kernel entry and a zeroed 4 KiB page): rustls copies every
/// received TLS record (up to 16 KiB) into a fresh buffer, and that buffer kept landing in memory
/// the heap had just returned to the OS. With these settings the same load takes no page faults
/// and the relay's CPU time per 1 MiB request fell by about 30 % (`deploy/bench`, side by side).
/// Setting either threshold turns off glibc's own sliding thresholds, so both are set.
/// [`spawn_idle_heap_trim`] gives the memory held back to the OS once the process is idle.
pub fn tune_heap_for_bulk() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes malloc's parameters; glibc serialises it with allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 * 1024 * 1024);
    }
}

/// How often [`spawn_idle_heap_trim`] looks for idleness: 500 ms.
pub const HEAP_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Spawns a task that gives free heap memory back to the OS once the process goes idle: every
/// [`HEAP_TRIM_INTERVAL`], if streams were started since the last trim but none during the last
/// interval ([`crate::mux::streams_started`]), it calls glibc's `malloc_trim(0)` (which also
/// releases free pages inside the heap, not only at its top). So buffers grown under load do
/// not stay resident while the process waits for work. Does nothing with other C libraries.
/// Call it inside a tokio runtime.
pub fn spawn_idle_heap_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async {
        let mut tick = tokio::time::interval(HEAP_TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = crate::mux::streams_started();
        let mut trimmed_at = seen;
        loop {
            tick.tick().await;
            let now = crate::mux::streams_started();
            if now == seen && now != trimmed_at {
                // SAFETY: `malloc_trim` has no preconditions; glibc locks each arena it trims.
                unsafe {
                    libc::malloc_trim(0);
                }
                trimmed_at = now;
            }
            seen = now;
        }
    });
}

/// Resolves at the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Spawns the signal handler: the first SIGINT/SIGTERM calls `on_first` (start draining), a
/// second one exits at once with status 130.
pub fn spawn_signal_handler(on_first: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        shutdown_signal().await;
        on_first();
        shutdown_signal().await;
        std::process::exit(130);
    });
}
