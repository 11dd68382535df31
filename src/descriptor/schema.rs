//! JSON Schemas generated from the descriptor model, and schema validation with user-facing messages.
//!
//! This module owns three things: generating one schema per kind plus one for the common envelope
//! (what `berth schema` writes to `schema/`), compiling them once, and turning `jsonschema`'s errors
//! into messages that say what was written and what was expected. It never reads files.
//!
//! Messages quote what was written, except inside a secret: wherever a schema node is marked
//! `writeOnly` (secret references and the maps of them), no value and no key is ever shown, only
//! the path to the secret and what to write instead.

use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use schemars::generate::SchemaSettings;
use serde_json::Value;

use super::Kind;
use super::model::{ChallengeSpec, Envelope, PipelineSpec, StagingSpec};
use super::values::{self, Duration, Name, ObjectRef, Size};
use super::yaml::{escaped, show};

/// Most violations reported for one file: enough to fix a file in a few rounds, few enough that
/// a hostile file cannot make an unbounded list. [`check`] returns one more, so that the loader
/// can say there are more.
pub const MAX_VIOLATIONS: usize = 100;

/// Base of the `$id` of every schema berth writes.
pub const SCHEMA_ID_BASE: &str = "https://berth.dev/schema/v1/";

/// The descriptor schema files `berth schema` writes, by file name (the agent's config schema
/// is [`crate::config::schema`]).
pub fn generate() -> Vec<(&'static str, Value)> {
    let mut files = vec![("envelope.json", envelope_schema())];
    for kind in Kind::ALL {
        files.push((kind.schema_file(), kind_schema(kind)));
    }
    files
}

/// The schema of any of berth's types, written as berth writes its schema files.
pub fn root_schema<T: schemars::JsonSchema>(file: &str, title: &str) -> Value {
    finish(
        settings().into_root_schema_for::<T>().to_value(),
        file,
        title,
    )
}

fn settings() -> schemars::SchemaGenerator {
    SchemaSettings::draft2020_12().into_generator()
}

/// Optional fields are left out, never written as `null`: drop the `null` alternatives schemars
/// adds for `Option`, so that a wrong value gets the precise error of the one real type.
fn drop_null_options(schema: &mut Value) {
    match schema {
        Value::Object(object) => {
            if let Some(Value::Array(choices)) = object.get_mut("anyOf") {
                choices.retain(|choice| choice != &serde_json::json!({"type": "null"}));
                if choices.len() == 1
                    && let Some(Value::Object(only)) = choices.pop()
                {
                    object.remove("anyOf");
                    for (key, value) in only {
                        object.entry(key).or_insert(value);
                    }
                }
            }
            if let Some(Value::Array(types)) = object.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.pop().expect("one type");
                    object.insert("type".into(), only);
                }
            }
            object.values_mut().for_each(drop_null_options);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null_options),
        _ => {}
    }
}

fn finish(mut schema: Value, file: &str, title: &str) -> Value {
    drop_null_options(&mut schema);
    let object = schema
        .as_object_mut()
        .expect("schemars makes object schemas");
    object.insert(
        "$id".into(),
        Value::String(format!("{SCHEMA_ID_BASE}{file}")),
    );
    object.insert("title".into(), Value::String(title.into()));
    schema
}

fn kind_schema(kind: Kind) -> Value {
    let generator = settings();
    let schema = match kind {
        Kind::Challenge => generator.into_root_schema_for::<Envelope<ChallengeSpec>>(),
        Kind::Pipeline => generator.into_root_schema_for::<Envelope<PipelineSpec>>(),
        Kind::Staging => generator.into_root_schema_for::<Envelope<StagingSpec>>(),
    };
    let mut schema = schema.to_value();
    schema["properties"]["kind"] =
        serde_json::json!({ "const": kind.as_str(), "description": "The kind of descriptor." });
    if let Some(defs) = schema.get_mut("$defs").and_then(Value::as_object_mut) {
        defs.remove("Kind");
    }
    finish(
        schema,
        kind.schema_file(),
        &format!("berth {kind} descriptor"),
    )
}

