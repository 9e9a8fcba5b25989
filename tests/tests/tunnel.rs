//! The tunnel end to end: a real relay, a real agent, real upstreams (httpbin and an in-process
//! app), over real TLS.

use std::time::{Duration, Instant};

use airlock_tests::pattern::{pattern_sha256, sha256_hex};
use airlock_tests::{
    assert_eventually, start_online_agent, wait_agent_online, wait_agent_status, Agent,
    AgentOptions, Httpbin, OnlineAgent, Relay, RelayOptions, Tunnel, Upstream,
};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A relay, one agent of group `dc1` allowed to reach `allow`, and its enrolment id.
async fn setup(allow: &[String]) -> (Relay, Agent, String) {
    let t = Tunnel::start(allow).await.unwrap();
    (t.relay, t.agent, t.agent_id)
}

fn private_connection(name: &str, base_url: &str, auth: Value) -> Value {
    json!({
        "name": name,
        "base_url": base_url,
        "auth": auth,
        "network": {"private": true, "agent_group": "dc1"},
        "test_request": {"method": "GET", "path": "/"}
    })
}

async fn problem(resp: reqwest::Response) -> (StatusCode, Value, String) {
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body, ct)
}

#[tokio::test]
async fn basic_auth_through_the_agent_against_httpbin() {
    let httpbin = Httpbin::start().await.unwrap();
    let (relay, _agent, _) = setup(&[httpbin.addr.to_string()]).await;
    relay
        .create_connection(&private_connection(
            "hb",
            &httpbin.url,
            json!({"type": "basic", "username": "u", "password": "p"}),
        ))
        .await
        .unwrap();
    let resp = relay
        .proxy(Method::GET, "hb", "basic-auth/u/p")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, json!({"authenticated": true, "user": "u"}));

    // Wrong password: httpbin's own 401 passes through unchanged.
    let mut wrong = private_connection(
        "hb-wrong",
        &httpbin.url,
        json!({"type": "basic", "username": "u", "password": "nope"}),
    );
    wrong["test_request"]["path"] = json!("/basic-auth/u/p");
    relay.create_connection(&wrong).await.unwrap();
    let direct = reqwest::Client::new()
        .get(httpbin.url_for("/basic-auth/u/p"))
        .basic_auth("u", Some("nope"))
        .send()
        .await
        .unwrap();
    let direct_status = direct.status();
    let direct_www = direct.headers().get("www-authenticate").cloned();
    let direct_body = direct.bytes().await.unwrap();
    let resp = relay
        .proxy(Method::GET, "hb-wrong", "basic-auth/u/p")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), direct_status);
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers().get("www-authenticate").cloned(), direct_www);
    assert_eq!(resp.bytes().await.unwrap(), direct_body);

    // The caller's own credential for the relay never reaches the app.
    let resp = relay
        .proxy(Method::GET, "hb", "headers")
        .send()
        .await
        .unwrap();
    let headers: Value = resp.json().await.unwrap();
    let auth = headers["headers"]["Authorization"].as_str().unwrap();
    assert!(auth.starts_with("Basic "), "{auth}");
    assert!(!auth.contains(&relay.admin_token));

    // The test request reports status, latency and the agent.
    relay
        .api_json(
            Method::PUT,
            "/v1/connections/hb",
            Some(&json!({
                "name": "hb",
                "base_url": httpbin.url,
                "auth": {"type": "basic", "username": "u", "password": {"set": true}},
                "network": {"private": true, "agent_group": "dc1"},
                "test_request": {"method": "GET", "path": "/basic-auth/u/p"}
            })),
        )
        .await
        .unwrap();
    let report = relay.test_connection("hb").await.unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["status"], 200);
    assert_eq!(report["agent"]["name"], "a1");
    assert!(report["latency_ms"].as_u64().is_some());
    let report = relay.test_connection("hb-wrong").await.unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["kind"], "auth");
}

