//! The small value types descriptors are written in: durations, sizes, names, ports, cron
//! expressions, secret references and `Kind/name` references.
//!
//! Each type parses from the text a user writes, renders back to the same text, and describes itself
//! as a JSON Schema with a pattern and examples, so editors catch mistakes as people type. Parsing
//! is pure and owns its error messages: each says what was written and what was expected.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};

/// Pattern of a DNS-1123 label.
pub const NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";
const SIZE_PATTERN: &str = "^[0-9]+(\\.[0-9]+)?(k|K|M|G|T|Ki|Mi|Gi|Ti)?$";
const REFERENCE_PATTERN: &str = "^(Challenge|Pipeline|Staging)/[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Pattern of a portable variable name (POSIX): letters, digits and `_`, not starting with a digit.
/// [`is_variable_name`] is the same rule in Rust.
pub const VARIABLE_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// Longest duration: what an engine can still count in nanoseconds as an `i64` (Docker's
/// health-check intervals are), so no value overflows on its way to the engine.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(106_751 * 86_400);
/// Largest size: what an engine can still count in bytes as an `i64` (Docker's memory limit is).
const MAX_SIZE_BYTES: u64 = i64::MAX as u64;
/// Docker refuses a memory limit below 6 MiB (`Minimum memory limit allowed is 6MB`).
pub const MIN_MEMORY_LIMIT: Size = Size { bytes: 6 << 20 };

/// `format` of a [`Duration`].
const DURATION_FORMAT: &str = "berth-duration";
/// `format` of a [`Size`].
const SIZE_FORMAT: &str = "berth-size";
/// `format` of a [`CronExpr`].
const CRON_FORMAT: &str = "berth-cron";
/// `format` of a memory limit: a [`Size`] the engine accepts as one.
pub const MEMORY_LIMIT_FORMAT: &str = "berth-memory-limit";
/// `format` of a [`Duration`] that must not be zero: health-check intervals and timeouts (Docker
/// reads 0 as "the default" and refuses anything under 1ms) and run timeouts.
pub const NONZERO_DURATION_FORMAT: &str = "berth-nonzero-duration";

/// Why a string does not satisfy a format, if it does not.
pub type FormatCheck = fn(&str) -> Result<(), FormatProblem>;

/// What is wrong with a string a schema's `format` names, as its parser or the engine's limit
/// tells it: shown at the value, as the schema's other problems are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatProblem(pub String);

/// What a string must be beyond its schema's pattern, by the `format` name the schemas carry:
/// the value types' own parsers and the engine's limits. The schema validator runs these, so a
/// value that matches its pattern but cannot be used (an overflowing size, a memory limit the
/// engine refuses) is reported with every other problem of its document, at its value.
pub const FORMATS: &[(&str, FormatCheck)] = &[
    (DURATION_FORMAT, |text| {
        text.parse::<Duration>().map(drop).map_err(FormatProblem)
    }),
    (SIZE_FORMAT, |text| {
        text.parse::<Size>().map(drop).map_err(FormatProblem)
    }),
    (CRON_FORMAT, |text| {
        text.parse::<CronExpr>().map(drop).map_err(FormatProblem)
    }),
    (MEMORY_LIMIT_FORMAT, memory_limit),
    (NONZERO_DURATION_FORMAT, nonzero_duration),
];

/// Why `text` does not satisfy `format`, if it does not; `None` for formats berth does not own.
pub fn check_format(format: &str, text: &str) -> Option<Result<(), FormatProblem>> {
    FORMATS
        .iter()
        .find(|(name, _)| *name == format)
        .map(|(_, check)| check(text))
}

/// Texts that are no size at all are left to the size format, so each mistake is told once.
fn memory_limit(text: &str) -> Result<(), FormatProblem> {
    match text.parse::<Size>() {
        Ok(size) if size < MIN_MEMORY_LIMIT => Err(FormatProblem(format!(
            "\"{text}\" is below the smallest memory limit the engine accepts; write at least {MIN_MEMORY_LIMIT}"
        ))),
        _ => Ok(()),
    }
}

