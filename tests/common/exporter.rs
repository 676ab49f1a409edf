//! A real HTTP server on loopback (actix-web) that serves what the test sets — body,
//! status, delay — the way exporters serve it over the wire (gzip when asked, chunked
//! bodies, an auth check), and records every request it gets.

use actix_web::middleware::{Compress, Condition};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl Answer {
    pub fn ok(body: impl Into<String>) -> Self {
        Self {
            status: 200,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }
}

/// How the answer goes over the wire (fixed when the exporter starts).
#[derive(Clone, Debug, Default)]
pub struct Wire {
    /// Compress with gzip when the request's `Accept-Encoding` allows it, as
    /// exporters (and the Go client library) do.
    pub gzip: bool,
    /// Send the body in chunks of this many bytes (`Transfer-Encoding: chunked`, no
    /// `Content-Length`), each chunk flushed on its own.
    pub chunk_size: Option<usize>,
    /// With `chunk_size`: repeat the body without end (a runaway exporter).
    pub endless: bool,
    /// Answer 401 unless the `Authorization` header is exactly this.
    pub authorization: Option<String>,
    /// Serve these bytes instead of the answer's body (text that is not UTF-8).
    pub raw_body: Option<Vec<u8>>,
}

/// One request as the exporter received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Decoded query pairs, in order (`match[]` may repeat).
    pub query: Vec<(String, String)>,
    /// Header name (lower case) → value.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The values of query parameter `name`.
    pub fn query_values(&self, name: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Serves the current `Answer` to every request and records it: `recorded` in full,
/// `requests` as request heads (request line and headers) and, in `bodies`, the
/// bodies of requests that have a `Content-Length`.
pub struct FixtureExporter {
    pub url: String,
    answer: Arc<Mutex<Answer>>,
    pub requests: Arc<Mutex<Vec<String>>>,
    pub bodies: Arc<Mutex<Vec<String>>>,
    pub recorded: Arc<Mutex<Vec<Request>>>,
    server: actix_web::dev::ServerHandle,
}

#[derive(Clone)]
struct Shared {
    answer: Arc<Mutex<Answer>>,
    requests: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<Vec<String>>>,
    recorded: Arc<Mutex<Vec<Request>>>,
    wire: Wire,
}

impl FixtureExporter {
    pub async fn start(answer: Answer) -> Self {
        Self::start_with(answer, Wire::default()).await
    }

    pub async fn start_with(answer: Answer, wire: Wire) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind exporter");
        let url = format!("http://{}/metrics", listener.local_addr().expect("address"));
        let shared = Shared {
            answer: Arc::new(Mutex::new(answer)),
            requests: Arc::default(),
            bodies: Arc::default(),
            recorded: Arc::default(),
            wire,
        };
        let data = web::Data::new(shared.clone());
        let gzip = shared.wire.gzip;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .wrap(Condition::new(gzip, Compress::default()))
                .default_service(web::to(serve))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .listen(listener)
        .expect("listen exporter")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url,
            answer: shared.answer,
            requests: shared.requests,
            bodies: shared.bodies,
            recorded: shared.recorded,
            server: handle,
        }
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock().expect("lock") = answer;
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Request> {
        self.recorded.lock().expect("lock").clone()
    }

    /// Stops serving: connections are refused from now on.
    pub async fn stop(&self) {
        self.server.stop(false).await;
    }
}

async fn serve(request: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let mut head = format!(
        "{} {} {:?}\r\n",
        request.method(),
        request.uri(),
        request.version()
    );
    let mut headers = BTreeMap::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        head.push_str(&format!("{name}: {value}\r\n"));
        headers.insert(name.as_str().to_ascii_lowercase(), value);
    }
    head.push_str("\r\n");
    let body = String::from_utf8_lossy(&body).into_owned();
    let query = url::form_urlencoded::parse(request.query_string().as_bytes())
        .into_owned()
        .collect();
    shared.requests.lock().expect("lock").push(head);
    if headers.contains_key("content-length") {
        shared.bodies.lock().expect("lock").push(body.clone());
    }
    shared.recorded.lock().expect("lock").push(Request {
        method: request.method().to_string(),
        path: request.path().to_owned(),
        query,
        headers: headers.clone(),
        body,
    });

    let answer = shared.answer.lock().expect("lock").clone();
    tokio::time::sleep(answer.delay).await;
    let wire = &shared.wire;
    if let Some(expected) = &wire.authorization {
        if headers.get("authorization") != Some(expected) {
            return HttpResponse::Unauthorized()
                .insert_header(("WWW-Authenticate", "Basic realm=\"exporter\""))
                .body("unauthorized");
        }
    }
    let status = actix_web::http::StatusCode::from_u16(answer.status).expect("a status code");
    let mut response = HttpResponse::build(status);
    response.content_type("text/plain; version=0.0.4");
    let body = wire
        .raw_body
        .clone()
        .unwrap_or_else(|| answer.body.into_bytes());
    match wire.chunk_size {
        None => response.body(body),
        Some(size) => {
            let chunks: Vec<web::Bytes> = body
                .chunks(size.max(1))
                .map(web::Bytes::copy_from_slice)
                .collect();
            let rounds = if wire.endless { usize::MAX } else { 1 };
            let stream = futures::stream::iter(std::iter::repeat_n(chunks, rounds).flatten()).then(
                |chunk| async move {
                    // one chunk per write: the client sees a body that arrives in pieces
                    tokio::task::yield_now().await;
                    Ok::<_, std::convert::Infallible>(chunk)
                },
            );
            response.streaming(stream.boxed_local())
        }
    }
}

/// A loopback URL on which nothing listens, for the rest of the test process: its
/// port stays bound (never listening), so nothing else can start serving there.
pub fn refused_url() -> String {
    let (socket, port) = super::reserved_port();
    std::mem::forget(socket);
    format!("http://127.0.0.1:{port}/metrics")
}
