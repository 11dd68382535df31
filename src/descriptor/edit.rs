//! Changing one descriptor's `spec.state` in its file as a person would in an editor: that value
//! alone, written where it stands (or one line added where it is missing), and every other byte
//! (comments, order, quoting, the file's other documents) as it was. Pure.
//!
//! The change is checked by reading the file again: it must say the new state and, but for it,
//! exactly what it said before; otherwise nothing is changed and the reason is given.

use serde_json::Value;

use super::yaml::{self, Position};
use super::{Kind, ObjectRef};

/// A state the console can ask a descriptor for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WantedState {
    /// `running`: a Challenge started, a Staging restored.
    Running,
    /// `stopped`: a Challenge's containers kept but stopped, a Staging's workloads scaled to zero.
    Stopped,
    /// `archived`: a Staging scaled to zero, its volumes kept.
    Archived,
}

impl WantedState {
    /// The value as the descriptor writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            WantedState::Running => "running",
            WantedState::Stopped => "stopped",
            WantedState::Archived => "archived",
        }
    }

    /// The state named `name`.
    pub fn from_name(name: &str) -> Option<WantedState> {
        [
            WantedState::Running,
            WantedState::Stopped,
            WantedState::Archived,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Whether a descriptor of `kind` takes this state.
    pub fn fits(self, kind: Kind) -> bool {
        matches!(
            (kind, self),
            (Kind::Challenge, WantedState::Running | WantedState::Stopped)
                | (
                    Kind::Staging,
                    WantedState::Running | WantedState::Stopped | WantedState::Archived
                )
        )
    }
}

/// Why a descriptor's state cannot be changed in its file by berth.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditRefused {
    /// The kind has no such state.
    #[error("a {0} cannot be {state}", state = .1.as_str())]
    NotAState(Kind, WantedState),
    /// The file does not parse.
    #[error("the file does not read as YAML: {0}")]
    NotYaml(String),
    /// No document of the file declares the object.
    #[error("the file declares no {0}")]
    NotDeclared(ObjectRef),
    /// The object's document has no `spec`.
    #[error("{0} has no spec to add a state to")]
    NoSpec(ObjectRef),
    /// The file is written in a way berth cannot edit in place (what, said).
    #[error("{0}")]
    Layout(&'static str),
    /// The edit would change more than the state.
    #[error(
        "the state of {0} cannot be changed alone in its file as it is written; change it by hand"
    )]
    NotAlone(ObjectRef),
}

/// `text` with the `spec.state` of the document that declares `key` set to `state`.
pub fn set_state(text: &str, key: &ObjectRef, state: WantedState) -> Result<String, EditRefused> {
    if !state.fits(key.kind) {
        return Err(EditRefused::NotAState(key.kind, state));
    }
    let before = yaml::parse(text, true);
    if let Some(fatal) = before.fatal {
        return Err(EditRefused::NotYaml(fatal.message));
    }
    let (index, document) = before
        .documents
        .iter()
        .enumerate()
        .find(|(_, d)| declares(&d.value, key))
        .ok_or_else(|| EditRefused::NotDeclared(key.clone()))?;
    let changed = match document.positions.get("/spec/state") {
        Some(at) => replace_scalar(text, at.value, state.as_str())?,
        None => {
            let spec = document
                .positions
                .get("/spec")
                .ok_or_else(|| EditRefused::NoSpec(key.clone()))?;
            add_state(text, spec.value, state.as_str())?
        }
    };
    let after = yaml::parse(&changed, false);
    let same = after.fatal.is_none()
        && after.documents.len() == before.documents.len()
        && after
            .documents
            .iter()
            .zip(&before.documents)
            .enumerate()
            .all(|(at, (new, old))| match at == index {
                true => {
                    new.value.pointer("/spec/state") == Some(&Value::from(state.as_str()))
                        && without_state(&new.value) == without_state(&old.value)
                }
                false => new.value == old.value,
            });
    match same {
        true => Ok(changed),
        false => Err(EditRefused::NotAlone(key.clone())),
    }
}

fn declares(document: &Value, key: &ObjectRef) -> bool {
    document["kind"] == key.kind.as_str() && document["metadata"]["name"] == key.name.as_str()
}

fn without_state(document: &Value) -> Value {
    let mut document = document.clone();
    if let Some(spec) = document.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("state");
    }
    document
}

/// The byte offset of a 1-based line and character column in `text`.
fn offset(text: &str, at: Position) -> Option<usize> {
    let line_start = match at.line {
        0 => return None,
        1 => 0,
        n => text.match_indices('\n').nth(n - 2).map(|(i, _)| i + 1)?,
    };
    let line = &text[line_start..];
    let column = line
        .char_indices()
        .nth(at.column.checked_sub(1)?)
        .map(|(i, _)| i)?;
    Some(line_start + column)
}

