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
