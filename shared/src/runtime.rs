//! The tokio runtime both binaries run on.
//!
//! `AIRLOCK_WORKER_THREADS` picks the number of worker threads: unset or `0` means one per CPU
//! core (tokio's default); `1` runs everything on the calling thread (`current_thread`), which
//! saves the cross-thread wake-ups of a tunnel hop and is often fastest on small machines.

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
        _ => 0,
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
