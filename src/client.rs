//! The command line's client of a running agent's API, for `berth runs`, `berth logs` and
//! `berth instances`: HTTP/1.1
//! to the agent's `listen` address with the API's bearer token, the answer's body handed over piece
//! by piece as it arrives, so a followed log shows each line when the run prints it.
//!
//! Plain HTTP only, as the agent serves it: an agent on another host is reached through the TLS
//! proxy in front of it, or an SSH tunnel.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// A running agent's API.
pub struct AgentApi {
    authority: String,
    token: String,
}

impl AgentApi {
    /// The agent at `url` (`http://host:port`), with the API token `token`.
    pub fn new(url: &str, token: &str) -> Result<AgentApi, ClientError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| ClientError::NotPlainHttp(url.into()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::NotHostAndPort(url.into()));
        }
        Ok(AgentApi {
            authority: authority.to_string(),
            token: token.trim().to_string(),
        })
    }

    /// `GET path`: hands each piece of the body to `piece` as it arrives. An answer other than
    /// a success is an error, with the agent's reason.
    pub async fn get(&self, path: &str, piece: impl FnMut(&[u8])) -> Result<(), ClientError> {
        self.send(hyper::Method::GET, path, Vec::new(), piece).await
    }

    /// `method path` with `body`, as [`AgentApi::get`] does.
    pub async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
        mut piece: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable {
            authority: self.authority.clone(),
            why: e.to_string(),
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::BadRequest {
                path: path.into(),
                why: e.to_string(),
            })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status();
        let mut body = response.into_body();
        let mut refusal = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::BrokeOff(e.to_string()))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            match status.is_success() {
                true => piece(data),
                false if refusal.len() < 4096 => refusal.extend_from_slice(data),
                false => {}
            }
        }
        match status.is_success() {
            true => Ok(()),
            false => Err(ClientError::Refused {
                status,
                reason: String::from_utf8_lossy(&refusal).trim().to_string(),
            }),
        }
    }
}

/// Why the agent's API could not be asked, or said no.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://`.
    #[error("{0}: the agent's API is plain http://host:port (use a tunnel or a proxy for TLS)")]
    NotPlainHttp(String),
    /// The URL is not `http://host:port`.
    #[error("{0}: give the agent as http://host:port")]
    NotHostAndPort(String),
    /// No connection, or it was lost before the answer.
    #[error("cannot reach the agent at http://{authority}: {why}")]
    Unreachable {
        /// `host:port`.
        authority: String,
        /// Why.
        why: String,
    },
    /// The request could not be made (a path with characters a URL cannot hold).
    #[error("bad request {path}: {why}")]
    BadRequest {
        /// The path asked for.
        path: String,
        /// Why.
        why: String,
    },
    /// The answer stopped before its end.
    #[error("the agent's answer broke off: {0}")]
    BrokeOff(String),
    /// The agent answered with a failure.
    #[error("the agent answered {status}: {reason}")]
    Refused {
        /// Its status code.
        status: hyper::StatusCode,
        /// What it said, up to 4 KiB.
        reason: String,
    },
}

/// Every byte of a URL's part but the unreserved ones (RFC 3986, section 2.3).
const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `text` as one part of a URL's path or query: every byte but the unreserved ones
/// percent-encoded.
pub fn query_value(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}