fn envelope_schema() -> Value {
    let schema = settings()
        .into_root_schema_for::<Envelope<serde_json::Map<String, Value>>>()
        .to_value();
    finish(schema, "envelope.json", "berth descriptor envelope")
}

struct Compiled {
    envelope: (Value, Validator),
    kinds: Vec<(Value, Validator)>,
    /// Names of the fields that hold secrets, in any kind.
    secret_fields: Vec<String>,
}

fn compiled() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let compile = |schema: Value| {
            let mut options = jsonschema::options().should_validate_formats(true);
            for &(name, check) in values::FORMATS {
                options = options.with_format(name, move |text: &str| check(text).is_ok());
            }
            let validator = options.build(&schema).expect("generated schemas are valid");
            (schema, validator)
        };
        let kinds: Vec<_> = Kind::ALL
            .iter()
            .map(|kind| compile(kind_schema(*kind)))
            .collect();
        let mut secret_fields = Vec::new();
        for (schema, _) in &kinds {
            collect_secret_fields(schema, &mut secret_fields);
        }
        secret_fields.sort();
        secret_fields.dedup();
        Compiled {
            envelope: compile(envelope_schema()),
            kinds,
            secret_fields,
        }
    })
}

fn collect_secret_fields(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(object) => {
            if let Some(Value::Object(properties)) = object.get("properties") {
                for (name, property) in properties {
                    if property.get("writeOnly") == Some(&Value::Bool(true)) {
                        out.push(name.clone());
                    }
                }
            }
            object
                .values()
                .for_each(|value| collect_secret_fields(value, out));
        }
        Value::Array(items) => items
            .iter()
            .for_each(|value| collect_secret_fields(value, out)),
        _ => {}
    }
}

/// The names of the fields that hold secrets (`secretEnv`, `secret`): YAML problems inside them
/// never name a key.
pub fn secret_fields() -> &'static [String] {
    &compiled().secret_fields
}

/// Whether the value at `pointer` lies in a secret, in any kind's schema: then the part of the
/// pointer that may be shown. That is the path up to the secret, plus the name a map of secrets
/// holds it under when that name is a plain variable name (`/spec/secretEnv/FLAG`); never a key
/// inside a secret reference.
pub fn secret_part(pointer: &str) -> Option<String> {
    compiled()
        .kinds
        .iter()
        .filter_map(|(schema, _)| secret_part_in(schema, pointer))
        .min_by_key(String::len)
}

fn secret_part_in(schema: &Value, pointer: &str) -> Option<String> {
    let mut node = schema;
    let mut walked = 0;
    let mut segments = pointer.split('/').skip(1).peekable();
    loop {
        if write_only(schema, node) {
            let mut shown = pointer[..walked].to_string();
            if let Some(name) = segments.peek()
                && resolve(schema, node)
                    .get("additionalProperties")
                    .is_some_and(Value::is_object)
                && values::is_variable_name(name)
            {
                shown.push('/');
                shown.push_str(name);
            }
            return Some(shown);
        }
        let segment = segments.next()?;
        node = child(schema, node, &segment.replace("~1", "/").replace("~0", "~"))?;
        walked += 1 + segment.len();
    }
}

/// `node`, or what its `$ref` points at.
fn resolve<'a>(schema: &'a Value, mut node: &'a Value) -> &'a Value {
    // Generated schemas never chain references deeply; the bound only guards against a cycle.
    for _ in 0..8 {
        match node
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|reference| reference.strip_prefix('#'))
            .and_then(|pointer| schema.pointer(pointer))
        {
            Some(target) => node = target,
            None => break,
        }
    }
    node
}

fn write_only(schema: &Value, node: &Value) -> bool {
    let marked = |node: &Value| node.get("writeOnly") == Some(&Value::Bool(true));
    marked(node) || marked(resolve(schema, node))
}

