//! Smoke tests of the harness itself: the upstreams, the polling helpers and the network
//! namespace layout. They need neither the relay nor the agent.

use std::time::{Duration, Instant};

use airlock_tests::pattern::{pattern_bytes, pattern_sha256, pattern_stream, sha256_hex};
use airlock_tests::{
    assert_eventually, eventually, http_client, require_netns, venv_dir, Httpbin, Netns, Upstream,
};
use anyhow::{ensure, Context as _};
use futures_util::StreamExt as _;
use serde_json::Value;

#[test]
fn binaries_are_built_for_integration_tests() {
    for path in [
        env!("CARGO_BIN_EXE_e2e-relay"),
        env!("CARGO_BIN_EXE_e2e-agent"),
    ] {
        assert!(std::path::Path::new(path).is_file(), "{path} missing");
    }
    assert_eq!(
        airlock_tests::binary("e2e-relay").unwrap(),
        env!("CARGO_BIN_EXE_e2e-relay")
    );
}

#[tokio::test]
async fn httpbin_basic_auth() -> anyhow::Result<()> {
    let httpbin = Httpbin::start().await?;
    let client = http_client();
    let url = httpbin.url_for("/basic-auth/u/p");
    let ok = client.get(&url).basic_auth("u", Some("p")).send().await?;
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await?;
    assert_eq!(body["authenticated"], true);
    assert_eq!(body["user"], "u");
    let wrong = client
        .get(&url)
        .basic_auth("u", Some("nope"))
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    Ok(())
}

#[tokio::test]
async fn upstream_bytes_have_content_length_and_the_expected_digest() -> anyhow::Result<()> {
    let upstream = Upstream::start().await?;
    let n: u64 = 3 * 1024 * 1024 + 17;
    let response = http_client()
        .get(upstream.url_for(&format!("/bytes/{n}?seed=9")))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(n));
    let body = response.bytes().await?;
    assert_eq!(body.len() as u64, n);
    assert_eq!(sha256_hex(&body), pattern_sha256(n, 9));
    assert_ne!(pattern_sha256(n, 9), pattern_sha256(n, 10));
    assert_eq!(upstream.requests(&format!("/bytes/{n}")), 1);
    assert_eq!(
        upstream
            .last_request(&format!("/bytes/{n}"))
            .unwrap()
            .query
            .as_deref(),
        Some("seed=9")
    );
    Ok(())
}

#[tokio::test]
async fn upstream_stream_is_chunked_without_content_length() -> anyhow::Result<()> {
    let upstream = Upstream::start().await?;
    let n: u64 = 300_001;
    let response = http_client()
        .get(upstream.url_for(&format!("/stream/{n}?seed=1")))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("content-length").is_none(),
        "{:?}",
        response.headers()
    );
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let mut hashed = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        hashed.extend_from_slice(&chunk?);
    }
    assert_eq!(hashed, pattern_bytes(n as usize, 1));
    Ok(())
}

#[tokio::test]
async fn upstream_hashes_uploads_chunked_and_sized() -> anyhow::Result<()> {
    let upstream = Upstream::start().await?;
    let client = http_client();
    let n: u64 = 1_000_003;
    let chunked: Value = client
        .post(upstream.url_for("/sha256"))
        .body(reqwest::Body::wrap_stream(pattern_stream(n, 5)))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(chunked["sha256"], pattern_sha256(n, 5));
    assert_eq!(chunked["len"], n);
    assert_eq!(chunked["chunked"], true);
    assert_eq!(chunked["content_length"], Value::Null);

    let sized: Value = client
        .post(upstream.url_for("/sha256"))
        .body(pattern_bytes(1000, 6))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(sized["sha256"], pattern_sha256(1000, 6));
    assert_eq!(sized["chunked"], false);
    assert_eq!(sized["content_length"], 1000);
    assert_eq!(upstream.requests("/sha256"), 2);
    Ok(())
}

#[tokio::test]
async fn upstream_slow_chunks_arrive_spaced_in_time() -> anyhow::Result<()> {
    let upstream = Upstream::start().await?;
    let started = Instant::now();
    let response = http_client()
        .get(upstream.url_for("/slow-chunks?count=3&interval_ms=150"))
        .send()
        .await?;
    assert!(response.headers().get("content-length").is_none());
    let mut arrivals = Vec::new();
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        arrivals.push(started.elapsed());
        body.extend_from_slice(&chunk?);
    }
    assert_eq!(String::from_utf8(body)?, "chunk 0\nchunk 1\nchunk 2\n");
    let last = *arrivals.last().unwrap();
    assert!(
        last >= Duration::from_millis(300),
        "all chunks within {last:?}"
    );
    assert!(
        arrivals[0] < Duration::from_millis(300),
        "first chunk after {:?}",
        arrivals[0]
    );
    Ok(())
}

