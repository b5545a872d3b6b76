//! The CLV (customer lifetime value) calculator.
//!
//! - `GET /get_clv` with the JSON body `{"customer_id":"<32 hex>"}` ->
//!   `{"customer_id":"...","clv":[...]}`, one value per order row of the customer;
//!   unknown customer -> 422 `{"detail":"customer not found"}`; missing or malformed body -> 500
//!   with the Sanic-style JSON error the real service answered.
//! - `GET /refresh_data` -> `{"code":200,"message":"OK"}`: a day passes, so every row's
//!   days-since-last-order grows by one and every value changes (drops by 0.2).
//!
//! The model (see [`clv_value`]) is linear over the six features of an order row:
//!
//! ```text
//! clv = 2·total_revenue + 0.2·max_revenue + 2·items + 5·order_count + 0.2·gap_days
//!       − 0.2·days_since_last_order
//! ```
//!
//! floored at 0 and rounded to one decimal; the row `[5, 200.5, 301.0, 2, 108, 30.0]` gives 646.5.
//! The real service is slow (~210 ms); that comes from [`crate::Knobs::default_for`].

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use serde_json::Value;

use crate::respond;

/// The customer of the real service's README example: two rows, CLV `[244.9, 89.9]`.
pub const CLV_EXAMPLE_CUSTOMER: &str = "450e1c2cbd21687780153995f1be0c23";

/// Every customer the demo knows: [`CLV_EXAMPLE_CUSTOMER`] first, then 20 more with 1 to 4
/// order rows each, all deterministic.
pub const CLV_CUSTOMERS: &[&str] = &[
    CLV_EXAMPLE_CUSTOMER,
    "1a0b4b2deb1bf0d10cff6b3bbd1a4ddc",
    "41fe891cff8bbdcdcfe89761d8e62372",
    "9efdcecfa9c146a3c588844a4783796c",
    "eb8a276573b9abd291ba6cacf69e5e59",
    "06b730289423c11e41d9a819652443cd",
    "aa7ee336690a31a593680ed62cd9e996",
    "d2847e2fb1d74122600c4825b823d2d1",
    "b5f424b1bdee6017690449ac8ba629e7",
    "5433d424691c2d13f78f616dceb07412",
    "ce5708da34f7da02283409498dfbae59",
    "bf950a142af27ce73dd9614e574160d5",
    "717dbc56236a95c5f256181fadcd5d40",
    "2daf01e4b9aa3ffcaa7dd2c28e305f3c",
    "20275d7bbb51ca971a5b701e684e11ca",
    "c653e2c00d7fd40fec38f3cbc8055319",
    "50d800218b2e6812671e36b014ac7ea0",
    "117f045c88b13d2588e6b60e9032e85a",
    "81d4379e968f2e49bb5820dc87e20991",
    "dd5c66c11fb037ab7a82c570358b4bee",
    "cd9896614b890a7d13758022f3df22ec",
];

/// The example customer's two rows, built so that their values are exactly 244.9 and 89.9.
const EXAMPLE_ROWS: [OrderRow; 2] = [
    OrderRow::new(4, 62.5, 104.5, 3, 10, 12.0),
    OrderRow::new(2, 24.5, 39.5, 1, 15, 0.0),
];

/// One order row of a customer: the six features the model reads.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct OrderRow {
    /// Items ordered.
    pub items: u32,
    /// Largest single-order revenue.
    pub max_revenue: f64,
    /// Total revenue.
    pub total_revenue: f64,
    /// Number of orders.
    pub order_count: u32,
    /// Days since the last order (grows by one on every `/refresh_data`).
    pub days_since_last_order: u32,
    /// Average gap between orders, in days.
    pub gap_days: f64,
}

impl OrderRow {
    /// A row from its features, in the order the model lists them.
    pub const fn new(
        items: u32,
        max_revenue: f64,
        total_revenue: f64,
        order_count: u32,
        days_since_last_order: u32,
        gap_days: f64,
    ) -> Self {
        OrderRow {
            items,
            max_revenue,
            total_revenue,
            order_count,
            days_since_last_order,
            gap_days,
        }
    }
}

/// The CLV of one order row: `2·total + 0.2·max + 2·items + 5·orders + 0.2·gap − 0.2·days`,
/// floored at 0 and rounded to one decimal.
pub fn clv_value(row: &OrderRow) -> f64 {
    let raw = 2.0 * row.total_revenue
        + 0.2 * row.max_revenue
        + 2.0 * f64::from(row.items)
        + 5.0 * f64::from(row.order_count)
        + 0.2 * row.gap_days
        - 0.2 * f64::from(row.days_since_last_order);
    (raw.max(0.0) * 10.0).round() / 10.0
}

/// The in-memory data set the service computes from.
#[derive(Clone, Debug)]
pub struct ClvData {
    rows: HashMap<&'static str, Vec<OrderRow>>,
}

impl Default for ClvData {
    fn default() -> Self {
        Self::new()
    }
}

impl ClvData {
    /// The data set as loaded at start-up.
    pub fn new() -> Self {
        let rows = CLV_CUSTOMERS
            .iter()
            .map(|&customer| (customer, rows_for(customer)))
            .collect();
        ClvData { rows }
    }

    /// The CLV values of a customer, one per order row, or `None` for an unknown customer.
    pub fn clv(&self, customer_id: &str) -> Option<Vec<f64>> {
        self.rows
            .get(customer_id)
            .map(|rows| rows.iter().map(clv_value).collect())
    }

    /// The order rows of a customer.
    pub fn rows(&self, customer_id: &str) -> Option<&[OrderRow]> {
        self.rows.get(customer_id).map(Vec::as_slice)
    }

