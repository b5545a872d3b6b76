//! The restaurant menu API: thirteen lunch restaurants in Uppsala and Solna.
//!
//! - `GET /api/` -> `{"entities":["restaurant"],"url":"..."}`
//! - `GET /api/restaurant` -> `{"restaurants":[...13 entries...],"url":"..."}`
//! - `GET /api/restaurant/{id}` -> `{"restaurant":{"location","map_url","menu","title","url"},"url":"..."}`,
//!   unknown id -> 404 `{"detail":"Restaurant not found"}`
//!
//! Keys come sorted like the real API; the top-level `url` is the URL of the request as received.
//! Bodies are rendered once at start-up, so a request only appends its own URL.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use serde::Serialize;

use crate::respond::{self, LocalAddr};

/// One restaurant of the demo data set.
#[derive(Clone, Copy, Debug)]
pub struct Restaurant {
    /// Short identifier used in URLs.
    pub identifier: &'static str,
    /// Display name (`title` in the detail view).
    pub name: &'static str,
    /// "Uppsala" or "Solna".
    pub region: &'static str,
    /// Latitude and longitude.
    pub coordinate: [f64; 2],
    /// Homepage (`url` in the detail view).
    pub homepage: &'static str,
    /// Where the weekly menu is published.
    pub menu_url: &'static str,
    /// OpenStreetMap link (`map_url` in the detail view).
    pub osm: &'static str,
    /// This week's dishes; empty when the restaurant published no menu.
    pub menu: &'static [&'static str],
}