fn nonzero_duration(text: &str) -> Result<(), FormatProblem> {
    match text.parse::<Duration>() {
        Ok(duration) if duration.0.is_zero() => Err(FormatProblem(format!(
            "\"{text}\" is too short; write at least 1ms"
        ))),
        _ => Ok(()),
    }
}

/// Whether `text` is a portable variable name (POSIX): letters, digits and `_`, not starting with
/// a digit. The same rule as [`VARIABLE_NAME_PATTERN`].
pub fn is_variable_name(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Implements serde and Display for a type that round-trips through its text form.
macro_rules! text_value {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(super) use text_value;

/// A length of time written as `30s`, `10m`, `14d`, `1h30m` or `500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl FromStr for Duration {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!(
                "\"{text}\" is not a duration; expected a number and a unit (ms, s, m, h, d), e.g. 30s, 10m, 14d"
            )
        };
        let too_long = || {
            format!(
                "\"{text}\" is too long; the longest duration is {}",
                Duration(MAX_DURATION)
            )
        };
        let mut total = std::time::Duration::ZERO;
        let mut rest = text;
        if rest.is_empty() {
            return Err(invalid());
        }
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(invalid)?;
            if digits == 0 {
                return Err(invalid());
            }
            // Only digits: parsing fails only by overflow.
            let amount: u64 = rest[..digits].parse().map_err(|_| too_long())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (std::time::Duration::from_millis(1), 2)
            } else {
                let seconds = match rest.chars().next() {
                    Some('s') => 1,
                    Some('m') => 60,
                    Some('h') => 3600,
                    Some('d') => 86_400,
                    _ => return Err(invalid()),
                };
                (std::time::Duration::from_secs(seconds), 1)
            };
            let part = unit
                .checked_mul(u32::try_from(amount).map_err(|_| too_long())?)
                .ok_or_else(too_long)?;
            total = total.checked_add(part).ok_or_else(too_long)?;
            rest = &rest[len..];
        }
        if total > MAX_DURATION {
            return Err(too_long());
        }
        Ok(Duration(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if !millis.is_multiple_of(1000) {
            return write!(f, "{millis}ms");
        }
        let seconds = self.0.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if seconds != 0 && seconds.is_multiple_of(size) {
                return write!(f, "{}{unit}", seconds / size);
            }
        }
        write!(f, "{seconds}s")
    }
}
text_value!(Duration);

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "format": DURATION_FORMAT,
            "description": "A length of time: a number and a unit (ms, s, m, h, d), e.g. 30s, 10m, 14d, 1h30m.",
            "examples": ["30s", "10m", "14d"]
        })
    }
}

/// An amount of memory or storage in bytes, written as `256Mi`, `1G` or `1048576`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size {
    /// The size in bytes.
    pub bytes: u64,
}

impl FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!(
                "\"{text}\" is not a size; expected a number with an optional unit (k, M, G, T, Ki, Mi, Gi, Ti), e.g. 256Mi, 1G"
            )
        };
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let multiplier: u64 = match unit {
            "" => 1,
            "k" | "K" => 1000,
            "M" => 1000_u64.pow(2),
            "G" => 1000_u64.pow(3),
            "T" => 1000_u64.pow(4),
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            _ => return Err(invalid()),
        };
        if number.is_empty()
            || number.starts_with('.')
            || number.ends_with('.')
            || number.matches('.').count() > 1
        {
            return Err(invalid());
        }
        let value: f64 = number.parse().map_err(|_| invalid())?;
        let bytes = value * multiplier as f64;
        // `MAX_SIZE_BYTES as f64` rounds up to 2^63, one past the largest size.
        if !bytes.is_finite() || bytes >= MAX_SIZE_BYTES as f64 {
            return Err(format!(
                "\"{text}\" is too large; the largest size is {}",
                Size {
                    bytes: MAX_SIZE_BYTES >> 40 << 40
                }
            ));
        }
        Ok(Size {
            bytes: bytes.round() as u64,
        })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if self.bytes != 0 && self.bytes.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.bytes / size);
            }
        }
        write!(f, "{}", self.bytes)
    }
}
text_value!(Size);

