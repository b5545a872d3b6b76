//! The voucher API (a FastAPI service): which voucher value to offer a Peruvian customer.
//!
//! - `GET /healthz` -> `{"status":"ok"}`
//! - `POST /api/v1/voucher` with `customer_id` (int), `country_code` (`"Peru"`),
//!   `last_order_ts` and `first_order_ts` (`"YYYY-MM-DD HH:MM:SS"`), `total_orders` (int >= 0) and
//!   `segment_name` (`"frequent_segment"` | `"recency_segment"`) -> `{"voucher":<int>}`.
//!   Invalid bodies -> 422 `{"detail":[{"loc":["body","<field>"],"msg":"...","type":"..."}]}`
//!   listing every bad field, like FastAPI/pydantic.
//!
//! The answer is a pure function of the body (no wall clock), see [`voucher_for`]:
//!
//! | segment            | bucket                                   | voucher |
//! |--------------------|------------------------------------------|---------|
//! | `frequent_segment` | total_orders 0–4                         | 4400    |
//! |                    | 5–13                                     | 3520    |
//! |                    | 14–37                                    | 2640    |
//! |                    | 38+                                      | 1760    |
//! | `recency_segment`  | days from last_order_ts to [`REFERENCE_DATE`]: < 30 | 0 |
//! |                    | 30–60                                    | 1760    |
//! |                    | 61–90                                    | 2640    |
//! |                    | 91–120                                   | 3520    |
//! |                    | 121–180                                  | 4400    |
//! |                    | 181+                                     | 5280    |

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::respond;

/// The fixed "today" recency is measured against (the data set's snapshot date).
pub const REFERENCE_DATE: &str = "2022-01-01 00:00:00";

/// `frequent_segment`: inclusive lower bound of `total_orders` and the voucher from there on.
pub const FREQUENT_BUCKETS: [(u64, u64); 4] = [(0, 4400), (5, 3520), (14, 2640), (38, 1760)];

/// `recency_segment`: inclusive lower bound of the days since the last order and the voucher.
pub const RECENCY_BUCKETS: [(u64, u64); 6] = [
    (0, 0),
    (30, 1760),
    (61, 2640),
    (91, 3520),
    (121, 4400),
    (181, 5280),
];

/// The segment a voucher is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Bucketed on `total_orders`.
    Frequent,
    /// Bucketed on the days since `last_order_ts`.
    Recency,
}

/// A validated voucher request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoucherRequest {
    /// Customer id.
    pub customer_id: i64,
    /// Always "Peru".
    pub country_code: String,
    /// Seconds since the Unix epoch of the last order.
    pub last_order_ts: i64,
    /// Seconds since the Unix epoch of the first order.
    pub first_order_ts: i64,
    /// Number of orders so far.
    pub total_orders: u64,
    /// Which segment to answer for.
    pub segment: Segment,
}

/// One entry of a FastAPI validation error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Where: `["body", "<field>"]`.
    pub loc: Vec<String>,
    /// What is wrong.
    pub msg: String,
    /// Pydantic's error type, e.g. `value_error.missing`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl FieldError {
    fn new(field: &str, msg: impl Into<String>, kind: &str) -> Self {
        let mut loc = vec!["body".to_owned()];
        if !field.is_empty() {
            loc.push(field.to_owned());
        }
        FieldError {
            loc,
            msg: msg.into(),
            kind: kind.to_owned(),
        }
    }
}

/// The voucher value for a validated request.
pub fn voucher_for(request: &VoucherRequest) -> u64 {
    match request.segment {
        Segment::Frequent => bucket(&FREQUENT_BUCKETS, request.total_orders),
        Segment::Recency => bucket(&RECENCY_BUCKETS, recency_days(request.last_order_ts)),
    }
}

/// Whole days from `last_order_ts` to [`REFERENCE_DATE`] (0 for orders after it).
pub fn recency_days(last_order_ts: i64) -> u64 {
    let reference = parse_timestamp(REFERENCE_DATE).unwrap_or(0);
    u64::try_from((reference - last_order_ts).div_euclid(86_400)).unwrap_or(0)
}

fn bucket(buckets: &[(u64, u64)], value: u64) -> u64 {
    buckets
        .iter()
        .rev()
        .find(|(from, _)| value >= *from)
        .map_or(0, |(_, voucher)| *voucher)
}

