//! `netem-proxy`: an HTTP/1.1 reverse proxy that emulates a network link (latency, bandwidth)
//! and injects faults, for testing and benchmarking lazylayer against a real registry on
//! loopback, where `tc netem` is not available.
//!
//! Link emulation: each request is held for half of `--rtt-ms` before it is forwarded, and
//! every response byte is delivered half an RTT after it arrived (a delay line: bytes in flight
//! do not slow the ones behind them), so a request costs one round trip, as on a kept-alive
//! connection. Response bytes are paced by token buckets: `--bandwidth` (Mbit/s, shared by all
//! connections) and `--conn-bandwidth` (per connection).
//!
//! Each client connection carries one request (the proxy answers `Connection: close`, which
//! every HTTP client handles), forwarded to `--upstream` over a new connection. A request whose
//! path contains `--match` gets a fault with probability `--fault-rate`, chosen uniformly from
//! `--faults`; the first `--fail-first` matching requests always get `--fail-first-fault`. The
//! random choices come from `--seed`, so a run can be replayed.
//!
//! Faults:
//! - `reset`: the response body is cut after a random number of bytes with a TCP reset;
//! - `truncate`: the body ends early with an orderly close (Content-Length still says more);
//! - `flip`: one random byte of the body is inverted;
//! - `stall`: the body stops after a random number of bytes for `--stall-secs`;
//! - `500`, `503`, `429`: answered by the proxy, 503 and 429 with `Retry-After: 1`;
//! - `redirect-dead`: a 307 to a port on which nothing listens.
//!
//! Every request is logged to `--log` as one line when it arrives: `N METHOD PATH FAULT AUTH MS`,
//! where FAULT is `ok` or the fault's name, AUTH says whether the request carried an
//! `Authorization` header (`auth` or `-`) and MS is the milliseconds since the proxy started, so a
//! test can count what was injected, check where credentials went, and tell requests sent
//! together (arrivals within one RTT) from requests sent one after another. On start the proxy prints `listening on ADDR` on stdout.
//!
//! A client that does not open with an HTTP request line (a TLS handshake: HTTPS probes by Go
//! clients and containerd) gets `400 Bad Request` and a close at once, not a silent wait.
//!
//! `GET /_netem/stats` is answered by the proxy itself (never forwarded, never counted) with
//! `{"requests": N, "body_bytes": M}`: requests forwarded and response body bytes received from
//! upstream so far. A benchmark reads it before and after a run to learn what the run cost on
//! the link, whatever the client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(
    name = "netem-proxy",
    about = "HTTP reverse proxy that injects faults (resets, truncation, bit flips, stalls, 5xx, 429, dead redirects)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address of the server to forward to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Share of matching requests that get a fault, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Faults to choose from, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "reset,truncate,flip,stall,503,429,500,redirect-dead"
    )]
    faults: Vec<Fault>,
    /// Only requests whose path contains this get faults.
    #[arg(long, default_value = "/")]
    r#match: String,
    /// The first N matching requests always get --fail-first-fault (a server that is down for
    /// a while).
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
    #[arg(long, default_value = "503")]
    fail_first_fault: Fault,
    /// How long a `stall` holds the body.
    #[arg(long, default_value_t = 5.0)]
    stall_secs: f64,
    /// Seed for the fault choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Append one line per request here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Round-trip time to emulate, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// Bandwidth of the whole link for responses, in Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    bandwidth: f64,
    /// Bandwidth of each connection for responses, in Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    conn_bandwidth: f64,
}

/// A token bucket pacing bytes to a rate.
struct Bucket {
    bytes_per_sec: f64,
    /// (tokens available, when last refilled)
    state: Mutex<(f64, std::time::Instant)>,
}

impl Bucket {
    /// A bucket for `mbit` Mbit/s, or none for 0. Bursts up to 64 KiB, a few TCP segments' worth.
    fn new(mbit: f64) -> Option<Arc<Bucket>> {
        (mbit > 0.0).then(|| {
            Arc::new(Bucket {
                bytes_per_sec: mbit * 1e6 / 8.0,
                state: Mutex::new((0.0, std::time::Instant::now())),
            })
        })
    }