impl Size {
    /// `bytes` as people read a measured size: `5.2 GiB`, `300 MiB`, `12 KiB`, `80 B`. Pure.
    pub fn approximate(bytes: u64) -> String {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if bytes >= size {
                let amount = bytes as f64 / size as f64;
                return if amount < 10.0 {
                    format!("{:.1} {unit}", (amount * 10.0).floor() / 10.0)
                } else {
                    format!("{} {unit}", amount.floor())
                };
            }
        }
        format!("{bytes} B")
    }
}

impl JsonSchema for Size {
    fn schema_name() -> Cow<'static, str> {
        "Size".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": SIZE_PATTERN,
            "format": SIZE_FORMAT,
            "description": "An amount of bytes with an optional unit: k, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024).",
            "examples": ["256Mi", "1G"]
        })
    }
}

/// A DNS-1123 label: lower-case letters, digits and `-`, at most 63 characters, starting and
/// ending with a letter or digit. Names become parts of container, network and namespace names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let valid = !text.is_empty()
            && text.len() <= 63
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !text.starts_with('-')
            && !text.ends_with('-');
        if valid {
            Ok(Name(text.to_string()))
        } else {
            Err(format!(
                "\"{text}\" is not a valid name; expected a DNS-1123 label: at most 63 lower-case letters, digits or '-', starting and ending with a letter or digit"
            ))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
text_value!(Name);

impl JsonSchema for Name {
    fn schema_name() -> Cow<'static, str> {
        "Name".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": NAME_PATTERN,
            "maxLength": 63,
            "description": "A DNS-1123 label: at most 63 lower-case letters, digits or '-', starting and ending with a letter or digit.",
            "examples": ["web-101"]
        })
    }
}

/// A TCP or UDP port number, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = i64::deserialize(deserializer)?;
        match u16::try_from(number) {
            Ok(port) if port != 0 => Ok(Port(port)),
            _ => Err(serde::de::Error::custom(format!(
                "{number} is not a port; expected 1 to 65535"
            ))),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl JsonSchema for Port {
    fn schema_name() -> Cow<'static, str> {
        "Port".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "integer",
            "minimum": 1,
            "maximum": 65535,
            "description": "A port number, 1 to 65535."
        })
    }
}

/// A standard 5-field cron expression (minute, hour, day of month, month, day of week), such as
/// `*/15 * * * *`; `@daily` and other nicknames work too.
///
/// Only the text is kept: a parsed schedule holds croner's bit sets (5 KiB), which 2,000
/// pipelines' descriptors would carry for nothing between runs. It is parsed again when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronExpr {
    text: String,
}

impl CronExpr {
    /// The parsed schedule.
    pub fn schedule(&self) -> croner::Cron {
        cron_parser()
            .parse(&self.text)
            .expect("a CronExpr is checked when it is made")
    }
}

impl FromStr for CronExpr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        // A schedule is checked twice per document (the schema's format check, then the typed
        // model), and repos repeat schedules: remember the last few checked, since parsing one
        // fills croner's bit sets and was a tenth of `validate`'s time.
        const REMEMBERED: usize = 8;
        thread_local! {
            static RECENT: super::recent::Recent<Result<(), String>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let checked = super::recent::remembered(&RECENT, REMEMBERED, text, check_cron);
        checked.map(|()| CronExpr {
            text: text.to_string(),
        })
    }
}

