//! The products and orders gateway (airships for sale), with an in-memory, thread-safe store.
//!
//! - `GET /products/{id}` -> the product; `POST /products` (a product) -> `{"id":"..."}` (200,
//!   creates or replaces); `DELETE /products/{id}` -> 204 with an empty body.
//! - `POST /orders` `{"order_details":[{"product_id","price","quantity"}]}` -> `{"id":N}`; every
//!   ordered product's `in_stock` drops by the quantity (as the real products service does on
//!   `order_created`, which may take it below zero).
//! - `GET /orders/{id}` -> the order with each detail's `image` and current `product` (`null` once
//!   the product was deleted); `GET /orders` (or `/orders/`) -> the list of orders, `[]` if none.
//! - Errors: `{"error":"PRODUCT_NOT_FOUND"|"ORDER_NOT_FOUND","message":...}` with 404,
//!   `{"error":"VALIDATION_ERROR"|"BAD_REQUEST","message":...}` with 400.
//!
//! Prices are decimals with at most two places, sent as strings or numbers and answered as
//! strings with two places (`"100000.99"`).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::respond;

/// Where product images live; a detail's `image` is `IMAGE_ROOT/<product_id>.jpg`.
pub const IMAGE_ROOT: &str = "http://www.example.com/airship/images";

/// A product (an airship).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Identifier, e.g. `the_odyssey`.
    pub id: String,
    /// Display name.
    pub title: String,
    /// Passengers it carries.
    pub passenger_capacity: i64,
    /// Top speed.
    pub maximum_speed: i64,
    /// Units in stock.
    pub in_stock: i64,
}

/// The products the store starts with; `the_odyssey` is the one of the real API's examples.
pub fn initial_products() -> Vec<Product> {
    [
        ("the_odyssey", "The Odyssey", 101, 5, 10),
        ("the_enigma", "The Enigma", 38, 12, 14),
        ("the_kestrel", "The Kestrel", 12, 34, 7),
        ("the_aurora", "The Aurora", 240, 9, 3),
        ("the_meridian", "The Meridian", 64, 18, 21),
    ]
    .into_iter()
    .map(
        |(id, title, passenger_capacity, maximum_speed, in_stock)| Product {
            id: id.to_owned(),
            title: title.to_owned(),
            passenger_capacity,
            maximum_speed,
            in_stock,
        },
    )
    .collect()
}

/// One stored order line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Detail {
    id: u64,
    product_id: String,
    price_cents: i64,
    quantity: i64,
}

#[derive(Debug)]
struct Store {
    products: BTreeMap<String, Product>,
    orders: BTreeMap<u64, Vec<Detail>>,
    next_order_id: u64,
    next_detail_id: u64,
}

impl Store {
    fn new() -> Self {
        Store {
            products: initial_products()
                .into_iter()
                .map(|product| (product.id.clone(), product))
                .collect(),
            orders: BTreeMap::new(),
            next_order_id: 1,
            next_detail_id: 1,
        }
    }

    fn order_view(&self, id: u64, details: &[Detail]) -> OrderView {
        OrderView {
            id,
            order_details: details
                .iter()
                .map(|detail| DetailView {
                    id: detail.id,
                    product_id: detail.product_id.clone(),
                    price: format_price(detail.price_cents),
                    quantity: detail.quantity,
                    image: format!("{IMAGE_ROOT}/{}.jpg", detail.product_id),
                    product: self.products.get(&detail.product_id).cloned(),
                })
                .collect(),
        }
    }
}

type SharedStore = Arc<RwLock<Store>>;

#[derive(Serialize)]
struct OrderView {
    id: u64,
    order_details: Vec<DetailView>,
}

#[derive(Serialize)]
struct DetailView {
    id: u64,
    product_id: String,
    price: String,
    quantity: i64,
    image: String,
    product: Option<Product>,
}

