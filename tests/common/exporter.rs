//! A real HTTP exporter on loopback whose answer the test sets: body, status, delay.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// Serves the current `Answer` to every request and records request heads (and,
/// in `bodies`, the bodies of requests that have a `Content-Length`).
pub struct FixtureExporter {
    pub url: String,
    answer: Arc<Mutex<Answer>>,
    pub requests: Arc<Mutex<Vec<String>>>,
    pub bodies: Arc<Mutex<Vec<String>>>,
}

impl FixtureExporter {
    pub async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind exporter");
        let url = format!("http://{}/metrics", listener.local_addr().expect("address"));
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (shared, seen, seen_bodies) = (answer.clone(), requests.clone(), bodies.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (shared, seen, seen_bodies) =
                    (shared.clone(), seen.clone(), seen_bodies.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.lock()
                        .expect("lock")
                        .push(String::from_utf8_lossy(&head).into_owned());
                    if let Some(body) = read_body(&mut stream, head).await {
                        seen_bodies.lock().expect("lock").push(body);
                    }
                    let answer = shared.lock().expect("lock").clone();
                    tokio::time::sleep(answer.delay).await;
                    let response = format!(
                        "HTTP/1.1 {} X\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        answer.status,
                        answer.body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.write_all(answer.body.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self {
            url,
            answer,
            requests,
            bodies,
        }
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock().expect("lock") = answer;
    }
}

/// The body after `read` (the head and what came with it), when the head has a
/// `Content-Length`.
async fn read_body(stream: &mut tokio::net::TcpStream, mut read: Vec<u8>) -> Option<String> {
    let end = read.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&read[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    let mut buf = [0u8; 4096];
    while read.len() < end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&read[end..]).into_owned())
}

/// A loopback URL on which nothing listens.
pub fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}/metrics")
}
