//! HTTP/2 clients of stoa's listeners: a connection with prior knowledge to the cleartext
//! listener (h2c), and one GET on any HTTP/2 connection.

use bytes::Bytes;
use h2::client::SendRequest;

/// An HTTP/2 connection with prior knowledge to the cleartext listener on `port` (h2c).
pub async fn h2c(port: u16) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One `GET http://localhost<path>` with extra `headers`: status, headers and body.
pub async fn get(
    send: &SendRequest<Bytes>,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    get_with_scheme(send, "http", path, headers).await
}

/// [`get`] with the request's scheme (`https` over the TLS listener).
pub async fn get_with_scheme(
    send: &SendRequest<Bytes>,
    scheme: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    let mut req = http::Request::get(format!("{scheme}://localhost{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    request(send, req.body(()).unwrap(), None).await
}

/// Sends `req` (then `body` in a DATA frame, if any): status, headers and body.
pub async fn request(
    send: &SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<Bytes>,
) -> (u16, http::HeaderMap, Bytes) {
    let mut send = send.clone().ready().await.expect("connection open");
    let (resp, mut stream) = send
        .send_request(req, body.is_none())
        .expect("request sent");
    if let Some(body) = body {
        stream.send_data(body, true).unwrap();
    }
    let (parts, mut body) = resp.await.expect("answer").into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    (parts.status.as_u16(), parts.headers, Bytes::from(data))
}
