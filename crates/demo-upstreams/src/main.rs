//! `stoa-demo`: runs the demo upstream APIs that stoa fronts.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use stoa_demo::{Api, DemoServer, Knobs};
use tracing_subscriber::EnvFilter;

/// Runs realistic demo versions of the five upstream APIs stoa fronts, each on its own port,
/// with knobs for latency, injected 500s and dropped connections.
///
/// APIs: restaurants (menus, `/api/restaurant/{id}`), clv (`GET /get_clv` with a JSON body, slow),
/// voucher (`POST /api/v1/voucher`), orders (`/products`, `/orders`) and campaigns
/// (`/campaigns/{id}/`, HTML with a cookie).
///
/// Every server also answers `GET /__stats`, `POST /__stats/reset`, `GET /__knobs` and
/// `PUT /__knobs` (a partial JSON like `{"latency_ms":500}`); those are never counted or delayed.
#[derive(Debug, Parser)]
#[command(name = "stoa-demo", version, after_help = EXAMPLES)]
struct Cli {
    /// Address of the restaurant menu API (an IP:PORT, or just a PORT on 127.0.0.1).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9001", value_parser = parse_addr)]
    restaurants: SocketAddr,

    /// Address of the CLV calculator.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7787", value_parser = parse_addr)]
    clv: SocketAddr,

    /// Address of the voucher API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000", value_parser = parse_addr)]
    voucher: SocketAddr,

    /// Address of the products and orders gateway.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8002", value_parser = parse_addr)]
    orders: SocketAddr,

    /// Address of the banner campaigns service.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8003", value_parser = parse_addr)]
    campaigns: SocketAddr,

    /// Start only this API (repeatable): restaurants, clv, voucher, orders or campaigns; by
    /// default all five start.
    #[arg(long, value_name = "API")]
    only: Vec<Api>,

    /// Added latency per request, as API=DURATION (humantime: 200ms, 1s, 1h); API may be `all`.
    /// Repeatable; an API's own setting beats `all`. The CLV calculator defaults to 200ms.
    #[arg(long, value_name = "API=DURATION", value_parser = parse_assignment::<Latency>)]
    latency: Vec<(Target, Latency)>,

    /// Probability of answering 500 `{"error":"INTERNAL",...}`, as API=RATE with RATE in [0, 1].
    #[arg(long, value_name = "API=RATE", value_parser = parse_assignment::<Rate>)]
    error_rate: Vec<(Target, Rate)>,

    /// Probability of closing the connection without any response, as API=RATE.
    #[arg(long, value_name = "API=RATE", value_parser = parse_assignment::<Rate>)]
    drop_rate: Vec<(Target, Rate)>,
}

const EXAMPLES: &str = "Examples:
  stoa-demo                                   all five on their default ports
  stoa-demo --only restaurants --restaurants 9100
  stoa-demo --latency all=50ms --latency clv=1s --error-rate voucher=0.1 --drop-rate orders=0.05
  curl -s http://127.0.0.1:9001/api/restaurant/dufva
  curl -s http://127.0.0.1:9001/__stats";

/// Which API a knob setting is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    All,
    One(Api),
}

impl Target {
    fn matches(self, api: Api) -> bool {
        match self {
            Target::All => true,
            Target::One(one) => one == api,
        }
    }
}

/// A latency given on the command line.
#[derive(Clone, Copy, Debug)]
struct Latency(Duration);

impl FromStr for Latency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(Latency)
            .map_err(|err| format!("invalid duration {s:?} ({err}); use e.g. 200ms, 1s, 1h"))
    }
}

/// A probability given on the command line.
#[derive(Clone, Copy, Debug)]
struct Rate(f64);

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<f64>() {
            Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(Rate(rate)),
            _ => Err(format!(
                "invalid rate {s:?}: expected a number between 0 and 1"
            )),
        }
    }
}

