//! Secrets at rest and in flight: the plaintext of a connection secret appears nowhere it should
//! not — not in an API answer, not in the relay's or the agent's debug log, not in the relay's
//! SQLite files, not in an error — while the secrets keep working through the agent and the relay,
//! across an update that leaves them unchanged and across a restart. A relay given another master
//! key refuses to start, naming the connection.

use std::path::Path;

use airlock_tests::{
    start_online_agent, wait_agent_online, AgentOptions, Httpbin, OnlineAgent, Relay, RelayOptions,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

// Distinctive plaintexts, each used in one place, of characters that need no encoding anywhere
// (so a leak shows as the same bytes in a URL, a header, JSON or a log line).
const BASIC_PW: &str = "basicPW-8c1f2e-zulu";
const WRONG_PW: &str = "wrongPW-3d9a77-yankee";
const UPDATED_PW: &str = "updatedPW-6a2e44-papa";
const HEADER_TOKEN: &str = "hdrTOKEN-51b0c4-xray";
const HEADER_KEY: &str = "apiKEY-9e2d13-whiskey";
const QUERY_KEY: &str = "qryKEY-70af58-victor";
const CUSTOM_PW: &str = "customPW-c4e812-uniform";
const CUSTOM_HEADER: &str = "customHDR-2b7d90-tango";
const CUSTOM_QUERY: &str = "customQRY-e5a3f1-sierra";
const BAD_JSON_SECRET: &str = "badjson-0f4c2a-romeo";
const CRLF_SECRET: &str = "crlf-88d1b3-quebec";
const TYPE_SECRET: &str = "wrongtype-5e9b21-oscar";
const CLI_PW: &str = "cliPW-1a7c3d-november";
const CLI_HEADER: &str = "cliHDR-4f0e6b-mike";
const CLI_QUERY: &str = "cliQRY-93c2d8-lima";

/// The public (non-secret) parts of credentials the tests use.
const USER: &str = "u";
const CUSTOM_USER: &str = "cu";
const TENANT: &str = "tenant-visible-acme";

/// Every plaintext secret, and the forms the upstream sees them in (`Basic base64(user:pw)`).
fn needles() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = [
        BASIC_PW,
        WRONG_PW,
        UPDATED_PW,
        HEADER_TOKEN,
        HEADER_KEY,
        QUERY_KEY,
        CUSTOM_PW,
        CUSTOM_HEADER,
        CUSTOM_QUERY,
        BAD_JSON_SECRET,
        CRLF_SECRET,
        TYPE_SECRET,
        CLI_PW,
        CLI_HEADER,
        CLI_QUERY,
    ]
    .iter()
    .map(|s| (s.to_string(), s.to_string()))
    .collect();
    for (user, pw) in [
        (USER, BASIC_PW),
        (USER, WRONG_PW),
        (USER, UPDATED_PW),
        (CUSTOM_USER, CUSTOM_PW),
        (USER, CLI_PW),
    ] {
        out.push((
            format!("base64({user}:{pw})"),
            base64(format!("{user}:{pw}").as_bytes()),
        ));
    }
    out
}

/// Fails naming `what` and the secret when any needle occurs in `haystack`.
fn assert_no_secret(what: &str, haystack: &[u8]) {
    for (name, needle) in needles() {
        assert!(
            !haystack
                .windows(needle.len())
                .any(|w| w == needle.as_bytes()),
            "{what} contains the secret {name}"
        );
    }
}

/// Standard base64 with padding (RFC 4648 §4); the tests crate has no base64 dependency.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every byte of every file under `dir` (recursively), with the file names.
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
    out
}

/// Records every answer of the relay's own API (not the upstream content a proxied request
/// carries), to search them all at the end.
#[derive(Default)]
struct Seen {
    answers: Vec<(String, Vec<u8>)>,
}

impl Seen {
    /// Sends an API request with a JSON body and records the answer.
    async fn api(
        &mut self,
        relay: &Relay,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = relay.api(method.clone(), path);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(format!("{method} {path}"), request).await
    }