fn cron_parser() -> croner::parser::CronParser {
    use croner::parser::{CronParser, Seconds, Year};
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

fn check_cron(text: &str) -> Result<(), String> {
    let fields = text.split_whitespace().count();
    if !text.trim_start().starts_with('@') && fields != 5 {
        return Err(format!(
            "\"{text}\" is not a cron expression: it has {fields} fields, expected 5 (minute hour day-of-month month day-of-week), e.g. \"*/15 * * * *\""
        ));
    }
    match cron_parser().parse(text) {
        Ok(_) => Ok(()),
        Err(error) => Err(format!(
            "\"{text}\" is not a cron expression ({error}); expected 5 fields (minute hour day-of-month month day-of-week), e.g. \"*/15 * * * *\""
        )),
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
text_value!(CronExpr);

impl JsonSchema for CronExpr {
    fn schema_name() -> Cow<'static, str> {
        "CronExpr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": CRON_FORMAT,
            "description": "A standard 5-field cron expression: minute hour day-of-month month day-of-week.",
            "examples": ["*/15 * * * *", "0 3 * * 1"]
        })
    }
}

/// Where a secret's value is found on the agent's host. Secret values are never written in the repo.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(deny_unknown_fields)]
// `writeOnly` marks what messages must never show (see `schema::secret_part`).
#[schemars(extend("minProperties" = 1, "maxProperties" = 1, "writeOnly" = true))]
pub struct SecretRef {
    /// Path of a file on the agent's host that holds the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Name of an environment variable of the agent that holds the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

impl SecretRef {
    /// Reads the secret's value on this host. The error names the reference, never a value.
    pub fn resolve(&self) -> Result<String, SecretError> {
        match (&self.file, &self.env) {
            (Some(path), None) => std::fs::read_to_string(path)
                .map(|value| value.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|source| SecretError::File {
                    path: path.clone(),
                    source,
                }),
            (None, Some(name)) => std::env::var(name).map_err(|_| SecretError::Unset(name.clone())),
            _ => Err(SecretError::NotOne),
        }
    }
}

/// A named secret whose value could not be read.
#[derive(Debug, thiserror::Error)]
#[error("secret {name}: {source}")]
pub struct SecretUnread {
    /// The secret's name (its variable, its key).
    pub name: String,
    /// Why.
    pub source: SecretError,
}

/// Reads each named secret's value; the error names the secret and its reference, never a
/// value.
pub fn resolve_all<'a>(
    secrets: impl IntoIterator<Item = (&'a String, &'a SecretRef)>,
) -> Result<std::collections::BTreeMap<String, String>, SecretUnread> {
    secrets
        .into_iter()
        .map(|(name, reference)| {
            reference
                .resolve()
                .map(|value| (name.clone(), value))
                .map_err(|source| SecretUnread {
                    name: name.clone(),
                    source,
                })
        })
        .collect()
}

/// Why a secret's value could not be read. It names the reference, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file that holds it cannot be read.
    #[error("cannot read secret file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The system's reason.
        source: std::io::Error,
    },
    /// The environment variable that holds it is not set.
    #[error("secret environment variable {0} is not set")]
    Unset(String),
    /// The reference names both a file and a variable, or neither.
    #[error("a secret reference needs exactly one of file or env")]
    NotOne,
}

impl fmt::Display for SecretRef {
    /// Always `<secret>`: a reference is shown, never followed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// A reference to another descriptor, written `Kind/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The kind.
    pub kind: super::Kind,
    /// The name.
    pub name: Name,
}

impl FromStr for ObjectRef {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!("\"{text}\" is not a reference; expected Kind/name, e.g. Pipeline/web-image")
        };
        let (kind, name) = text.split_once('/').ok_or_else(invalid)?;
        Ok(ObjectRef {
            kind: kind.parse().map_err(|_| invalid())?,
            name: name.parse()?,
        })
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}
text_value!(ObjectRef);

