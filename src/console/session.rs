//! Who is logged in to the console: sessions made by a token, kept in memory for 12 hours, each
//! with a role and a CSRF token of its own. Pure but for the clock and the random source.
//!
//! A session's id is 32 random bytes, sent back only as an `HttpOnly`, `SameSite=Strict` cookie;
//! the tokens themselves are compared in constant time and never stored. At most
//! [`MAX_SESSIONS`] live at once: a flood of logins pushes out the oldest, never the memory up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::config::Secret;

/// How long a session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// Most sessions kept at once.
pub const MAX_SESSIONS: usize = 1024;
/// The session cookie's name; `__Host-` first when cookies are `Secure`, so no other service on
/// the host (a challenge's port) can set one in its place.
pub fn session_cookie(secure: bool) -> &'static str {
    match secure {
        true => "__Host-berth_session",
        false => "berth_session",
    }
}

/// The login form's CSRF cookie's name, prefixed as [`session_cookie`] is.
pub fn login_cookie(secure: bool) -> &'static str {
    match secure {
        true => "__Host-berth_login",
        false => "berth_login",
    }
}

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Logged in with the API token: everything.
    Operator,
    /// Logged in with the viewer token: read only.
    Viewer,
}

impl Role {
    /// Whether it may change anything.
    pub fn may_act(self) -> bool {
        self == Role::Operator
    }

    /// How the console names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

/// One logged-in browser.
#[derive(Clone)]
pub struct Session {
    /// What it may do.
    pub role: Role,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The name given at login, for the `Requested-by:` trailer of the commits it asks for: said,
    /// not proven (the token is shared by everyone of its role).
    pub who: Option<String>,
    made: Instant,
}

/// Longest name a login may give, in characters.
pub const MAX_NAME: usize = 64;

/// The name a login gave, fit for one line of a commit's trailer: control characters (a newline
/// would forge another trailer) dropped, spaces trimmed, at most [`MAX_NAME`] characters; `None`
/// when nothing is left.
pub fn given_name(sent: &str) -> Option<String> {
    // Format characters too: bidi overrides and zero-width ones would make a name read as
    // another in `git log`.
    let format = |c: &char| matches!(*c as u32, 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x2069 | 0xFEFF | 0xAD);
    let name: String = sent
        .chars()
        .filter(|c| !c.is_control() && !format(c))
        .collect::<String>()
        .trim()
        .chars()
        .take(MAX_NAME)
        .collect();
    let name = name.trim_end().to_string();
    (!name.is_empty()).then_some(name)
}

/// The tokens that log in.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// The API token: an operator.
    pub operator: Option<Secret>,
    /// The viewer token: read only.
    pub viewer: Option<Secret>,
}