/// The thirteen restaurants, sorted by identifier.
pub const RESTAURANTS: [Restaurant; 13] = [
    Restaurant {
        identifier: "bikupan",
        name: "Restaurang Bikupan",
        region: "Uppsala",
        coordinate: [59.85081, 17.63035],
        homepage: "http://www.bikupan.se/",
        menu_url: "http://www.bikupan.se/lunch/",
        osm: "https://www.openstreetmap.org/#map=19/59.85077/17.63041",
        menu: &[
            "Pannbiff med löksky och potatis",
            "Ugnsbakad lax med dillsås",
            "Halloumigryta med ris",
            "Kycklingsoppa med rotfrukter",
        ],
    },
    Restaurant {
        identifier: "dufva",
        name: "Sven Dufva",
        region: "Uppsala",
        coordinate: [59.84292, 17.64129],
        homepage: "http://svendufva.se/",
        menu_url: "https://matfest.se/veckans-lunch/",
        osm: "https://www.openstreetmap.org/#map=19/59.84298/17.64096",
        menu: &[
            "Köttbullar med gräddsås och lingon",
            "Stekt strömming med potatismos",
            "Linsbiffar med yoghurtsås",
            "Ärtsoppa och pannkakor",
        ],
    },
    Restaurant {
        identifier: "glada",
        name: "Glada Restaurangen",
        region: "Solna",
        coordinate: [59.34932, 18.02585],
        homepage: "https://gladarestaurangen.se/",
        menu_url: "https://gladarestaurangen.se/meny/",
        osm: "https://www.openstreetmap.org/#map=19/59.34929/18.02591",
        menu: &[
            "Wallenbergare med ärtor",
            "Fiskgratäng med räkor",
            "Svamprisotto",
            "Biff Lindström med kapris",
            "Tomatsoppa med surdegsbröd",
        ],
    },
    Restaurant {
        identifier: "haga",
        name: "Haga Kök & Bar",
        region: "Solna",
        coordinate: [59.35198, 18.03122],
        homepage: "https://hagakok.se/",
        menu_url: "https://hagakok.se/lunch/",
        osm: "https://www.openstreetmap.org/#map=19/59.35201/18.03117",
        menu: &[
            "Kycklingschnitzel med citron",
            "Torskrygg med brynt smör",
            "Falafel med tahinisås",
        ],
    },
    Restaurant {
        identifier: "hjulet",
        name: "Restaurang Hjulet",
        region: "Uppsala",
        coordinate: [59.84176, 17.63802],
        homepage: "http://www.restauranghjulet.se/",
        menu_url: "http://www.restauranghjulet.se/veckomeny/",
        osm: "https://www.openstreetmap.org/#map=19/59.84171/17.63795",
        menu: &[],
    },
    Restaurant {
        identifier: "hubben",
        name: "Hubben",
        region: "Uppsala",
        coordinate: [59.84355, 17.63891],
        homepage: "https://hubben-uppsala.se/",
        menu_url: "https://hubben-uppsala.se/lunchmeny/",
        osm: "https://www.openstreetmap.org/#map=19/59.84351/17.63886",
        menu: &[
            "Fläskfilé med rödvinssky",
            "Laxpudding med smält smör",
            "Böngryta med koriander",
            "Caesarsallad med kyckling",
        ],
    },
    Restaurant {
        identifier: "jons",
        name: "Jöns Kök",
        region: "Solna",
        coordinate: [59.34858, 18.02341],
        homepage: "https://jonskok.se/",
        menu_url: "https://jonskok.se/veckans-meny/",
        osm: "https://www.openstreetmap.org/#map=19/59.34861/18.02347",
        menu: &[
            "Kalops med rödbetor",
            "Sej med äggsås",
            "Pasta med grönkålspesto",
            "Raggmunk med fläsk",
        ],
    },
    Restaurant {
        identifier: "jorpes",
        name: "Café Jorpes",
        region: "Solna",
        coordinate: [59.34829, 18.02796],
        homepage: "https://cafejorpes.se/",
        menu_url: "https://cafejorpes.se/lunch/",
        osm: "https://www.openstreetmap.org/#map=19/59.34833/18.02801",
        menu: &["Räksmörgås", "Kycklingwok med nudlar", "Vegetarisk lasagne"],
    },
    Restaurant {
        identifier: "livet",
        name: "Restaurang Livet",
        region: "Solna",
        coordinate: [59.34961, 18.02512],
        homepage: "https://restauranglivet.se/",
        menu_url: "https://restauranglivet.se/dagens/",
        osm: "https://www.openstreetmap.org/#map=19/59.34965/18.02518",
        menu: &[
            "Helstekt fläskkarré med äppelchutney",
            "Gravad lax med hovmästarsås",
            "Rödbetsbiffar med fetaost",
            "Kyckling tikka masala",
            "Potatis- och purjolökssoppa",
        ],
    },
    Restaurant {
        identifier: "nanna",
        name: "Nanna Matsal",
        region: "Solna",
        coordinate: [59.34774, 18.02963],
        homepage: "https://nannamatsal.se/",
        menu_url: "https://nannamatsal.se/meny/",
        osm: "https://www.openstreetmap.org/#map=19/59.34778/18.02958",
        menu: &[],
    },
    Restaurant {
        identifier: "rudbeck",
        name: "Rudbecks Matsal",
        region: "Uppsala",
        coordinate: [59.84512, 17.62964],
        homepage: "https://rudbecksmatsal.se/",
        menu_url: "https://rudbecksmatsal.se/lunch/",
        osm: "https://www.openstreetmap.org/#map=19/59.84508/17.62971",
        menu: &[
            "Kåldolmar med gräddsås",
            "Kolja med skirat smör",
            "Chili sin carne",
            "Grekisk sallad",
            "Kycklinglårfilé med ris",
            "Morotssoppa med ingefära",
        ],
    },
    Restaurant {
        identifier: "svarta",
        name: "Svarta Räfven",
        region: "Solna",
        coordinate: [59.34683, 18.02172],
        homepage: "https://svartarafven.se/",
        menu_url: "https://svartarafven.se/lunchmeny/",
        osm: "https://www.openstreetmap.org/#map=19/59.34687/18.02166",
        menu: &[
            "Högrevsburgare med pommes",
            "Fish and chips",
            "Halloumiburgare",
        ],
    },
    Restaurant {
        identifier: "tallrik",
        name: "Tallrik Bistro",
        region: "Uppsala",
        coordinate: [59.85846, 17.64671],
        homepage: "https://tallrikbistro.se/",
        menu_url: "https://tallrikbistro.se/veckans-lunch/",
        osm: "https://www.openstreetmap.org/#map=19/59.85842/17.64677",
        menu: &[
            "Biff med bearnaisesås",
            "Stekt rödspätta med remouladsås",
            "Ratatouille med quinoa",
            "Korv Stroganoff med ris",
        ],
    },
];