/// The routes of the gateway.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/products", post(create_product))
        .route("/products/{id}", get(get_product).delete(delete_product))
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/", get(list_orders))
        .route("/orders/{id}", get(get_order))
        .fallback(|uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                &format!("no route for {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "BAD_REQUEST",
                "method not allowed",
            )
        })
        .with_state(Arc::new(RwLock::new(Store::new())))
}

/// An error answer of the gateway: `{"error": code, "message": ...}`.
#[derive(Debug)]
struct GatewayError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        respond::json(
            self.status,
            &serde_json::json!({"error": self.code, "message": self.message}),
        )
    }
}

fn error(status: StatusCode, code: &'static str, message: &str) -> GatewayError {
    GatewayError {
        status,
        code,
        message: message.to_owned(),
    }
}

fn product_not_found(message: String) -> GatewayError {
    error(StatusCode::NOT_FOUND, "PRODUCT_NOT_FOUND", &message)
}

fn validation_error(problems: &BTreeMap<String, String>) -> GatewayError {
    // The real gateway answers marshmallow's error dict as a string.
    let message = problems
        .iter()
        .map(|(field, problem)| format!("'{field}': ['{problem}']"))
        .collect::<Vec<_>>()
        .join(", ");
    error(
        StatusCode::BAD_REQUEST,
        "VALIDATION_ERROR",
        &format!("{{{message}}}"),
    )
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => {
            let mut problems = BTreeMap::new();
            problems.insert("_schema".to_owned(), "Invalid input type.".to_owned());
            Err(validation_error(&problems))
        }
        Err(err) => Err(error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            &format!("Invalid json: {err}"),
        )),
    }
}

const MISSING: &str = "Missing data for required field.";

fn string_field(
    object: &Map<String, Value>,
    name: &str,
    problems: &mut BTreeMap<String, String>,
) -> Option<String> {
    match object.get(name) {
        None | Some(Value::Null) => {
            problems.insert(name.to_owned(), MISSING.to_owned());
            None
        }
        Some(Value::String(text)) if !text.trim().is_empty() => Some(text.clone()),
        Some(_) => {
            problems.insert(name.to_owned(), "Not a valid string.".to_owned());
            None
        }
    }
}

fn int_field(
    object: &Map<String, Value>,
    name: &str,
    min: i64,
    problems: &mut BTreeMap<String, String>,
) -> Option<i64> {
    match object.get(name) {
        None | Some(Value::Null) => {
            problems.insert(name.to_owned(), MISSING.to_owned());
            None
        }
        Some(value) => match respond::lenient_int(value) {
            Some(number) if number >= min => Some(number),
            Some(_) => {
                problems.insert(name.to_owned(), format!("Must be at least {min}."));
                None
            }
            None => {
                problems.insert(name.to_owned(), "Not a valid integer.".to_owned());
                None
            }
        },
    }
}

/// Validates a product body like the gateway's `ProductSchema`.
fn parse_product(body: &[u8]) -> Result<Product, GatewayError> {
    let object = parse_object(body)?;
    let mut problems = BTreeMap::new();
    let id = string_field(&object, "id", &mut problems);
    let title = string_field(&object, "title", &mut problems);
    let passenger_capacity = int_field(&object, "passenger_capacity", 0, &mut problems);
    let maximum_speed = int_field(&object, "maximum_speed", 0, &mut problems);
    let in_stock = int_field(&object, "in_stock", 0, &mut problems);
    match (id, title, passenger_capacity, maximum_speed, in_stock) {
        (Some(id), Some(title), Some(passenger_capacity), Some(maximum_speed), Some(in_stock))
            if problems.is_empty() =>
        {
            Ok(Product {
                id,
                title,
                passenger_capacity,
                maximum_speed,
                in_stock,
            })
        }
        _ => Err(validation_error(&problems)),
    }
}

