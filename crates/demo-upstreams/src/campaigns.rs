//! Banner campaigns: an HTML page showing one banner, rotated per client.
//!
//! - `GET /campaigns/{id}/` (ids 1–50) -> a ~190-byte `text/html` page with one
//!   `<img src="/campaigns/banners/image_<n>.png">`. The banner is picked at random among the
//!   top banners of the current quarter of the hour for that campaign ([`candidates`], 5 to 10
//!   of them), never the one this client saw last, which is remembered in the cookie
//!   `last_banner_<id>=<n>` (`Set-Cookie: last_banner_<id>=<n>; Path=/`, plus `Vary: Cookie`).
//!   Unknown campaign -> 404 `text/html`. `GET /campaigns/{id}` redirects (301) to the slash form.
//! - `GET /campaigns/banners/image_<n>.png` (n in 1–500) -> a tiny PNG.
//!
//! So the page depends on the client's cookie and on the time: a cache must not hand one
//! client's page to another.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Path;
use axum::http::header::{COOKIE, LOCATION, SET_COOKIE, VARY};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use rand::seq::IndexedRandom as _;

use crate::respond;

/// Campaign ids are `1..=CAMPAIGN_COUNT`.
pub const CAMPAIGN_COUNT: u32 = 50;

/// Banner ids are `1..=BANNER_COUNT`.
pub const BANNER_COUNT: u32 = 500;

/// Length of a period, in seconds: the top banners change every quarter of an hour.
pub const PERIOD_SECS: u64 = 15 * 60;

/// A 1×1 PNG served for every banner.
const BANNER_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0x78, 0x91, 0x25, 0x03,
    0x00, 0x03, 0xac, 0x01, 0x6f, 0x0a, 0x5b, 0xe9, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// Django's production 404 page.
const NOT_FOUND_HTML: &str = "<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n</body>\n</html>\n";

/// The period (quarter of the hour, 0–3) at `unix_secs`, as the real service computed it.
pub fn period_at(unix_secs: u64) -> u8 {
    // Always below 4, so the cast cannot truncate.
    ((unix_secs % 3_600) / PERIOD_SECS) as u8
}

/// The current period.
pub fn current_period() -> u8 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    period_at(now)
}

/// The top banners of a campaign in a period: 5 to 10 distinct banner ids, deterministic.
pub fn candidates(campaign: u32, period: u8) -> Vec<u32> {
    let mut state = u64::from(campaign) << 8 | u64::from(period);
    let mut next = move || {
        // SplitMix64: a stable sequence, independent of any crate's version.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let count = 5 + (next() % 6) as usize;
    let mut banners = Vec::with_capacity(count);
    while banners.len() < count {
        let banner = 1 + (next() % u64::from(BANNER_COUNT)) as u32;
        if !banners.contains(&banner) {
            banners.push(banner);
        }
    }
    banners
}

/// Picks a banner among `candidates`, avoiding `last` when there is any other choice.
pub fn pick(candidates: &[u32], last: Option<u32>) -> Option<u32> {
    let fresh: Vec<u32> = candidates
        .iter()
        .copied()
        .filter(|banner| Some(*banner) != last)
        .collect();
    let pool = if fresh.is_empty() { candidates } else { &fresh };
    pool.choose(&mut rand::rng()).copied()
}

/// The page showing `banner` for `campaign`.
pub fn page(campaign: u32, banner: u32) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Banner campaign {campaign}</title>\n</head>\n<body>\n<img src=\"/campaigns/banners/image_{banner}.png\" alt=\"Banner {banner}\">\n</body>\n</html>\n"
    )
}

/// The banner remembered in the request's `last_banner_<campaign>` cookie.
fn last_banner(headers: &HeaderMap, campaign: u32) -> Option<u32> {
    let name = format!("last_banner_{campaign}");
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|cookie| cookie.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().trim_matches('"').parse().ok())
}

fn campaign_id(raw: &str) -> Option<u32> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse()
        .ok()
        .filter(|id| (1..=CAMPAIGN_COUNT).contains(id))
}

