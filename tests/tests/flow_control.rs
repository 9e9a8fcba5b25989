//! Flow control end to end: a client reading a 256 MiB response slowly keeps the relay's and the
//! agent's memory flat, because credit only returns as the client reads.

use std::time::{Duration, Instant};

use airlock_tests::pattern::pattern_sha256;
use airlock_tests::{Tunnel, Upstream};
use futures_util::StreamExt;
use reqwest::Method;
use sha2::{Digest, Sha256};

/// Resident set size of a process, in bytes (`VmRSS` of /proc/PID/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test]
async fn slow_reader_keeps_relay_and_agent_memory_flat() {
    const SIZE: u64 = 256 * 1024 * 1024;
    /// Client read rate: 40 MiB/s, far below what the tunnel could push.
    const RATE: f64 = 40.0 * 1024.0 * 1024.0;
    const LIMIT: u64 = 32 * 1024 * 1024;

    let upstream = Upstream::start().await.unwrap();
    let Tunnel { relay, agent, .. } = Tunnel::to_upstream(&upstream).await.unwrap();
    // Warm both processes up with a small request so the baseline includes pools and buffers.
    let warm = relay
        .proxy(Method::GET, "up", "bytes/100000?seed=1")
        .send()
        .await
        .unwrap();
    warm.bytes().await.unwrap();
    let (relay_pid, agent_pid) = (relay.pid().unwrap(), agent.pid().unwrap());
    let (relay_base, agent_base) = (rss(relay_pid), rss(agent_pid));

    let peaks = std::sync::Arc::new(std::sync::Mutex::new((relay_base, agent_base)));
    let done = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let peaks = peaks.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while !done.is_cancelled() {
                let (r, a) = (rss(relay_pid), rss(agent_pid));
                {
                    let mut p = peaks.lock().unwrap();
                    p.0 = p.0.max(r);
                    p.1 = p.1.max(a);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let resp = relay
        .proxy(Method::GET, "up", &format!("bytes/{SIZE}?seed=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let mut stream = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        read += chunk.len() as u64;
        hasher.update(&chunk);
        // Throttle: never get ahead of RATE.
        let due = Duration::from_secs_f64(read as f64 / RATE);
        let elapsed = started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
    done.cancel();
    sampler.await.unwrap();
    assert_eq!(read, SIZE);
    assert_eq!(hex::encode(hasher.finalize()), pattern_sha256(SIZE, 5));
    let (relay_peak, agent_peak) = *peaks.lock().unwrap();
    let relay_growth = relay_peak.saturating_sub(relay_base);
    let agent_growth = agent_peak.saturating_sub(agent_base);
    eprintln!(
        "read {SIZE} bytes in {:?}; RSS growth: relay {} KiB (base {} KiB), agent {} KiB (base {} KiB)",
        started.elapsed(),
        relay_growth / 1024,
        relay_base / 1024,
        agent_growth / 1024,
        agent_base / 1024
    );
    assert!(
        relay_growth < LIMIT,
        "relay RSS grew by {relay_growth} bytes"
    );
    assert!(
        agent_growth < LIMIT,
        "agent RSS grew by {agent_growth} bytes"
    );
}