    /// What the nightly rebuild does: a day passes for every row.
    pub fn refresh(&mut self) {
        for row in self.rows.values_mut().flatten() {
            row.days_since_last_order = row.days_since_last_order.saturating_add(1);
        }
    }
}

/// Deterministic rows for a customer (fixed ones for the example customer).
fn rows_for(customer: &str) -> Vec<OrderRow> {
    if customer == CLV_EXAMPLE_CUSTOMER {
        return EXAMPLE_ROWS.to_vec();
    }
    let mut rng = SplitMix64(customer.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    }));
    let count = 1 + rng.below(4);
    (0..count)
        .map(|_| {
            let order_count = 1 + rng.below(8) as u32;
            let items = order_count + rng.below(u64::from(order_count) * 3) as u32;
            let total_tenths = 150 + rng.below(6_350);
            let max_tenths = if order_count == 1 {
                total_tenths
            } else {
                let floor = total_tenths / u64::from(order_count);
                floor + rng.below(total_tenths - floor + 1)
            };
            let gap_tenths = if order_count == 1 { 0 } else { rng.below(900) };
            OrderRow {
                items,
                max_revenue: tenths(max_tenths),
                total_revenue: tenths(total_tenths),
                order_count,
                days_since_last_order: rng.below(240) as u32,
                gap_days: tenths(gap_tenths),
            }
        })
        .collect()
}

fn tenths(value: u64) -> f64 {
    value as f64 / 10.0
}

/// A tiny PRNG with a stable sequence (independent of any crate's version).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

type SharedData = Arc<RwLock<ClvData>>;

/// The routes of the CLV calculator.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/get_clv", get(get_clv))
        .route("/refresh_data", get(refresh_data))
        .fallback(|uri: Uri| async move {
            sanic_error(
                StatusCode::NOT_FOUND,
                &format!("Requested URL {} not found", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            sanic_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("Method {method} not allowed for URL {}", uri.path()),
            )
        })
        .with_state(Arc::new(RwLock::new(ClvData::new())))
}

#[derive(Serialize)]
struct ClvResponse<'a> {
    customer_id: &'a str,
    clv: Vec<f64>,
}

async fn get_clv(State(data): State<SharedData>, body: Bytes) -> Response {
    let Some(customer_id) = customer_id_of(&body) else {
        tracing::debug!("get_clv without a valid {{\"customer_id\": ...}} body");
        return sanic_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server encountered an internal error and cannot complete your request.",
        );
    };
    let values = data
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clv(&customer_id);
    match values {
        Some(clv) => respond::json(
            StatusCode::OK,
            &ClvResponse {
                customer_id: &customer_id,
                clv,
            },
        ),
        None => respond::json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &serde_json::json!({"detail": "customer not found"}),
        ),
    }
}

/// The `customer_id` string of a `{"customer_id": "..."}` body, if the body is one.
fn customer_id_of(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(mut object) => match object.remove("customer_id")? {
            Value::String(id) => Some(id),
            _ => None,
        },
        _ => None,
    }
}

async fn refresh_data(State(data): State<SharedData>) -> Response {
    data.write()
        .unwrap_or_else(PoisonError::into_inner)
        .refresh();
    respond::json_raw(StatusCode::OK, r#"{"code":200,"message":"OK"}"#)
}

/// An error body shaped like Sanic's JSON errors.
fn sanic_error(status: StatusCode, message: &str) -> Response {
    respond::json(
        status,
        &serde_json::json!({
            "description": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "message": message,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_matches_the_documented_row() {
        assert_eq!(
            clv_value(&OrderRow::new(5, 200.5, 301.0, 2, 108, 30.0)),
            646.5
        );
    }

    #[test]
    fn example_customer_has_the_real_values() {
        let data = ClvData::new();
        assert_eq!(data.clv(CLV_EXAMPLE_CUSTOMER), Some(vec![244.9, 89.9]));
        assert_eq!(data.clv("00000000000000000000000000000000"), None);
    }

    #[test]
    fn customers_are_valid_deterministic_and_distinct() {
        assert_eq!(CLV_CUSTOMERS.len(), 21);
        let data = ClvData::new();
        let again = ClvData::new();
        for customer in CLV_CUSTOMERS {
            assert_eq!(customer.len(), 32);
            assert!(customer
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            let values = data.clv(customer).unwrap();
            assert!((1..=4).contains(&values.len()), "{customer}: {values:?}");
            assert!(values.iter().all(|v| *v > 0.0));
            assert_eq!(Some(values), again.clv(customer));
        }
        let unique: std::collections::HashSet<_> = CLV_CUSTOMERS.iter().collect();
        assert_eq!(unique.len(), CLV_CUSTOMERS.len());
    }

    #[test]
    fn refresh_changes_every_value() {
        let mut data = ClvData::new();
        let before: Vec<_> = CLV_CUSTOMERS.iter().map(|c| data.clv(c)).collect();
        data.refresh();
        assert_eq!(data.clv(CLV_EXAMPLE_CUSTOMER), Some(vec![244.7, 89.7]));
        for (customer, old) in CLV_CUSTOMERS.iter().zip(before) {
            assert_ne!(data.clv(customer), old, "{customer}");
        }
    }

    #[test]
    fn body_parsing() {
        assert_eq!(
            customer_id_of(br#"{"customer_id": "abc"}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(customer_id_of(b""), None);
        assert_eq!(customer_id_of(b"{"), None);
        assert_eq!(customer_id_of(br#"{"customer_id": 1}"#), None);
        assert_eq!(customer_id_of(br#"["x"]"#), None);
    }
}