/// The schema of `node`'s member `segment`, through references and untagged choices.
fn child<'a>(schema: &'a Value, node: &'a Value, segment: &str) -> Option<&'a Value> {
    let node = resolve(schema, node);
    if let Some(property) = node.get("properties").and_then(|p| p.get(segment)) {
        return Some(property);
    }
    for key in ["additionalProperties", "items"] {
        if let Some(member) = node.get(key).filter(|m| m.is_object()) {
            return Some(member);
        }
    }
    ["anyOf", "oneOf", "allOf"]
        .iter()
        .filter_map(|key| node.get(*key).and_then(Value::as_array))
        .flatten()
        .find_map(|branch| child(schema, branch, segment))
}

/// A schema violation, placed by JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer of the offending node.
    pub pointer: String,
    /// Whether the problem is the node's key (an unknown field) rather than its value.
    pub at_key: bool,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Checks a document against its kind's schema, or against the envelope when the kind is not
/// known, and returns every violation.
pub fn check(kind: Option<Kind>, document: &Value) -> Vec<Violation> {
    let compiled = compiled();
    let (schema, validator) = match kind {
        Some(kind) => &compiled.kinds[kind.index()],
        None => &compiled.envelope,
    };
    // Most documents are valid: the validator's yes-or-no walk stops early and builds no errors.
    if validator.is_valid(document) {
        return Vec::new();
    }
    let mut violations = Vec::new();
    for error in validator.iter_errors(document) {
        explain(schema, &error, &mut violations);
        if violations.len() > MAX_VIOLATIONS {
            break;
        }
    }
    // A value type's pattern and format can tell the same mistake twice.
    violations.sort_by(|a, b| (&a.pointer, &a.message).cmp(&(&b.pointer, &b.message)));
    violations.dedup();
    violations.truncate(MAX_VIOLATIONS + 1);
    violations
}

/// A JSON pointer as users write paths: `spec.ports[0].host`.
pub fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

/// The schema node that a keyword location points into (the location less its keyword).
fn schema_node<'a>(schema: &'a Value, keyword_location: &str) -> Option<&'a Value> {
    let parent = keyword_location
        .rsplit_once('/')
        .map_or("", |(parent, _)| parent);
    schema.pointer(parent)
}

/// The `$defs` entry a keyword location lies directly in, if any (`/$defs/Duration/pattern` → `Duration`).
fn definition(keyword_location: &str) -> Option<&str> {
    let rest = keyword_location.strip_prefix("/$defs/")?;
    let (name, keyword) = rest.split_once('/')?;
    (!keyword.contains('/')).then_some(name)
}