/// Looks a restaurant up by identifier.
pub fn find(identifier: &str) -> Option<&'static Restaurant> {
    RESTAURANTS.iter().find(|r| r.identifier == identifier)
}

/// An entry of the list, keys in the real API's (sorted) order.
#[derive(Serialize)]
struct ListEntry<'a> {
    coordinate: [f64; 2],
    homepage: &'a str,
    identifier: &'a str,
    #[serde(rename = "menuUrl")]
    menu_url: &'a str,
    name: &'a str,
    osm: &'a str,
    region: &'a str,
}

/// The detail view, keys in the real API's (sorted) order.
#[derive(Serialize)]
struct Detail<'a> {
    location: &'a str,
    map_url: &'a str,
    menu: Vec<Dish<'a>>,
    title: &'a str,
    url: &'a str,
}

#[derive(Serialize)]
struct Dish<'a> {
    dish: &'a str,
}

/// Bodies rendered once, each missing only its trailing `"url":"..."}`.
struct Rendered {
    list_prefix: String,
    detail_prefixes: HashMap<&'static str, String>,
}

impl Rendered {
    fn new() -> Result<Self, serde_json::Error> {
        let entries: Vec<ListEntry<'_>> = RESTAURANTS
            .iter()
            .map(|r| ListEntry {
                coordinate: r.coordinate,
                homepage: r.homepage,
                identifier: r.identifier,
                menu_url: r.menu_url,
                name: r.name,
                osm: r.osm,
                region: r.region,
            })
            .collect();
        let list_prefix = format!(
            r#"{{"restaurants":{},"url":"#,
            serde_json::to_string(&entries)?
        );
        let mut detail_prefixes = HashMap::new();
        for r in &RESTAURANTS {
            let detail = Detail {
                location: r.region,
                map_url: r.osm,
                menu: r.menu.iter().map(|dish| Dish { dish }).collect(),
                title: r.name,
                url: r.homepage,
            };
            let prefix = format!(
                r#"{{"restaurant":{},"url":"#,
                serde_json::to_string(&detail)?
            );
            detail_prefixes.insert(r.identifier, prefix);
        }
        Ok(Rendered {
            list_prefix,
            detail_prefixes,
        })
    }
}

/// Appends the JSON-encoded `url` and the closing brace to a pre-rendered prefix.
fn finish(prefix: &str, url: &str) -> Response {
    let mut body = String::with_capacity(prefix.len() + url.len() + 8);
    body.push_str(prefix);
    match serde_json::to_string(url) {
        Ok(encoded) => body.push_str(&encoded),
        Err(err) => return respond::internal_error(&format!("cannot encode url: {err}")),
    }
    body.push('}');
    respond::json_raw(StatusCode::OK, body)
}

