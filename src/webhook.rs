//! Webhooks from git hosts: checking that a delivery is signed with the shared secret, and turning
//! each provider's push payload into one [`PushEvent`].
//!
//! Pure: no I/O, so every provider's signature scheme and payload shape is unit-tested here. The
//! HTTP side (body limits, status codes) is `server.rs`. Signatures are compared in constant time.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// A git host that sends webhooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// GitHub: `X-Hub-Signature-256: sha256=HEX`, HMAC-SHA256 of the body.
    GitHub,
    /// GitLab: `X-Gitlab-Token`, the secret itself.
    GitLab,
    /// Gitea (and Forgejo): `X-Gitea-Signature: HEX`, HMAC-SHA256 of the body.
    Gitea,
    /// Anything else: `X-Signature: HEX`, HMAC-SHA256 of the body.
    Generic,
}

impl Provider {
    /// Every provider.
    pub const ALL: [Provider; 4] = [
        Provider::GitHub,
        Provider::GitLab,
        Provider::Gitea,
        Provider::Generic,
    ];

    /// The provider's name in URLs and metrics: `github`, `gitlab`, `gitea`, `generic`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
            Provider::Generic => "generic",
        }
    }

    /// The provider named in a URL.
    pub fn from_name(name: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.as_str() == name)
    }

    fn signature_header(self) -> &'static str {
        match self {
            Provider::GitHub => "x-hub-signature-256",
            Provider::GitLab => "x-gitlab-token",
            Provider::Gitea => "x-gitea-signature",
            Provider::Generic => "x-signature",
        }
    }

    fn event_header(self) -> Option<&'static str> {
        match self {
            Provider::GitHub => Some("x-github-event"),
            Provider::GitLab => Some("x-gitlab-event"),
            Provider::Gitea => Some("x-gitea-event"),
            Provider::Generic => None,
        }
    }
}

/// Why a delivery was refused. The text never contains the secret or the signature sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No signature header.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// A signature that does not match the body and the secret.
    #[error("bad signature in {0} header")]
    Bad(&'static str),
}

/// Checks that `body` was sent by someone holding `secret`.
pub fn verify(
    provider: Provider,
    headers: &HeaderMap,
    body: &[u8],
    secret: &[u8],
) -> Result<(), Refusal> {
    let mut check = SignatureCheck::start(provider, headers, secret)?;
    check.update(body);
    check.finish()
}

/// Bytes in an HMAC-SHA256.
const HMAC_SHA256_LEN: usize = 32;

/// A delivery's signature, checked in two stages so that a server refuses what it can before it
/// reads a body: [`SignatureCheck::start`] looks only at the headers (a missing header, a
/// malformed signature, GitLab's token), then the body is fed in as it arrives and never has to
/// be held for the check.
pub struct SignatureCheck {
    header: &'static str,
    expected: Expected,
}

enum Expected {
    /// GitLab's token was right; the body is not signed.
    Nothing,
    /// The HMAC-SHA256 of the body must equal `sent`.
    Hmac { mac: Hmac<Sha256>, sent: Vec<u8> },
}

impl SignatureCheck {
    /// Reads the signature header. Refuses at once when it is missing, cannot be a signature, or
    /// (GitLab) is not the secret.
    pub fn start(
        provider: Provider,
        headers: &HeaderMap,
        secret: &[u8],
    ) -> Result<SignatureCheck, Refusal> {
        let header = provider.signature_header();
        let sent = headers
            .get(header)
            .and_then(|v| v.to_str().ok())
            .ok_or(Refusal::Missing(header))?
            .trim();
        let hex = match provider {
            Provider::GitLab => {
                return if bool::from(sent.as_bytes().ct_eq(secret)) {
                    Ok(SignatureCheck {
                        header,
                        expected: Expected::Nothing,
                    })
                } else {
                    Err(Refusal::Bad(header))
                };
            }
            Provider::GitHub => sent.strip_prefix("sha256="),
            Provider::Gitea | Provider::Generic => {
                Some(sent.strip_prefix("sha256=").unwrap_or(sent))
            }
        };
        match hex.map(hex::decode) {
            Some(Ok(sent)) if sent.len() == HMAC_SHA256_LEN => Ok(SignatureCheck {
                header,
                expected: Expected::Hmac {
                    mac: Hmac::<Sha256>::new_from_slice(secret)
                        .expect("HMAC takes keys of any length"),
                    sent,
                },
            }),
            _ => Err(Refusal::Bad(header)),
        }
    }