#[tokio::test]
async fn large_bodies_stream_both_ways_and_keep_their_framing() {
    let upstream = Upstream::start().await.unwrap();
    let Tunnel {
        relay,
        agent: _agent,
        ..
    } = Tunnel::to_upstream(&upstream).await.unwrap();
    const SIZE: u64 = 64 * 1024 * 1024;

    // 64 MiB download with Content-Length.
    let resp = relay
        .proxy(Method::GET, "up", &format!("bytes/{SIZE}?seed=7"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"].to_str().unwrap(),
        SIZE.to_string()
    );
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        n += chunk.len() as u64;
        hasher.update(&chunk);
    }
    assert_eq!(n, SIZE);
    assert_eq!(hex::encode(hasher.finalize()), pattern_sha256(SIZE, 7));

    // Without Content-Length it stays chunked.
    let resp = relay
        .proxy(Method::GET, "up", "stream/100000?seed=3")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("content-length").is_none());
    assert_eq!(
        resp.headers()["transfer-encoding"].to_str().unwrap(),
        "chunked"
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(sha256_hex(&body), pattern_sha256(100_000, 3));

    // 64 MiB upload with Content-Length: the upstream hashes what it received.
    let data = airlock_tests::pattern::pattern_bytes(SIZE as usize, 11);
    let resp = relay
        .proxy(Method::POST, "up", "sha256")
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["sha256"], pattern_sha256(SIZE, 11));
    assert_eq!(got["len"], SIZE);
    assert_eq!(got["chunked"], false);
    assert_eq!(got["content_length"], SIZE);

    // A chunked upload stays chunked.
    let chunks = futures_util::stream::iter(
        (0..16).map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![i as u8; 10_000]))),
    );
    let resp = relay
        .proxy(Method::POST, "up", "sha256")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["chunked"], true);
    assert_eq!(got["len"], 160_000);

    // An empty body stays empty (no chunked framing invented), and Content-Length: 0 stays.
    let resp = relay
        .proxy(Method::POST, "up", "sha256")
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got["len"], 0);
    assert_eq!(got["chunked"], false);
}

#[tokio::test]
async fn a_chunked_response_arrives_before_the_upstream_has_finished() {
    let upstream = Upstream::start().await.unwrap();
    let Tunnel {
        relay,
        agent: _agent,
        ..
    } = Tunnel::to_upstream(&upstream).await.unwrap();
    // 5 chunks, 400 ms apart: the whole body takes >= 1.6 s.
    let started = Instant::now();
    let resp = relay
        .proxy(Method::GET, "up", "slow-chunks?count=5&interval_ms=400")
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(!first.is_empty());
    let mut rest = 0;
    while let Some(c) = stream.next().await {
        rest += c.unwrap().len();
    }
    let total = started.elapsed();
    assert!(rest > 0);
    assert!(
        first_at + Duration::from_millis(1000) < total,
        "first chunk at {first_at:?}, whole body at {total:?}: not streamed"
    );
}

