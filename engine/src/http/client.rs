//! A small HTTP/1.1 client for the CLI: one request per connection, to the API over TCP or to
//! the admin API over its unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
pub use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;

/// Where to send a request.
#[derive(Debug, Clone)]
pub enum Target {
    /// The HTTP API.
    Tcp(SocketAddr),
    /// The admin unix socket.
    Unix(PathBuf),
}

impl Target {
    /// The API at `api`: `host:port`, `[v6]:port` or either after `http://`; a host name is
    /// resolved (the first address that accepts a connection is used by the caller).
    pub async fn resolve_api(api: &str) -> Result<Target, ClientError> {
        let bare = api
            .strip_prefix("http://")
            .unwrap_or(api)
            .trim_end_matches('/');
        if let Ok(addr) = bare.parse::<SocketAddr>() {
            return Ok(Target::Tcp(addr));
        }
        let resolve_err = |source| ClientError::Connect {
            target: api.to_owned(),
            source,
        };
        let addr = tokio::net::lookup_host(bare)
            .await
            .map_err(resolve_err)?
            .next()
            .ok_or_else(|| resolve_err(std::io::Error::other("the name has no address")))?;
        Ok(Target::Tcp(addr))
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// Where.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// Sends one request and returns the status and the whole body.
pub async fn request(
    target: &Target,
    method: Method,
    path: &str,
    bearer_token: Option<&str>,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let request = build_request(method, path, bearer_token, body)?;
    let connect_err = |source| ClientError::Connect {
        target: format!("{target:?}"),
        source,
    };
    let response = match target {
        Target::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(connect_err)?;
            send(TokioIo::new(stream), request).await?
        }
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(connect_err)?;
            send(TokioIo::new(stream), request).await?
        }
    };
    Ok(response)
}

fn build_request(
    method: Method,
    path: &str,
    bearer_token: Option<&str>,
    body: Vec<u8>,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = bearer_token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    Ok(builder.body(Full::new(Bytes::from(body)))?)
}

async fn send<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), ClientError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    drop(sender);
    let _ = driver.await;
    Ok((status, body))
}

/// Sends one request and returns the status and the body as it arrives, chunk by chunk, for
/// endpoints that stream (`/v1/updates`, `/v1/queries`). The channel closes when the body ends.
pub async fn request_stream(
    target: &Target,
    method: Method,
    path: &str,
    bearer_token: Option<&str>,
    body: Vec<u8>,
) -> Result<(StatusCode, tokio::sync::mpsc::Receiver<Bytes>), ClientError> {
    let (status, _, rx) =
        request_stream_with_headers(target, method, path, bearer_token, body).await?;
    Ok((status, rx))
}

/// [`request_stream`], also returning the response headers (`/v1/subscriptions` puts the
/// subscription's id and query hash there).
pub async fn request_stream_with_headers(
    target: &Target,
    method: Method,
    path: &str,
    bearer_token: Option<&str>,
    body: Vec<u8>,
) -> Result<
    (
        StatusCode,
        hyper::HeaderMap,
        tokio::sync::mpsc::Receiver<Bytes>,
    ),
    ClientError,
> {
    let request = build_request(method, path, bearer_token, body)?;
    let Target::Tcp(addr) = target else {
        return Err(ClientError::Connect {
            target: format!("{target:?}"),
            source: std::io::Error::other("streaming is only over TCP"),
        });
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            target: addr.to_string(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut body = response.into_body();
    // Dropping the receiver closes the connection at once, so the server frees the stream.
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                _ = tx.closed() => break,
                frame = body.frame() => frame,
            };
            let Some(Ok(frame)) = frame else { break };
            if let Ok(data) = frame.into_data() {
                if tx.send(data).await.is_err() {
                    break;
                }
            }
        }
    });
    Ok((status, headers, rx))
}