impl Tokens {
    /// The role `sent` logs in as, if any. Both tokens are compared, in constant time.
    pub fn role_of(&self, sent: &str) -> Option<Role> {
        if sent.is_empty() {
            return None;
        }
        let matches = |token: &Option<Secret>| {
            token
                .as_ref()
                .is_some_and(|t| bool::from(sent.as_bytes().ct_eq(t.expose().as_bytes())))
        };
        let (operator, viewer) = (matches(&self.operator), matches(&self.viewer));
        match (operator, viewer) {
            (true, _) => Some(Role::Operator),
            (false, true) => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// The sessions of one agent. Cloning shares them.
#[derive(Clone, Default)]
pub struct Sessions {
    live: Arc<Mutex<HashMap<String, Session>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.live.lock().map_or(0, |live| live.len());
        write!(f, "Sessions({count} live)")
    }
}

/// 32 random bytes as hex.
pub fn random_token() -> String {
    crate::backend::random_bytes()
        .map(hex::encode)
        .unwrap_or_else(|_| {
            // Without the kernel's random source nothing unguessable can be made: no session
            // can be either, and the login fails (an empty token is never accepted).
            String::new()
        })
}

impl Sessions {
    /// A new session for `role`, of the person who gave the name `who`: its id.
    pub fn open(&self, role: Role, who: Option<String>) -> Option<(String, Session)> {
        let (id, csrf) = (random_token(), random_token());
        if id.is_empty() || csrf.is_empty() {
            return None;
        }
        let session = Session {
            role,
            csrf,
            who,
            made: Instant::now(),
        };
        let mut live = self.live.lock().expect("sessions");
        live.retain(|_, s| s.made.elapsed() < SESSION_LIFETIME);
        while live.len() >= MAX_SESSIONS {
            // Viewers' logins push out viewers first: a flood of them never logs an operator out.
            let oldest = live
                .iter()
                .min_by_key(|(_, s)| (s.role == Role::Operator, s.made))
                .map(|(id, _)| id.clone());
            match oldest {
                Some(oldest) => live.remove(&oldest),
                None => break,
            };
        }
        live.insert(id.clone(), session.clone());
        Some((id, session))
    }

    /// The live session `id` names, if any.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut live = self.live.lock().expect("sessions");
        match live.get(id) {
            Some(session) if session.made.elapsed() < SESSION_LIFETIME => Some(session.clone()),
            Some(_) => {
                live.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends session `id`.
    pub fn close(&self, id: &str) {
        self.live.lock().expect("sessions").remove(id);
    }
}

/// Whether the form's CSRF token is the session's, in constant time.
pub fn csrf_matches(session: &Session, sent: &str) -> bool {
    !sent.is_empty() && bool::from(sent.as_bytes().ct_eq(session.csrf.as_bytes()))
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, on every path, for `max_age` (zero
/// removes it), and `Secure` when the console is served through TLS.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    let mut cookie = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        max_age.as_secs()
    );
    if secure {
        cookie.push_str("; Secure");
    }
    cookie
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            operator: Some(Secret::new("operator-token".into())),
            viewer: Some(Secret::new("viewer-token".into())),
        }
    }

    #[test]
    fn each_token_logs_in_as_its_role_and_nothing_else_does() {
        let tokens = tokens();
        assert_eq!(tokens.role_of("operator-token"), Some(Role::Operator));
        assert_eq!(tokens.role_of("viewer-token"), Some(Role::Viewer));
        assert_eq!(tokens.role_of(""), None);
        assert_eq!(tokens.role_of("operator-toke"), None);
        assert_eq!(Tokens::default().role_of(""), None);
    }

    #[test]
    fn sessions_are_kept_to_their_bound_and_closed_ones_are_gone() {
        let sessions = Sessions::default();
        let (first, session) = sessions.open(Role::Viewer, None).unwrap();
        assert_eq!(first.len(), 64);
        assert!(csrf_matches(&session, &session.csrf));
        assert!(!csrf_matches(&session, ""));
        assert!(!csrf_matches(&session, &first));
        let (operator, _) = sessions.open(Role::Operator, None).unwrap();
        for _ in 0..MAX_SESSIONS {
            sessions.open(Role::Viewer, None).unwrap();
        }
        assert_eq!(sessions.live.lock().unwrap().len(), MAX_SESSIONS);
        assert!(sessions.get(&first).is_none(), "the oldest was pushed out");
        assert!(
            sessions.get(&operator).is_some(),
            "viewers pushed out an operator"
        );
        let (id, _) = sessions.open(Role::Operator, None).unwrap();
        assert_eq!(sessions.get(&id).unwrap().role, Role::Operator);
        sessions.close(&id);
        assert!(sessions.get(&id).is_none());
    }

    /// A name cannot forge a trailer or a line, nor grow without bound.
    #[test]
    fn a_given_name_is_one_short_line() {
        assert_eq!(given_name("  Ada Lovelace "), Some("Ada Lovelace".into()));
        assert_eq!(
            given_name("eve\nRequested-by: admin\r"),
            Some("eveRequested-by: admin".into())
        );
        assert_eq!(given_name(" \t\n"), None);
        assert_eq!(
            given_name("ad\u{202E}nimda\u{200B}"),
            Some("adnimda".into())
        );
        assert_eq!(
            given_name(&"x".repeat(500)).unwrap().chars().count(),
            MAX_NAME
        );
    }

    #[test]
    fn cookies_are_read_by_name_and_set_strict() {
        assert_eq!(
            cookie("a=1; berth_session=xyz; b=2", session_cookie(false)),
            Some("xyz")
        );
        assert_eq!(cookie("xberth_session=1", session_cookie(false)), None);
        let set = set_cookie(session_cookie(true), "v", SESSION_LIFETIME, true);
        assert_eq!(
            set,
            "__Host-berth_session=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200; Secure"
        );
    }
}