fn parse_assignment<T: FromStr<Err = String>>(s: &str) -> Result<(Target, T), String> {
    let (api, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected API=VALUE (e.g. clv=200ms or all=0.1), got {s:?}"))?;
    let target = if api.trim().eq_ignore_ascii_case("all") {
        Target::All
    } else {
        Target::One(api.parse().map_err(|err| format!("{err}"))?)
    };
    Ok((target, value.parse()?))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.trim().parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.trim()
        .parse()
        .map_err(|_| format!("invalid address {s:?}: expected IP:PORT or PORT"))
}

impl Cli {
    fn addr(&self, api: Api) -> SocketAddr {
        match api {
            Api::Restaurants => self.restaurants,
            Api::Clv => self.clv,
            Api::Voucher => self.voucher,
            Api::Orders => self.orders,
            Api::Campaigns => self.campaigns,
        }
    }

    fn apis(&self) -> Vec<Api> {
        Api::ALL
            .into_iter()
            .filter(|api| self.only.is_empty() || self.only.contains(api))
            .collect()
    }

    /// The API's defaults, then every `all=` setting, then the API's own settings.
    fn knobs(&self, api: Api) -> Knobs {
        let mut knobs = Knobs::default_for(api);
        for own in [false, true] {
            let applies = |target: Target| target.matches(api) && own == (target != Target::All);
            for (target, Latency(latency)) in &self.latency {
                if applies(*target) {
                    knobs.latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
                }
            }
            for (target, Rate(rate)) in &self.error_rate {
                if applies(*target) {
                    knobs.error_rate = *rate;
                }
            }
            for (target, Rate(rate)) in &self.drop_rate {
                if applies(*target) {
                    knobs.drop_rate = *rate;
                }
            }
        }
        knobs
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Listen for signals before announcing anything, so a script that waits for our output
    // and then signals us is never ignored.
    let signals = Signals::new()?;

    let mut servers = BTreeMap::new();
    for api in cli.apis() {
        let server = DemoServer::start(api, cli.addr(api), cli.knobs(api))
            .await
            .with_context(|| format!("cannot start the {api} demo upstream"))?;
        servers.insert(api, server);
    }

    let mut stdout = std::io::stdout().lock();
    for (api, server) in &servers {
        let knobs = server.knobs();
        writeln!(
            stdout,
            "{api:<12} {:<24} latency {}, error rate {}, drop rate {}",
            server.url(),
            humantime::format_duration(knobs.latency()),
            knobs.error_rate,
            knobs.drop_rate,
        )?;
    }
    stdout.flush()?;
    drop(stdout);

    signals.wait().await;
    for server in servers.into_values() {
        server.shutdown().await;
    }
    Ok(())
}

/// SIGINT (Ctrl-C) and, on Unix, SIGTERM, registered as soon as this is created.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the first signal.
    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("stoa-demo").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults() {
        let cli = cli(&[]);
        assert_eq!(cli.apis(), Api::ALL);
        for api in Api::ALL {
            assert_eq!(cli.addr(api).port(), api.default_port());
            assert_eq!(cli.knobs(api), Knobs::default_for(api));
        }
    }

    #[test]
    fn knobs_own_beats_all() {
        let cli = cli(&[
            "--latency",
            "clv=1s",
            "--latency",
            "all=50ms",
            "--error-rate",
            "voucher=0.1",
            "--drop-rate",
            "all=0.05",
            "--only",
            "clv",
            "--only",
            "voucher",
            "--orders",
            "9100",
        ]);
        assert_eq!(cli.apis(), [Api::Clv, Api::Voucher]);
        assert_eq!(cli.knobs(Api::Clv).latency_ms, 1000);
        assert_eq!(cli.knobs(Api::Voucher).latency_ms, 50);
        assert_eq!(cli.knobs(Api::Voucher).error_rate, 0.1);
        assert_eq!(cli.knobs(Api::Restaurants).drop_rate, 0.05);
        assert_eq!(cli.addr(Api::Orders), "127.0.0.1:9100".parse().unwrap());
    }

    #[test]
    fn bad_arguments_are_rejected() {
        for args in [
            &["--latency", "clv"][..],
            &["--latency", "nope=1s"],
            &["--latency", "clv=fast"],
            &["--error-rate", "all=1.5"],
            &["--only", "nope"],
            &["--clv", "localhost:x"],
        ] {
            let parsed =
                Cli::try_parse_from(std::iter::once("stoa-demo").chain(args.iter().copied()));
            assert!(parsed.is_err(), "{args:?}");
        }
    }
}
