//! The `restaurant-menu` command as a real process: against a gateway that is not listening,
//! and against a small stand-in for the gateway's `/menu/{name}` and `/restaurants` routes that
//! answers with fixed JSON in the shapes of the aggregation contract.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_restaurant-menu");

/// (identifier, name, region, homepage, menuUrl, osm) of the thirteen restaurants.
const RESTAURANTS: [(&str, &str, &str, &str, &str, &str); 13] = [
    (
        "bikupan",
        "Restaurang Bikupan",
        "Uppsala",
        "http://www.bikupan.se/",
        "http://www.bikupan.se/lunch/",
        "https://www.openstreetmap.org/#map=19/59.85077/17.63041",
    ),
    (
        "dufva",
        "Sven Dufva",
        "Uppsala",
        "http://svendufva.se/",
        "https://matfest.se/veckans-lunch/",
        "https://www.openstreetmap.org/#map=19/59.84298/17.64096",
    ),
    (
        "glada",
        "Glada Restaurangen",
        "Solna",
        "https://gladarestaurangen.se/",
        "https://gladarestaurangen.se/meny/",
        "https://www.openstreetmap.org/#map=19/59.34929/18.02591",
    ),
    (
        "haga",
        "Haga Kök & Bar",
        "Solna",
        "https://hagakok.se/",
        "https://hagakok.se/lunch/",
        "https://www.openstreetmap.org/#map=19/59.35201/18.03117",
    ),
    (
        "hjulet",
        "Restaurang Hjulet",
        "Uppsala",
        "http://www.restauranghjulet.se/",
        "http://www.restauranghjulet.se/veckomeny/",
        "https://www.openstreetmap.org/#map=19/59.84171/17.63795",
    ),
    (
        "hubben",
        "Hubben",
        "Uppsala",
        "https://hubben-uppsala.se/",
        "https://hubben-uppsala.se/lunchmeny/",
        "https://www.openstreetmap.org/#map=19/59.84351/17.63886",
    ),
    (
        "jons",
        "Jöns Kök",
        "Solna",
        "https://jonskok.se/",
        "https://jonskok.se/veckans-meny/",
        "https://www.openstreetmap.org/#map=19/59.34861/18.02347",
    ),
    (
        "jorpes",
        "Café Jorpes",
        "Solna",
        "https://cafejorpes.se/",
        "https://cafejorpes.se/lunch/",
        "https://www.openstreetmap.org/#map=19/59.34833/18.02801",
    ),
    (
        "livet",
        "Restaurang Livet",
        "Solna",
        "https://restauranglivet.se/",
        "https://restauranglivet.se/dagens/",
        "https://www.openstreetmap.org/#map=19/59.34965/18.02518",
    ),
    (
        "nanna",
        "Nanna Matsal",
        "Solna",
        "https://nannamatsal.se/",
        "https://nannamatsal.se/meny/",
        "https://www.openstreetmap.org/#map=19/59.34778/18.02958",
    ),
    (
        "rudbeck",
        "Rudbecks Matsal",
        "Uppsala",
        "https://rudbecksmatsal.se/",
        "https://rudbecksmatsal.se/lunch/",
        "https://www.openstreetmap.org/#map=19/59.84508/17.62971",
    ),
    (
        "svarta",
        "Svarta Räfven",
        "Solna",
        "https://svartarafven.se/",
        "https://svartarafven.se/lunchmeny/",
        "https://www.openstreetmap.org/#map=19/59.34687/18.02166",
    ),
    (
        "tallrik",
        "Tallrik Bistro",
        "Uppsala",
        "https://tallrikbistro.se/",
        "https://tallrikbistro.se/veckans-lunch/",
        "https://www.openstreetmap.org/#map=19/59.85842/17.64677",
    ),
];

const BIKUPAN_DISHES: [&str; 4] = [
    "Pannbiff med löksky och potatis",
    "Ugnsbakad lax med dillsås",
    "Halloumigryta med ris",
    "Kycklingsoppa med rotfrukter",
];

/// What a stand-in answers for a request path: status and JSON body, or `None` to never answer.
type Handler = fn(&str) -> Option<(u16, Value)>;

