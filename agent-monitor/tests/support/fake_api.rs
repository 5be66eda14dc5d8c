//! A fake Kubernetes API server for the kube watchers' tests (`kube_watcher.rs`,
//! `policy_watch.rs`), included with `#[path = "support/fake_api.rs"] mod fake_api;`.
//!
//! No real API server can run here, so this test double speaks just enough HTTP/1.1 for
//! kube's list+watch of one resource. Every request is reported on
//! [`FakeApiServer::next_request`]; a list answers with the objects set by
//! [`FakeApiServer::set_list`] and closes, a watch stays open (chunked) and streams the
//! events the test pushes through the request's `watch` sender.

// Each test binary that includes this module uses only part of it.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// How long any one expected request may take (a relist waits out a backoff of ~1 s).
pub const WAIT: Duration = Duration::from_secs(15);

/// The fake API server (see the module documentation).
pub struct FakeApiServer {
    /// Where it listens: `http://{addr}` is the client's cluster URL.
    pub addr: SocketAddr,
    list: Arc<Mutex<List>>,
    requests: mpsc::UnboundedReceiver<Request>,
}

/// What a list answers.
struct List {
    /// The list's `kind` (`PodList`).
    kind: String,
    resource_version: String,
    items: Vec<Value>,
}

/// One request the fake server received.
#[derive(Debug)]
pub struct Request {
    pub path: String,
    pub query: HashMap<String, String>,
    /// For a watch: where to push the events streamed to the client.
    pub watch: Option<mpsc::UnboundedSender<Value>>,
}

impl FakeApiServer {
    /// Starts serving on a free port of 127.0.0.1; lists are of kind `list_kind`
    /// (`PodList`) and empty until [`FakeApiServer::set_list`].
    pub async fn start(list_kind: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let list = Arc::new(Mutex::new(List {
            kind: list_kind.to_owned(),
            resource_version: "1".to_owned(),
            items: Vec::new(),
        }));
        let (tx, requests) = mpsc::unbounded_channel();
        let shared = list.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, shared.clone(), tx.clone()));
            }
        });
        Self {
            addr,
            list,
            requests,
        }
    }

    /// A kube client whose cluster URL is this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    }

    /// What the next list returns.
    pub fn set_list(&self, resource_version: &str, items: Vec<Value>) {
        let mut list = self.list.lock().expect("list lock");
        list.resource_version = resource_version.to_owned();
        list.items = items;
    }

    pub async fn next_request(&mut self) -> Request {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("timed out waiting for a request")
            .expect("server running")
    }

    /// The next request, which must be a list of `path`.
    pub async fn expect_list_at(&mut self, path: &str) -> Request {
        let req = self.next_request().await;
        assert_eq!(req.path, path);
        assert!(req.watch.is_none(), "expected a list, got {req:?}");
        req
    }

    /// The next request, which must be a watch of `path` from `resource_version`.
    pub async fn expect_watch_at(&mut self, path: &str, resource_version: &str) -> Request {
        let req = self.next_request().await;
        assert_eq!(req.path, path);
        assert_eq!(req.query.get("watch").map(String::as_str), Some("true"));
        assert_eq!(
            req.query.get("resourceVersion").map(String::as_str),
            Some(resource_version)
        );
        assert!(req.watch.is_some(), "watch request has an event sender");
        req
    }
}

/// A watch event.
pub fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

/// The watch event of a 410 Gone: the client must relist.
pub fn gone() -> Value {
    event(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "Expired", "code": 410, "message": "too old resource version"}),
    )
}

/// Serves one connection: one request, then a closed list or an open watch.
async fn serve(
    conn: TcpStream,
    list: Arc<Mutex<List>>,
    requests: mpsc::UnboundedSender<Request>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header == "\r\n" {
            break;
        }
    }
    let mut conn = reader.into_inner();
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: HashMap<String, String> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let path = path.to_owned();

    if query.get("watch").map(String::as_str) == Some("true") {
        let (tx, mut events) = mpsc::unbounded_channel::<Value>();
        conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
        conn.flush().await?;
        let _ = requests.send(Request {
            path,
            query,
            watch: Some(tx),
        });
        while let Some(event) = events.recv().await {
            let line = format!("{event}\n");
            conn.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
                .await?;
            conn.flush().await?;
        }
        conn.write_all(b"0\r\n\r\n").await?;
    } else {
        let body = {
            let list = list.lock().expect("list lock");
            json!({
                "kind": list.kind, "apiVersion": "v1",
                "metadata": {"resourceVersion": list.resource_version},
                "items": list.items,
            })
            .to_string()
        };
        let _ = requests.send(Request {
            path,
            query,
            watch: None,
        });
        conn.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    }
    conn.shutdown().await
}

/// Decodes `application/x-www-form-urlencoded` (what kube encodes query values with).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