    /// Sends `request`, records the status, headers and body, and returns the status and JSON.
    async fn send(
        &mut self,
        what: String,
        request: reqwest::RequestBuilder,
    ) -> (StatusCode, Value) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let mut record = format!("{status}\n").into_bytes();
        for (name, value) in response.headers() {
            record.extend_from_slice(name.as_str().as_bytes());
            record.extend_from_slice(b": ");
            record.extend_from_slice(value.as_bytes());
            record.push(b'\n');
        }
        let body = response.bytes().await.unwrap();
        record.extend_from_slice(&body);
        self.answers.push((what, record));
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn assert_clean(&self) {
        for (what, bytes) in &self.answers {
            assert_no_secret(&format!("the answer to {what}"), bytes);
        }
    }
}

fn connection(name: &str, base_url: &str, private: bool, auth: Value, test_path: &str) -> Value {
    let network = if private {
        json!({"private": true, "agent_group": "dc1"})
    } else {
        json!({"private": false})
    };
    json!({
        "name": name,
        "base_url": base_url,
        "auth": auth,
        "network": network,
        "test_request": {"method": "GET", "path": test_path}
    })
}

/// A proxied `GET /anything?echo=1` through `name`: httpbin's echo of what it received.
/// The answer carries the upstream's content (the credentials it was sent), so it is checked,
/// not recorded.
async fn echo(relay: &Relay, name: &str) -> Value {
    let response = relay
        .proxy(Method::GET, name, "anything?client=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{name}");
    response.json().await.unwrap()
}

fn header<'a>(echo: &'a Value, name: &str) -> &'a str {
    echo["headers"][name].as_str().unwrap_or("")
}

