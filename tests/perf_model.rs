//! `server.request_id`, end to end against the real binary.

mod common;

use common::{EchoUpstream, StoaProcess};
use serde_json::Value;

fn echo_routes(echo: &EchoUpstream) -> String {
    format!(
        "[upstreams.echo]\nurl = \"{}\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"pass\"\nmethods = [\"GET\"]\npath = \"/pass/{{id}}\"\nupstream = \"echo\"\nrewrite = \"/echo/{{id}}\"\n\n\
         [[routes]]\nname = \"cached\"\nmethods = [\"GET\"]\npath = \"/cached/{{id}}\"\nupstream = \"echo\"\nrewrite = \"/echo/{{id}}\"\ncache = {{ ttl = \"60s\" }}\n",
        echo.url()
    )
}

/// Sends `GET path` with an optional raw `X-Request-Id`; returns the answer's id and the id
/// the upstream saw (from the echoed headers).
async fn ids(
    gw: &StoaProcess,
    path: &str,
    sent: Option<&[u8]>,
) -> (Option<String>, Option<String>) {
    let mut req = reqwest::Client::new().get(gw.url(path));
    if let Some(id) = sent {
        req = req.header(
            "x-request-id",
            reqwest::header::HeaderValue::from_bytes(id).unwrap(),
        );
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let answered = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string());
    let v: Value = r.json().await.unwrap();
    let seen = v["headers"]["x-request-id"].as_str().map(String::from);
    (answered, seen)
}

fn is_generated(id: &Option<String>) -> bool {
    id.as_ref().is_some_and(|id| {
        id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_generate_keeps_a_valid_id_and_replaces_a_hostile_one() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("request_id = \"generate\"", &echo_routes(&echo)).await;
    for path in ["/pass/1", "/cached/1"] {
        let (answered, seen) = ids(&gw, path, Some(b"client-1")).await;
        assert_eq!(answered.as_deref(), Some("client-1"), "{path}");
        assert_eq!(seen.as_deref(), Some("client-1"), "{path}");
    }
    let long = [b'x'; 129];
    for (i, hostile) in [&long[..], b"a\tb", b"a b"].into_iter().enumerate() {
        let path = format!("/cached/h{i}");
        for path in ["/pass/2", path.as_str()] {
            let (answered, seen) = ids(&gw, path, Some(hostile)).await;
            assert!(is_generated(&answered), "{path}: {answered:?}");
            assert_eq!(seen, answered, "{path}");
        }
    }
    let (a, _) = ids(&gw, "/pass/3", None).await;
    let (b, _) = ids(&gw, "/pass/3", None).await;
    assert!(
        is_generated(&a) && is_generated(&b) && a != b,
        "{a:?} {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_pass_only_passes_a_clients_valid_id() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("request_id = \"pass\"", &echo_routes(&echo)).await;
    for path in ["/pass/1", "/cached/1"] {
        let (answered, seen) = ids(&gw, path, Some(b"client-1")).await;
        assert_eq!(answered.as_deref(), Some("client-1"), "{path}");
        assert_eq!(seen.as_deref(), Some("client-1"), "{path}");
    }
    for (path, sent) in [
        ("/pass/2", None),
        ("/cached/2", None),
        ("/pass/3", Some(&b"a\tb"[..])),
        ("/cached/3", Some(&b"a\tb"[..])),
    ] {
        assert_eq!(ids(&gw, path, sent).await, (None, None), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_off_sends_and_answers_none() {
    let echo = EchoUpstream::start().await;
    let gw = StoaProcess::start_with("request_id = \"off\"", &echo_routes(&echo)).await;
    for (path, sent) in [
        ("/pass/1", Some(&b"client-1"[..])),
        ("/cached/1", Some(&b"client-1"[..])),
        ("/pass/2", None),
        ("/cached/2", None),
    ] {
        assert_eq!(ids(&gw, path, sent).await, (None, None), "{path}");
    }
    // stoa's own answers carry none either.
    let r = reqwest::Client::new()
        .get(gw.url("/nowhere"))
        .header("x-request-id", "client-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("x-request-id").is_none());
}
