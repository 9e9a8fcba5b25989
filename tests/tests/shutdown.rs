//! Draining: in-flight bodies complete across an agent's SIGTERM and a relay's shutdown, and
//! protocol-version negotiation at the handshake.

use std::time::Duration;

use airlock_shared::mux;
use airlock_shared::proto::{Frame, Hello};
use airlock_tests::pattern::{pattern_sha256, sha256_hex};
use airlock_tests::{Agent, Relay, Tunnel, Upstream};
use futures_util::StreamExt;
use reqwest::Method;

async fn setup() -> (Upstream, Relay, Agent, String) {
    let upstream = Upstream::start().await.unwrap();
    let t = Tunnel::to_upstream(&upstream).await.unwrap();
    (upstream, t.relay, t.agent, t.token)
}

#[tokio::test]
async fn agent_sigterm_lets_in_flight_bodies_finish() {
    let (_upstream, relay, mut agent, _) = setup().await;
    // 5 chunks, 300 ms apart: in flight when SIGTERM arrives.
    let resp = relay
        .proxy(Method::GET, "up", "slow-chunks?count=5&interval_ms=300")
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    agent.terminate().unwrap();
    let mut body = first.to_vec();
    while let Some(c) = stream.next().await {
        body.extend_from_slice(&c.expect("the body failed during the agent's drain"));
    }
    assert!(!body.is_empty());
    let status = agent.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "agent exit status {status}");
    assert!(agent.log().contains("draining"), "{}", agent.log());
}

#[tokio::test]
async fn relay_shutdown_lets_in_flight_bodies_finish() {
    let (_upstream, mut relay, _agent, _) = setup().await;
    let resp = relay
        .proxy(Method::GET, "up", "slow-chunks?count=5&interval_ms=300")
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let _ = stream.next().await.unwrap().unwrap();
    relay.terminate().unwrap();
    while let Some(c) = stream.next().await {
        c.expect("the body failed during the relay's drain");
    }
    let status = relay.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "relay exit status {status}");
}

type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw agent speaking the handshake by hand over the relay's real TLS WebSocket.
async fn hello(relay: &Relay, token: &str, versions: Vec<u16>) -> Result<Frame, String> {
    let (_ws, frame) = raw_agent(relay, token, versions).await?;
    Ok(frame)
}

async fn raw_agent(
    relay: &Relay,
    token: &str,
    versions: Vec<u16>,
) -> Result<(RawWs, Frame), String> {
    let pem = std::fs::read(&relay.ca_file).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(airlock_shared::exec::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("{}/v1/agent/connect", relay.ws_url),
    )
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        true,
        Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
            tls,
        ))),
    )
    .await
    .map_err(|e| e.to_string())?;
    mux::send_frame(
        &mut ws,
        &Frame::Hello(Hello {
            versions,
            agent_version: "0.0.1-test".into(),
            agent_id: "raw".into(),
            hostname: "raw".into(),
        }),
    )
    .await
    .unwrap();
    let frame = mux::recv_frame(&mut ws, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    Ok((ws, frame))
}

/// Reads until the relay's close frame; returns its code.
async fn close_code(ws: &mut RawWs) -> Option<u16> {
    use tokio_tungstenite::tungstenite::Message;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match msg {
            Ok(Message::Close(c)) => return c.map(|c| u16::from(c.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test]
async fn bad_frames_close_the_tunnel_with_a_reason() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (_upstream, relay, _agent, token) = setup().await;
    // Malformed frame: 1002.
    let (mut ws, _) = raw_agent(&relay, &token, vec![1]).await.unwrap();
    ws.send(Message::Binary(bytes::Bytes::from_static(&[0x7f, 0x01])))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1002));
    // Text message: 1002.
    let (mut ws, _) = raw_agent(&relay, &token, vec![1]).await.unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1002));
    // Larger than the negotiated maximum frame size (1 MiB): 1009, never an allocation.
    let (mut ws, _) = raw_agent(&relay, &token, vec![1]).await.unwrap();
    let _ = ws
        .send(Message::Binary(bytes::Bytes::from(vec![
            0u8;
            2 * 1024 * 1024
        ])))
        .await;
    assert_eq!(close_code(&mut ws).await, Some(1009));
    // The relay is still serving its real agent.
    let resp = relay
        .proxy(Method::GET, "up", "bytes/10?seed=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn protocol_versions_are_negotiated() {
    let (_upstream, relay, _agent, token) = setup().await;
    // An agent that also speaks a future version gets the highest common one.
    match hello(&relay, &token, vec![1, 2, 7]).await.unwrap() {
        Frame::Welcome(w) => assert_eq!(w.version, 1),
        other => panic!("expected Welcome, got {other:?}"),
    }
    // An agent with no common version gets a Reject that says what to do.
    match hello(&relay, &token, vec![42]).await.unwrap() {
        Frame::Reject(r) => {
            assert!(r.reason.contains("upgrade the agent"), "{}", r.reason);
            assert!(r.reason.contains("42"), "{}", r.reason);
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    // The real agent still works alongside.
    let resp = relay
        .proxy(Method::GET, "up", "bytes/5000?seed=2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        sha256_hex(&resp.bytes().await.unwrap()),
        pattern_sha256(5000, 2)
    );
}