/// Validates a request body, collecting every problem like pydantic does.
pub fn parse_request(body: &[u8]) -> Result<VoucherRequest, Vec<FieldError>> {
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        vec![FieldError::new(
            "",
            format!("invalid JSON: {err}"),
            "value_error.jsondecode",
        )]
    })?;
    let Value::Object(object) = value else {
        return Err(vec![FieldError::new(
            "",
            "value is not a valid dict",
            "type_error.dict",
        )]);
    };
    let mut errors = Vec::new();
    let customer_id = int_field(&object, "customer_id", &mut errors);
    let country_code = field(&object, "country_code", &mut errors).and_then(|value| match value {
        Value::String(code) if code == "Peru" => Some(code.clone()),
        Value::String(code) => {
            errors.push(FieldError::new(
                "country_code",
                format!("country_code must be 'Peru', got '{code}'"),
                "value_error",
            ));
            None
        }
        _ => {
            errors.push(FieldError::new(
                "country_code",
                "str type expected",
                "type_error.str",
            ));
            None
        }
    });
    let last_order_ts = timestamp_field(&object, "last_order_ts", &mut errors);
    let first_order_ts = timestamp_field(&object, "first_order_ts", &mut errors);
    let total_orders = int_field(&object, "total_orders", &mut errors).and_then(|total| {
        let total = u64::try_from(total).ok();
        if total.is_none() {
            errors.push(FieldError::new(
                "total_orders",
                "ensure this value is greater than or equal to 0",
                "value_error.number.not_ge",
            ));
        }
        total
    });
    let segment = field(&object, "segment_name", &mut errors).and_then(|value| {
        match value.as_str() {
            Some("frequent_segment") => Some(Segment::Frequent),
            Some("recency_segment") => Some(Segment::Recency),
            _ => {
                errors.push(FieldError::new(
                    "segment_name",
                    "value is not a valid enumeration member; permitted: 'frequent_segment', 'recency_segment'",
                    "type_error.enum",
                ));
                None
            }
        }
    });
    if let (Some(first), Some(last)) = (first_order_ts, last_order_ts) {
        if first > last {
            errors.push(FieldError::new(
                "first_order_ts",
                "first_order_ts must not be after last_order_ts",
                "value_error",
            ));
        }
    }
    match (
        customer_id,
        country_code,
        last_order_ts,
        first_order_ts,
        total_orders,
        segment,
    ) {
        (
            Some(customer_id),
            Some(country_code),
            Some(last),
            Some(first),
            Some(total),
            Some(segment),
        ) if errors.is_empty() => Ok(VoucherRequest {
            customer_id,
            country_code,
            last_order_ts: last,
            first_order_ts: first,
            total_orders: total,
            segment,
        }),
        _ => Err(errors),
    }
}

fn field<'a>(
    object: &'a Map<String, Value>,
    name: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a Value> {
    match object.get(name) {
        Some(Value::Null) | None => {
            errors.push(FieldError::new(
                name,
                "field required",
                "value_error.missing",
            ));
            None
        }
        Some(value) => Some(value),
    }
}

fn int_field(object: &Map<String, Value>, name: &str, errors: &mut Vec<FieldError>) -> Option<i64> {
    let value = field(object, name, errors)?;
    let parsed = respond::lenient_int(value);
    if parsed.is_none() {
        errors.push(FieldError::new(
            name,
            "value is not a valid integer",
            "type_error.integer",
        ));
    }
    parsed
}

fn timestamp_field(
    object: &Map<String, Value>,
    name: &str,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    let value = field(object, name, errors)?;
    let parsed = value.as_str().and_then(parse_timestamp);
    if parsed.is_none() {
        errors.push(FieldError::new(
            name,
            "invalid datetime format",
            "value_error.datetime",
        ));
    }
    parsed
}

/// Parses `YYYY-MM-DD HH:MM:SS` (or with a `T`) as UTC seconds since the Unix epoch.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() != 19
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b' ' | b'T')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The routes of the voucher API.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/voucher", post(voucher))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
}

fn detail(status: StatusCode, detail: &str) -> Response {
    respond::json(status, &serde_json::json!({ "detail": detail }))
}