    async fn take(&self, n: usize) {
        const BURST: f64 = 64.0 * 1024.0;
        loop {
            let wait = {
                let mut state = self.state.lock().unwrap();
                let now = std::time::Instant::now();
                let refill = now.duration_since(state.1).as_secs_f64() * self.bytes_per_sec;
                state.0 = (state.0 + refill).min(BURST.max(n as f64));
                state.1 = now;
                if state.0 >= n as f64 {
                    state.0 -= n as f64;
                    return;
                }
                (n as f64 - state.0) / self.bytes_per_sec
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// What the delivery task does with the client connection, each at its release time.
enum Deliver {
    Data(Vec<u8>),
    Pause(Duration),
    /// Close with a TCP reset.
    Reset,
    /// Close in order.
    Close,
}

/// Writes what it is sent to the client half an RTT after it was sent, paced by the buckets.
fn delivery(
    mut client: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    buckets: Vec<Arc<Bucket>>,
) -> (
    tokio::sync::mpsc::UnboundedSender<Deliver>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Deliver)>();
    let (stamped_tx, mut stamped_rx) = tokio::sync::mpsc::unbounded_channel::<Deliver>();
    // Stamp each item with its release time when it is sent, not when the writer gets to it.
    tokio::spawn(async move {
        while let Some(item) = stamped_rx.recv().await {
            if tx
                .send((tokio::time::Instant::now() + delay, item))
                .is_err()
            {
                break;
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some((release, item)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            match item {
                Deliver::Data(bytes) => {
                    for piece in bytes.chunks(16 << 10) {
                        for bucket in &buckets {
                            bucket.take(piece.len()).await;
                        }
                        client.write_all(piece).await?;
                    }
                }
                Deliver::Pause(d) => tokio::time::sleep(d).await,
                Deliver::Reset => {
                    // SO_LINGER 0 turns the close into a RST.
                    let _ = client.as_ref().set_zero_linger();
                    return Ok(());
                }
                Deliver::Close => return client.shutdown().await,
            }
        }
        client.shutdown().await
    });
    (stamped_tx, writer)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Fault {
    Reset,
    Truncate,
    Flip,
    Stall,
    #[value(name = "500")]
    Status500,
    #[value(name = "503")]
    Status503,
    #[value(name = "429")]
    Status429,
    RedirectDead,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Reset => "reset",
            Fault::Truncate => "truncate",
            Fault::Flip => "flip",
            Fault::Stall => "stall",
            Fault::Status500 => "500",
            Fault::Status503 => "503",
            Fault::Status429 => "429",
            Fault::RedirectDead => "redirect-dead",
        }
    }
}

struct Proxy {
    args: Args,
    rng: Mutex<fastrand::Rng>,
    matched: AtomicU64,
    requests: AtomicU64,
    /// Response body bytes received from upstream (for `/_netem/stats`).
    body_bytes: AtomicU64,
    log: Option<Mutex<std::fs::File>>,
    /// A port with no listener, for `redirect-dead`.
    dead_port: u16,
    /// When the proxy started (log lines say how long after).
    started: std::time::Instant,
    /// The whole link's bandwidth, shared by every connection.
    link: Option<Arc<Bucket>>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("netem-proxy: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    // Bind and drop: the port is then free and refuses connections.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = match &args.log {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )),
        None => None,
    };
    let proxy = Arc::new(Proxy {
        link: Bucket::new(args.bandwidth),
        rng: Mutex::new(fastrand::Rng::with_seed(args.seed)),
        args,
        matched: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        body_bytes: AtomicU64::new(0),
        log,
        dead_port,
        started: std::time::Instant::now(),
    });
    println!("listening on {}", listener.local_addr()?);
    use std::io::Write as _;
    std::io::stdout().flush()?;
    loop {
        let (client, _) = listener.accept().await?;
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _ = proxy.serve(client).await;
        });
    }
}

/// A parsed HTTP head: the first line, the header lines, and the declared body length.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn content_length(&self) -> Option<u64> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
    }

    /// The head as sent on, with `Connection: close` (one request per connection).
    fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            if !k.eq_ignore_ascii_case("connection") && !k.eq_ignore_ascii_case("keep-alive") {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

/// Reads a head (up to the blank line); returns it and any bytes read past it.
async fn read_head(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<(Head, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 << 10 {
            return Err(std::io::Error::other("head too large"));
        }
        let n = stream.read(&mut piece).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&piece[..n]);
        // A request line starts with a method, an uppercase token. Anything else (a TLS
        // ClientHello starts with the record type 0x16) would never send the blank line this
        // loop waits for, and its client would wait for an answer until it times out.
        if !buf[0].is_ascii_uppercase() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end + 4..].to_vec();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((Head { first, headers }, rest))
}

impl Proxy {
    fn choose(&self, path: &str) -> Option<Fault> {
        if !path.contains(&self.args.r#match) {
            return None;
        }
        let n = self.matched.fetch_add(1, Ordering::Relaxed);
        if n < self.args.fail_first {
            return Some(self.args.fail_first_fault);
        }
        let mut rng = self.rng.lock().unwrap();
        if self.args.faults.is_empty() || rng.f64() >= self.args.fault_rate {
            return None;
        }
        Some(self.args.faults[rng.usize(..self.args.faults.len())])
    }

    fn record(&self, method: &str, path: &str, fault: Option<Fault>, authorized: bool) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = &self.log {
            use std::io::Write as _;
            let _ = writeln!(
                log.lock().unwrap(),
                "{n} {method} {path} {} {} {}",
                fault.map_or("ok", Fault::name),
                if authorized { "auth" } else { "-" },
                self.started.elapsed().as_millis()
            );
        }
    }

