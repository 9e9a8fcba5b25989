//! "Behind the firewall", for real: the private app lives in a network namespace that only the
//! agent's namespace can reach. A direct connection from the relay's side fails; the same request
//! through the relay and the agent succeeds.

use std::time::Duration;

use airlock_tests::{
    require_netns, start_online_agent, AgentOptions, Httpbin, Netns, OnlineAgent, Relay,
};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn the_private_app_is_reachable_only_through_the_agent() {
    require_netns!();
    let ns = Netns::create().unwrap();
    let httpbin = Httpbin::start_with(ns.httpbin_options()).await.unwrap();

    // From the relay's namespace the app is unreachable.
    let direct = Netns::connect_in(None, httpbin.addr, Duration::from_secs(2)).await;
    assert!(
        direct.is_err(),
        "the private app is reachable from the relay's side"
    );
    // From the agent's namespace it answers.
    let status = Netns::http_status_in(
        Some(ns.agent_ns()),
        httpbin.addr,
        "/get",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    let relay = Relay::start(ns.relay_options()).await.unwrap();
    // The relay itself cannot reach it either: a *public* connection to it fails to connect.
    relay
        .create_connection(&json!({
            "name": "direct",
            "base_url": httpbin.url,
            "auth": {"type": "basic", "username": "u", "password": "p"},
        }))
        .await
        .unwrap();
    let resp = relay
        .proxy(Method::GET, "direct", "basic-auth/u/p")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["type"].as_str().unwrap().ends_with("/connect"),
        "{body}"
    );

    // Through an agent in namespace A it works.
    let OnlineAgent { agent: _agent, .. } = start_online_agent(
        &relay,
        "fw-agent",
        "dc1",
        AgentOptions {
            allow: vec![httpbin.addr.to_string()],
            ..ns.agent_options()
        },
    )
    .await
    .unwrap();
    relay
        .create_connection(&json!({
            "name": "private",
            "base_url": httpbin.url,
            "auth": {"type": "basic", "username": "u", "password": "p"},
            "network": {"private": true, "agent_group": "dc1"},
            "test_request": {"path": "/basic-auth/u/p"}
        }))
        .await
        .unwrap();
    let resp = relay
        .proxy(Method::GET, "private", "basic-auth/u/p")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, json!({"authenticated": true, "user": "u"}));
    let report = relay.test_connection("private").await.unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["agent"]["name"], "fw-agent");
}