/// A stand-in gateway on a loopback port, stopped when dropped.
struct StandIn {
    addr: SocketAddr,
    /// Request targets in arrival order, as sent (still percent-encoded).
    requests: Arc<Mutex<Vec<String>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl StandIn {
    fn start(handler: Handler) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let seen = requests.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            tokio::spawn(answer(stream, handler, seen.clone()));
                        }
                    }
                }
            });
        });
        StandIn {
            addr,
            requests,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads one request head, records its target and answers it (`Connection: close`).
async fn answer(
    mut stream: tokio::net::TcpStream,
    handler: Handler,
    seen: Arc<Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (request_line.next().unwrap_or(""), request_line.next());
    let target = target.unwrap_or("").to_string();
    seen.lock().unwrap().push(target.clone());
    let (status, body) = if method != "GET" {
        (
            405,
            json!({"error": "method_not_allowed", "message": "only GET"}),
        )
    } else {
        match handler(&target) {
            Some(answer) => answer,
            None => {
                // Hold the connection open without answering until the client gives up.
                let _ = stream.read(&mut buf).await;
                return;
            }
        }
    };
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        _ => "Other",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The gateway's two routes as the aggregation contract describes them.
fn contract(target: &str) -> Option<(u16, Value)> {
    let names: Vec<&str> = RESTAURANTS.iter().map(|r| r.1).collect();
    if target == "/restaurants" {
        let list: Vec<Value> = RESTAURANTS
            .iter()
            .map(|(identifier, name, region, homepage, menu_url, osm)| {
                json!({"homepage": homepage, "identifier": identifier, "menuUrl": menu_url,
                       "name": name, "osm": osm, "region": region})
            })
            .collect();
        return Some((
            200,
            json!({"restaurants": list, "url": "http://menus.test/api/restaurant"}),
        ));
    }
    let Some(encoded) = target.strip_prefix("/menu/") else {
        return Some((
            404,
            json!({"error": "not_found", "message": format!("no route matches {target}")}),
        ));
    };
    let wanted = percent_decode_str(encoded)
        .decode_utf8_lossy()
        .to_lowercase();
    let Some(&(identifier, name, region, homepage, menu_url, _)) =
        RESTAURANTS.iter().find(|r| r.1.to_lowercase() == wanted)
    else {
        return Some((
            404,
            json!({"error": "not_found",
                   "message": format!("no entry of /restaurants has name {:?}", wanted),
                   "names": names}),
        ));
    };
    let dishes: &[&str] = if identifier == "bikupan" {
        &BIKUPAN_DISHES
    } else {
        &[]
    };
    Some((
        200,
        json!({"name": name, "region": region, "dishes": dishes, "menu_url": menu_url,
               "url": homepage, "map_url": format!("https://maps.test/{identifier}")}),
    ))
}

/// A gateway whose restaurant upstream is down.
fn upstream_down(_: &str) -> Option<(u16, Value)> {
    Some((
        502,
        json!({"error": "upstream_unreachable",
               "message": "upstream restaurants could not be reached: connection refused"}),
    ))
}

/// A gateway without the aggregation routes: every path is unknown.
fn no_routes(target: &str) -> Option<(u16, Value)> {
    Some((
        404,
        json!({"error": "not_found", "message": format!("no route matches {target}")}),
    ))
}

/// A gateway that accepts connections and never answers.
fn silent(_: &str) -> Option<(u16, Value)> {
    None
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run restaurant-menu")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// The numbered list of all thirteen names, as printed.
fn numbered_names() -> String {
    RESTAURANTS
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{}. {}\n", i + 1, r.1))
        .collect()
}

#[test]
fn an_unreachable_gateway_fails_with_a_clear_message() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let gateway = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let out = run(&["Restaurang Bikupan", "--gateway", &gateway]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach the gateway at {gateway}: ")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The list (no name) fails the same way.
    let out = run(&["--gateway", &gateway]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("cannot reach the gateway at"));
}

#[test]
fn help_and_version() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = stdout(&out);
    for needle in ["Usage: restaurant-menu", "[NAME]", "--gateway", "--timeout"] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    assert!(help.contains("http://127.0.0.1:8080"), "{help}");

    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).starts_with("restaurant-menu "), "{out:?}");

    // A gateway URL that is not http:// is a usage error.
    let out = run(&["--gateway", "ftp://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("only http://"), "{out:?}");
}

#[test]
fn a_known_name_prints_dishes_and_links() {
    let gateway = StandIn::start(contract);
    let out = run(&["Restaurang Bikupan", "--gateway", &gateway.url()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let expected = "Restaurang Bikupan (Uppsala)\n\
                    \x20 - Pannbiff med löksky och potatis\n\
                    \x20 - Ugnsbakad lax med dillsås\n\
                    \x20 - Halloumigryta med ris\n\
                    \x20 - Kycklingsoppa med rotfrukter\n\
                    Menu: http://www.bikupan.se/lunch/\n\
                    Homepage: http://www.bikupan.se/\n\
                    Map: https://maps.test/bikupan\n";
    assert_eq!(stdout(&out), expected);
    // One call, the name percent-encoded as one path segment.
    assert_eq!(gateway.requests(), ["/menu/Restaurang%20Bikupan"]);

    // The gateway matches names case-insensitively; the tool passes the name through.
    let out = run(&["restaurang bikupan", "--gateway", &gateway.url()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), expected);
}

#[test]
fn a_name_with_special_characters_is_encoded() {
    let gateway = StandIn::start(contract);
    let out = run(&[
        "Haga Kök & Bar",
        "--gateway",
        &format!("{}/", gateway.url()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout(&out).starts_with("Haga Kök & Bar (Solna)\n"),
        "{out:?}"
    );
    assert_eq!(gateway.requests(), ["/menu/Haga%20K%C3%B6k%20&%20Bar"]);
}

#[test]
fn a_restaurant_without_a_menu_gives_the_menu_link() {
    let gateway = StandIn::start(contract);
    let out = run(&["Restaurang Hjulet", "--gateway", &gateway.url()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert!(text.starts_with("Restaurang Hjulet (Uppsala)\n"), "{text}");
    assert!(text.contains("No menu is published"), "{text}");
    assert!(!text.contains("  - "), "{text}");
    assert!(
        text.contains("Menu: http://www.restauranghjulet.se/veckomeny/\n"),
        "{text}"
    );
}

#[test]
fn an_unknown_name_prints_the_numbered_list() {
    let gateway = StandIn::start(contract);
    let out = run(&["Restaurang Okänd", "--gateway", &gateway.url()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let text = stdout(&out);
    assert_eq!(
        text,
        format!(
            "No restaurant named \"Restaurang Okänd\" was found. Restaurants:\n{}",
            numbered_names()
        )
    );
    assert!(text.contains("\n13. Tallrik Bistro\n"), "{text}");
    // The names come from the 404 body: no second call for the list.
    assert_eq!(gateway.requests(), ["/menu/Restaurang%20Ok%C3%A4nd"]);
}

#[test]
fn no_name_prints_the_numbered_list() {
    let gateway = StandIn::start(contract);
    let url = gateway.url();
    for args in [vec!["--gateway", &url], vec!["  ", "--gateway", &url]] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(
            stdout(&out),
            format!("Restaurants:\n{}", numbered_names()),
            "{args:?}"
        );
    }
    assert_eq!(gateway.requests(), ["/restaurants", "/restaurants"]);
}

#[test]
fn a_gateway_error_is_reported_with_status_and_message() {
    let gateway = StandIn::start(upstream_down);
    let out = run(&["Restaurang Bikupan", "--gateway", &gateway.url()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("502 Bad Gateway"), "{err}");
    assert!(
        err.contains("upstream restaurants could not be reached: connection refused"),
        "{err}"
    );

    let out = run(&["--gateway", &gateway.url()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("502 Bad Gateway"), "{out:?}");
}

#[test]
fn a_gateway_without_the_menu_route_is_an_error() {
    // A 404 without the list of names is not "unknown restaurant": the route is missing.
    let gateway = StandIn::start(no_routes);
    let out = run(&["Restaurang Bikupan", "--gateway", &gateway.url()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("404 Not Found"), "{err}");
    assert!(
        err.contains("no route matches /menu/Restaurang%20Bikupan"),
        "{err}"
    );
}

#[test]
fn a_silent_gateway_times_out() {
    let gateway = StandIn::start(silent);
    let started = Instant::now();
    let out = run(&[
        "Restaurang Bikupan",
        "--gateway",
        &gateway.url(),
        "--timeout",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("no answer within 1 s"), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(8));
}
