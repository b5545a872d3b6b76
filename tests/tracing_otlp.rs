//! OpenTelemetry traces end to end: stoa exports to an OTLP/HTTP receiver in the test,
//! which decodes the protobuf it gets; the upstream records the `traceparent` it sees.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{quoted, scene, wait_redis_up, Origin};
use common::redis::RedisServer;
use common::{free_port, read_head, serve_heads, text_answer, StoaProcess};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An OTLP/HTTP receiver: every span of every `POST /v1/traces`.
struct Collector {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(end) = read_head(&mut sock, &mut buf).await {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .expect("the exporter sends a content-length");
                        while buf.len() < end + length {
                            let mut chunk = [0u8; 8192];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body: Vec<u8> = buf.drain(..end + length).skip(end).collect();
                        assert!(head.starts_with("post /v1/traces "), "{head}");
                        let req = ExportTraceServiceRequest::decode(body.as_slice())
                            .expect("an OTLP protobuf export");
                        {
                            let mut spans = kept.lock().unwrap();
                            for rs in req.resource_spans {
                                for ss in rs.scope_spans {
                                    spans.extend(ss.spans);
                                }
                            }
                        }
                        let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if sock.write_all(ok.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Collector { port, spans, task }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `done` holds for the spans received.
    async fn until(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream answering every GET with a cacheable text after `delay` (paths with
/// `slow`), recording each head it gets.
fn origin(delay: Duration) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = heads.clone();
    serve_heads(listener, move |head| {
        let seen = seen.clone();
        async move {
            let slow = head.lines().next().unwrap_or_default().contains("slow");
            seen.lock().unwrap().push(head);
            if slow {
                tokio::time::sleep(delay).await;
            }
            // A JSON string: aggregates' legs read it.
            text_answer(200, "cache-control: max-age=60\r\n", "\"hello\"")
        }
    });
    (format!("http://{addr}"), heads)
}

async fn gateway(collector_port: u16, sample_ratio: f64, origin: &str) -> StoaProcess {
    gateway_with(collector_port, sample_ratio, origin, "").await
}

/// [`gateway`] with more routes.
async fn gateway_with(
    collector_port: u16,
    sample_ratio: f64,
    origin: &str,
    routes: &str,
) -> StoaProcess {
    let config = format!(
        "[tracing]\notlp_endpoint = \"http://127.0.0.1:{collector_port}\"\nsample_ratio = {sample_ratio:?}\nservice_name = \"stoa-test\"\n\n\
         [upstreams.up]\nurl = \"{origin}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"item\"\nupstream = \"up\"\nmethods = [\"GET\"]\npath = \"/item/{{id}}\"\ncache = {{ ttl = \"60s\" }}\n{routes}"
    );
    StoaProcess::start(&config).await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
        .map(|v| match v {
            AnyValue::StringValue(s) => s,
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        })
}

/// The request spans (kind server) for `path`.
fn requests_for<'a>(spans: &'a [Span], path: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| attr(s, "url.path").as_deref() == Some(path))
        .collect()
}

#[tokio::test]
async fn a_clients_traceparent_is_continued_and_sent_upstream_under_a_stoa_span() {
    let collector = Collector::start().await;
    let (origin_url, heads) = origin(Duration::ZERO);
    let gw = gateway(collector.port, 1.0, &origin_url).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let resp = reqwest::Client::new()
        .get(gw.url("/item/1"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "MISS");

    // The upstream saw the client's trace, with a parent that is not the client's span.
    let head = heads
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("the upstream was asked");
    let sent = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("traceparent:")
                .map(|v| v.trim().to_string())
        })
        .expect("a traceparent upstream");
    let fields: Vec<&str> = sent.split('-').collect();
    assert_eq!(fields.len(), 4, "{sent}");
    assert_eq!(fields[1], trace_id);
    assert_ne!(fields[2], client_span);
    assert!(
        head.to_ascii_lowercase().contains("tracestate: vendor=abc"),
        "{head}"
    );

    let spans = collector
        .until(|spans| {
            spans
                .iter()
                .any(|s| hex(&s.span_id) == fields[2] && !requests_for(spans, "/item/1").is_empty())
        })
        .await;
    let request = requests_for(&spans, "/item/1");
    assert_eq!(request.len(), 1, "one request span: {spans:#?}");
    let request = request[0];
    assert_eq!(hex(&request.trace_id), trace_id);
    assert_eq!(hex(&request.parent_span_id), client_span);
    assert_eq!(attr(request, "http.route").as_deref(), Some("item"));
    assert_eq!(attr(request, "stoa.cache").as_deref(), Some("MISS"));
    assert_eq!(attr(request, "stoa.lane").as_deref(), Some("answer"));
    assert_eq!(
        attr(request, "http.response.status_code").as_deref(),
        Some("200")
    );
    // The upstream's parent is the fill's span, child of the request's, in the same trace.
    let parent = spans
        .iter()
        .find(|s| hex(&s.span_id) == fields[2])
        .expect("the upstream's parent span is exported");
    assert_eq!(parent.name, "stoa.fill");
    assert_eq!(hex(&parent.trace_id), trace_id);
    assert_eq!(parent.parent_span_id, request.span_id);
    for name in ["stoa.cache.lookup", "stoa.upstream"] {
        let child = spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span: {spans:#?}"));
        assert_eq!(hex(&child.trace_id), trace_id, "{name}");
    }
}

#[tokio::test]
async fn coalesced_waiters_link_to_the_one_fill_they_waited_for() {
    let collector = Collector::start().await;
    let (origin_url, heads) = origin(Duration::from_millis(700));
    let gw = gateway(collector.port, 1.0, &origin_url).await;
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (http, url) = (http.clone(), gw.url("/item/slow"));
        tasks.push(tokio::spawn(async move {
            let resp = http.get(url).send().await.unwrap();
            let cache = resp.headers()["x-cache"].to_str().unwrap().to_string();
            (resp.status().as_u16(), cache)
        }));
    }
    for task in tasks {
        let (status, _) = task.await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(heads.lock().unwrap().len(), 1, "one fetch upstream");

    let spans = collector
        .until(|spans| {
            requests_for(spans, "/item/slow").len() >= 20
                && spans.iter().any(|s| s.name == "stoa.fill")
        })
        .await;
    let fills: Vec<&Span> = spans.iter().filter(|s| s.name == "stoa.fill").collect();
    assert_eq!(fills.len(), 1, "one fill span: {fills:#?}");
    let fill = fills[0];
    let requests = requests_for(&spans, "/item/slow");
    assert_eq!(requests.len(), 20);
    let leader: Vec<&&Span> = requests
        .iter()
        .filter(|s| s.span_id == fill.parent_span_id)
        .collect();
    assert_eq!(leader.len(), 1, "the fill is the child of one request");
    let linked: Vec<&&Span> = requests
        .iter()
        .filter(|s| {
            s.links
                .iter()
                .any(|l| l.span_id == fill.span_id && l.trace_id == fill.trace_id)
        })
        .collect();
    assert_eq!(
        linked.len(),
        19,
        "every waiter links to the fill: {requests:#?}"
    );
    assert!(linked
        .iter()
        .all(|s| attr(s, "stoa.cache").as_deref() == Some("MISS")
            || s.span_id != fill.parent_span_id));
}

#[tokio::test]
async fn a_sample_ratio_of_zero_exports_nothing() {
    let collector = Collector::start().await;
    let (origin_url, heads) = origin(Duration::ZERO);
    let gw = gateway(collector.port, 0.0, &origin_url).await;
    let http = reqwest::Client::new();
    for i in 0..5 {
        let resp = http
            .get(gw.url(&format!("/item/{}", i % 2)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(heads.lock().unwrap().len(), 2);
    // The export runs every half second: three seconds leave time for several.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(collector.spans().is_empty(), "{:#?}", collector.spans());
    // The upstream still sees a trace, unsampled.
    let head = heads.lock().unwrap()[0].to_ascii_lowercase();
    let sent = head
        .lines()
        .find_map(|l| l.strip_prefix("traceparent:"))
        .expect("a traceparent upstream")
        .trim()
        .to_string();
    assert!(sent.ends_with("-00"), "{sent}");
}

#[tokio::test]
async fn a_dead_collector_costs_requests_nothing() {
    // Nothing listens on this port.
    let dead = free_port();
    let (origin_url, _heads) = origin(Duration::ZERO);
    let gw = gateway(dead, 1.0, &origin_url).await;
    let http = reqwest::Client::new();
    let started = Instant::now();
    for i in 0..100 {
        let asked = Instant::now();
        let resp = http
            .get(gw.url(&format!("/item/{}", i % 10)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "request {i} took {:?}",
            asked.elapsed()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The spans that could not be exported are counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gw.metrics().await;
        let dropped = common::sample(&metrics, "stoa_trace_spans_dropped_total").unwrap_or(0.0);
        if dropped > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no drop counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_clients_sampled_flag_decides_whatever_the_ratio() {
    let collector = Collector::start().await;
    let (origin_url, heads) = origin(Duration::ZERO);
    // Nothing sampled on stoa's own: a client's sampled trace is still followed.
    let gw = gateway(collector.port, 0.0, &origin_url).await;
    let http = reqwest::Client::new();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let resp = http
        .get(gw.url("/item/7"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let spans = collector
        .until(|spans| !requests_for(spans, "/item/7").is_empty())
        .await;
    let request = requests_for(&spans, "/item/7");
    assert_eq!(request.len(), 1, "{spans:#?}");
    assert_eq!(hex(&request[0].trace_id), trace_id);
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == trace_id),
        "{spans:#?}"
    );

    // Everything sampled on stoa's own: a client's unsampled trace is not.
    let collector = Collector::start().await;
    let gw = gateway(collector.port, 1.0, &origin_url).await;
    let resp = http
        .get(gw.url("/item/8"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-00"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(collector.spans().is_empty(), "{:#?}", collector.spans());
    let head = heads.lock().unwrap().last().unwrap().to_ascii_lowercase();
    assert!(head.contains("traceparent: 00-"), "{head}");
    assert!(head.contains("-00\r\n"), "unsampled upstream: {head}");
}

#[tokio::test]
async fn a_ratio_samples_whole_requests_and_leaves_the_rest_untouched() {
    let collector = Collector::start().await;
    let (origin_url, _heads) = origin(Duration::ZERO);
    let gw = gateway(collector.port, 0.5, &origin_url).await;
    let http = reqwest::Client::new();
    // 40 misses, then 160 hits.
    for i in 0..200 {
        let resp = http
            .get(gw.url(&format!("/item/{}", i % 40)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spans = collector
        .until(|spans| spans.iter().filter(|s| s.kind == 2).count() >= 60)
        .await;
    let requests: Vec<&Span> = spans.iter().filter(|s| s.kind == 2).collect();
    // Binomial(200, 0.5): 100 ± 7; outside 60..=140 is far beyond chance.
    assert!(
        (60..=140).contains(&requests.len()),
        "{} requests sampled of 200",
        requests.len()
    );
    // Every other span belongs to a sampled request's trace: no orphan fill or lookup.
    for span in spans.iter().filter(|s| s.kind != 2) {
        assert!(
            requests.iter().any(|r| r.trace_id == span.trace_id),
            "a span outside every sampled request: {span:#?}"
        );
    }
    let fills = spans.iter().filter(|s| s.name == "stoa.fill").count();
    let sampled_misses = requests
        .iter()
        .filter(|r| attr(r, "stoa.cache").as_deref() == Some("MISS"))
        .count();
    assert_eq!(fills, sampled_misses, "one fill span per sampled miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_waiting_for_another_nodes_lease_links_to_that_fill() {
    let redis = RedisServer::start();
    let collector = Collector::start().await;
    let origin = Origin::start(Duration::from_millis(900)).await;
    let tracing = format!(
        "\n[tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\nsample_ratio = 1.0\n",
        collector.port
    );
    let mut nodes = Vec::new();
    for n in 0..2 {
        let text = scene(
            &quoted(&redis.url()),
            &format!("node-{n}"),
            &origin,
            "ttl = \"60s\"",
            &tracing,
        );
        nodes.push(StoaProcess::start(&text).await);
    }
    wait_redis_up(&nodes, true).await;
    let http = reqwest::Client::new();
    let first = tokio::spawn({
        let (http, url) = (http.clone(), nodes[0].url("/items/1"));
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    });
    // node-0 holds the lease by now; node-1 waits for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = http.get(nodes[1].url("/items/1")).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let body = second.text().await.unwrap();
    assert_eq!(body, first.await.unwrap());
    assert_eq!(origin.calls(), 1, "one fetch cluster-wide");

    let spans = collector
        .until(|spans| spans.iter().filter(|s| s.name == "stoa.fill").count() >= 2)
        .await;
    let fills: Vec<&Span> = spans.iter().filter(|s| s.name == "stoa.fill").collect();
    assert_eq!(fills.len(), 2, "{spans:#?}");
    let (fetched, waited): (Vec<&&Span>, Vec<&&Span>) = fills.iter().partition(|f| {
        spans
            .iter()
            .any(|s| s.name == "stoa.upstream" && s.parent_span_id == f.span_id)
    });
    assert_eq!((fetched.len(), waited.len()), (1, 1), "{fills:#?}");
    let link = waited[0]
        .links
        .iter()
        .find(|l| l.span_id == fetched[0].span_id && l.trace_id == fetched[0].trace_id);
    assert!(
        link.is_some(),
        "no link to the other node's fill: {fills:#?}"
    );
    let why = link
        .unwrap()
        .attributes
        .iter()
        .find(|kv| kv.key == "stoa.link");
    assert!(format!("{why:?}").contains("lease"), "{why:?}");
}

#[tokio::test]
async fn aggregate_legs_and_pass_through_attempts_have_spans() {
    let collector = Collector::start().await;
    let (origin_url, heads) = origin(Duration::ZERO);
    let routes = r#"
[[routes]]
name = "pair"
methods = ["GET"]
path = "/pair/{a}/{b}"
respond = { first = "{first}", second = "{second}" }

[[routes.legs]]
name = "first"
path = "/item/{a}"

[[routes.legs]]
name = "second"
path = "/item/{b}"

[[routes]]
name = "through"
upstream = "up"
methods = ["GET"]
path = "/through"
"#;
    let gw = gateway_with(collector.port, 1.0, &origin_url, routes).await;
    let http = reqwest::Client::new();
    let resp = http.get(gw.url("/pair/1/2")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({ "first": "hello", "second": "hello" })
    );
    let resp = http.get(gw.url("/through")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let spans = collector
        .until(|spans| {
            spans
                .iter()
                .filter(|s| s.name == "stoa.aggregate.leg")
                .count()
                >= 2
                && !requests_for(spans, "/through").is_empty()
        })
        .await;
    let pair = requests_for(&spans, "/pair/1/2");
    assert_eq!(pair.len(), 1, "{spans:#?}");
    let pair_fill = spans
        .iter()
        .find(|s| s.name == "stoa.fill" && s.parent_span_id == pair[0].span_id)
        .expect("the aggregate's fill");
    let legs: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "stoa.aggregate.leg")
        .collect();
    assert_eq!(legs.len(), 2, "{legs:#?}");
    for (leg, name, path) in [
        ("first", "first", "/item/1"),
        ("second", "second", "/item/2"),
    ] {
        let span = legs
            .iter()
            .find(|s| attr(s, "stoa.leg").as_deref() == Some(leg))
            .unwrap_or_else(|| panic!("no span of leg {name}: {legs:#?}"));
        assert_eq!(span.trace_id, pair[0].trace_id);
        assert_eq!(
            span.parent_span_id, pair_fill.span_id,
            "under the aggregate's fill"
        );
        assert_eq!(attr(span, "url.path").as_deref(), Some(path));
        assert_eq!(
            attr(span, "http.response.status_code").as_deref(),
            Some("200")
        );
        // The leg's own fill runs under the leg's span.
        assert!(
            spans
                .iter()
                .any(|s| s.name == "stoa.fill" && s.parent_span_id == span.span_id),
            "no fill under leg {name}: {spans:#?}"
        );
    }

    // A pass-through request: its upstream attempt is a span, the parent the upstream sees.
    let through = requests_for(&spans, "/through");
    assert_eq!(through.len(), 1);
    assert_eq!(attr(through[0], "stoa.lane").as_deref(), Some("forward"));
    let attempt = spans
        .iter()
        .find(|s| s.name == "stoa.upstream" && s.parent_span_id == through[0].span_id)
        .expect("an attempt span under the pass-through request");
    assert_eq!(attr(attempt, "stoa.attempt").as_deref(), Some("1"));
    let head = heads
        .lock()
        .unwrap()
        .iter()
        .find(|h| h.starts_with("GET /through"))
        .cloned()
        .expect("the upstream saw /through");
    assert!(
        head.to_ascii_lowercase().contains(&hex(&attempt.span_id)),
        "the upstream's parent is the attempt: {head}"
    );
}
