//! Every non-OAuth2 auth type against the real httpbin, through the agent (a private
//! connection) and directly from the relay (a public one): Basic (also with a non-ASCII
//! password), header fields, query parameters that need percent-encoding, custom combinations,
//! agent-side profiles; the connection's credentials win over the client's; a redirect to
//! another origin carries none of them; malformed definitions are refused when saved.

use airlock_tests::{
    start_online_agent, Agent, AgentOptions, Httpbin, HttpbinOptions, OnlineAgent, Relay,
    RelayOptions,
};
use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Values that must never appear in a log or an API answer.
const SECRETS: &[&str] = &[
    "tok-SECRET-2",
    "key-SECRET-3",
    "qry-SECRET-4",
    "cst-PASS-5",
    "prof-PASS-6",
    "prof-TOKEN-7",
];

/// The agents' profiles: credentials the relay never sees.
const AGENT_TOML: &str = r#"
[profiles.hb-basic]
auth = { type = "basic", username = "prof-user", password = "prof-PASS-6" }

[profiles.hb-bearer]
auth = { type = "header", headers = [{ name = "Authorization", value = "Bearer prof-TOKEN-7" }] }
"#;

struct Setup {
    relay: Relay,
    agent: Agent,
    a: Httpbin,
    b: Httpbin,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn small_httpbin() -> HttpbinOptions {
    HttpbinOptions {
        workers: 1,
        threads: 8,
        ..HttpbinOptions::default()
    }
}

/// Two httpbins (two origins), a relay, and an agent of group `dc1` allowed to reach both,
/// with the profiles of [`AGENT_TOML`] and debug logging.
async fn setup() -> Setup {
    let (a, b) = tokio::join!(
        Httpbin::start_with(small_httpbin()),
        Httpbin::start_with(small_httpbin())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let dir = std::env::temp_dir().join(format!(
        "airlock-auth-types-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(&config, AGENT_TOML).unwrap();
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let OnlineAgent { agent, .. } = start_online_agent(
        &relay,
        "a1",
        "dc1",
        AgentOptions {
            allow: vec![a.addr.to_string(), b.addr.to_string()],
            args: vec!["--config".into(), config.display().to_string()],
            env: vec![("RUST_LOG".into(), "debug".into())],
            ..AgentOptions::default()
        },
    )
    .await
    .unwrap();
    Setup {
        relay,
        agent,
        a,
        b,
        _dir: TempDir(dir),
    }
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Agent,
    Relay,
}

const BOTH: [Via; 2] = [Via::Agent, Via::Relay];

fn connection(name: &str, base_url: &str, auth: Value, via: Via) -> Value {
    let (suffix, network) = match via {
        Via::Agent => ("agent", json!({"private": true, "agent_group": "dc1"})),
        Via::Relay => ("relay", json!({"private": false})),
    };
    json!({
        "name": format!("{name}-{suffix}"),
        "base_url": base_url,
        "auth": auth,
        "network": network,
    })
}

/// Creates the connection; returns its name.
async fn create(relay: &Relay, definition: Value) -> String {
    let created = relay.create_connection(&definition).await.unwrap();
    let text = created.to_string();
    for secret in SECRETS {
        assert!(!text.contains(secret), "secret in the API answer: {text}");
    }
    definition["name"].as_str().unwrap().to_owned()
}

/// `GET` through the proxy with extra client headers; returns the status and JSON body.
async fn get(
    relay: &Relay,
    name: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut request = relay.proxy(Method::GET, name, path);
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let resp = request.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn basic_of(header: &Value) -> String {
    let value = header.as_str().unwrap_or_default();
    let token = value
        .strip_prefix("Basic ")
        .unwrap_or_else(|| panic!("not Basic: {value}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .unwrap();
    String::from_utf8(bytes).expect("RFC 7617 credentials are UTF-8")
}

#[tokio::test]
async fn each_auth_type_works_through_the_agent_and_directly() {
    let s = setup().await;
    for via in BOTH {
        // basic
        let name = create(
            &s.relay,
            connection(
                "basic",
                &s.a.url,
                json!({"type": "basic", "username": "u", "password": "basic-pw"}),
                via,
            ),
        )
        .await;
        let (status, body) = get(&s.relay, &name, "basic-auth/u/basic-pw", &[]).await;
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(body, json!({"authenticated": true, "user": "u"}));

        // basic, non-ASCII password: UTF-8 (RFC 7617 §2.1), which httpbin (Werkzeug) decodes.
        let name = create(
            &s.relay,
            connection(
                "basic-utf8",
                &s.a.url,
                json!({"type": "basic", "username": "ü", "password": "pässwörd €"}),
                via,
            ),
        )
        .await;
        let (status, _) = get(
            &s.relay,
            &name,
            "basic-auth/%C3%BC/p%C3%A4ssw%C3%B6rd%20%E2%82%AC",
            &[],
        )
        .await;
        assert_eq!(status, 200, "{via:?}");
        let (_, body) = get(&s.relay, &name, "headers", &[]).await;
        assert_eq!(basic_of(&body["headers"]["Authorization"]), "ü:pässwörd €");

        // header: Bearer and an API key; the client's own values of those fields lose.
        let name = create(
            &s.relay,
            connection(
                "header",
                &s.a.url,
                json!({"type": "header", "headers": [
                    {"name": "Authorization", "value": "Bearer tok-SECRET-2"},
                    {"name": "X-Api-Key", "value": "key-SECRET-3"},
                    {"name": "X-Tenant", "value": "acme", "secret": false}]}),
                via,
            ),
        )
        .await;
        let (status, body) = get(&s.relay, &name, "bearer", &[]).await;
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(
            body,
            json!({"authenticated": true, "token": "tok-SECRET-2"})
        );
        let (_, body) = get(
            &s.relay,
            &name,
            "headers",
            &[("X-Api-Key", "client-evil"), ("x-tenant", "client-evil")],
        )
        .await;
        let headers = &body["headers"];
        assert_eq!(headers["Authorization"], "Bearer tok-SECRET-2", "{body}");
        assert_eq!(headers["X-Api-Key"], "key-SECRET-3", "{body}");
        assert_eq!(headers["X-Tenant"], "acme", "{body}");

        // query: names and values that need percent-encoding round-trip; the client's
        // parameters of the same names are dropped, the others kept.
        let name = create(
            &s.relay,
            connection(
                "query",
                &s.a.url,
                json!({"type": "query", "params": {
                    "api_key": "qry-SECRET-4",
                    "a&b= +/ü%": "v&=+ /ä%"}}),
                via,
            ),
        )
        .await;
        let (status, body) = get(
            &s.relay,
            &name,
            "anything?x=1&api_key=evil&api%5Fkey=evil2&a%26b%3D+%2B%2F%C3%BC%25=evil3&y=%20",
            &[],
        )
        .await;
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(
            body["args"],
            json!({"x": "1", "y": " ", "api_key": "qry-SECRET-4", "a&b= +/ü%": "v&=+ /ä%"}),
            "{body}"
        );

        // custom: Basic + a header + a parameter.
        let name = create(
            &s.relay,
            connection(
                "custom",
                &s.a.url,
                json!({"type": "custom", "username": "svc", "password": "cst-PASS-5",
                       "headers": [{"name": "X-Api-Key", "value": "key-SECRET-3"}],
                       "params": {"sig": "qry-SECRET-4"}}),
                via,
            ),
        )
        .await;
        let (status, body) = get(&s.relay, &name, "anything?z=1", &[]).await;
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(
            basic_of(&body["headers"]["Authorization"]),
            "svc:cst-PASS-5"
        );
        assert_eq!(body["headers"]["X-Api-Key"], "key-SECRET-3");
        assert_eq!(body["args"], json!({"z": "1", "sig": "qry-SECRET-4"}));

        // A same-origin redirect keeps the credentials (applied afresh at each hop).
        let (status, body) = get(
            &s.relay,
            &name,
            "redirect-to?url=%2Fanything%3Fhop%3D2",
            &[],
        )
        .await;
        assert_eq!(status, 200, "{via:?}");
        assert_eq!(body["args"], json!({"hop": "2", "sig": "qry-SECRET-4"}));
        assert_eq!(
            basic_of(&body["headers"]["Authorization"]),
            "svc:cst-PASS-5"
        );

        // The test request uses the auth too.
        let mut with_test = connection(
            "basic-test",
            &s.a.url,
            json!({"type": "basic", "username": "u", "password": "basic-pw"}),
            via,
        );
        with_test["test_request"] = json!({"method": "GET", "path": "/basic-auth/u/basic-pw"});
        let name = create(&s.relay, with_test).await;
        let report = s.relay.test_connection(&name).await.unwrap();
        assert_eq!(report["ok"], true, "{report}");
    }
    assert_no_secret_in_logs(&s);
}

#[tokio::test]
async fn a_redirect_to_another_origin_carries_no_credential() {
    let s = setup().await;
    for via in BOTH {
        let name = create(
            &s.relay,
            connection(
                "redirect",
                &s.a.url,
                json!({"type": "custom", "username": "svc", "password": "cst-PASS-5",
                       "headers": [{"name": "X-Api-Key", "value": "key-SECRET-3"}],
                       "params": {"api_key": "qry-SECRET-4"}}),
                via,
            ),
        )
        .await;
        // httpbin A redirects to httpbin B; B shows what it received.
        let target = format!("{}/anything?z=1", s.b.url);
        let encoded: String = url::form_urlencoded::byte_serialize(target.as_bytes()).collect();
        let (status, body) = get(
            &s.relay,
            &name,
            &format!("redirect-to?url={encoded}"),
            &[("Cookie", "session=client-cookie"), ("X-Other", "kept")],
        )
        .await;
        assert_eq!(status, 200, "{via:?}: {body}");
        let url = body["url"].as_str().unwrap();
        assert!(
            url.contains(&s.b.addr.port().to_string()),
            "{via:?}: not B: {url}"
        );
        let headers = body["headers"].as_object().unwrap();
        for field in ["Authorization", "X-Api-Key", "Cookie"] {
            assert!(
                !headers.contains_key(field),
                "{via:?}: B got {field}: {body}"
            );
        }
        assert_eq!(headers["X-Other"], "kept");
        assert_eq!(body["args"], json!({"z": "1"}), "{via:?}: {body}");
        let text = body.to_string();
        for secret in SECRETS {
            assert!(
                !text.contains(secret),
                "{via:?}: B saw a credential: {text}"
            );
        }
    }
}

#[tokio::test]
async fn agent_profiles_supply_credentials_the_relay_never_sees() {
    let s = setup().await;
    let private = |name: &str, profile: &str, path: &str| {
        let mut c = connection(
            name,
            &s.a.url,
            json!({"type": "profile", "name": profile}),
            Via::Agent,
        );
        c["test_request"] = json!({"method": "GET", "path": path});
        c
    };
    let name = create(
        &s.relay,
        // (httpbin's /basic-auth/USER/PASSWORD would put the password in the definition and
        // the logs: /headers shows what was sent instead.)
        private("prof-basic", "hb-basic", "/headers"),
    )
    .await;
    let report = s.relay.test_connection(&name).await.unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["agent"]["name"], "a1");
    let (status, body) = get(&s.relay, &name, "headers", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        basic_of(&body["headers"]["Authorization"]),
        "prof-user:prof-PASS-6"
    );

    let name = create(&s.relay, private("prof-bearer", "hb-bearer", "/bearer")).await;
    let report = s.relay.test_connection(&name).await.unwrap();
    assert_eq!(report["ok"], true, "{report}");

    // The relay stores only the profile's name.
    let (_, view) = s
        .relay
        .api_json(Method::GET, "/v1/connections/prof-basic-agent", None)
        .await
        .unwrap();
    assert_eq!(view["auth"], json!({"type": "profile", "name": "hb-basic"}));

    // An unknown profile: a clear error from the agent, surfaced by the test request and the
    // proxy.
    let name = create(&s.relay, private("prof-unknown", "nope", "/get")).await;
    let report = s.relay.test_connection(&name).await.unwrap();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["error"]["kind"], "invalid_request", "{report}");
    assert_eq!(
        report["error"]["message"],
        format!("unknown profile 'nope' on agent {hostname}"),
        "{report}"
    );
    // Which agent refused it is part of the report.
    assert_eq!(report["agent"]["name"], "a1", "{report}");
    let resp = s
        .relay
        .proxy(Method::GET, &name, "get")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let problem: Value = resp.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown profile 'nope'"),
        "{problem}"
    );

    // A profile on a public connection is refused when saved: only an agent can resolve it.
    let (status, problem) = s
        .relay
        .api_json(
            Method::POST,
            "/v1/connections",
            Some(&connection(
                "prof-public",
                &s.a.url,
                json!({"type": "profile", "name": "hb-basic"}),
                Via::Relay,
            )),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["field"], "auth.type");

    assert_no_secret_in_logs(&s);
}

#[tokio::test]
async fn malformed_credentials_are_refused_when_saved() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let header = |name: &str, value: &str| json!({"type": "header", "headers": [{"name": "X-Ok", "value": "1"}, {"name": name, "value": value}]});
    let cases = [
        (
            header("X-Api-Key", "v\r\nX-Injected: 1"),
            None,
            "auth.headers[1].value",
            "CR or LF",
        ),
        (
            header("X-Api-Key", "v\nX-Injected: 1"),
            None,
            "auth.headers[1].value",
            "CR or LF",
        ),
        (
            header("X-Api-Key", "v\u{0}"),
            None,
            "auth.headers[1].value",
            "NUL",
        ),
        (
            header("Bad Name", "v"),
            None,
            "auth.headers[1].name",
            "RFC 9110",
        ),
        (
            header("X-Api-Key:", "v"),
            None,
            "auth.headers[1].name",
            "RFC 9110",
        ),
        (
            json!({"type": "basic", "username": "a:b", "password": "p"}),
            None,
            "auth.username",
            "':'",
        ),
        (
            json!({"type": "none"}),
            Some(
                json!({"ca_certificate": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"}),
            ),
            "tls.ca_certificate",
            "not a valid X.509 certificate",
        ),
        (
            json!({"type": "none"}),
            Some(json!({"client_certificate": "not PEM at all", "client_key": "x"})),
            "tls.client_certificate",
            "no PEM certificate",
        ),
    ];
    for (auth, tls, field, message) in cases {
        let mut definition =
            json!({"name": "bad", "base_url": "https://app.example", "auth": auth});
        if let Some(tls) = tls {
            definition["tls"] = tls;
        }
        let (status, problem) = relay
            .api_json(Method::POST, "/v1/connections", Some(&definition))
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{definition}: {problem}"
        );
        assert_eq!(problem["field"], field, "{problem}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(message), "{message:?} not in {detail:?}");
        assert!(!problem.to_string().contains("X-Injected"), "{problem}");
    }
    let (_, listed) = relay
        .api_json(Method::GET, "/v1/connections", None)
        .await
        .unwrap();
    assert_eq!(listed["connections"], json!([]), "nothing half-stored");
}

fn assert_no_secret_in_logs(s: &Setup) {
    for (who, log) in [("relay", s.relay.log()), ("agent", s.agent.log())] {
        for secret in SECRETS {
            assert!(!log.contains(secret), "{secret} in the {who}'s log");
        }
    }
}