#[tokio::test]
async fn secrets_appear_nowhere_but_keep_working() {
    let httpbin = Httpbin::start().await.unwrap();
    let debug = vec![("RUST_LOG".to_string(), "debug".to_string())];
    let mut relay = Relay::start(RelayOptions {
        env: debug.clone(),
        ..RelayOptions::default()
    })
    .await
    .unwrap();
    let OnlineAgent {
        agent,
        id: agent_id,
        ..
    } = start_online_agent(
        &relay,
        "a1",
        "dc1",
        AgentOptions {
            allow: vec![httpbin.addr.to_string()],
            env: debug.clone(),
            ..AgentOptions::default()
        },
    )
    .await
    .unwrap();
    let mut seen = Seen::default();

    // ---- create: one connection per auth type, through the agent and public ----
    let basic = json!({"type": "basic", "username": USER, "password": BASIC_PW});
    let header_auth = json!({"type": "header", "headers": [
        {"name": "Authorization", "value": format!("Bearer {HEADER_TOKEN}")},
        {"name": "X-Api-Key", "value": HEADER_KEY},
        {"name": "X-Tenant", "value": TENANT, "secret": false},
    ]});
    let query = json!({"type": "query", "params": {"api_key": QUERY_KEY}});
    let custom = json!({
        "type": "custom", "username": CUSTOM_USER, "password": CUSTOM_PW,
        "headers": [{"name": "X-Custom", "value": CUSTOM_HEADER}],
        "params": {"sig": CUSTOM_QUERY},
    });
    let mut names = Vec::new();
    // httpbin's /bearer answers 200 only with a bearer token; /basic-auth would need the password
    // in its URL, so the basic connections test with /get.
    for (kind, auth, test_path) in [
        ("basic", &basic, "/get"),
        ("header", &header_auth, "/bearer"),
        ("query", &query, "/get"),
        ("custom", &custom, "/get"),
    ] {
        for private in [true, false] {
            let name = format!("{kind}-{}", if private { "private" } else { "public" });
            let definition = connection(&name, &httpbin.url, private, auth.clone(), test_path);
            let (status, view) = seen
                .api(&relay, Method::POST, "/v1/connections", Some(&definition))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{name}: {view}");
            names.push(name);
        }
    }
    let (_, view) = seen
        .api(&relay, Method::GET, "/v1/connections/header-private", None)
        .await;
    let headers = &view["auth"]["headers"];
    assert_eq!(headers[0]["value"], json!({"set": true}), "{view}");
    assert_eq!(headers[1]["value"], json!({"set": true}), "{view}");
    // A header marked not secret is shown.
    assert_eq!(headers[2]["value"], TENANT, "{view}");
    let (_, view) = seen
        .api(&relay, Method::GET, "/v1/connections/query-public", None)
        .await;
    assert_eq!(
        view["auth"]["params"]["api_key"],
        json!({"set": true}),
        "{view}"
    );
    let (status, list) = seen.api(&relay, Method::GET, "/v1/connections", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["connections"].as_array().unwrap().len(), names.len());

    // ---- use: the upstream receives every credential, on both paths ----
    for private in ["private", "public"] {
        let e = echo(&relay, &format!("basic-{private}")).await;
        assert_eq!(
            header(&e, "Authorization"),
            format!("Basic {}", base64(format!("{USER}:{BASIC_PW}").as_bytes()))
        );
        let e = echo(&relay, &format!("header-{private}")).await;
        assert_eq!(
            header(&e, "Authorization"),
            format!("Bearer {HEADER_TOKEN}")
        );
        assert_eq!(header(&e, "X-Api-Key"), HEADER_KEY);
        assert_eq!(header(&e, "X-Tenant"), TENANT);
        let e = echo(&relay, &format!("query-{private}")).await;
        assert_eq!(e["args"]["api_key"], QUERY_KEY, "{e}");
        assert_eq!(e["args"]["client"], "1", "{e}");
        let e = echo(&relay, &format!("custom-{private}")).await;
        assert_eq!(
            header(&e, "Authorization"),
            format!(
                "Basic {}",
                base64(format!("{CUSTOM_USER}:{CUSTOM_PW}").as_bytes())
            )
        );
        assert_eq!(header(&e, "X-Custom"), CUSTOM_HEADER);
        assert_eq!(e["args"]["sig"], CUSTOM_QUERY, "{e}");
    }
    // ---- the test request (the header connections' /bearer needs the token) ----
    for name in &names {
        let (status, report) = seen
            .api(
                &relay,
                Method::POST,
                &format!("/v1/connections/{name}/test"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{name}: {report}");
        assert_eq!(report["ok"], true, "{name}: {report}");
    }

    // ---- errors ----
    // Wrong password: httpbin's 401 passes through; the test request says `auth`.
    for private in [true, false] {
        let name = format!("wrong-{}", if private { "private" } else { "public" });
        let definition = connection(
            &name,
            &httpbin.url,
            private,
            json!({"type": "basic", "username": USER, "password": WRONG_PW}),
            "/basic-auth/u/expected-password",
        );
        let (status, _) = seen
            .api(&relay, Method::POST, "/v1/connections", Some(&definition))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = seen
            .send(
                format!("proxy {name}"),
                relay.proxy(Method::GET, &name, "basic-auth/u/expected-password"),
            )
            .await;
        assert_eq!(status, 401, "{name}");
        let (_, report) = seen
            .api(
                &relay,
                Method::POST,
                &format!("/v1/connections/{name}/test"),
                None,
            )
            .await;
        assert_eq!(report["ok"], false, "{report}");
        assert_eq!(report["error"]["kind"], "auth", "{report}");
    }
    // Unknown connection.
    let (status, problem) = seen
        .send(
            "proxy to an unknown connection".into(),
            relay.proxy(Method::GET, "nope", "get"),
        )
        .await;
    assert_eq!(status, 404, "{problem}");
    let (status, _) = seen
        .api(&relay, Method::POST, "/v1/connections/nope/test", None)
        .await;
    assert_eq!(status, 404);
    // Malformed JSON holding a secret: 400, not echoed.
    let (status, problem) = seen
        .send(
            "POST malformed JSON".into(),
            relay
                .api(Method::POST, "/v1/connections")
                .header("content-type", "application/json")
                .body(format!(
                    "{{\"name\": \"bad\", \"auth\": {{\"type\": \"basic\", \"password\": \"{BAD_JSON_SECRET}\""
                )),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("malformed_json"));
    // A secret of the wrong type, a header value with CR LF, an unknown field next to a secret:
    // 422 naming the field, not echoing the value.
    for (body, field) in [
        (
            connection(
                "bad",
                &httpbin.url,
                false,
                json!({"type": "basic", "username": USER, "password": [TYPE_SECRET]}),
                "/",
            ),
            "auth.password",
        ),
        (
            connection(
                "bad",
                &httpbin.url,
                false,
                json!({"type": "header", "headers": [
                    {"name": "X-Api-Key", "value": format!("{CRLF_SECRET}\r\nX-Injected: 1")}
                ]}),
                "/",
            ),
            "auth.headers[0].value",
        ),
        (
            connection(
                "bad",
                &httpbin.url,
                false,
                json!({"type": "query", "params": {"k": BAD_JSON_SECRET}, "colour": TYPE_SECRET}),
                "/",
            ),
            "auth.colour",
        ),
    ] {
        let (status, problem) = seen
            .api(&relay, Method::POST, "/v1/connections", Some(&body))
            .await;
        assert_eq!(status, 422, "{problem}");
        // serde reports errors inside the internally tagged `auth` at `auth` itself; what matters
        // here is that the problem names the auth object or the field, not the value.
        let named = problem["field"].as_str().unwrap_or_default();
        assert!(
            field.starts_with(named) && named.starts_with("auth"),
            "{field}: {problem}"
        );
    }

    // ---- update with {"set": true}: the GET view sent back keeps every secret ----
    for name in ["header-private", "custom-public", "query-private"] {
        let path = format!("/v1/connections/{name}");
        let (_, mut view) = seen.api(&relay, Method::GET, &path, None).await;
        view["test_request"]["path"] = json!("/status/200");
        let (status, answer) = seen.api(&relay, Method::PUT, &path, Some(&view)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let e = echo(&relay, "header-private").await;
    assert_eq!(
        header(&e, "Authorization"),
        format!("Bearer {HEADER_TOKEN}")
    );
    assert_eq!(header(&e, "X-Api-Key"), HEADER_KEY);
    let e = echo(&relay, "custom-public").await;
    assert_eq!(header(&e, "X-Custom"), CUSTOM_HEADER);
    assert_eq!(e["args"]["sig"], CUSTOM_QUERY);
    let e = echo(&relay, "query-private").await;
    assert_eq!(e["args"]["api_key"], QUERY_KEY);
    // A new password replaces the old one.
    let updated = connection(
        "basic-private",
        &httpbin.url,
        true,
        json!({"type": "basic", "username": USER, "password": UPDATED_PW}),
        "/get",
    );
    let (status, answer) = seen
        .api(
            &relay,
            Method::PUT,
            "/v1/connections/basic-private",
            Some(&updated),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["auth"]["password"], json!({"set": true}));
    let e = echo(&relay, "basic-private").await;
    assert_eq!(
        header(&e, "Authorization"),
        format!(
            "Basic {}",
            base64(format!("{USER}:{UPDATED_PW}").as_bytes())
        )
    );

    // ---- the CLI: a password read from the environment is never printed ----
    let cli = run_cli(
        &relay,
        &[
            "connections",
            "create",
            "--name",
            "cli-basic",
            "--base-url",
            &httpbin.url,
            "--auth",
            "basic",
            "--username",
            USER,
            "--password-env",
            "AIRLOCK_TEST_CLI_PASSWORD",
        ],
    )
    .await;
    assert!(cli.status.success(), "{cli:?}");
    assert_no_secret("the CLI's output", &[cli.stdout, cli.stderr].concat());
    let e = echo(&relay, "cli-basic").await;
    assert_eq!(
        header(&e, "Authorization"),
        format!("Basic {}", base64(format!("{USER}:{CLI_PW}").as_bytes()))
    );
    // Header and query values from the environment: --auth custom is inferred.
    let cli = run_cli(
        &relay,
        &[
            "connections",
            "create",
            "--name",
            "cli-custom",
            "--base-url",
            &httpbin.url,
            "--header-env",
            "X-Cli=AIRLOCK_TEST_CLI_HEADER",
            "--param-env",
            "cli_key=AIRLOCK_TEST_CLI_QUERY",
            "--private",
            "--agent-group",
            "dc1",
        ],
    )
    .await;
    assert!(cli.status.success(), "{cli:?}");
    assert_no_secret("the CLI's output", &[cli.stdout, cli.stderr].concat());
    let e = echo(&relay, "cli-custom").await;
    assert_eq!(header(&e, "X-Cli"), CLI_HEADER);
    assert_eq!(e["args"]["cli_key"], CLI_QUERY, "{e}");
    let cli = run_cli(&relay, &["connections", "get", "cli-basic"]).await;
    assert!(cli.status.success(), "{cli:?}");
    assert_no_secret("the CLI's output", &[cli.stdout, cli.stderr].concat());

    // ---- restart: the same data directory and key still serve every connection ----
    relay.restart().await.unwrap();
    wait_agent_online(&relay, &agent_id).await.unwrap();
    let e = echo(&relay, "basic-private").await;
    assert_eq!(
        header(&e, "Authorization"),
        format!(
            "Basic {}",
            base64(format!("{USER}:{UPDATED_PW}").as_bytes())
        )
    );
    let e = echo(&relay, "custom-public").await;
    assert_eq!(header(&e, "X-Custom"), CUSTOM_HEADER);
    let (_, report) = seen
        .api(
            &relay,
            Method::POST,
            "/v1/connections/header-public/test",
            None,
        )
        .await;
    assert_eq!(report["ok"], true, "{report}");

    // ---- nowhere: answers, logs, the relay's files (SQLite database, WAL, shared memory) ----
    seen.assert_clean();
    let relay_log = relay.log();
    let agent_log = agent.log();
    assert!(
        relay_log.contains("DEBUG"),
        "the relay did not log at debug level"
    );
    assert!(
        agent_log.contains("DEBUG"),
        "the agent did not log at debug level"
    );
    assert_no_secret("the relay's log", relay_log.as_bytes());
    assert_no_secret("the agent's log", agent_log.as_bytes());
    let data_dir = relay.data_dir.clone();
    let files = files_under(&data_dir);
    for required in ["airlock.db", "master-key"] {
        assert!(
            files.iter().any(|(p, _)| p.ends_with(required)),
            "no {required} in {}",
            data_dir.display()
        );
    }
    for (path, bytes) in &files {
        assert_no_secret(path, bytes);
    }
    for (path, bytes) in files_under(&agent.dir) {
        assert_no_secret(&path, &bytes);
    }

    // ---- another master key: the relay refuses to start, naming the connection ----
    relay.kill().await.unwrap();
    let other_key = base64(&[0x5a; 32]);
    let error = Relay::start(RelayOptions {
        data_dir: Some(data_dir.clone()),
        env: vec![
            ("RUST_LOG".into(), "debug".into()),
            ("AIRLOCK_MASTER_KEY".into(), other_key.clone()),
        ],
        ..RelayOptions::default()
    })
    .await
    .expect_err("a relay with another master key must not start");
    let error = format!("{error:#}");
    assert!(error.contains("master key"), "{error}");
    assert!(error.contains("connection '"), "{error}");
    assert!(!error.contains(&other_key), "the key is echoed: {error}");
    assert_no_secret("the refused relay's error", error.as_bytes());
    // The same key again (from the data directory) still works.
    let relay = Relay::start(RelayOptions {
        data_dir: Some(data_dir.clone()),
        ..RelayOptions::default()
    })
    .await
    .unwrap();
    // (It listens on another port, so the agent is not back: test a public connection.)
    let (status, _) = relay
        .api_json(Method::POST, "/v1/connections/query-public/test", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    for (path, bytes) in files_under(&data_dir) {
        assert_no_secret(&path, &bytes);
    }
}

/// Runs `airlock-relay ARGS…` as a client of `relay` with the CLI password in the environment.
async fn run_cli(relay: &Relay, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(airlock_tests::binary("e2e-relay").unwrap())
        .args(args)
        .env("AIRLOCK_RELAY_URL", &relay.url)
        .env("AIRLOCK_TOKEN", &relay.admin_token)
        .env("AIRLOCK_CA_FILE", &relay.ca_file)
        .env("AIRLOCK_TEST_CLI_PASSWORD", CLI_PW)
        .env("AIRLOCK_TEST_CLI_HEADER", CLI_HEADER)
        .env("AIRLOCK_TEST_CLI_QUERY", CLI_QUERY)
        .env("RUST_LOG", "debug")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (input, output) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(input.as_bytes()), output);
    }
}