fn type_name(kind: &TypeKind) -> String {
    let article = |name: String| match name.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {name}"),
        _ => format!("a {name}"),
    };
    match kind {
        TypeKind::Single(t) => article(t.to_string()),
        TypeKind::Multiple(set) => set
            .iter()
            .map(|t| article(t.to_string()))
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

fn prefix(pointer: &str) -> String {
    if pointer.is_empty() {
        String::new()
    } else {
        format!("{}: ", dotted(pointer))
    }
}

/// A message from the value type's own parser, when the failing node is one of berth's value types.
fn value_type_message(definition: Option<&str>, value: &Value) -> Option<String> {
    let text = value.as_str()?;
    match definition? {
        "Duration" => text.parse::<Duration>().err(),
        "Size" => text.parse::<Size>().err(),
        "Name" => text.parse::<Name>().err(),
        "ObjectRef" => text.parse::<ObjectRef>().err(),
        _ => None,
    }
}

fn explain(schema: &Value, error: &ValidationError<'_>, out: &mut Vec<Violation>) {
    let pointer = error.instance_path().as_str().to_string();
    let location = error.schema_path().as_str();
    let definition = definition(location);
    let value = error.instance();
    let here = prefix(&pointer);
    let mut push = |pointer: String, at_key: bool, message: String| {
        out.push(Violation {
            pointer,
            at_key,
            message,
        })
    };

    if let Some(shown) = secret_part(&pointer) {
        explain_secret(schema, error, &pointer, &shown, out);
        return;
    }

    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed = schema_node(schema, location)
                .and_then(|node| node.get("properties"))
                .and_then(Value::as_object)
                .map(|properties| properties.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            for field in unexpected.iter().take(MAX_VIOLATIONS + 1) {
                let shown = show(&Value::String(field.clone()));
                let message = if allowed.is_empty() {
                    format!("{here}unknown field {shown}")
                } else {
                    format!("{here}unknown field {shown}, expected one of: {allowed}")
                };
                push(member(&pointer, field), true, message);
            }
        }
        ValidationErrorKind::PropertyNames { error: name_error } => {
            let name = name_error.instance();
            let rule = name_rule(schema, name_error);
            push(
                member(&pointer, name.as_str().unwrap_or_default()),
                true,
                format!("{here}{} is not a valid name: {rule}", show(name)),
            );
        }
        ValidationErrorKind::Format { format } => {
            let message = value
                .as_str()
                .and_then(|text| values::check_format(format, text))
                .and_then(Result::err)
                .map_or_else(|| error.to_string(), |problem| problem.to_string());
            push(pointer, false, format!("{here}{message}"));
        }
        ValidationErrorKind::Required { property } => {
            let property = property.as_str().unwrap_or_default();
            push(
                pointer,
                false,
                format!("{here}missing required field \"{property}\""),
            );
        }
        ValidationErrorKind::Type { kind } => {
            push(
                pointer,
                false,
                format!("{here}{} is not {}", show(value), type_name(kind)),
            );
        }
        ValidationErrorKind::Constant { expected_value } if pointer == "/apiVersion" => {
            push(
                pointer,
                false,
                format!(
                    "unknown apiVersion {}, expected {}",
                    show(value),
                    show(expected_value)
                ),
            );
        }
        ValidationErrorKind::Constant { expected_value } => {
            push(
                pointer,
                false,
                format!("{here}{} must be {}", show(value), show(expected_value)),
            );
        }
        ValidationErrorKind::Enum { options } if pointer == "/kind" => {
            let names = enum_names(options);
            push(
                pointer,
                false,
                format!("unknown kind {}, expected one of: {names}", show(value)),
            );
        }
        ValidationErrorKind::Enum { options } => {
            let names = enum_names(options);
            push(
                pointer,
                false,
                format!("{here}{} is not one of: {names}", show(value)),
            );
        }
        ValidationErrorKind::Pattern { .. }
        | ValidationErrorKind::MaxLength { .. }
        | ValidationErrorKind::MinLength { .. } => {
            let message =
                value_type_message(definition, value).unwrap_or_else(|| error.to_string());
            push(pointer, false, format!("{here}{message}"));
        }
        ValidationErrorKind::Minimum { limit } | ValidationErrorKind::Maximum { limit } => {
            let message = match (definition, schema_node(schema, location)) {
                (Some("Port"), _) => format!("{} is not a port; expected 1 to 65535", show(value)),
                (_, Some(node)) => {
                    let bounds = (node.get("minimum"), node.get("maximum"));
                    match bounds {
                        (Some(min), Some(max)) => {
                            format!("{} is out of range; expected {min} to {max}", show(value))
                        }
                        _ => format!("{} is out of range (limit {limit})", show(value)),
                    }
                }
                _ => format!("{} is out of range (limit {limit})", show(value)),
            };
            push(pointer, false, format!("{here}{message}"));
        }
        ValidationErrorKind::MinItems { limit } => {
            push(
                pointer,
                false,
                format!("{here}needs at least {limit} item(s)"),
            );
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            // Untagged choices (an image name or {fromPipeline: …}): when the value's JSON type
            // picks exactly one branch, report that branch's own errors, which are precise.
            let fitting: Vec<_> = context
                .iter()
                .filter(|branch| {
                    !branch.iter().any(|e| {
                        e.instance_path().as_str() == pointer
                            && matches!(e.kind(), ValidationErrorKind::Type { .. })
                    })
                })
                .collect();
            if let [branch] = fitting.as_slice() {
                for error in branch.iter() {
                    explain(schema, error, out);
                }
                return;
            }
            let expected = schema_node(schema, location)
                .and_then(|node| node.get("description"))
                .and_then(Value::as_str)
                .map(|d| d.trim_end_matches('.').to_lowercase())
                .unwrap_or_else(|| "one of the allowed forms".into());
            push(
                pointer,
                false,
                format!("{here}{} is not valid: expected {expected}", show(value)),
            );
        }
        _ => push(pointer, false, format!("{here}{error}")),
    }
}