    /// Feeds the next piece of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        if let Expected::Hmac { mac, .. } = &mut self.expected {
            mac.update(chunk);
        }
    }

    /// Whether the body fed in matches the signature.
    pub fn finish(self) -> Result<(), Refusal> {
        match self.expected {
            Expected::Nothing => Ok(()),
            // `verify_slice` compares in constant time.
            Expected::Hmac { mac, sent } => mac
                .verify_slice(&sent)
                .map_err(|_| Refusal::Bad(self.header)),
        }
    }
}

/// The HMAC-SHA256 signature of `body`, hex, as GitHub, Gitea and the generic endpoint expect
/// (GitHub prefixes it with `sha256=`). For senders and tests.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// A push, whatever the provider.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushEvent {
    /// The branch pushed to, without `refs/heads/`.
    pub branch: String,
    /// The commit the branch now points at, if the payload says.
    pub commit: Option<String>,
    /// Who pushed, if the payload says.
    pub pusher: Option<String>,
    /// The repository's clone and web URLs, as the payload gives them: they say which pipelines'
    /// sources the push was to.
    pub repository_urls: Vec<String>,
    /// The provider's id of this delivery (a redelivery keeps it), prefixed with the provider.
    pub delivery: Option<String>,
    /// The push deleted the branch: nothing to build.
    pub deleted: bool,
}

/// Where each provider's payload names the repository.
const REPOSITORY_URLS: [&str; 12] = [
    "/repository/clone_url",
    "/repository/ssh_url",
    "/repository/git_url",
    "/repository/html_url",
    "/repository/url",
    "/repository/git_http_url",
    "/repository/git_ssh_url",
    "/project/git_http_url",
    "/project/git_ssh_url",
    "/project/web_url",
    "/repository",
    "/url",
];

/// The delivery ids of the last [`RecentDeliveries::CAPACITY`] deliveries taken: providers
/// redeliver on timeouts, with the same id. (The id is not signed: a replay of a captured
/// delivery under a new id is a new delivery, and what bounds it is the agent's `minInterval`.)
#[derive(Debug, Default)]
pub struct RecentDeliveries {
    order: std::collections::VecDeque<String>,
    seen: std::collections::HashSet<String>,
}

impl RecentDeliveries {
    /// How many ids are remembered; the oldest is forgotten first.
    pub const CAPACITY: usize = 4096;

    /// Forgets `id`: what it delivered was not taken, so it may come again.
    pub fn forget(&mut self, id: &str) {
        if self.seen.remove(id) {
            self.order.retain(|kept| kept != id);
        }
    }

    /// Records `id`; `false` when it was recorded before.
    pub fn first_time(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == Self::CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(id.to_string());
        self.seen.insert(id.to_string());
        true
    }
}

/// The headers that carry each provider's delivery id.
const DELIVERY_HEADERS: [&str; 5] = [
    "x-github-delivery",
    "x-gitea-delivery",
    "x-gitlab-event-uuid",
    "x-delivery",
    "x-request-id",
];

/// What a verified delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A push.
    Push(PushEvent),
    /// Something berth does not act on (a ping, an issue comment, a tag push), and why.
    Ignored(String),
}

/// Why a verified delivery's payload cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The payload is not JSON.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// The payload names no ref or branch.
    #[error("payload names no ref (or branch)")]
    NoRef,
}

