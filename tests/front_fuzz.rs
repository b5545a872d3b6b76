//! End to end, the arm of the front's differential test (`src/front/fuzz.rs`) that goes over
//! TCP: generated streams of pipelined requests of every lane, written in random pieces to a
//! real stoa in front of an upstream that echoes what it received. Each request gets its
//! answer, in order, and the upstream saw the target and the body the generator wrote.
//! `STOA_FUZZ_SEED` and `STOA_FUZZ_CASES` as for the unit test.

mod common;

use std::time::Duration;

use common::{dechunk, read_answer, EchoUpstream, StoaProcess};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn routes(echo: &EchoUpstream) -> String {
    format!(
        "[upstreams.echo]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"pass\"\npath = \"/pass/{{*rest}}\"\nupstream = \"echo\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\"]\npath = \"/cached/{{id}}\"\n\
         upstream = \"echo\"\ncache = {{ ttl = \"1m\" }}\n",
        echo.url()
    )
}

/// What a request should get.
#[derive(Debug)]
enum Expect {
    /// The upstream's echo (of this request, or from the cache of an earlier one) with this
    /// target and body.
    Echo { target: String, body: String },
    /// stoa's 404.
    NotFound,
}

/// One request of a lane the generator picks, and what it should get.
fn request(rng: &mut fastrand::Rng, n: usize) -> (String, Expect) {
    let data: String = (0..rng.usize(0..40)).map(|_| rng.alphanumeric()).collect();
    let echo = |target: &str, body: &str| Expect::Echo {
        target: target.to_string(),
        body: body.to_string(),
    };
    match rng.u32(..9) {
        // answer: a cached route (a miss, then hits of the same few ids).
        0 => {
            let id = rng.u32(..3);
            let target = format!("/cached/{id}");
            let head = format!("GET {target} HTTP/1.1\r\nHost: stoa\r\n\r\n");
            (head, echo(&target, ""))
        }
        1 => (
            "GET /nowhere HTTP/1.1\r\nHost: stoa\r\n\r\n".to_string(),
            Expect::NotFound,
        ),
        // forward: a body with its head.
        2 | 3 => {
            let target = format!("/pass/f{n}?q={}", rng.u32(..100));
            let head = format!(
                "POST {target} HTTP/1.1\r\nHost: stoa\r\nContent-Length: {}\r\n\r\n{data}",
                data.len()
            );
            (head, echo(&target, &data))
        }
        // proxy:framing: a chunked body, some chunks long, some with trailers.
        4 | 5 => {
            let target = format!("/pass/c{n}");
            let mut body = String::new();
            let mut plain = String::new();
            for _ in 0..rng.usize(0..4) {
                let len = if rng.u32(..4) == 0 {
                    rng.usize(1000..6000)
                } else {
                    rng.usize(1..30)
                };
                let chunk: String = (0..len).map(|_| rng.alphanumeric()).collect();
                body.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
                plain.push_str(&chunk);
            }
            let trailers = if rng.bool() { "X-Sum: 1\r\n" } else { "" };
            let head = format!(
                "PUT {target} HTTP/1.1\r\nHost: stoa\r\nTransfer-Encoding: chunked\r\n\r\n\
                 {body}0\r\n{trailers}\r\n"
            );
            (head, echo(&target, &plain))
        }
        // proxy:headers: a Connection header that names another.
        6 => {
            let target = format!("/pass/h{n}");
            let head = format!(
                "POST {target} HTTP/1.1\r\nHost: stoa\r\nConnection: keep-alive, x-hop\r\n\
                 x-hop: 1\r\nContent-Length: {}\r\n\r\n{data}",
                data.len()
            );
            (head, echo(&target, &data))
        }
        // proxy:framing: HTTP/1.0 kept alive.
        7 => {
            let target = format!("/pass/o{n}");
            let head =
                format!("GET {target} HTTP/1.0\r\nHost: stoa\r\nConnection: keep-alive\r\n\r\n");
            (head, echo(&target, ""))
        }
        // proxy:target: absolute form.
        _ => {
            let target = format!("/pass/a{n}");
            let head = format!("GET http://stoa{target} HTTP/1.1\r\nHost: stoa\r\n\r\n");
            (head, echo(&target, ""))
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
async fn generated_pipelines_reach_the_upstream_as_written() {
    let seed = env("STOA_FUZZ_SEED", 24);
    let cases = env("STOA_FUZZ_CASES", 40) as usize;
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start(&routes(&echo)).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut requests = 0;
    for case in 0..cases {
        let (heads, expected): (Vec<String>, Vec<Expect>) =
            (0..rng.usize(1..7)).map(|n| request(&mut rng, n)).unzip();
        let stream = heads.concat().into_bytes();
        let mut sock = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        sock.set_nodelay(true).unwrap();
        let mut at = 0;
        while at < stream.len() {
            let n = rng.usize(1..=stream.len() - at);
            if let Err(e) = sock.write_all(&stream[at..at + n]).await {
                panic!("case {case}: writing {heads:?}: {e}");
            }
            at += n;
            if rng.bool() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let mut buf = Vec::new();
        for (i, want) in expected.iter().enumerate() {
            let read =
                tokio::time::timeout(Duration::from_secs(10), read_answer(&mut sock, &mut buf));
            let answer = match read.await {
                Ok(Ok(answer)) => answer,
                other => panic!("case {case}, answer {i} of {heads:?}: {other:?}"),
            };
            match want {
                Expect::NotFound => assert_eq!(answer.status, 404, "case {case}, {i}: {answer:?}"),
                Expect::Echo { target, body } => {
                    assert_eq!(answer.status, 200, "case {case}, {i}: {answer:?}");
                    let json = answer.json();
                    assert_eq!(
                        json["target"],
                        target.as_str(),
                        "case {case}, {i}: {heads:?}"
                    );
                    let sent = json["body"].as_str().unwrap_or_default();
                    let chunked = json["headers"]["transfer-encoding"] == "chunked";
                    let sent = if chunked {
                        dechunk(sent)
                    } else {
                        sent.to_string()
                    };
                    assert_eq!(&sent, body, "case {case}, {i}: {heads:?}");
                }
            }
            requests += 1;
        }
        assert!(
            buf.is_empty(),
            "case {case}: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    println!("front fuzz over TCP: seed {seed}, {cases} streams, {requests} requests answered");
}