/// Said of a mistake inside a secret, in place of what was written.
const HIDDEN: &str = "what is written there is not shown, as it may be a secret";
/// What to write in a secret position.
const REFERENCE: &str =
    "write a reference instead: {file: PATH} or {env: NAME}, resolved on the agent's host";

/// The message for a value that is not a secret reference where one belongs: what to write,
/// nothing of what was written. `shown` is the part of its pointer that may be shown.
pub fn secret_message(shown: &str) -> String {
    format!(
        "{}a secret value must not be written inline ({HIDDEN}); {REFERENCE}",
        prefix(shown)
    )
}

/// A problem inside a secret, told without anything written there: no value, no key.
fn explain_secret(
    schema: &Value,
    error: &ValidationError<'_>,
    pointer: &str,
    shown: &str,
    out: &mut Vec<Violation>,
) {
    let here = prefix(shown);
    let mut push = |pointer: String, at_key: bool, message: String| {
        out.push(Violation {
            pointer,
            at_key,
            message: format!("{here}{message}"),
        })
    };
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            for field in unexpected.iter().take(MAX_VIOLATIONS + 1) {
                push(
                    member(pointer, field),
                    true,
                    format!("a secret reference takes only file or env ({HIDDEN}); {REFERENCE}"),
                );
            }
        }
        ValidationErrorKind::PropertyNames { error: name_error } => {
            let name = name_error.instance();
            push(
                member(pointer, name.as_str().unwrap_or_default()),
                true,
                format!(
                    "a name is not valid ({HIDDEN}): {}",
                    name_rule(schema, name_error)
                ),
            );
        }
        ValidationErrorKind::MinProperties { .. } | ValidationErrorKind::MaxProperties { .. } => {
            push(
                pointer.to_string(),
                false,
                "a secret reference needs exactly one of file or env".into(),
            );
        }
        ValidationErrorKind::Type { .. }
            if schema_node(schema, error.schema_path().as_str())
                .and_then(|node| node.get("additionalProperties"))
                .is_some_and(Value::is_object) =>
        {
            push(
                pointer.to_string(),
                false,
                format!(
                    "expected a mapping of names to secret references, e.g. FLAG: {{file: PATH}} ({HIDDEN})"
                ),
            );
        }
        _ => out.push(Violation {
            pointer: pointer.to_string(),
            at_key: false,
            message: secret_message(shown),
        }),
    }
}

/// The pointer of `name` in the object at `pointer`.
fn member(pointer: &str, name: &str) -> String {
    format!("{pointer}/{}", escaped(name))
}

/// What names a `propertyNames` schema allows, from its description.
fn name_rule(schema: &Value, name_error: &ValidationError<'_>) -> String {
    schema_node(schema, name_error.schema_path().as_str())
        .and_then(|node| node.get("description"))
        .and_then(Value::as_str)
        .map_or_else(|| name_error.to_string(), str::to_string)
}

