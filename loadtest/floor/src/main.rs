//! The floor of loadtest/compare.sh: a pingora 0.9 HTTP proxy that forwards every request
//! to one fixed peer and does nothing else (no routing, no header changes, no metrics, no
//! logging), to show what pingora's proxy path itself costs next to stoa's.
//!
//!   stoa-floor --listen 127.0.0.1:8080 --peer 127.0.0.1:8081 [--threads N] [--model split|shared]
//!
//! `--model split` (the default) runs N single-thread services without work stealing, each
//! accepting from the one listening socket, like nginx workers; `--model shared` runs one
//! service on N threads with pingora's default work stealing.

use std::net::SocketAddr;
use std::process::ExitCode;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Floor {
    peer: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.peer, false, String::new())))
    }
}

struct Args {
    listen: String,
    peer: SocketAddr,
    threads: usize,
    split: bool,
}

const USAGE: &str =
    "usage: stoa-floor --listen ADDR --peer ADDR [--threads N] [--model split|shared]";

fn args() -> Result<Args, String> {
    let mut listen = None;
    let mut peer = None;
    let mut threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut split = true;
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
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        peer: peer.ok_or("--peer is required")?,
        threads,
        split,
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