/// The routes of the restaurant API.
pub(crate) fn router() -> Result<Router, serde_json::Error> {
    let rendered = Arc::new(Rendered::new()?);
    let router = Router::new()
        .route("/api/", get(index))
        .route("/api/restaurant", get(list))
        .route("/api/restaurant/{id}", get(detail))
        .fallback(|| async { detail_error(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            detail_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .with_state(rendered);
    Ok(router)
}

fn detail_error(status: StatusCode, detail: &str) -> Response {
    respond::json(status, &serde_json::json!({ "detail": detail }))
}

fn url_of(headers: &HeaderMap, uri: &Uri, local: Option<Extension<LocalAddr>>) -> String {
    respond::request_url(headers, uri, local.map(|Extension(LocalAddr(addr))| addr))
}

async fn index(headers: HeaderMap, uri: Uri, local: Option<Extension<LocalAddr>>) -> Response {
    respond::json(
        StatusCode::OK,
        &serde_json::json!({"entities": ["restaurant"], "url": url_of(&headers, &uri, local)}),
    )
}

async fn list(
    State(rendered): State<Arc<Rendered>>,
    headers: HeaderMap,
    uri: Uri,
    local: Option<Extension<LocalAddr>>,
) -> Response {
    finish(&rendered.list_prefix, &url_of(&headers, &uri, local))
}

async fn detail(
    State(rendered): State<Arc<Rendered>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    local: Option<Extension<LocalAddr>>,
) -> Response {
    match rendered.detail_prefixes.get(id.as_str()) {
        Some(prefix) => finish(prefix, &url_of(&headers, &uri, local)),
        None => detail_error(StatusCode::NOT_FOUND, "Restaurant not found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirteen_sorted_restaurants_in_two_regions() {
        let ids: Vec<_> = RESTAURANTS.iter().map(|r| r.identifier).collect();
        assert_eq!(
            ids,
            [
                "bikupan", "dufva", "glada", "haga", "hjulet", "hubben", "jons", "jorpes", "livet",
                "nanna", "rudbeck", "svarta", "tallrik"
            ]
        );
        let uppsala = RESTAURANTS.iter().filter(|r| r.region == "Uppsala").count();
        let solna = RESTAURANTS.iter().filter(|r| r.region == "Solna").count();
        assert_eq!((uppsala, solna), (6, 7));
        assert_eq!(find("bikupan").map(|r| r.name), Some("Restaurang Bikupan"));
        let without_menu: Vec<_> = RESTAURANTS
            .iter()
            .filter(|r| r.menu.is_empty())
            .map(|r| r.identifier)
            .collect();
        assert_eq!(without_menu, ["hjulet", "nanna"]);
        assert!(RESTAURANTS
            .iter()
            .filter(|r| !r.menu.is_empty())
            .all(|r| (3..=6).contains(&r.menu.len())));
    }

    #[test]
    fn dufva_detail_matches_the_real_shape() {
        let rendered = Rendered::new().unwrap();
        let url = "http://127.0.0.1:9001/api/restaurant/dufva";
        let body = format!("{}\"{url}\"}}", rendered.detail_prefixes["dufva"]);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["url"], url);
        assert_eq!(value["restaurant"]["title"], "Sven Dufva");
        assert_eq!(value["restaurant"]["location"], "Uppsala");
        assert_eq!(value["restaurant"]["url"], "http://svendufva.se/");
        assert_eq!(
            value["restaurant"]["map_url"],
            "https://www.openstreetmap.org/#map=19/59.84298/17.64096"
        );
        assert!(body.starts_with(r#"{"restaurant":{"location":"Uppsala","map_url":"#));
        // "About 380 bytes" for a typical restaurant.
        assert!(
            (340..=420).contains(&body.len()),
            "{} bytes: {body}",
            body.len()
        );
    }

    #[test]
    fn list_entry_matches_the_real_shape() {
        let rendered = Rendered::new().unwrap();
        let body = format!("{}\"http://h/api/restaurant\"}}", rendered.list_prefix);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        let dufva = &value["restaurants"][1];
        assert_eq!(
            serde_json::to_string(dufva).unwrap(),
            r#"{"coordinate":[59.84292,17.64129],"homepage":"http://svendufva.se/","identifier":"dufva","menuUrl":"https://matfest.se/veckans-lunch/","name":"Sven Dufva","osm":"https://www.openstreetmap.org/#map=19/59.84298/17.64096","region":"Uppsala"}"#
        );
    }
}