#[tokio::test]
async fn two_hundred_concurrent_requests_over_one_agent() {
    let upstream = Upstream::start().await.unwrap();
    let Tunnel { relay, agent, .. } = Tunnel::to_upstream(&upstream).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let req = relay.proxy(
            Method::GET,
            "up",
            &format!("bytes/{}?seed={i}", 1000 + i * 97),
        );
        tasks.push(tokio::spawn(async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.bytes().await.unwrap();
            assert_eq!(sha256_hex(&body), pattern_sha256(1000 + i * 97, i));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(relay.metric("airlock_agents_connected").await.unwrap(), 1.0);
    assert_eventually!(relay.metric("airlock_streams_active").await.unwrap() == 0.0);
    assert_eventually!(agent.metric("airlock_agent_streams_active").await.unwrap() == 0.0);
}

#[tokio::test]
async fn client_going_away_cancels_the_upstream_request() {
    let upstream = Upstream::start().await.unwrap();
    let Tunnel { relay, agent, .. } = Tunnel::to_upstream(&upstream).await.unwrap();
    let resp = relay.proxy(Method::GET, "up", "hang").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let _ = stream.next().await.unwrap().unwrap();
    assert_eq!(relay.metric("airlock_streams_active").await.unwrap(), 1.0);
    let dropped_at = Instant::now();
    drop(stream);
    let cancelled_at = upstream
        .wait_hang_cancelled(Duration::from_secs(5))
        .await
        .expect("the upstream never saw its request cancelled");
    let took = cancelled_at.saturating_duration_since(dropped_at);
    assert!(took < Duration::from_secs(1), "cancellation took {took:?}");
    assert_eventually!(relay.metric("airlock_streams_active").await.unwrap() == 0.0);
    assert_eventually!(agent.metric("airlock_agent_streams_active").await.unwrap() == 0.0);
}

#[tokio::test]
async fn agent_killed_mid_stream_is_an_error_not_a_short_body() {
    let upstream = Upstream::start().await.unwrap();
    let Tunnel {
        relay, mut agent, ..
    } = Tunnel::to_upstream(&upstream).await.unwrap();
    for path in ["hang", "stream/100000000?seed=1", "bytes/100000000?seed=1"] {
        let resp = relay.proxy(Method::GET, "up", path).send().await.unwrap();
        let mut stream = resp.bytes_stream();
        let _ = stream.next().await.unwrap().unwrap();
        if path != "hang" {
            // Kill while the body is still flowing.
            agent.kill().await.unwrap();
        } else {
            agent.kill().await.unwrap();
        }
        let mut failed = false;
        while let Some(c) = stream.next().await {
            if c.is_err() {
                failed = true;
                break;
            }
        }
        assert!(
            failed,
            "{path}: the body ended cleanly after the agent died"
        );
        agent.restart().await.unwrap();
        assert_eventually!(relay.metric("airlock_agents_connected").await.unwrap() == 1.0);
    }
}

#[tokio::test]
async fn agent_reconnects_by_itself_after_a_relay_restart() {
    let upstream = Upstream::start().await.unwrap();
    let Tunnel {
        mut relay,
        agent,
        agent_id: id,
        ..
    } = Tunnel::to_upstream(&upstream).await.unwrap();
    let pid = agent.pid();
    relay.restart().await.unwrap();
    wait_agent_online(&relay, &id).await.unwrap();
    assert_eq!(agent.pid(), pid, "the same agent process reconnected");
    let resp = relay
        .proxy(Method::GET, "up", "bytes/1000?seed=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        sha256_hex(&resp.bytes().await.unwrap()),
        pattern_sha256(1000, 1)
    );
}

#[tokio::test]
async fn bad_and_revoked_agent_tokens() {
    let upstream = Upstream::start().await.unwrap();
    let (relay, agent, id) = setup(&[upstream.addr.to_string()]).await;
    // A bad token is refused with 401 on the upgrade request.
    let resp = relay
        .client()
        .get(format!("{}/v1/agent/connect", relay.url))
        .bearer_auth("alk_agent_not-a-real-token")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    let (status, body, ct) = problem(resp).await;
    assert_eq!(status, 401);
    assert_eq!(ct, "application/problem+json");
    assert!(body["type"].as_str().unwrap().ends_with("/unauthorized"));
    let resp = relay
        .client()
        .get(format!("{}/v1/agent/connect", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Revocation disconnects within a second.
    relay
        .create_connection(&private_connection(
            "up",
            &upstream.url,
            json!({"type": "none"}),
        ))
        .await
        .unwrap();
    let revoked_at = Instant::now();
    let (status, _) = relay
        .api_json(Method::DELETE, &format!("/v1/agents/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 204);
    assert_eventually!(
        timeout = Duration::from_secs(2),
        relay.metric("airlock_agents_connected").await.unwrap() == 0.0
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(1) + Duration::from_millis(200));
    assert_eventually!(agent.metric("airlock_agent_connected").await.unwrap() == 0.0);
    let resp = relay
        .proxy(Method::GET, "up", "bytes/10")
        .send()
        .await
        .unwrap();
    let (status, body, _) = problem(resp).await;
    assert_eq!(status, 503);
    assert!(body["type"].as_str().unwrap().ends_with("/agent_offline"));
    // It cannot come back with the revoked token.
    assert_eventually!(agent.log().contains("401"), "agent log: {}", agent.log());
    wait_agent_status(&relay, &id, "revoked").await.unwrap();
}

#[tokio::test]
async fn private_connection_without_an_online_agent_is_503_at_once() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    relay
        .create_connection(&private_connection(
            "nobody",
            "http://127.0.0.1:9",
            json!({"type": "none"}),
        ))
        .await
        .unwrap();
    let started = Instant::now();
    let resp = relay
        .proxy(Method::GET, "nobody", "x")
        .send()
        .await
        .unwrap();
    let (status, body, ct) = problem(resp).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status, 503);
    assert_eq!(ct, "application/problem+json");
    assert!(body["type"].as_str().unwrap().ends_with("/agent_offline"));
    assert!(body["detail"].as_str().unwrap().contains("dc1"));
    let report = relay.test_connection("nobody").await.unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["kind"], "agent_offline");
}

#[tokio::test]
async fn destinations_outside_the_allow_list_are_refused() {
    let allowed = Upstream::start().await.unwrap();
    let other = Upstream::start().await.unwrap();
    let (relay, _agent, _) = setup(&[allowed.addr.to_string()]).await;
    relay
        .create_connection(&private_connection(
            "other",
            &other.url,
            json!({"type": "none"}),
        ))
        .await
        .unwrap();
    relay
        .create_connection(&private_connection(
            "by-name",
            &format!("http://localhost:{}", other.addr.port()),
            json!({"type": "none"}),
        ))
        .await
        .unwrap();
    for name in ["other", "by-name"] {
        let resp = relay
            .proxy(Method::GET, name, "bytes/10")
            .send()
            .await
            .unwrap();
        let (status, body, ct) = problem(resp).await;
        assert_eq!(status, 403, "{name}: {body}");
        assert_eq!(ct, "application/problem+json");
        assert!(body["type"]
            .as_str()
            .unwrap()
            .ends_with("/destination_not_allowed"));
    }
    assert_eq!(
        other.total_requests(),
        0,
        "the refused upstream received a request"
    );
}

#[tokio::test]
async fn bad_api_input_is_a_problem_and_stores_nothing() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let client = relay.client();
    let post = |body: &'static str| {
        client
            .post(format!("{}/v1/connections", relay.url))
            .bearer_auth(&relay.admin_token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, status, slug) in [
        ("{not json", 400, "malformed_json"),
        (r#"{"base_url": "http://a"}"#, 422, "invalid_field"),
        (
            r#"{"name": "x", "base_url": "not a url"}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"name": "x", "base_url": "ftp://a"}"#,
            422,
            "invalid_field",
        ),
        (
            r#"{"name": "x", "base_url": "http://a", "network": {"private": true}}"#,
            422,
            "invalid_field",
        ),
    ] {
        let (s, b, ct) = problem(post(body).await.unwrap()).await;
        assert_eq!(s.as_u16(), status, "{body}: {b}");
        assert_eq!(ct, "application/problem+json");
        assert!(b["type"].as_str().unwrap().ends_with(slug), "{b}");
        assert!(!b["detail"].as_str().unwrap().is_empty());
    }
    let (_, list) = relay
        .api_json(Method::GET, "/v1/connections", None)
        .await
        .unwrap();
    assert_eq!(list["connections"], json!([]));
    // Unknown connection.
    let resp = relay
        .proxy(Method::GET, "missing", "x")
        .send()
        .await
        .unwrap();
    let (s, b, _) = problem(resp).await;
    assert_eq!(s, 404);
    assert!(b["type"].as_str().unwrap().ends_with("/not_found"));
    // No token.
    let resp = client
        .get(format!("{}/v1/connections", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn clients_may_use_a_plain_listener_while_agents_use_tls() {
    let upstream = Upstream::start().await.unwrap();
    let port = airlock_tests::free_port();
    let relay = Relay::start(RelayOptions {
        args: vec!["--plain-listen".into(), format!("127.0.0.1:{port}")],
        ..RelayOptions::default()
    })
    .await
    .unwrap();
    let OnlineAgent { agent: _agent, .. } = start_online_agent(
        &relay,
        "a1",
        "dc1",
        AgentOptions {
            allow: vec![upstream.addr.to_string()],
            ..AgentOptions::default()
        },
    )
    .await
    .unwrap();
    relay
        .create_connection(&private_connection(
            "up",
            &upstream.url,
            json!({"type": "none"}),
        ))
        .await
        .unwrap();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!(
            "http://127.0.0.1:{port}/v1/connections/up/proxy/bytes/2000?seed=4"
        ))
        .bearer_auth(&relay.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        sha256_hex(&resp.bytes().await.unwrap()),
        pattern_sha256(2000, 4)
    );

    // Dot-segments cannot climb out of the connection's base path (HTTP clients normalise them
    // away, so speak HTTP/1.1 by hand).
    relay
        .create_connection(&private_connection(
            "prefixed",
            &format!("{}/bytes/", upstream.url),
            json!({"type": "basic", "username": "u", "password": "p"}),
        ))
        .await
        .unwrap();
    let before = upstream.total_requests();
    for path in ["../stream/10", "%2e%2e/stream/10", "..%2fstream/10"] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let req = format!(
            "GET /v1/connections/prefixed/proxy/{path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            relay.admin_token
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 404"),
            "{path}: {answer}"
        );
    }
    assert_eq!(
        upstream.total_requests(),
        before,
        "an escaped request reached the upstream"
    );
    // The root of a connection is reachable with and without the trailing slash.
    for path in ["/v1/connections/up/proxy", "/v1/connections/up/proxy/"] {
        let before = upstream.total_requests();
        let resp = relay.api(Method::GET, path).send().await.unwrap();
        let body = resp.text().await.unwrap();
        assert!(!body.contains("no such endpoint"), "{path}: {body}");
        assert_eq!(
            upstream.total_requests(),
            before + 1,
            "{path} did not reach the app"
        );
    }
}
