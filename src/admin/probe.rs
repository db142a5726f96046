//! `tollgate health`: one GET against a health endpoint, for a container's
//! `HEALTHCHECK` or a supervisor, so the image needs no curl.
//!
//! It speaks plain HTTP/1.1, as the admin listener does, and reads nothing
//! but the status: 200 is healthy, anything else (another status, a refused
//! connection, no answer within the timeout) is not.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a probe found the endpoint unhealthy.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0} is not an http:// URL with a host (the admin listener speaks plain HTTP)")]
    Url(String),
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("the request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered {0}, not 200")]
    Status(StatusCode),
}

/// GETs `url` and succeeds when it answers 200 within `timeout`.
pub async fn health(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, status_of(url)).await {
        Ok(Ok(StatusCode::OK)) => Ok(()),
        Ok(Ok(status)) => Err(ProbeError::Status(status)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn status_of(url: &str) -> Result<StatusCode, ProbeError> {
    let (address, uri) = target(url)?;
    let stream = TcpStream::connect(&address)
        .await
        .map_err(|source| ProbeError::Connect {
            address: address.clone(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(uri)
        .header(http::header::HOST, &address)
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?.status())
}

/// The `host:port` to connect to and the URI to ask for (the path and query).
fn target(url: &str) -> Result<(String, Uri), ProbeError> {
    let bad = || ProbeError::Url(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?;
    let address = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Ok((address, path.parse().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_its_address_with_the_default_port_and_its_path() {
        let (address, uri) = target("http://127.0.0.1/healthz?x=1").unwrap();
        assert_eq!(address, "127.0.0.1:80");
        assert_eq!(uri, "/healthz?x=1");
        let (address, uri) = target("http://localhost:9090").unwrap();
        assert_eq!(address, "localhost:9090");
        assert_eq!(uri, "/");
    }

    #[test]
    fn only_plain_http_urls_with_a_host_are_probed() {
        for url in [
            "https://127.0.0.1:9090/healthz",
            "/healthz",
            "127.0.0.1:9090",
            "",
        ] {
            assert!(matches!(target(url), Err(ProbeError::Url(_))), "{url}");
        }
    }
}