fn enum_names(options: &Value) -> String {
    options
        .as_array()
        .map(|list| {
            list.iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn challenge(spec: Value) -> Value {
        json!({"apiVersion": "berth/v1", "kind": "Challenge", "metadata": {"name": "web"}, "spec": spec})
    }

    fn messages(kind: Option<Kind>, document: &Value) -> Vec<(String, bool, String)> {
        check(kind, document)
            .into_iter()
            .map(|v| (v.pointer, v.at_key, v.message))
            .collect()
    }

    #[test]
    fn a_valid_challenge_has_no_violations() {
        let document = challenge(
            json!({"image": "busybox:latest", "ports": [{"container": 80, "host": 10001}]}),
        );
        assert_eq!(messages(Some(Kind::Challenge), &document), vec![]);
    }

    #[test]
    fn unknown_fields_list_the_allowed_ones() {
        let document = challenge(json!({"image": "busybox", "prots": []}));
        let found = messages(Some(Kind::Challenge), &document);
        assert_eq!(found.len(), 1);
        let (pointer, at_key, message) = &found[0];
        assert_eq!(pointer, "/spec/prots");
        assert!(at_key);
        assert!(
            message.starts_with("spec: unknown field \"prots\", expected one of: "),
            "{message}"
        );
        assert!(
            message.contains("ports") && message.contains("env"),
            "{message}"
        );
    }

    #[test]
    fn wrong_types_name_the_path_and_the_type() {
        let document =
            challenge(json!({"image": "busybox", "ports": [{"container": 80, "host": "abc"}]}));
        let found = messages(Some(Kind::Challenge), &document);
        assert_eq!(found[0].2, "spec.ports[0].host: \"abc\" is not an integer");
    }

    #[test]
    fn inline_secrets_are_refused_without_echoing_them() {
        let document = challenge(json!({"image": "busybox", "secretEnv": {"FLAG": "ctf{leak}"}}));
        let found = messages(Some(Kind::Challenge), &document);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].2.contains("must not be written inline"),
            "{}",
            found[0].2
        );
        assert!(!found[0].2.contains("ctf{leak}"));
    }

    /// Issue 8, item 13: a secret written as a map, with an unknown key, as a list or a number
    /// had its content in the message. Nothing inside a secret position is ever quoted.
    #[test]
    fn nothing_inside_a_secret_is_quoted() {
        for secret_env in [
            json!({"F": {"file": {"x": "flag{1}"}}}),
            json!({"F": {"vault": "flag{2}"}}),
            json!({"F": ["flag{3}"]}),
            json!({"F": 4242}),
            json!({"flag{5}": {"env": "X"}}),
            json!("flag{6}"),
            json!(["flag{7}"]),
            json!({"F": {"env": {"flag{8}": 1}}}),
            json!({"F": {"file": "/x", "env": "flag_9"}}),
        ] {
            let document = challenge(json!({"image": "busybox", "secretEnv": secret_env.clone(),
                "sidecars": [{"name": "db", "image": "busybox", "secretEnv": secret_env}]}));
            let found = messages(Some(Kind::Challenge), &document);
            assert_eq!(found.len(), 2, "{found:?}");
            for (_, _, message) in &found {
                for secret in ["flag", "4242"] {
                    assert!(!message.contains(secret), "{message}");
                }
            }
        }
    }

    #[test]
    fn secret_positions_come_from_the_schemas() {
        assert_eq!(secret_fields(), ["secret", "secretEnv"]);
        for (pointer, shown) in [
            ("/spec/secretEnv/FLAG/file", Some("/spec/secretEnv/FLAG")),
            ("/spec/secretEnv/flag{x}/env", Some("/spec/secretEnv")),
            ("/spec/secretEnv", Some("/spec/secretEnv")),
            (
                "/spec/sidecars/0/secretEnv/A/x/y",
                Some("/spec/sidecars/0/secretEnv/A"),
            ),
            (
                "/spec/overrides/secret/DB",
                Some("/spec/overrides/secret/DB"),
            ),
            ("/spec/env/A", None),
            ("/spec/image/build/context", None),
            ("/spec/prots/0", None),
        ] {
            assert_eq!(secret_part(pointer).as_deref(), shown, "{pointer}");
        }
    }

    /// Issue 8, item 5: names of variables are checked, each placed at its key.
    #[test]
    fn variable_names_are_placed_at_their_keys() {
        let document = challenge(json!({"image": "busybox", "env": {"A B": "x", "OK": "y"}}));
        assert_eq!(
            messages(Some(Kind::Challenge), &document),
            vec![(
                "/spec/env/A B".to_string(),
                true,
                "spec.env: \"A B\" is not a valid name: a variable name is letters, digits and _, not starting with a digit (POSIX), e.g. LOG_LEVEL".to_string()
            )]
        );
    }

    /// Issue 8, items 6 and 15: what only a value's parser or the engine's limits can tell is
    /// checked with the schema, so it comes with every other problem of the document.
    #[test]
    fn formats_are_checked_with_everything_else() {
        let document = challenge(json!({"image": "busybox", "prots": [],
            "resources": {"memory": "1k"}, "healthcheck": {"tcp": 80, "interval": "99999999999d"}}));
        let found: Vec<String> = messages(Some(Kind::Challenge), &document)
            .into_iter()
            .map(|(pointer, _, message)| format!("{pointer} {message}"))
            .collect();
        assert_eq!(
            found,
            vec![
                "/spec/healthcheck/interval spec.healthcheck.interval: \"99999999999d\" is too long; the longest duration is 106751d".to_string(),
                "/spec/prots spec: unknown field \"prots\", expected one of: state, target, image, build, command, entrypoint, env, secretEnv, secretFiles, volumes, ports, resources, healthcheck, restart, replicas, sidecars, security, network, init, stopTimeout, info, instanced".to_string(),
                "/spec/resources/memory spec.resources.memory: \"1k\" is below the smallest memory limit the engine accepts; write at least 6Mi".to_string(),
            ]
        );
    }

    #[test]
    fn value_types_explain_themselves() {
        let document = challenge(json!({"image": "busybox", "resources": {"memory": "lots"},
            "healthcheck": {"tcp": 80, "interval": "10x"}, "ports": [{"container": 70000}]}));
        let found: Vec<String> = messages(Some(Kind::Challenge), &document)
            .into_iter()
            .map(|m| m.2)
            .collect();
        assert!(found.contains(&"spec.healthcheck.interval: \"10x\" is not a duration; expected a number and a unit (ms, s, m, h, d), e.g. 30s, 10m, 14d".to_string()), "{found:?}");
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("spec.resources.memory: \"lots\" is not a size")),
            "{found:?}"
        );
        assert!(
            found.contains(
                &"spec.ports[0].container: 70000 is not a port; expected 1 to 65535".to_string()
            ),
            "{found:?}"
        );
    }

    #[test]
    fn untagged_choices_report_the_fitting_branch() {
        let document = challenge(json!({"image": {"fromPipelin": "x"}}));
        let found = messages(Some(Kind::Challenge), &document);
        assert!(
            found.iter().any(|(p, k, m)| p == "/spec/image/fromPipelin"
                && *k
                && m.contains("unknown field \"fromPipelin\"")),
            "{found:?}"
        );
    }

    #[test]
    fn unknown_kinds_and_versions_are_named() {
        let document = json!({"apiVersion": "berth/v2", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {}});
        let found: Vec<String> = messages(None, &document).into_iter().map(|m| m.2).collect();
        assert!(
            found.contains(
                &"unknown kind \"Deployment\", expected one of: Challenge, Pipeline, Staging"
                    .to_string()
            ),
            "{found:?}"
        );
        assert!(
            found.contains(&"unknown apiVersion \"berth/v2\", expected \"berth/v1\"".to_string()),
            "{found:?}"
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let document = json!({"apiVersion": "berth/v1", "kind": "Staging", "metadata": {"name": "x"}, "spec": {"tag": "v1"}});
        let found: Vec<String> = messages(Some(Kind::Staging), &document)
            .into_iter()
            .map(|m| m.2)
            .collect();
        assert_eq!(
            found,
            vec!["spec: missing required field \"namespace\"".to_string()]
        );
    }

    #[test]
    fn dotted_paths_read_like_yaml() {
        assert_eq!(dotted("/spec/ports/0/host"), "spec.ports[0].host");
        assert_eq!(dotted(""), "");
        assert_eq!(dotted("/metadata/labels/a~1b"), "metadata.labels.a/b");
    }
}