/// `text` with the scalar that starts at `at` (plain, or quoted) replaced by `value`.
fn replace_scalar(text: &str, at: Position, value: &str) -> Result<String, EditRefused> {
    let start =
        offset(text, at).ok_or(EditRefused::Layout("the state's place is not in the file"))?;
    let rest = &text[start..];
    let length = match rest.chars().next() {
        Some(quote @ ('"' | '\'')) => {
            rest[1..]
                .find(quote)
                .ok_or(EditRefused::Layout("the state's quote does not end"))?
                + 2
        }
        _ => rest
            .find(|c: char| c.is_whitespace() || matches!(c, ',' | '}' | ']' | '#'))
            .unwrap_or(rest.len()),
    };
    Ok(format!("{}{value}{}", &text[..start], &rest[length..]))
}

/// `text` with `state: VALUE` added to the spec mapping that starts at `at`: a line of its own
/// above the first key of a block mapping, or the first entry of a flow one (`{…}`).
fn add_state(text: &str, at: Position, value: &str) -> Result<String, EditRefused> {
    let start =
        offset(text, at).ok_or(EditRefused::Layout("the spec's place is not in the file"))?;
    let rest = &text[start..];
    if let Some(inside) = rest.strip_prefix('{') {
        let entry = match inside.trim_start().starts_with('}') {
            true => format!("state: {value}"),
            false => format!("state: {value}, "),
        };
        return Ok(format!("{}{{{entry}{inside}", &text[..start]));
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let indent = &text[line_start..start];
    if !indent.chars().all(|c| c == ' ') {
        return Err(EditRefused::Layout(
            "the spec's first key does not start its line",
        ));
    }
    // The file's own line ends.
    let end = match text.contains("\r\n") {
        true => "\r\n",
        false => "\n",
    };
    Ok(format!(
        "{}{indent}state: {value}{end}{}",
        &text[..line_start],
        &text[line_start..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> ObjectRef {
        text.parse().unwrap()
    }

    #[test]
    fn an_existing_state_changes_alone_keeping_comments_and_quotes() {
        let text = "# the web challenge\napiVersion: berth/v1\nkind: Challenge\nmetadata: {name: web}\nspec:\n  image: web:1   # pinned\n  state: \"running\"  # for now\n  ports: [{container: 80}]\n";
        let changed = set_state(text, &key("Challenge/web"), WantedState::Stopped).unwrap();
        assert_eq!(
            changed,
            text.replace("state: \"running\"  # for now", "state: stopped  # for now")
        );
    }

    #[test]
    fn a_missing_state_is_one_line_added_at_the_specs_indent_or_a_flow_entry() {
        let text = "kind: Staging\nmetadata:\n  name: qa\nspec:\n    namespace: qa\n    manifests: qa/\n---\nkind: Staging\nmetadata: {name: other}\nspec: {namespace: other}\n";
        let changed = set_state(text, &key("Staging/qa"), WantedState::Archived).unwrap();
        assert_eq!(
            changed,
            text.replace(
                "spec:\n    namespace: qa",
                "spec:\n    state: archived\n    namespace: qa"
            )
        );
        let flow = set_state(text, &key("Staging/other"), WantedState::Archived).unwrap();
        assert_eq!(
            flow,
            text.replace(
                "spec: {namespace: other}",
                "spec: {state: archived, namespace: other}"
            )
        );
    }

    #[test]
    fn an_added_line_ends_as_the_files_lines_do() {
        let text = "kind: Challenge\r\nmetadata: {name: web}\r\nspec:\r\n  image: web:1\r\n";
        let changed = set_state(text, &key("Challenge/web"), WantedState::Stopped).unwrap();
        assert_eq!(
            changed,
            "kind: Challenge\r\nmetadata: {name: web}\r\nspec:\r\n  state: stopped\r\n  image: web:1\r\n"
        );
    }

    #[test]
    fn what_cannot_be_changed_alone_is_refused() {
        let text = "kind: Challenge\nmetadata: {name: web}\nspec: {image: web:1}\n";
        let archived = set_state(text, &key("Challenge/web"), WantedState::Archived).unwrap_err();
        assert_eq!(archived.to_string(), "a Challenge cannot be archived");
        assert_eq!(
            set_state(text, &key("Challenge/api"), WantedState::Stopped),
            Err(EditRefused::NotDeclared(key("Challenge/api")))
        );
        // An anchor shared with another value: changing it in place would change both.
        let shared = "kind: Challenge\nmetadata: {name: web}\nspec:\n  state: &s running\n  info: {was: *s}\n  image: web:1\n";
        assert_eq!(
            set_state(shared, &key("Challenge/web"), WantedState::Stopped),
            Err(EditRefused::NotAlone(key("Challenge/web")))
        );
        assert!(matches!(
            set_state("kind: [", &key("Challenge/web"), WantedState::Stopped),
            Err(EditRefused::NotYaml(_))
        ));
    }
}
