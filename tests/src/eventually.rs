//! Polling with a deadline instead of sleeping.

use std::future::Future;
use std::time::Duration;

/// Default deadline of [`assert_eventually!`](crate::assert_eventually).
pub const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause between two polls of [`eventually`] and [`assert_eventually!`](crate::assert_eventually).
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value.
///
/// Each attempt runs under the remaining time, so a hanging attempt cannot outlive the
/// deadline. Closures that use borrowed state should capture references:
///
/// ```ignore
/// let relay = &relay;
/// let agent = eventually(Duration::from_secs(10), || async move {
///     let n = relay.metric("airlock_agents_connected").await?;
///     anyhow::ensure!(n == 1.0, "agents connected: {n}");
///     Ok(n)
/// })
/// .await?;
/// ```
///
/// # Errors
///
/// When the deadline passes: the last error of `check` (or "timed out"), with context naming
/// the timeout.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => last_error = Some(error),
            Err(_elapsed) => {}
        }
        if tokio::time::Instant::now() + POLL_INTERVAL >= deadline {
            let error = last_error.unwrap_or_else(|| anyhow::anyhow!("attempt timed out"));
            return Err(error.context(format!("condition not met within {timeout:?}")));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts that a boolean expression becomes true before a deadline, polling it every
/// [`POLL_INTERVAL`](crate::POLL_INTERVAL). The expression may `.await` (the macro must be used
/// in an async context) and is re-evaluated on every poll.
///
/// ```ignore
/// assert_eventually!(relay.metric("airlock_streams_active").await? == 0.0);
/// assert_eventually!(upstream.requests("/hang") == 1, "upstream saw no request");
/// assert_eventually!(timeout = Duration::from_secs(40), agent_is_back().await);
/// ```
///
/// # Panics
///
/// When the expression is still false after the timeout (default
/// [`EVENTUALLY_TIMEOUT`](crate::EVENTUALLY_TIMEOUT)), with the expression or the given message.
#[macro_export]
macro_rules! assert_eventually {
    (timeout = $timeout:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!(timeout = $timeout, $cond, "{}", stringify!($cond))
    };
    (timeout = $timeout:expr, $cond:expr, $($arg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        let deadline = $crate::__private::tokio::time::Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            if $crate::__private::tokio::time::Instant::now() >= deadline {
                panic!("not true within {:?}: {}", timeout, format_args!($($arg)+));
            }
            $crate::__private::tokio::time::sleep($crate::POLL_INTERVAL).await;
        }
    }};
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(timeout = $crate::EVENTUALLY_TIMEOUT, $cond)
    };
    ($cond:expr, $($arg:tt)+) => {
        $crate::assert_eventually!(timeout = $crate::EVENTUALLY_TIMEOUT, $cond, $($arg)+)
    };
}