async fn healthz() -> Response {
    respond::json_raw(StatusCode::OK, r#"{"status":"ok"}"#)
}

async fn voucher(body: Bytes) -> Response {
    match parse_request(&body) {
        Ok(request) => respond::json(
            StatusCode::OK,
            &serde_json::json!({ "voucher": voucher_for(&request) }),
        ),
        Err(errors) => respond::json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &serde_json::json!({ "detail": errors }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"customer_id": 123, "country_code": "Peru","last_order_ts": "2021-10-26 00:00:00", "first_order_ts": "2021-10-26 00:00:00", "total_orders": 14, "segment_name": "frequent_segment"}"#;

    fn request(segment: Segment, total_orders: u64, last_order: &str) -> VoucherRequest {
        let ts = parse_timestamp(last_order).unwrap();
        VoucherRequest {
            customer_id: 1,
            country_code: "Peru".into(),
            last_order_ts: ts,
            first_order_ts: ts,
            total_orders,
            segment,
        }
    }

    #[test]
    fn readme_example_gives_2640() {
        let parsed = parse_request(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(voucher_for(&parsed), 2640);
    }

    #[test]
    fn frequent_buckets() {
        for (orders, expected) in [
            (0, 4400),
            (4, 4400),
            (5, 3520),
            (13, 3520),
            (14, 2640),
            (37, 2640),
            (38, 1760),
            (1_000, 1760),
        ] {
            let req = request(Segment::Frequent, orders, "2021-10-26 00:00:00");
            assert_eq!(voucher_for(&req), expected, "{orders} orders");
        }
    }

    #[test]
    fn recency_buckets() {
        for (last_order, days, expected) in [
            ("2022-03-01 00:00:00", 0, 0),
            ("2021-12-31 12:00:00", 0, 0),
            ("2021-12-03 00:00:00", 29, 0),
            ("2021-12-02 00:00:00", 30, 1760),
            ("2021-11-01 00:00:00", 61, 2640),
            ("2021-10-26 00:00:00", 67, 2640),
            ("2021-10-02 00:00:00", 91, 3520),
            ("2021-07-05 00:00:00", 180, 4400),
            ("2021-07-04 00:00:00", 181, 5280),
            ("2019-01-01 00:00:00", 1096, 5280),
        ] {
            let req = request(Segment::Recency, 3, last_order);
            assert_eq!(recency_days(req.last_order_ts), days, "{last_order}");
            assert_eq!(voucher_for(&req), expected, "{last_order}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_timestamp("2021-10-26 00:00:00"), Some(1_635_206_400));
        assert_eq!(parse_timestamp("2021-10-26T01:02:03"), Some(1_635_210_123));
        assert_eq!(parse_timestamp("2020-02-29 00:00:00"), Some(1_582_934_400));
        for bad in [
            "2021-02-29 00:00:00",
            "2021-13-01 00:00:00",
            "2021-10-26",
            "2021-10-26 24:00:00",
            "2021-1a-26 00:00:00",
            "+021-10-26 00:00:00",
            "2021-10-26 00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_bad_field_is_listed() {
        let errors = parse_request(
            br#"{"customer_id":"x","country_code":"Chile","last_order_ts":"yesterday","total_orders":-1,"segment_name":"vip"}"#,
        )
        .unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.loc[1].as_str()).collect();
        assert_eq!(
            fields,
            [
                "customer_id",
                "country_code",
                "last_order_ts",
                "first_order_ts",
                "total_orders",
                "segment_name"
            ]
        );
        assert_eq!(errors[3].kind, "value_error.missing");
        assert_eq!(errors[1].kind, "value_error");
    }

    #[test]
    fn bad_bodies() {
        assert_eq!(
            parse_request(b"").unwrap_err()[0].kind,
            "value_error.jsondecode"
        );
        assert_eq!(
            parse_request(b"[1]").unwrap_err()[0].kind,
            "type_error.dict"
        );
        let swapped = EXAMPLE.replace(
            r#""first_order_ts": "2021-10-26 00:00:00""#,
            r#""first_order_ts": "2021-10-27 00:00:00""#,
        );
        let errors = parse_request(swapped.as_bytes()).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].loc, ["body", "first_order_ts"]);
    }
}
