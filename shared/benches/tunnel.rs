//! Micro-benchmarks of the codec and the multiplexer, so regressions show without the full
//! bench setup (`cargo bench -p airlock-shared`).

use std::time::Duration;

use airlock_shared::mux::{Inbound, Mux, MuxConfig, Role};
use airlock_shared::proto::{self, BodyKind, Frame, Open, RequestHead, StreamId};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

fn open_frame() -> Frame {
    Frame::Open(Open {
        stream: StreamId(12345),
        head: RequestHead {
            method: "GET".into(),
            target: "/rest/api/2/issue/ABC-123?expand=names".into(),
            headers: vec![
                ("accept".into(), Bytes::from_static(b"application/json")),
                ("user-agent".into(), Bytes::from_static(b"bench/1.0")),
                ("x-request-id".into(), Bytes::from_static(b"0123456789abcdef")),
            ],
            body: BodyKind::Empty,
        },
        spec: Bytes::from_static(
            br#"{"name":"jira","base_url":"https://jira.corp.example:8443/","auth":{"type":"basic","username":"svc","password":"secret"},"response_timeout_ms":60000}"#,
        ),
    })
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let open = open_frame();
    let open_bytes = proto::encode(&open, proto::MAX_FRAME_SIZE_LIMIT).unwrap();
    g.bench_function("encode_open", |b| {
        b.iter(|| proto::encode(&open, proto::MAX_FRAME_SIZE_LIMIT).unwrap())
    });
    g.bench_function("decode_open", |b| {
        b.iter(|| proto::decode(&open_bytes, proto::MAX_FRAME_SIZE_LIMIT).unwrap())
    });
    for size in [100usize, 16 * 1024, 64 * 1024] {
        let data = Frame::Data {
            stream: StreamId(7),
            data: Bytes::from(vec![0xabu8; size]),
        };
        let bytes = proto::encode(&data, proto::MAX_FRAME_SIZE_LIMIT).unwrap();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode_data", size), &data, |b, f| {
            b.iter(|| proto::encode(f, proto::MAX_FRAME_SIZE_LIMIT).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("decode_data", size), &bytes, |b, bytes| {
            b.iter(|| proto::decode(bytes, proto::MAX_FRAME_SIZE_LIMIT).unwrap())
        });
    }
    g.finish();
}

fn config(role: Role) -> MuxConfig {
    MuxConfig {
        role,
        ..MuxConfig::relay_default()
    }
}

/// A relay and an agent multiplexer over an in-memory duplex; the agent echoes a fixed body.
fn pair(rt: &tokio::runtime::Runtime, body: Bytes) -> Mux {
    rt.block_on(async {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let cfg = WebSocketConfig::default();
        let r = WebSocketStream::from_raw_socket(a, WsRole::Server, Some(cfg)).await;
        let g = WebSocketStream::from_raw_socket(b, WsRole::Client, Some(cfg)).await;
        let (relay, rd, _) = Mux::new(r, config(Role::Relay));
        let (_agent, ad, mut incoming) = Mux::new(g, config(Role::Agent));
        tokio::spawn(rd.run());
        tokio::spawn(ad.run());
        tokio::spawn(async move {
            while let Some(mut s) = incoming.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    while let Some(i) = s.recv.recv().await {
                        if matches!(i, Inbound::End | Inbound::Reset { .. }) {
                            break;
                        }
                    }
                    let _ = s
                        .send
                        .send_response(200, vec![], BodyKind::Length(body.len() as u64));
                    let _ = s.send.send_data(body).await;
                    let _ = s.send.finish();
                });
            }
        });
        relay
    })
}

async fn exchange(relay: &Mux) -> usize {
    let head = RequestHead {
        method: "GET".into(),
        target: "/".into(),
        headers: vec![],
        body: BodyKind::Empty,
    };
    let (send, mut recv) = relay.open(head, Bytes::new()).unwrap();
    send.finish().unwrap();
    let mut n = 0;
    while let Some(i) = recv.recv().await {
        match i {
            Inbound::Data(d) => n += d.len(),
            Inbound::End => break,
            Inbound::Response(_) => {}
            Inbound::Reset { .. } => panic!("reset"),
        }
    }
    n
}

fn mux(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("mux");
    g.measurement_time(Duration::from_secs(3));
    for size in [100usize, 1024 * 1024] {
        let relay = pair(&rt, Bytes::from(vec![1u8; size]));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("request_response", size), |b| {
            b.iter(|| rt.block_on(exchange(&relay)))
        });
    }
    let relay = pair(&rt, Bytes::from_static(b"ok"));
    g.throughput(Throughput::Elements(64));
    g.bench_function("64_concurrent_small", |b| {
        b.iter(|| {
            rt.block_on(async {
                let futs: Vec<_> = (0..64).map(|_| exchange(&relay)).collect();
                futures_util::future::join_all(futs).await
            })
        })
    });
    g.finish();
}

criterion_group!(benches, codec, mux);
criterion_main!(benches);