/// Reads a verified delivery: the provider's event header and its JSON payload.
pub fn parse(provider: Provider, headers: &HeaderMap, body: &[u8]) -> Result<Delivery, Malformed> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(name) = provider.event_header() {
        let event = header(name).unwrap_or("");
        let is_push = match provider {
            Provider::GitLab => event == "Push Hook",
            _ => event == "push",
        };
        if !is_push {
            return Ok(Delivery::Ignored(format!(
                "{name}: {event:?} is not a push"
            )));
        }
    }
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| Malformed::NotJson(e.to_string()))?;
    let text = |pointer: &str| {
        payload
            .pointer(pointer)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    let reference = text("/ref").or_else(|| text("/branch").map(|b| format!("refs/heads/{b}")));
    let Some(reference) = reference else {
        return Err(Malformed::NoRef);
    };
    let Some(branch) = reference.strip_prefix("refs/heads/") else {
        return Ok(Delivery::Ignored(format!("{reference} is not a branch")));
    };
    let deleted = payload.pointer("/deleted").and_then(Value::as_bool) == Some(true)
        || text("/after").is_some_and(|after| after.chars().all(|c| c == '0'));
    let commit = match provider {
        Provider::GitLab => text("/checkout_sha").or_else(|| text("/after")),
        _ => text("/after").or_else(|| text("/commit")),
    }
    .filter(|c| c.chars().any(|ch| ch != '0'));
    let pusher = match provider {
        Provider::GitHub => text("/pusher/name"),
        Provider::GitLab => text("/user_username").or_else(|| text("/user_name")),
        Provider::Gitea => text("/pusher/login").or_else(|| text("/pusher/username")),
        Provider::Generic => text("/pusher").or_else(|| text("/pusher/name")),
    };
    let mut repository_urls: Vec<String> = REPOSITORY_URLS.iter().filter_map(|p| text(p)).collect();
    repository_urls.dedup();
    let delivery = DELIVERY_HEADERS
        .iter()
        .find_map(|name| header(name))
        .filter(|id| !id.is_empty() && id.len() <= 200)
        .map(|id| format!("{}:{id}", provider.as_str()));
    Ok(Delivery::Push(PushEvent {
        branch: branch.to_string(),
        commit,
        pusher,
        repository_urls,
        delivery,
        deleted,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_delivery_id_is_taken_once_and_the_oldest_are_forgotten_first() {
        let mut recent = super::RecentDeliveries::default();
        assert!(recent.first_time("github:a"));
        assert!(!recent.first_time("github:a"));
        for n in 0..super::RecentDeliveries::CAPACITY {
            assert!(recent.first_time(&format!("github:{n}")));
        }
        assert!(
            recent.first_time("github:a"),
            "forgotten after CAPACITY others"
        );
        assert!(!recent.first_time("github:4095"));
        recent.forget("github:4095");
        assert!(recent.first_time("github:4095"), "forgotten, taken again");
    }

    use super::*;

    const SECRET: &[u8] = b"It's a Secret to Everybody";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                let name: axum::http::HeaderName = k.parse().unwrap();
                (name, v.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn github_signature_matches_githubs_documented_example() {
        // The example from GitHub's "Validating webhook deliveries" page.
        let body = b"Hello, World!";
        let expected = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(SECRET, body), expected);
        let map = headers(&[("x-hub-signature-256", &format!("sha256={expected}"))]);
        assert_eq!(verify(Provider::GitHub, &map, body, SECRET), Ok(()));
    }

    #[test]
    fn a_bad_or_missing_signature_is_refused_for_every_provider() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let good = sign(SECRET, body);
        for provider in Provider::ALL {
            let empty = headers(&[]);
            assert!(matches!(
                verify(provider, &empty, body, SECRET),
                Err(Refusal::Missing(_))
            ));
            let wrong = headers(&[(provider.signature_header(), &sign(b"other", body))]);
            assert!(matches!(
                verify(provider, &wrong, body, SECRET),
                Err(Refusal::Bad(_))
            ));
            let tampered = headers(&[(provider.signature_header(), &good)]);
            assert!(
                verify(provider, &tampered, b"{}", SECRET).is_err(),
                "{provider:?} accepted a body the signature was not made for"
            );
        }
    }

    #[test]
    fn each_provider_accepts_its_own_scheme() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let hex = sign(SECRET, body);
        let cases = [
            (Provider::GitHub, format!("sha256={hex}")),
            (Provider::Gitea, hex.clone()),
            (Provider::Generic, hex.clone()),
            (
                Provider::GitLab,
                String::from_utf8(SECRET.to_vec()).unwrap(),
            ),
        ];
        for (provider, value) in cases {
            let map = headers(&[(provider.signature_header(), &value)]);
            assert_eq!(verify(provider, &map, body, SECRET), Ok(()), "{provider:?}");
        }
        // GitHub requires its prefix.
        let map = headers(&[("x-hub-signature-256", &hex)]);
        assert!(verify(Provider::GitHub, &map, body, SECRET).is_err());
    }

    #[test]
    fn what_the_headers_show_is_refused_before_any_body_is_read() {
        let bad_headers: [(Provider, &[(&str, &str)]); 5] = [
            (Provider::GitHub, &[]),
            (Provider::GitHub, &[("x-hub-signature-256", "sha256=zz")]),
            (Provider::GitHub, &[("x-hub-signature-256", "00ff")]),
            (Provider::Gitea, &[("x-gitea-signature", "00ff")]),
            (Provider::GitLab, &[("x-gitlab-token", "guess")]),
        ];
        for (provider, pairs) in bad_headers {
            assert!(
                SignatureCheck::start(provider, &headers(pairs), SECRET).is_err(),
                "{provider:?} {pairs:?}"
            );
        }
    }

    #[test]
    fn a_body_fed_in_pieces_is_checked_as_a_whole() {
        let body = br#"{"ref":"refs/heads/main","after":"abc"}"#;
        let map = headers(&[("x-signature", &sign(SECRET, body))]);
        let mut check = SignatureCheck::start(Provider::Generic, &map, SECRET).unwrap();
        for piece in body.chunks(7) {
            check.update(piece);
        }
        assert_eq!(check.finish(), Ok(()));
        let mut check = SignatureCheck::start(Provider::Generic, &map, SECRET).unwrap();
        check.update(&body[..10]);
        assert!(check.finish().is_err());
    }

    #[test]
    fn refusals_never_echo_what_was_sent() {
        let map = headers(&[("x-gitlab-token", "guessed-secret")]);
        let refusal = verify(Provider::GitLab, &map, b"{}", SECRET).unwrap_err();
        assert!(!refusal.to_string().contains("guessed-secret"));
    }

    #[test]
    fn payloads_of_each_provider_become_one_push_event() {
        let github = br#"{"ref":"refs/heads/main","before":"0000000000000000000000000000000000000000",
            "after":"6113728f27ae82c7b1a177c8d03f9e96e0adf246","repository":{"full_name":"ops/infra",
            "clone_url":"https://git.example.org/ops/infra.git","ssh_url":"git@git.example.org:ops/infra.git"},
            "pusher":{"name":"octocat","email":"octocat@github.com"},"deleted":false}"#;
        let gitlab = br#"{"object_kind":"push","ref":"refs/heads/main",
            "checkout_sha":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7","user_username":"jsmith",
            "project":{"git_http_url":"https://git.example.org/ops/infra.git"}}"#;
        let gitea =
            br#"{"ref":"refs/heads/main","after":"bffeb74224043ba2feb48d137756c8a9331c449a",
            "pusher":{"login":"gitea"},"repository":{"clone_url":"https://git.example.org/ops/infra.git"}}"#;
        let generic = br#"{"branch":"main","commit":"abc123","pusher":"deploy-bot",
            "repository":"git@git.example.org:ops/infra"}"#;
        let cases: [(Provider, &[u8], &str, &str, &str); 4] = [
            (
                Provider::GitHub,
                github,
                "push",
                "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
                "octocat",
            ),
            (
                Provider::GitLab,
                gitlab,
                "Push Hook",
                "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
                "jsmith",
            ),
            (
                Provider::Gitea,
                gitea,
                "push",
                "bffeb74224043ba2feb48d137756c8a9331c449a",
                "gitea",
            ),
            (Provider::Generic, generic, "", "abc123", "deploy-bot"),
        ];
        for (provider, body, event, commit, pusher) in cases {
            let id = [
                ("x-github-delivery", "gh-1"),
                ("x-gitlab-event-uuid", "gl-1"),
                ("x-gitea-delivery", "gt-1"),
                ("x-delivery", "gen-1"),
            ];
            let mut map = headers(&id);
            if let Some(name) = provider.event_header() {
                map.insert(name, event.parse().unwrap());
            }
            let Delivery::Push(push) = parse(provider, &map, body).unwrap() else {
                panic!("{provider:?}: not a push");
            };
            assert_eq!(
                (
                    push.branch.as_str(),
                    push.commit.as_deref(),
                    push.pusher.as_deref()
                ),
                ("main", Some(commit), Some(pusher)),
                "{provider:?}"
            );
            assert!(
                push.repository_urls
                    .iter()
                    .any(|url| crate::git_url::same_repository(
                        url,
                        "https://git.example.org/ops/infra"
                    )),
                "{provider:?}: {:?}",
                push.repository_urls
            );
            // A redelivery keeps its id; it is told apart from other providers' by a prefix.
            let delivery = push.delivery.expect("a delivery id");
            assert!(delivery.starts_with(provider.as_str()), "{delivery}");
        }
    }

    #[test]
    fn pings_tags_and_deleted_branches_are_not_pushes_to_apply() {
        let ping = headers(&[("x-github-event", "ping")]);
        assert!(matches!(
            parse(Provider::GitHub, &ping, br#"{"zen":"hi"}"#),
            Ok(Delivery::Ignored(_))
        ));
        let push = headers(&[("x-github-event", "push")]);
        assert!(matches!(
            parse(
                Provider::GitHub,
                &push,
                br#"{"ref":"refs/tags/v1","after":"ab"}"#
            ),
            Ok(Delivery::Ignored(_))
        ));
        let deleted = parse(
            Provider::GitHub,
            &push,
            br#"{"ref":"refs/heads/old","after":"0000000000000000000000000000000000000000"}"#,
        )
        .unwrap();
        assert!(matches!(
            deleted,
            Delivery::Push(PushEvent { commit: None, .. })
        ));
        assert!(parse(Provider::GitHub, &push, b"not json").is_err());
    }
}