    async fn serve(&self, mut client: TcpStream) -> std::io::Result<()> {
        let (head, early_body) = match read_head(&mut client).await {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let body = "not an HTTP/1.1 request (this proxy speaks plain HTTP, not TLS)\n";
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                return client.write_all(response.as_bytes()).await;
            }
            Err(e) => return Err(e),
        };
        let mut parts = head.first.split(' ');
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        if path == "/_netem/stats" {
            let body = format!(
                "{{\"requests\": {}, \"body_bytes\": {}}}",
                self.requests.load(Ordering::Relaxed),
                self.body_bytes.load(Ordering::Relaxed)
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            return client.write_all(response.as_bytes()).await;
        }
        let fault = self.choose(&path);
        let authorized = head
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        self.record(&method, &path, fault, authorized);
        let local = |status: &str, extra: String| {
            format!("HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n")
        };
        match fault {
            Some(Fault::Status500) => {
                return client
                    .write_all(local("500 Internal Server Error", String::new()).as_bytes())
                    .await;
            }
            Some(Fault::Status503) => {
                return client
                    .write_all(
                        local("503 Service Unavailable", "Retry-After: 1\r\n".into()).as_bytes(),
                    )
                    .await;
            }
            Some(Fault::Status429) => {
                return client
                    .write_all(
                        local("429 Too Many Requests", "Retry-After: 1\r\n".into()).as_bytes(),
                    )
                    .await;
            }
            Some(Fault::RedirectDead) => {
                let location = format!("Location: http://127.0.0.1:{}{path}\r\n", self.dead_port);
                return client
                    .write_all(local("307 Temporary Redirect", location).as_bytes())
                    .await;
            }
            _ => {}
        }
        // The request's half of the round trip.
        tokio::time::sleep(self.half_rtt()).await;
        let mut upstream = TcpStream::connect(self.args.upstream).await?;
        upstream.write_all(&head.encode()).await?;
        upstream.write_all(&early_body).await?;
        let (mut client_read, client_write) = client.into_split();
        let (mut up_read, mut up_write) = upstream.into_split();
        // Request bodies (uploads) pass through untouched.
        let uploads = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
        });
        let mut buckets: Vec<Arc<Bucket>> =
            Bucket::new(self.args.conn_bandwidth).into_iter().collect();
        buckets.extend(self.link.clone());
        let (out, writer) = delivery(client_write, self.half_rtt(), buckets);
        let result = self.respond(&mut up_read, &out, &method, fault).await;
        drop(out);
        let delivered = writer.await.unwrap_or(Ok(()));
        uploads.abort();
        result.and(delivered)
    }

    fn half_rtt(&self) -> Duration {
        Duration::from_secs_f64(self.args.rtt_ms / 2000.0)
    }

    /// Forwards the response, applying a body fault.
    async fn respond(
        &self,
        upstream: &mut tokio::net::tcp::OwnedReadHalf,
        client: &tokio::sync::mpsc::UnboundedSender<Deliver>,
        method: &str,
        fault: Option<Fault>,
    ) -> std::io::Result<()> {
        let send = |d: Deliver| {
            client
                .send(d)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        };
        let (head, mut body) = read_head(upstream).await?;
        self.body_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        send(Deliver::Data(head.encode()))?;
        let mut piece = vec![0u8; 64 << 10];
        let len = head.content_length().unwrap_or(0);
        // The byte where the fault strikes; a fault needs a body to strike in.
        let at = match fault {
            Some(_) if method != "HEAD" && len > 1 => Some(self.rng.lock().unwrap().u64(..len)),
            _ => None,
        };
        let mut sent: u64 = 0;
        loop {
            if body.is_empty() {
                let n = upstream.read(&mut piece).await?;
                if n == 0 {
                    return send(Deliver::Close);
                }
                self.body_bytes.fetch_add(n as u64, Ordering::Relaxed);
                body.extend_from_slice(&piece[..n]);
            }
            let chunk = std::mem::take(&mut body);
            let (from, to) = (sent, sent + chunk.len() as u64);
            match (fault, at) {
                (Some(f), Some(at)) if from <= at && at < to => {
                    let split = (at - from) as usize;
                    match f {
                        Fault::Reset | Fault::Truncate => {
                            send(Deliver::Data(chunk[..split].to_vec()))?;
                            return send(if f == Fault::Reset {
                                Deliver::Reset
                            } else {
                                Deliver::Close
                            });
                        }
                        Fault::Flip => {
                            let mut chunk = chunk;
                            chunk[split] ^= 0xff;
                            send(Deliver::Data(chunk))?;
                        }
                        Fault::Stall => {
                            send(Deliver::Data(chunk[..split].to_vec()))?;
                            send(Deliver::Pause(Duration::from_secs_f64(
                                self.args.stall_secs,
                            )))?;
                            send(Deliver::Data(chunk[split..].to_vec()))?;
                        }
                        _ => send(Deliver::Data(chunk))?,
                    }
                }
                _ => send(Deliver::Data(chunk))?,
            }
            sent = to;
        }
    }
}
