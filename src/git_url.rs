//! What a git URL or revision says, pure: whether two clone URLs name one repository or one
//! server, what of a URL may be shown (never a password or token in it), the login name an SSH
//! URL gives, and whether a text can name a revision. Low: everything that handles git URLs
//! (the agent's source, pipeline runs, webhooks, the command line) asks here.

/// Whether `text` can name a commit, branch or tag to build: what webhooks and the API pass on
/// is checked before it reaches git, the store or a log line.
pub fn valid_revision(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 200
        && !text.starts_with('-')
        && !text.contains("..")
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./+@".contains(&b))
}

/// The first 12 characters of a commit, for messages.
pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// Whether two clone URLs name one repository: `https://host/org/app.git`,
/// `git@host:org/app`, `ssh://git@host/org/app` and `https://user@host/org/app/` all do.
/// Schemes, user names, a trailing `.git` or `/` and letter case do not count; a port other than
/// an SSH one does.
pub fn same_repository(a: &str, b: &str) -> bool {
    let (a, b) = (repository_identity(a), repository_identity(b));
    !a.is_empty() && a == b
}

/// Whether two clone URLs name one server: the same scheme, host and port (a scheme's usual port
/// when none is written). The config repo's credentials are offered to a pipeline source on the
/// same server only: never over `http://` when given for `https://`, never to another port.
pub fn same_server(a: &str, b: &str) -> bool {
    matches!((server_of(a), server_of(b)), (Some(a), Some(b)) if a == b)
}

/// A clone URL's scheme, host (lower case) and port; `None` for local paths and `file://`.
fn server_of(url: &str) -> Option<(String, String, u16)> {
    let url = url.trim();
    let (scheme, authority) = match url.split_once("://") {
        Some((scheme, rest)) => (
            scheme.to_ascii_lowercase(),
            rest.split('/').next().unwrap_or_default(),
        ),
        // `git@host:org/app`: scp-like SSH.
        None => match url.split_once(':') {
            Some((host, _)) if !host.contains('/') && !host.is_empty() => ("ssh".into(), host),
            _ => return None,
        },
    };
    let usual = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        "ssh" => 22,
        "git" => 9418,
        _ => return None,
    };
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let (host, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && !port.contains(']') => {
            (name, port.parse().ok()?)
        }
        _ => (host, usual),
    };
    (!host.is_empty()).then(|| (scheme, host.to_ascii_lowercase(), port))
}

fn repository_identity(url: &str) -> String {
    let url = url.trim();
    if url.is_empty() {
        return String::new();
    }
    let (ssh, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.eq_ignore_ascii_case("ssh"), rest.to_string()),
        // `git@host:org/app`: scp-like SSH.
        None => match url.split_once(':') {
            Some((host, path)) if !host.contains('/') => (true, format!("{host}/{path}")),
            _ => (false, url.to_string()),
        },
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest.as_str(), ""));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match (ssh, host.split_once(':')) {
        (true, Some((name, _))) => name,
        _ => host,
    };
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    format!("{host}/{path}").to_lowercase()
}

/// The login name an `ssh://user@host/…` or scp-like `user@host:…` URL gives, if any; never the
/// user part of another scheme's URL, which may be a token. Pure.
pub fn login_user(url: &str) -> Option<String> {
    let authority = match url.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("ssh") || scheme.eq_ignore_ascii_case("git+ssh") =>
        {
            rest.split('/').next()?
        }
        Some(_) => return None,
        None => url.split(':').next()?,
    };
    let (user, _) = authority.rsplit_once('@')?;
    let user = user.split(':').next()?;
    (!user.is_empty()).then(|| user.to_string())
}