async fn create_product(State(store): State<SharedStore>, body: Bytes) -> Response {
    let product = match parse_product(&body) {
        Ok(product) => product,
        Err(err) => return err.into_response(),
    };
    let id = product.id.clone();
    store
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .products
        .insert(id.clone(), product);
    respond::json(StatusCode::OK, &serde_json::json!({ "id": id }))
}

async fn get_product(State(store): State<SharedStore>, Path(id): Path<String>) -> Response {
    let product = store
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .products
        .get(&id)
        .cloned();
    match product {
        Some(product) => respond::json(StatusCode::OK, &product),
        None => product_not_found(format!("Product ID {id} does not exist")).into_response(),
    }
}

async fn delete_product(State(store): State<SharedStore>, Path(id): Path<String>) -> Response {
    let removed = store
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .products
        .remove(&id);
    match removed {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => product_not_found(format!("Product ID {id} does not exist")).into_response(),
    }
}

/// A validated order line, before it gets its id.
struct NewDetail {
    product_id: String,
    price_cents: i64,
    quantity: i64,
}

fn parse_order(body: &[u8]) -> Result<Vec<NewDetail>, GatewayError> {
    let object = parse_object(body)?;
    let mut problems = BTreeMap::new();
    let lines = match object.get("order_details") {
        None | Some(Value::Null) => {
            problems.insert("order_details".to_owned(), MISSING.to_owned());
            return Err(validation_error(&problems));
        }
        Some(Value::Array(lines)) if !lines.is_empty() => lines,
        Some(Value::Array(_)) => {
            problems.insert(
                "order_details".to_owned(),
                "Shorter than minimum length 1.".to_owned(),
            );
            return Err(validation_error(&problems));
        }
        Some(_) => {
            problems.insert("order_details".to_owned(), "Invalid type.".to_owned());
            return Err(validation_error(&problems));
        }
    };
    let mut details = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        let Value::Object(line) = line else {
            problems.insert(
                format!("order_details.{index}"),
                "Invalid input type.".to_owned(),
            );
            continue;
        };
        let mut line_problems = BTreeMap::new();
        let product_id = string_field(line, "product_id", &mut line_problems);
        let quantity = int_field(line, "quantity", 1, &mut line_problems);
        let price_cents = match line.get("price") {
            None | Some(Value::Null) => {
                line_problems.insert("price".to_owned(), MISSING.to_owned());
                None
            }
            Some(value) => {
                let cents = parse_price(value);
                if cents.is_none() {
                    line_problems.insert(
                        "price".to_owned(),
                        "Not a valid price (a non-negative decimal with at most 2 places)."
                            .to_owned(),
                    );
                }
                cents
            }
        };
        for (field, problem) in line_problems {
            problems.insert(format!("order_details.{index}.{field}"), problem);
        }
        if let (Some(product_id), Some(price_cents), Some(quantity)) =
            (product_id, price_cents, quantity)
        {
            details.push(NewDetail {
                product_id,
                price_cents,
                quantity,
            });
        }
    }
    if problems.is_empty() {
        Ok(details)
    } else {
        Err(validation_error(&problems))
    }
}

/// A price as integer cents: a JSON number or a string, non-negative, at most two decimals.
fn parse_price(value: &Value) -> Option<i64> {
    let text = match value {
        Value::String(text) => text.trim().to_owned(),
        Value::Number(number) => number.to_string(),
        _ => return None,
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text.as_str(), ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 2 {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<2}").parse().ok()?
    };
    whole.checked_mul(100)?.checked_add(fraction)
}

