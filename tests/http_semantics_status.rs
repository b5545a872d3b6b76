//! Issue 13, items 8 and 9: `Cache-Status` (RFC 9211) on the answers of cached routes, and the
//! `RateLimit-Policy` / `RateLimit` structured fields of draft-ietf-httpapi-ratelimit-headers
//! (with the older `RateLimit-Limit/-Remaining/-Reset` trio behind `server.rate_limit_headers`).
//! Every field is parsed as an RFC 8941 structured field with the `sfv` crate.

mod common;

use common::{EchoUpstream, StoaProcess};
use sfv::{BareItem, Item, ListEntry, Parser};

/// The one item of a structured-field List header (panics on anything else).
fn list_item(r: &reqwest::Response, name: &str) -> Item {
    let value = r
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} ({}): {:?}", r.status(), r.headers()));
    let list = Parser::parse_list(value.as_bytes())
        .unwrap_or_else(|e| panic!("{name}: {value:?} is not a structured-field list: {e}"));
    assert_eq!(list.len(), 1, "{name}: {value:?}");
    match list.into_iter().next() {
        Some(ListEntry::Item(item)) => item,
        other => panic!("{name}: {value:?} is not an item: {other:?}"),
    }
}

fn int(item: &Item, param: &str) -> i64 {
    item.params
        .get(param)
        .and_then(BareItem::as_int)
        .unwrap_or_else(|| panic!("no integer {param} in {item:?}"))
}

/// A limited pass-through route in front of an echo origin: 3 requests at once, then one
/// every 20 s (`per_minute = 3`).
fn limited(origin: &EchoUpstream) -> String {
    format!(
        "[rate_limits.per_client]\nper_minute = 3\nburst = 3\n\n\
         [upstreams.echo]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"echo\"\nmethods = [\"GET\"]\npath = \"/echo\"\nupstream = \"echo\"\nrate_limit = \"per_client\"\n",
        origin.url()
    )
}

const TRIO: [&str; 3] = ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"];
const DRAFT: [&str; 2] = ["ratelimit-policy", "ratelimit"];

#[tokio::test]
async fn draft_ratelimit_fields_parse_count_down_and_explain_a_429() {
    let origin = EchoUpstream::start().await;
    let gw = StoaProcess::start(&limited(&origin)).await;
    let http = reqwest::Client::new();
    for expected in [2, 1, 0] {
        let r = http.get(gw.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let policy = list_item(&r, "ratelimit-policy");
        assert_eq!(policy.bare_item.as_str(), Some("per_client"));
        // The bucket holds 3 and fills in 60 s.
        assert_eq!((int(&policy, "q"), int(&policy, "w")), (3, 60));
        let state = list_item(&r, "ratelimit");
        assert_eq!(state.bare_item.as_str(), Some("per_client"));
        assert_eq!(int(&state, "r"), expected, "{:?}", r.headers());
        // One more request's worth comes back within 20 s.
        assert_eq!(int(&state, "t"), 20);
        for name in TRIO {
            assert!(!r.headers().contains_key(name), "{name} by default");
        }
        assert!(!r.headers().contains_key("retry-after"));
    }
    let r = http.get(gw.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let state = list_item(&r, "ratelimit");
    assert_eq!(int(&state, "r"), 0);
    let t = int(&state, "t");
    assert!(t > 0 && t <= 20, "t={t}");
    let retry_after: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, t, "Retry-After and t name the same wait");
    let policy = list_item(&r, "ratelimit-policy");
    assert_eq!((int(&policy, "q"), int(&policy, "w")), (3, 60));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
}

#[tokio::test]
async fn legacy_setting_gives_the_trio_and_none_gives_no_fields() {
    let origin = EchoUpstream::start().await;
    let http = reqwest::Client::new();

    let gw = StoaProcess::start_with("rate_limit_headers = \"legacy\"", &limited(&origin)).await;
    let r = http.get(gw.url("/echo")).send().await.unwrap();
    let trio: Vec<String> = TRIO
        .iter()
        .map(|h| r.headers()[*h].to_str().unwrap().to_string())
        .collect();
    assert_eq!(trio, ["3", "2", "20"]);
    for name in DRAFT {
        assert!(!r.headers().contains_key(name), "{name} with legacy");
    }
    drop(gw);

    let gw = StoaProcess::start_with("rate_limit_headers = \"none\"", &limited(&origin)).await;
    for _ in 0..3 {
        let r = http.get(gw.url("/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        for name in TRIO.iter().chain(DRAFT.iter()) {
            assert!(!r.headers().contains_key(*name), "{name} with none");
        }
    }
    let r = http.get(gw.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(
        r.headers().contains_key("retry-after"),
        "a 429 keeps Retry-After"
    );
    for name in TRIO.iter().chain(DRAFT.iter()) {
        assert!(!r.headers().contains_key(*name), "{name} with none");
    }
}