fn not_found() -> Response {
    respond::html(StatusCode::NOT_FOUND, NOT_FOUND_HTML)
}

/// The routes of the campaigns service.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/campaigns/{id}/", get(campaign_page))
        .route("/campaigns/{id}", get(add_slash))
        .route("/campaigns/banners/{file}", get(banner_image))
        .fallback(|| async { not_found() })
        .method_not_allowed_fallback(|| async {
            respond::html(
                StatusCode::METHOD_NOT_ALLOWED,
                "<h1>Method Not Allowed (405)</h1>\n",
            )
        })
}

async fn campaign_page(Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(campaign) = campaign_id(&id) else {
        return not_found();
    };
    let pool = candidates(campaign, current_period());
    let Some(banner) = pick(&pool, last_banner(&headers, campaign)) else {
        return not_found();
    };
    let mut response = respond::html(StatusCode::OK, page(campaign, banner));
    let headers = response.headers_mut();
    headers.insert(VARY, HeaderValue::from_static("Cookie"));
    if let Ok(cookie) = HeaderValue::from_str(&format!("last_banner_{campaign}={banner}; Path=/")) {
        headers.insert(SET_COOKIE, cookie);
    }
    response
}

/// Django's `APPEND_SLASH`: `/campaigns/7` -> 301 `/campaigns/7/`.
async fn add_slash(Path(id): Path<String>) -> Response {
    let Some(campaign) = campaign_id(&id) else {
        return not_found();
    };
    let mut response = respond::html(StatusCode::MOVED_PERMANENTLY, "");
    if let Ok(location) = HeaderValue::from_str(&format!("/campaigns/{campaign}/")) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

async fn banner_image(Path(file): Path<String>) -> Response {
    let banner = file
        .strip_prefix("image_")
        .and_then(|rest| rest.strip_suffix(".png"))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| (1..=BANNER_COUNT).contains(n));
    match banner {
        Some(_) => respond::with_type(StatusCode::OK, "image/png", BANNER_PNG),
        None => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_quarters_of_the_hour() {
        assert_eq!(period_at(0), 0);
        assert_eq!(period_at(899), 0);
        assert_eq!(period_at(900), 1);
        assert_eq!(period_at(3_599), 3);
        assert_eq!(period_at(3_600), 0);
    }

    #[test]
    fn candidates_are_deterministic_distinct_and_in_range() {
        for campaign in 1..=CAMPAIGN_COUNT {
            for period in 0..4 {
                let banners = candidates(campaign, period);
                assert!((5..=10).contains(&banners.len()));
                assert_eq!(banners, candidates(campaign, period));
                let mut sorted = banners.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), banners.len());
                assert!(banners.iter().all(|b| (1..=BANNER_COUNT).contains(b)));
            }
        }
        assert_ne!(candidates(1, 0), candidates(1, 1));
        assert_ne!(candidates(1, 0), candidates(2, 0));
    }

    #[test]
    fn never_the_last_banner() {
        let pool = candidates(1, 0);
        for _ in 0..200 {
            let picked = pick(&pool, Some(pool[0])).unwrap();
            assert_ne!(picked, pool[0]);
            assert!(pool.contains(&picked));
        }
        assert_eq!(pick(&[7], Some(7)), Some(7));
        assert_eq!(pick(&[], None), None);
    }

    #[test]
    fn page_is_about_190_bytes() {
        let len = page(1, 123).len();
        assert_eq!(len, 189);
    }

    #[test]
    fn cookie_parsing() {
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_static("sessionid=abc; last_banner_1=42; last_banner_10=7"),
        );
        assert_eq!(last_banner(&headers, 1), Some(42));
        assert_eq!(last_banner(&headers, 10), Some(7));
        assert_eq!(last_banner(&headers, 2), None);
    }

    #[test]
    fn campaign_ids() {
        assert_eq!(campaign_id("1"), Some(1));
        assert_eq!(campaign_id("50"), Some(50));
        for bad in ["0", "51", "", "-1", "+1", "abc", "99999999999"] {
            assert_eq!(campaign_id(bad), None, "{bad}");
        }
    }
}