fn format_price(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

async fn create_order(State(store): State<SharedStore>, body: Bytes) -> Response {
    let new_details = match parse_order(&body) {
        Ok(details) => details,
        Err(err) => return err.into_response(),
    };
    let mut store = store.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(missing) = new_details
        .iter()
        .find(|detail| !store.products.contains_key(&detail.product_id))
    {
        return product_not_found(format!("Product Id {}", missing.product_id)).into_response();
    }
    let order_id = store.next_order_id;
    store.next_order_id += 1;
    let mut details = Vec::with_capacity(new_details.len());
    for new in new_details {
        if let Some(product) = store.products.get_mut(&new.product_id) {
            product.in_stock = product.in_stock.saturating_sub(new.quantity);
        }
        details.push(Detail {
            id: store.next_detail_id,
            product_id: new.product_id,
            price_cents: new.price_cents,
            quantity: new.quantity,
        });
        store.next_detail_id += 1;
    }
    store.orders.insert(order_id, details);
    respond::json(StatusCode::OK, &serde_json::json!({ "id": order_id }))
}

async fn get_order(State(store): State<SharedStore>, Path(id): Path<String>) -> Response {
    let store = store.read().unwrap_or_else(PoisonError::into_inner);
    let found = id.parse::<u64>().ok().and_then(|order_id| {
        store
            .orders
            .get(&order_id)
            .map(|details| (order_id, details))
    });
    match found {
        Some((order_id, details)) => {
            respond::json(StatusCode::OK, &store.order_view(order_id, details))
        }
        None => error(
            StatusCode::NOT_FOUND,
            "ORDER_NOT_FOUND",
            &format!("Order with id {id} not found"),
        )
        .into_response(),
    }
}

async fn list_orders(State(store): State<SharedStore>) -> Response {
    let store = store.read().unwrap_or_else(PoisonError::into_inner);
    let orders: Vec<OrderView> = store
        .orders
        .iter()
        .map(|(id, details)| store.order_view(*id, details))
        .collect();
    respond::json(StatusCode::OK, &orders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_odyssey_is_as_documented() {
        let odyssey = &initial_products()[0];
        assert_eq!(
            serde_json::to_string(odyssey).unwrap(),
            r#"{"id":"the_odyssey","title":"The Odyssey","passenger_capacity":101,"maximum_speed":5,"in_stock":10}"#
        );
    }

    #[test]
    fn prices() {
        assert_eq!(
            parse_price(&serde_json::json!("100000.99")),
            Some(10_000_099)
        );
        assert_eq!(parse_price(&serde_json::json!(99.99)), Some(9_999));
        assert_eq!(parse_price(&serde_json::json!(5)), Some(500));
        assert_eq!(parse_price(&serde_json::json!("5.9")), Some(590));
        assert_eq!(format_price(590), "5.90");
        assert_eq!(format_price(10_000_099), "100000.99");
        for bad in [
            serde_json::json!("-1"),
            serde_json::json!("1.999"),
            serde_json::json!("abc"),
            serde_json::json!(".5"),
            serde_json::json!(true),
            serde_json::json!("99999999999999999999"),
        ] {
            assert_eq!(parse_price(&bad), None, "{bad}");
        }
    }

    #[test]
    fn product_validation() {
        assert!(parse_product(
            br#"{"id":"x","title":"X","passenger_capacity":1,"maximum_speed":2,"in_stock":3}"#
        )
        .is_ok());
        let err = parse_product(br#"{"id":"x"}"#).unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
        );
        assert!(err
            .message
            .contains("'title': ['Missing data for required field.']"));
        let err = parse_product(b"{nope").unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::BAD_REQUEST, "BAD_REQUEST")
        );
    }

    #[test]
    fn order_validation() {
        let ok = parse_order(
            br#"{"order_details":[{"product_id":"the_odyssey","price":"100000.99","quantity":1}]}"#,
        )
        .unwrap_or_else(|_| panic!("valid order rejected"));
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].price_cents, 10_000_099);
        for bad in [
            &br#"{}"#[..],
            br#"{"order_details":[]}"#,
            br#"{"order_details":[{"product_id":"x","price":"1","quantity":0}]}"#,
            br#"{"order_details":[7]}"#,
            br#"[]"#,
        ] {
            assert!(
                parse_order(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
