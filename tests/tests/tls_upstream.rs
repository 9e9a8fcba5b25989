//! TLS to the app against the real nginx: client certificates (mutual TLS with
//! `ssl_verify_client on`), a private CA, `insecure_skip_verify`, hostname mismatch, and the
//! save-time checks of certificates and keys. Every case runs through the agent (a private
//! connection) and directly from the relay (a public one), so both sides of the shared engine
//! are shown to behave the same.

use airlock_tests::certs::{rsa_key_pkcs8, traditional_key, IssueOptions};
use airlock_tests::{
    start_online_agent, Agent, AgentOptions, Issued, Nginx, NginxOptions, OnlineAgent, Relay,
    RelayOptions, TestCa,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// nginx requiring client certificates from `client_ca`, serving a certificate of `server_ca`
/// for 127.0.0.1; a relay; an agent of group `dc1` allowed to reach nginx (by address and as
/// `localhost`).
struct Setup {
    relay: Relay,
    agent: Agent,
    nginx: Nginx,
    server_ca: TestCa,
    client_ca: TestCa,
}

async fn setup(agent_args: Vec<String>) -> Setup {
    let server_ca = TestCa::new("airlock test server CA");
    let client_ca = TestCa::new("airlock test client CA");
    let server = server_ca.server(&["127.0.0.1"]);
    let nginx = Nginx::start(NginxOptions {
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
        client_ca_pem: Some(client_ca.pem.clone()),
    })
    .await
    .unwrap();
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let OnlineAgent { agent, .. } = start_online_agent(
        &relay,
        "a1",
        "dc1",
        AgentOptions {
            allow: vec![
                nginx.addr.to_string(),
                format!("localhost:{}", nginx.addr.port()),
            ],
            args: agent_args,
            // Debug level: the leak checks below read everything the agent logs.
            env: vec![("RUST_LOG".into(), "debug".into())],
            ..AgentOptions::default()
        },
    )
    .await
    .unwrap();
    Setup {
        relay,
        agent,
        nginx,
        server_ca,
        client_ca,
    }
}

/// Whether a connection is executed by the agent or by the relay itself.
#[derive(Clone, Copy, Debug)]
enum Via {
    Agent,
    Relay,
}

const BOTH: [Via; 2] = [Via::Agent, Via::Relay];

fn connection(name: &str, base_url: &str, tls: Value, via: Via) -> Value {
    let network = match via {
        Via::Agent => json!({"private": true, "agent_group": "dc1"}),
        Via::Relay => json!({"private": false}),
    };
    json!({
        "name": format!("{name}-{}", match via { Via::Agent => "agent", Via::Relay => "relay" }),
        "base_url": base_url,
        "tls": tls,
        "network": network,
        "test_request": {"method": "GET", "path": "/whoami"}
    })
}

/// Creates the connection and runs its test request; returns the report.
async fn test_report(relay: &Relay, definition: &Value) -> Value {
    relay.create_connection(definition).await.unwrap();
    let name = definition["name"].as_str().unwrap();
    let report = relay.test_connection(name).await.unwrap();
    eprintln!("{name}: {report}");
    report
}

fn mtls(ca: &TestCa, client: &Issued) -> Value {
    json!({
        "ca_certificate": ca.pem,
        "client_certificate": client.cert_pem,
        "client_key": client.key_pem,
    })
}

fn assert_ok(report: &Value, via: Via) {
    assert_eq!(report["ok"], true, "{via:?}: {report}");
    assert_eq!(report["status"], 200, "{via:?}: {report}");
    match via {
        Via::Agent => assert_eq!(report["agent"]["name"], "a1", "{report}"),
        Via::Relay => assert!(report["agent"].is_null(), "{report}"),
    }
}

fn assert_failure(report: &Value, kind: &str, message_part: &str) {
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"]["kind"], kind, "{report}");
    let message = report["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(message_part),
        "expected {message_part:?} in {message:?}"
    );
}

#[tokio::test]
async fn client_certificates_against_nginx_with_verify_client() {
    let s = setup(Vec::new()).await;
    let ecdsa = s.client_ca.client("airlock-client");
    let rsa_pkcs8 = rsa_key_pkcs8().unwrap();
    let rsa = s
        .client_ca
        .issue(&IssueOptions {
            common_name: "airlock-rsa-client".into(),
            client: true,
            key_pem: Some(rsa_pkcs8),
            ..IssueOptions::default()
        })
        .unwrap();
    let rsa_pkcs1 = Issued {
        key_pem: traditional_key(&rsa.key_pem).unwrap(),
        ..rsa.clone()
    };
    assert!(rsa_pkcs1.key_pem.contains("BEGIN RSA PRIVATE KEY"));
    let ecdsa_sec1 = Issued {
        key_pem: traditional_key(&ecdsa.key_pem).unwrap(),
        ..ecdsa.clone()
    };
    assert!(ecdsa_sec1.key_pem.contains("BEGIN EC PRIVATE KEY"));
    // A chain in the certificate field: leaf, then the (here: root) issuer.
    let chained = Issued {
        cert_pem: format!("{}{}", ecdsa.cert_pem, s.client_ca.pem),
        ..ecdsa.clone()
    };
    let stranger = TestCa::new("a CA nginx does not trust").client("stranger");

    for via in BOTH {
        // With a client certificate: 200, and nginx saw who we are. PKCS#8, PKCS#1 and SEC1
        // keys, and a certificate chain.
        for (name, identity, subject) in [
            ("mtls-pkcs8", &ecdsa, "CN=airlock-client"),
            ("mtls-pkcs1", &rsa_pkcs1, "CN=airlock-rsa-client"),
            ("mtls-sec1", &ecdsa_sec1, "CN=airlock-client"),
            ("mtls-chain", &chained, "CN=airlock-client"),
        ] {
            let definition = connection(name, &s.nginx.url, mtls(&s.server_ca, identity), via);
            let report = test_report(&s.relay, &definition).await;
            assert_ok(&report, via);
            let connection_name = definition["name"].as_str().unwrap();
            let resp = s
                .relay
                .proxy(Method::GET, connection_name, "whoami")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let seen: Value = resp.json().await.unwrap();
            assert_eq!(seen["client_verify"], "SUCCESS", "{seen}");
            assert_eq!(seen["client_subject"], subject, "{seen}");
        }

        // Without one: nginx finishes the handshake and answers 400 itself; the report says
        // what that means.
        let report = test_report(
            &s.relay,
            &connection(
                "no-client-cert",
                &s.nginx.url,
                json!({"ca_certificate": s.server_ca.pem}),
                via,
            ),
        )
        .await;
        assert_eq!(report["status"], 400, "{report}");
        assert_failure(
            &report,
            "http_status",
            "the app requires a TLS client certificate and none was sent",
        );

        // A certificate from a CA nginx does not trust: refused, clearly.
        let report = test_report(
            &s.relay,
            &connection(
                "untrusted-client-cert",
                &s.nginx.url,
                mtls(&s.server_ca, &stranger),
                via,
            ),
        )
        .await;
        assert_eq!(report["status"], 400, "{report}");
        assert_failure(
            &report,
            "http_status",
            "the app refused the TLS client certificate",
        );
    }

    // The client keys never appear in either log.
    let logs = format!("{}\n{}", s.relay.log(), s.agent.log());
    for key in [&ecdsa.key_pem, &rsa_pkcs1.key_pem, &ecdsa_sec1.key_pem] {
        let body_line = key.lines().nth(1).unwrap();
        assert!(!logs.contains(body_line), "a client key is in the logs");
    }
    assert!(!logs.contains("PRIVATE KEY"), "a client key is in the logs");
}

#[tokio::test]
async fn private_ca_hostname_and_insecure_skip_verify() {
    let s = setup(Vec::new()).await;
    let client = s.client_ca.client("airlock-client");
    for via in BOTH {
        // The app's certificate is from a private CA: without ca_certificate, `tls` naming the
        // unknown CA.
        let report = test_report(
            &s.relay,
            &connection(
                "no-ca",
                &s.nginx.url,
                json!({"client_certificate": client.cert_pem, "client_key": client.key_pem}),
                via,
            ),
        )
        .await;
        assert!(report["status"].is_null(), "{report}");
        assert_failure(&report, "tls", "unknown CA");

        // With it: 200.
        let report = test_report(
            &s.relay,
            &connection("with-ca", &s.nginx.url, mtls(&s.server_ca, &client), via),
        )
        .await;
        assert_ok(&report, via);

        // The certificate is for 127.0.0.1, not for `localhost`: a hostname mismatch.
        let report = test_report(
            &s.relay,
            &connection(
                "wrong-name",
                &format!("https://localhost:{}", s.nginx.addr.port()),
                mtls(&s.server_ca, &client),
                via,
            ),
        )
        .await;
        assert_failure(&report, "tls", "hostname mismatch");

        // insecure_skip_verify: no CA, wrong name, still 200 (and logged).
        let report = test_report(
            &s.relay,
            &connection(
                "insecure",
                &format!("https://localhost:{}", s.nginx.addr.port()),
                json!({"client_certificate": client.cert_pem, "client_key": client.key_pem,
                       "insecure_skip_verify": true}),
                via,
            ),
        )
        .await;
        assert_ok(&report, via);
    }
    for (who, log) in [("relay", s.relay.log()), ("agent", s.agent.log())] {
        assert!(
            log.contains("insecure_skip_verify is on") && log.contains("insecure-"),
            "the {who} did not log the insecure_skip_verify opt-in:\n{log}"
        );
    }
}

#[tokio::test]
async fn expired_or_mismatched_client_identities_are_refused_at_save() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let ca = TestCa::new("airlock test client CA");
    let good = ca.client("good");
    let other = ca.client("other");
    let expired = ca
        .issue(&IssueOptions {
            client: true,
            not_before: (2001, 1, 1),
            not_after: (2002, 1, 1),
            ..IssueOptions::default()
        })
        .unwrap();
    let not_yet = ca
        .issue(&IssueOptions {
            client: true,
            not_before: (2990, 1, 1),
            ..IssueOptions::default()
        })
        .unwrap();
    let cases = [
        (
            json!({"client_certificate": expired.cert_pem, "client_key": expired.key_pem}),
            "tls.client_certificate",
            "has expired",
        ),
        (
            json!({"client_certificate": not_yet.cert_pem, "client_key": not_yet.key_pem}),
            "tls.client_certificate",
            "not valid yet",
        ),
        (
            json!({"client_certificate": good.cert_pem, "client_key": other.key_pem}),
            "tls.client_key",
            "does not match",
        ),
        (
            json!({"client_certificate": "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
                   "client_key": good.key_pem}),
            "tls.client_certificate",
            "PEM",
        ),
        (
            json!({"client_certificate": good.cert_pem, "client_key": "not a key"}),
            "tls.client_key",
            "no PEM private key",
        ),
        (
            json!({"client_certificate": good.cert_pem}),
            "tls.client_key",
            "required",
        ),
        (
            json!({"ca_certificate": "garbage"}),
            "tls.ca_certificate",
            "no PEM certificate",
        ),
    ];
    for via in BOTH {
        for (tls, field, message) in &cases {
            let definition = connection("bad", "https://127.0.0.1:1", tls.clone(), via);
            let (status, problem) = relay
                .api_json(Method::POST, "/v1/connections", Some(&definition))
                .await
                .unwrap();
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
            assert_eq!(problem["field"], *field, "{problem}");
            let detail = problem["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(message), "{message:?} not in {detail:?}");
            for key in [&good.key_pem, &other.key_pem, &expired.key_pem] {
                let key_line = key.lines().nth(1).unwrap();
                assert!(!problem.to_string().contains(key_line), "{problem}");
            }
        }
    }
}

#[tokio::test]
async fn agent_profile_holds_the_client_certificate() {
    // The profile's key and certificate are files on the agent's machine; the relay's
    // definition only names the profile.
    let dir = std::env::temp_dir().join(format!("airlock-tls-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let client_ca = TestCa::new("airlock test client CA");
    let server_ca = TestCa::new("airlock test server CA");
    let client = client_ca.client("profile-client");
    std::fs::write(dir.join("client.pem"), &client.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &client.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), &server_ca.pem).unwrap();
    std::fs::write(
        dir.join("agent.toml"),
        "[profiles.nginx.tls]\nclient_certificate_file = \"client.pem\"\n\
         client_key_file = \"client.key\"\nca_certificate_file = \"ca.pem\"\n",
    )
    .unwrap();
    let server = server_ca.server(&["127.0.0.1"]);
    let nginx = Nginx::start(NginxOptions {
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
        client_ca_pem: Some(client_ca.pem.clone()),
    })
    .await
    .unwrap();
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let OnlineAgent { agent, .. } = start_online_agent(
        &relay,
        "a1",
        "dc1",
        AgentOptions {
            allow: vec![nginx.addr.to_string()],
            args: vec![
                "--config".into(),
                dir.join("agent.toml").display().to_string(),
            ],
            env: vec![("RUST_LOG".into(), "debug".into())],
            ..AgentOptions::default()
        },
    )
    .await
    .unwrap();
    let definition = json!({
        "name": "nginx-profile",
        "base_url": nginx.url,
        "auth": {"type": "profile", "name": "nginx"},
        "network": {"private": true, "agent_group": "dc1"},
        "test_request": {"path": "/whoami"}
    });
    let report = test_report(&relay, &definition).await;
    assert_ok(&report, Via::Agent);
    let seen: Value = relay
        .proxy(Method::GET, "nginx-profile", "whoami")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["client_subject"], "CN=profile-client", "{seen}");
    let key_line = client.key_pem.lines().nth(1).unwrap();
    assert!(!agent.log().contains(key_line));
    assert!(!relay.log().contains(key_line));
    let _ = std::fs::remove_dir_all(&dir);
}