/// `url` without any password or token written into it (`https://user:secret@host/…`).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // scp-like `user:password@host:path`: a password before the host is hidden; a plain
        // `git@host:path` has none.
        // The host starts after the last `@` before the path's colon.
        let (before_path, _) = url.split_once(":/").unwrap_or((url, ""));
        return match url[..before_path.len()].rfind('@') {
            Some(at) if url[..at].contains(':') && !url[..at].contains('/') => {
                format!("<secret>@{}", &url[at + 1..])
            }
            _ => url.to_string(),
        };
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    match authority.rsplit_once('@') {
        // Over ssh the user is a login name, no secret (`ssh://git@host/`), and saying which
        // one was refused is what helps; a password after it is hidden.
        Some((user, host))
            if scheme.eq_ignore_ascii_case("ssh") || scheme.eq_ignore_ascii_case("git+ssh") =>
        {
            match user.split_once(':') {
                Some((name, _)) => format!("{scheme}://{name}:<secret>@{host}/{path}"),
                None => url.to_string(),
            }
        }
        // A token is often given as the user name (`https://ghp_…@host/`): none of it is shown.
        Some((_, host)) => format!("{scheme}://<secret>@{host}/{path}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_revisions_reach_git() {
        for good in [
            "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "main",
            "release/1.2",
            "v1.0+build",
        ] {
            assert!(valid_revision(good), "{good}");
        }
        for bad in [
            "",
            "aéééééé",
            "-upload-pack=x",
            "a b",
            "a..b",
            &"x".repeat(201),
            "a\nb",
        ] {
            assert!(!valid_revision(bad), "{bad}");
        }
        assert_eq!(short("aé"), "aé");
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
    }

    #[test]
    fn clone_urls_of_one_repository_match_whatever_their_form() {
        let forms = [
            "https://git.example.org/ctf/app.git",
            "https://git.example.org/ctf/app",
            "http://ci:token@git.example.org/ctf/app/",
            "git@git.example.org:ctf/app.git",
            "ssh://git@git.example.org:22/ctf/app.git",
            "https://Git.Example.org/CTF/App",
        ];
        for a in forms {
            for b in forms {
                assert!(same_repository(a, b), "{a} and {b}");
            }
        }
        assert!(!same_repository(
            forms[0],
            "https://git.example.org/ctf/app2"
        ));
        assert!(!same_repository(
            forms[0],
            "https://other.example.org/ctf/app"
        ));
        assert!(!same_repository(
            "http://127.0.0.1:8001/app.git",
            "http://127.0.0.1:8002/app.git"
        ));
        assert!(!same_repository("", ""));
        assert!(same_server(
            forms[0],
            "https://git.example.org:443/other/repo"
        ));
        assert!(same_server(
            "ssh://git@git.example.org/a",
            "git@git.example.org:other/repo"
        ));
        // The same host over another scheme or port is another server: no credentials.
        assert!(!same_server(forms[0], "http://git.example.org/ctf/app"));
        assert!(!same_server(forms[0], "git@git.example.org:other/repo"));
        assert!(!same_server(
            forms[0],
            "https://git.example.org:8443/ctf/app"
        ));
        assert!(!same_server(forms[0], "https://evil.example.org/ctf/app"));
        assert!(!same_server(
            "http://127.0.0.1:8001/app.git",
            "http://127.0.0.1:8002/app.git"
        ));
        assert!(!same_server("file:///srv/a.git", "file:///srv/b.git"));
    }

    /// Over ssh the user is a login name, shown; a password after it is not.
    #[test]
    fn an_ssh_user_is_shown_and_its_password_is_not() {
        assert_eq!(
            redact("ssh://git@host:2222/ops/infra.git"),
            "ssh://git@host:2222/ops/infra.git"
        );
        assert_eq!(
            redact("ssh://git:hunter2@host/ops/infra.git"),
            "ssh://git:<secret>@host/ops/infra.git"
        );
        assert_eq!(
            redact("https://ghp_token@host/x.git"),
            "https://<secret>@host/x.git"
        );
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact("https://bot:s3cret@git.example.org/ops/infra.git"),
            "https://<secret>@git.example.org/ops/infra.git"
        );
        // A token given as the user name.
        assert_eq!(
            redact("http://ghp_TOKENabc123@127.0.0.1:1/x.git"),
            "http://<secret>@127.0.0.1:1/x.git"
        );
        assert_eq!(redact("git@host:ops/infra.git"), "git@host:ops/infra.git");
        assert_eq!(
            redact("bot:s3cret@git.example.org:ops/infra.git"),
            "<secret>@git.example.org:ops/infra.git"
        );
        assert_eq!(
            redact("bot:p@ss@git.example.org:ops/infra.git"),
            "<secret>@git.example.org:ops/infra.git"
        );
        assert_eq!(redact("https://host/x.git"), "https://host/x.git");
    }
}
