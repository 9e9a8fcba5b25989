//! Measures reqwest's own keep-alive latency against a URL (sequential GETs), to tell the
//! client library's cost apart from the tunnel's. `cargo run --release --example reqwest_latency URL N`.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("URL");
    let n: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(5000);
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let r = client.get(&url).send().await.unwrap();
        let _ = r.bytes().await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    println!("p50 {:?} p99 {:?}", times[n / 2], times[n * 99 / 100]);
}
