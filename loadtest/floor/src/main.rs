//! The floor of loadtest/compare.sh: a pingora 0.9 HTTP proxy that forwards every request
//! to one fixed peer and does nothing else (no routing, no header changes, no metrics, no
//! logging), to show what pingora's proxy path itself costs next to stoa's.
//!
//!   stoa-floor --listen 127.0.0.1:8080 --peer 127.0.0.1:8081 [--threads N] [--model split|shared]
//!              [--path proxy|lean|raw] [--pool own|pingora] [--timeout SECONDS]
//!
//! `--path proxy` (the default) is pingora's `ProxyHttp` with a fixed peer; `--path lean` is a
//! custom pingora-core `ServerApp` on the HTTP/1 server and client sessions (see `lean.rs`),
//! with its own upstream pool (`--pool own`, default) or pingora's (`--pool pingora`), and
//! `--timeout` (default 10 s) on connecting to and each read and write of the upstream;
//! `--path raw` is pingora's listener and stream with no HTTP session at all (see `raw.rs`).
//!
//! `--model split` (the default) runs N single-thread services without work stealing, each
//! accepting from the one listening socket, like nginx workers; `--model shared` runs one
//! service on N threads with pingora's default work stealing.

mod lean;
mod proxy;
mod raw;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;

use lean::{Lean, PoolKind};
use proxy::Floor;
use raw::Raw;

/// Which code forwards the requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// pingora's `ProxyHttp`.
    Proxy,
    /// pingora-core's HTTP/1 sessions (`lean.rs`).
    Lean,
    /// No HTTP sessions: `httparse` and the bytes as they came (`raw.rs`).
    Raw,
}

struct Args {
    listen: String,
    peer: SocketAddr,
    threads: usize,
    split: bool,
    path: Path,
    pool: PoolKind,
    timeout: Duration,
}

const USAGE: &str = "usage: stoa-floor --listen ADDR --peer ADDR [--threads N] \
[--model split|shared] [--path proxy|lean|raw] [--pool own|pingora] [--timeout SECONDS]";

fn args() -> Result<Args, String> {
    let mut listen = None;
    let mut peer = None;
    let mut threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut split = true;
    let mut path = Path::Proxy;
    let mut pool = PoolKind::Own;
    let mut timeout = Duration::from_secs(10);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?),
            "--peer" => {
                let v = value()?;
                peer = Some(v.parse().map_err(|e| format!("--peer {v}: {e}"))?);
            }
            "--threads" => {
                let v = value()?;
                threads = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("--threads {v}: not a positive number"))?;
            }
            "--model" => {
                split = match value()?.as_str() {
                    "split" => true,
                    "shared" => false,
                    other => return Err(format!("--model {other}: not split or shared")),
                }
            }
            "--path" => {
                path = match value()?.as_str() {
                    "proxy" => Path::Proxy,
                    "lean" => Path::Lean,
                    "raw" => Path::Raw,
                    other => return Err(format!("--path {other}: not proxy, lean or raw")),
                }
            }
            "--pool" => {
                pool = match value()?.as_str() {
                    "own" => PoolKind::Own,
                    "pingora" => PoolKind::Pingora,
                    other => return Err(format!("--pool {other}: not own or pingora")),
                }
            }
            "--timeout" => {
                let v = value()?;
                timeout = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or(format!("--timeout {v}: not a positive number of seconds"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        peer: peer.ok_or("--peer is required")?,
        threads,
        split,
        path,
        pool,
        timeout,
    })
}

fn main() -> ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("stoa-floor: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let conf = ServerConf {
        threads: args.threads,
        work_stealing: !args.split,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let services = if args.split { args.threads } else { 1 };
    for i in 0..services {
        if args.path == Path::Raw {
            let mut service = Service::new(format!("raw {i}"), Raw::new(args.peer, args.timeout));
            service.add_tcp(&args.listen);
            if args.split {
                service.threads = Some(1);
            }
            server.add_service(service);
            continue;
        }
        if args.path == Path::Lean {
            let mut service = Service::new(
                format!("lean {i}"),
                Lean::new(args.peer, args.timeout, args.pool),
            );
            service.add_tcp(&args.listen);
            if args.split {
                service.threads = Some(1);
            }
            server.add_service(service);
            continue;
        }
        let mut proxy = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            Floor { peer: args.peer },
            &format!("floor {i}"),
        );
        // Services of one address share its listening socket (pingora's listener table).
        proxy.add_tcp(&args.listen);
        if args.split {
            proxy.threads = Some(1);
        }
        server.add_service(proxy);
    }
    server.run_forever()
}