impl JsonSchema for ObjectRef {
    fn schema_name() -> Cow<'static, str> {
        "ObjectRef".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": REFERENCE_PATTERN,
            "description": "Another descriptor, as Kind/name.",
            "examples": ["Pipeline/web-image"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_render() {
        for (text, seconds) in [
            ("30s", 30),
            ("10m", 600),
            ("14d", 14 * 86_400),
            ("1h30m", 5400),
            ("0s", 0),
        ] {
            let duration: Duration = text.parse().unwrap();
            assert_eq!(duration.0.as_secs(), seconds, "{text}");
        }
        assert_eq!("500ms".parse::<Duration>().unwrap().0.as_millis(), 500);
        assert_eq!("90m".parse::<Duration>().unwrap().to_string(), "90m");
        assert_eq!("120m".parse::<Duration>().unwrap().to_string(), "2h");
        for bad in ["", "30", "s", "10x", "1.5h", "-1s", "10 m"] {
            let error = bad.parse::<Duration>().unwrap_err();
            assert!(error.contains("is not a duration"), "{bad}: {error}");
        }
    }

    /// Issue 8, item 15: a duration an engine cannot count in nanoseconds overflowed on its way
    /// to Docker (a negative health-check interval); it is refused, saying the longest.
    #[test]
    fn durations_stop_where_engines_stop_counting() {
        assert_eq!(
            "106751d".parse::<Duration>().unwrap().to_string(),
            "106751d"
        );
        for long in [
            "106752d",
            "99999999999d",
            "99999999999999999999999s",
            "4294967296ms",
        ] {
            let error = long.parse::<Duration>().unwrap_err();
            assert_eq!(
                error,
                format!("\"{long}\" is too long; the longest duration is 106751d")
            );
        }
    }

    /// Issue 8, item 15: `99999999999999999999Gi` matched the size pattern and then failed to
    /// deserialize, reported at the document's first line; now the parser itself refuses it,
    /// saying the largest size, so the schema check places it at the value.
    #[test]
    fn sizes_stop_where_engines_stop_counting() {
        assert_eq!("8388607Ti".parse::<Size>().unwrap().bytes, 8_388_607 << 40);
        for large in [
            "8388608Ti",
            "99999999999999999999Gi",
            "99999999999999999999",
        ] {
            let error = large.parse::<Size>().unwrap_err();
            assert_eq!(
                error,
                format!("\"{large}\" is too large; the largest size is 8388607Ti")
            );
        }
    }

    /// Issue 8, item 6: values the engine refuses (a memory limit under 6 MiB, a zero interval)
    /// are refused here, and a text that is no value at all is left to its type's own format.
    #[test]
    fn formats_know_the_engine_limits() {
        let check = |format: &str, text: &str| check_format(format, text).expect("known format");
        assert!(check(MEMORY_LIMIT_FORMAT, "6Mi").is_ok());
        assert!(
            check(MEMORY_LIMIT_FORMAT, "64MB").is_ok(),
            "the size format tells this one"
        );
        assert_eq!(
            check(MEMORY_LIMIT_FORMAT, "1k").unwrap_err().to_string(),
            "\"1k\" is below the smallest memory limit the engine accepts; write at least 6Mi"
        );
        assert!(check(MEMORY_LIMIT_FORMAT, "6291455").is_err());
        assert!(check(NONZERO_DURATION_FORMAT, "1ms").is_ok());
        assert_eq!(
            check(NONZERO_DURATION_FORMAT, "0s")
                .unwrap_err()
                .to_string(),
            "\"0s\" is too short; write at least 1ms"
        );
        assert!(check(CRON_FORMAT, "61 * * * *").is_err());
        assert!(check(SIZE_FORMAT, "1..2Mi").is_err());
        assert_eq!(check_format("uint32", "1"), None);
    }

    /// Issue 8, item 5: variable names are portable POSIX names, and the Rust rule agrees with
    /// the pattern the schemas carry.
    #[test]
    fn variable_names_are_posix_names() {
        let pattern =
            jsonschema::validator_for(&serde_json::json!({ "pattern": VARIABLE_NAME_PATTERN }))
                .unwrap();
        for (name, valid) in [
            ("LOG_LEVEL", true),
            ("_x1", true),
            ("a", true),
            ("", false),
            ("A=B", false),
            ("PATH=/evil:/bin", false),
            ("A B", false),
            ("1A", false),
            ("A-B", false),
            ("A.B", false),
            ("É", false),
            ("A\n", false),
        ] {
            assert_eq!(is_variable_name(name), valid, "{name:?}");
            assert_eq!(
                pattern.is_valid(&serde_json::json!(name)),
                valid,
                "{name:?}"
            );
        }
    }

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        for (text, bytes) in [
            ("256Mi", 256 << 20),
            ("1G", 1_000_000_000),
            ("1048576", 1_048_576),
            ("1.5Gi", 3 << 29),
            ("64k", 64_000),
            ("2Ti", 2 << 40),
        ] {
            assert_eq!(text.parse::<Size>().unwrap().bytes, bytes, "{text}");
        }
        assert_eq!("256Mi".parse::<Size>().unwrap().to_string(), "256Mi");
        for bad in ["", "Mi", "12MB", "1..2Mi", ".5G", "1e3", "-1Mi"] {
            let error = bad.parse::<Size>().unwrap_err();
            assert!(error.contains("is not a size"), "{bad}: {error}");
        }
    }