#[tokio::test]
async fn upstream_records_when_a_hanging_request_is_cancelled() -> anyhow::Result<()> {
    let upstream = Upstream::start().await?;
    let mut response = http_client().get(upstream.url_for("/hang")).send().await?;
    assert_eq!(response.status(), 200);
    // Two chunks: the body is really streaming.
    for _ in 0..2 {
        let chunk = response.chunk().await?.context("hang body ended")?;
        assert_eq!(&chunk[..], b".");
    }
    assert_eq!(upstream.hang_started().len(), 1);
    assert!(upstream.hang_cancelled().is_empty());
    let client_gone = Instant::now();
    drop(response);
    let cancelled = upstream
        .wait_hang_cancelled(Duration::from_secs(5))
        .await
        .context("upstream never saw the cancellation")?;
    let after = cancelled.saturating_duration_since(client_gone);
    assert!(
        after < Duration::from_secs(1),
        "cancellation seen after {after:?}"
    );
    assert_eq!(upstream.requests("/hang"), 1);
    Ok(())
}

#[tokio::test]
async fn eventually_retries_until_ok_and_reports_the_last_error() -> anyhow::Result<()> {
    let started = Instant::now();
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let attempts = &attempts;
    let value = eventually(Duration::from_secs(5), || async move {
        let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ensure!(n >= 3, "attempt {n}");
        Ok(n)
    })
    .await?;
    assert_eq!(value, 3);

    let error = eventually(Duration::from_millis(200), || async {
        anyhow::bail!("never") as anyhow::Result<()>
    })
    .await
    .unwrap_err();
    assert!(format!("{error:#}").contains("never"), "{error:#}");

    assert_eventually!(started.elapsed() > Duration::from_millis(50));
    let result = tokio::spawn(async {
        assert_eventually!(timeout = Duration::from_millis(100), false, "stays false");
    })
    .await;
    assert!(result.unwrap_err().is_panic());
    Ok(())
}

#[tokio::test]
async fn netns_layout_hides_the_private_namespace_from_the_root() -> anyhow::Result<()> {
    require_netns!(Ok(()));
    let netns = Netns::create()?;
    let names = (netns.agent_ns().to_owned(), netns.private_ns().to_owned());

    // A real app (httpbin) and the in-process upstream, both in P.
    let httpbin = Httpbin::start_with(netns.httpbin_options()).await?;
    assert_eq!(httpbin.addr.ip(), netns.private_ip());
    let upstream = Upstream::start_with(netns.upstream_options()).await?;

    // A separate process inside A reaches P.
    let python = venv_dir().join("bin").join("python");
    let script = format!(
        "import urllib.request; print(urllib.request.urlopen('{}', timeout=5).status)",
        httpbin.url_for("/get")
    );
    let out = Netns::command(netns.agent_ns(), python.to_str().unwrap())
        .args(["-c", &script])
        .output()
        .await?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "200");
    let status = Netns::http_status_in(
        Some(netns.agent_ns()),
        upstream.addr,
        "/status/204",
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(status, 204);

    // The root namespace cannot reach P, and learns it at once.
    for addr in [httpbin.addr, upstream.addr] {
        let started = Instant::now();
        let result = Netns::connect_in(None, addr, Duration::from_secs(5)).await;
        assert!(result.is_err(), "root namespace reached {addr}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    // P cannot reach the root namespace either, nor does A forward for it.
    let root_side = Upstream::start_with(airlock_tests::UpstreamOptions {
        bind_ip: netns.root_ip().into(),
        netns: None,
    })
    .await?;
    assert_eq!(
        Netns::http_status_in(
            Some(netns.agent_ns()),
            root_side.addr,
            "/status/200",
            Duration::from_secs(5)
        )
        .await?,
        200
    );
    assert!(Netns::http_status_in(
        Some(netns.private_ns()),
        root_side.addr,
        "/status/200",
        Duration::from_secs(2)
    )
    .await
    .is_err());
    assert_eq!(upstream.requests("/status/204"), 1);
    assert_eq!(root_side.requests("/status/200"), 1);

    // Everything is gone after drop.
    drop((httpbin, upstream));
    let slot_route = format!("unreachable 10.213.{}.4/30", netns.private_ip().octets()[2]);
    drop(netns);
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed.contains(&names.0) && !listed.contains(&names.1),
        "{listed}"
    );
    let routes = std::process::Command::new("ip").args(["route"]).output()?;
    assert!(!String::from_utf8_lossy(&routes.stdout).contains(&slot_route));
    Ok(())
}