    #[test]
    fn names_are_dns_labels() {
        for good in ["web-101", "a", "0day", &"a".repeat(63)] {
            assert!(good.parse::<Name>().is_ok(), "{good}");
        }
        for bad in ["", "Web", "web_101", "-web", "web-", "a.b", &"a".repeat(64)] {
            let error = bad.parse::<Name>().unwrap_err();
            assert!(error.contains("DNS-1123"), "{bad}: {error}");
        }
    }

    #[test]
    fn cron_takes_five_fields() {
        for good in [
            "*/3 * * * *",
            "0 3 * * 1",
            "15 2 1 * *",
            "@daily",
            "0 0 * * MON-FRI",
        ] {
            assert!(good.parse::<CronExpr>().is_ok(), "{good}");
        }
        let error = "0 */5 * * * *".parse::<CronExpr>().unwrap_err();
        assert!(error.contains("6 fields, expected 5"), "{error}");
        let error = "61 * * * *".parse::<CronExpr>().unwrap_err();
        assert!(error.contains("is not a cron expression"), "{error}");
        assert!(
            "* * *"
                .parse::<CronExpr>()
                .unwrap_err()
                .contains("3 fields")
        );
    }

    #[test]
    fn ports_are_one_to_65535() {
        let port = |v: serde_json::Value| serde_json::from_value::<Port>(v);
        assert_eq!(port(serde_json::json!(80)).unwrap(), Port(80));
        assert_eq!(port(serde_json::json!(65535)).unwrap(), Port(65535));
        for bad in [0, 65536, -1] {
            let error = port(serde_json::json!(bad)).unwrap_err().to_string();
            assert!(error.contains("expected 1 to 65535"), "{bad}: {error}");
        }
    }

    #[test]
    fn secret_references_resolve_and_never_display() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        let by_file = SecretRef {
            file: Some(path.display().to_string()),
            env: None,
        };
        assert_eq!(by_file.resolve().unwrap(), "s3cr3t");
        assert_eq!(by_file.to_string(), "<secret>");
        let missing = SecretRef {
            file: None,
            env: Some("BERTH_TEST_SURELY_UNSET".into()),
        };
        assert_eq!(
            missing.resolve().unwrap_err().to_string(),
            "secret environment variable BERTH_TEST_SURELY_UNSET is not set"
        );
        assert!(
            SecretRef {
                file: None,
                env: None
            }
            .resolve()
            .is_err()
        );
    }

    #[test]
    fn references_name_a_kind_and_a_name() {
        let reference: ObjectRef = "Pipeline/web-image".parse().unwrap();
        assert_eq!(reference.to_string(), "Pipeline/web-image");
        assert!("Deployment/x".parse::<ObjectRef>().is_err());
        assert!("Pipeline".parse::<ObjectRef>().is_err());
    }
}
