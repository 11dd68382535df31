//! YAML text to JSON values, with the positions of every key and value.
//!
//! This module owns the translation from YAML (1.2 core schema) to `serde_json::Value`, the shape
//! JSON Schema validation works on. It is built on the event stream of `saphyr-parser` rather than
//! on a serde deserializer so that it can:
//! - record where each key and value stands (line and column) under its JSON pointer;
//! - report duplicate keys, which serde-based loaders silently merge or reject one at a time;
//! - bound the work a hostile file can cause: alias expansion ("billion laughs") and nesting depth
//!   are limited, so a small file can never make a huge tree.
//!
//! Positions are optional: the fast path parses without them, and the loader parses a file again with
//! positions only when it has a problem to place.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};
use serde_json::{Map, Number, Value};

/// Deepest nesting of mappings and sequences a document may have.
pub const MAX_DEPTH: usize = 64;

/// Most nodes one document may expand to through aliases, beyond the nodes written in it.
pub const MAX_ALIAS_NODES: usize = 10_000;

/// A place in a file: 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl Position {
    fn of(span: &Span) -> Position {
        Position {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// Where the key of a node and the node itself start.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodePosition {
    /// The key's position, when the node is a mapping value.
    pub key: Option<Position>,
    /// The value's position.
    pub value: Position,
}

/// Positions of one document's nodes, keyed by JSON pointer (`""` is the document itself).
pub type Positions = HashMap<String, NodePosition>;

/// One YAML document, as JSON.
#[derive(Debug)]
pub struct Document {
    /// The document's content; `Value::Null` for an empty document.
    pub value: Value,
    /// Where the document starts.
    pub start: Position,
    /// Node positions, when they were asked for.
    pub positions: Positions,
    /// What is wrong inside the document that still let it parse (duplicate keys, …).
    pub problems: Vec<YamlProblem>,
}

/// A problem found while reading YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlProblem {
    /// Where it is.
    pub at: Position,
    /// What is wrong and what to do.
    pub message: String,
}

/// Result of reading one file: the documents up to the first fatal problem, and that problem.
#[derive(Debug, Default)]
pub struct Stream {
    /// Documents read, in order.
    pub documents: Vec<Document>,
    /// A problem that stopped reading (syntax error, alias bomb, nesting too deep).
    pub fatal: Option<YamlProblem>,
}

/// Reads every document in `text`. With `with_positions`, each document carries the position of
/// every node.
pub fn parse(text: &str, with_positions: bool) -> Stream {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        with_positions,
        anchors: HashMap::new(),
        positions: Positions::new(),
        problems: Vec::new(),
        alias_nodes: 0,
    };
    let mut stream = Stream::default();
    loop {
        match builder.next() {
            Ok(None) => break,
            Ok(Some((Event::DocumentStart(_), span))) => {
                match builder.document(Position::of(&span)) {
                    Ok(document) => stream.documents.push(document),
                    Err(problem) => {
                        stream.fatal = Some(problem);
                        break;
                    }
                }
            }
            Ok(Some(_)) => {}
            Err(problem) => {
                stream.fatal = Some(problem);
                break;
            }
        }
    }
    stream
}

struct Builder<'input> {
    parser: Parser<'input, saphyr_parser::StrInput<'input>>,
    with_positions: bool,
    /// Anchored nodes of the current document, with their node counts.
    anchors: HashMap<usize, (Value, usize)>,
    positions: Positions,
    problems: Vec<YamlProblem>,
    alias_nodes: usize,
}

type Fatal = YamlProblem;

impl<'input> Builder<'input> {
    fn next(&mut self) -> Result<Option<(Event<'input>, Span)>, Fatal> {
        match self.parser.next_event() {
            None => Ok(None),
            Some(Ok((Event::StreamEnd, _))) => Ok(None),
            Some(Ok(event)) => Ok(Some(event)),
            Some(Err(error)) => Err(YamlProblem {
                at: Position {
                    line: error.marker().line(),
                    column: error.marker().col() + 1,
                },
                message: match error.info() {
                    "recursion limit exceeded" => {
                        "nesting is deeper than the YAML parser allows; flatten the document".into()
                    }
                    info => format!("YAML syntax error: {info}"),
                },
            }),
        }
    }

    fn document(&mut self, start: Position) -> Result<Document, Fatal> {
        self.anchors.clear();
        self.alias_nodes = 0;
        let mut value = Value::Null;
        let mut pointer = String::new();
        while let Some((event, span)) = self.next()? {
            match event {
                Event::DocumentEnd => break,
                event => {
                    value = self.node(event, span, &mut pointer, None, 0)?.0;
                }
            }
        }
        Ok(Document {
            value,
            start,
            positions: std::mem::take(&mut self.positions),
            problems: std::mem::take(&mut self.problems),
        })
    }

    /// Builds the node that starts with `event`; returns it with its node count.
    fn node(
        &mut self,
        event: Event<'input>,
        span: Span,
        pointer: &mut String,
        key: Option<Position>,
        depth: usize,
    ) -> Result<(Value, usize), Fatal> {
        let at = Position::of(&span);
        if self.with_positions {
            self.positions
                .insert(pointer.clone(), NodePosition { key, value: at });
        }
        let (value, nodes, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                (scalar(&text, style, tag.as_deref()), 1, anchor)
            }
            Event::Alias(id) => {
                let Some((value, nodes)) = self.anchors.get(&id) else {
                    return Err(YamlProblem {
                        at,
                        message: "alias to an unknown anchor".into(),
                    });
                };
                self.alias_nodes += nodes;
                if self.alias_nodes > MAX_ALIAS_NODES {
                    return Err(YamlProblem {
                        at,
                        message: format!(
                            "aliases expand to more than {MAX_ALIAS_NODES} nodes; \
                             this looks like an alias bomb, write the values out instead"
                        ),
                    });
                }
                return Ok((value.clone(), *nodes));
            }
            Event::SequenceStart(anchor, _) => {
                let (value, nodes) = self.sequence(pointer, at, depth + 1)?;
                (value, nodes, anchor)
            }
            Event::MappingStart(anchor, _) => {
                let (value, nodes) = self.mapping(pointer, at, depth + 1)?;
                (value, nodes, anchor)
            }
            other => {
                return Err(YamlProblem {
                    at,
                    message: format!("unexpected YAML event {other:?}"),
                });
            }
        };
        if anchor != 0 {
            self.anchors.insert(anchor, (value.clone(), nodes));
        }
        Ok((value, nodes))
    }

    fn check_depth(at: Position, depth: usize) -> Result<(), Fatal> {
        if depth > MAX_DEPTH {
            return Err(YamlProblem {
                at,
                message: format!("nesting is deeper than {MAX_DEPTH} levels; flatten the document"),
            });
        }
        Ok(())
    }

    fn sequence(
        &mut self,
        pointer: &mut String,
        at: Position,
        depth: usize,
    ) -> Result<(Value, usize), Fatal> {
        Self::check_depth(at, depth)?;
        let mut items = Vec::new();
        let mut nodes = 1;
        while let Some((event, span)) = self.next()? {
            if matches!(event, Event::SequenceEnd) {
                break;
            }
            let len = pointer.len();
            if self.with_positions {
                pointer.push('/');
                pointer.push_str(&items.len().to_string());
            }
            let (item, count) = self.node(event, span, pointer, None, depth)?;
            pointer.truncate(len);
            items.push(item);
            nodes += count;
        }
        Ok((Value::Array(items), nodes))
    }

    fn mapping(
        &mut self,
        pointer: &mut String,
        at: Position,
        depth: usize,
    ) -> Result<(Value, usize), Fatal> {
        Self::check_depth(at, depth)?;
        let mut map = Map::new();
        let mut key_lines: HashMap<String, Position> = HashMap::new();
        let mut merged: Vec<Map<String, Value>> = Vec::new();
        let mut nodes = 1;
        while let Some((event, span)) = self.next()? {
            let key_at = Position::of(&span);
            let key = match event {
                Event::MappingEnd => break,
                Event::Scalar(text, ..) => text.into_owned(),
                Event::Alias(_) | Event::SequenceStart(..) | Event::MappingStart(..) => {
                    return Err(YamlProblem {
                        at: key_at,
                        message:
                            "a mapping key must be a plain string; complex keys are not supported"
                                .into(),
                    });
                }
                other => {
                    return Err(YamlProblem {
                        at: key_at,
                        message: format!("unexpected YAML event {other:?}"),
                    });
                }
            };
            let Some((event, span)) = self.next()? else {
                break;
            };
            let len = pointer.len();
            if self.with_positions {
                pointer.push('/');
                push_escaped(pointer, &key);
            }
            let (value, count) = self.node(event, span, pointer, Some(key_at), depth)?;
            pointer.truncate(len);
            nodes += count;
            if key == "<<" {
                // Merge keys (`<<: *defaults`), as docker-compose users write them: keys written
                // in the mapping itself win over merged ones.
                match value {
                    Value::Object(object) => merged.push(object),
                    Value::Array(list) if list.iter().all(Value::is_object) => {
                        merged.extend(list.into_iter().filter_map(|v| match v {
                            Value::Object(o) => Some(o),
                            _ => None,
                        }))
                    }
                    _ => {
                        return Err(YamlProblem {
                            at: key_at,
                            message: "a merge key (<<) takes a mapping or a list of mappings"
                                .into(),
                        });
                    }
                }
                continue;
            }
            if let Some(first) = key_lines.get(&key) {
                self.problems.push(YamlProblem {
                    at: key_at,
                    message: format!(
                        "duplicate key \"{key}\" (first at line {}); remove one of them",
                        first.line
                    ),
                });
                continue;
            }
            key_lines.insert(key.clone(), key_at);
            map.insert(key, value);
        }
        for object in merged {
            for (key, value) in object {
                map.entry(key).or_insert(value);
            }
        }
        Ok((Value::Object(map), nodes))
    }
}

/// `key` as a JSON pointer segment (`~` and `/` escaped).
pub fn escaped(key: &str) -> String {
    let mut segment = String::with_capacity(key.len());
    push_escaped(&mut segment, key);
    segment
}

fn push_escaped(pointer: &mut String, key: &str) {
    for c in key.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

/// Resolves a scalar by the YAML 1.2 core schema; quoted scalars and `!!str` are always strings.
fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Value {
    if let Some(tag) = tag
        && tag.handle == "tag:yaml.org,2002:"
    {
        match tag.suffix.as_str() {
            "str" => return Value::String(text.to_string()),
            "null" => return Value::Null,
            _ => {}
        }
    }
    if style != ScalarStyle::Plain {
        return Value::String(text.to_string());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(number) = integer(text) {
        return Value::Number(number);
    }
    if looks_like_float(text)
        && let Ok(float) = text.parse::<f64>()
        && let Some(number) = Number::from_f64(float)
    {
        return Value::Number(number);
    }
    Value::String(text.to_string())
}

fn integer(text: &str) -> Option<Number> {
    let (digits, radix) = if let Some(hex) = text.strip_prefix("0x") {
        (hex, 16)
    } else if let Some(octal) = text.strip_prefix("0o") {
        (octal, 8)
    } else {
        (text, 10)
    };
    let unsigned = digits.strip_prefix(['-', '+']).unwrap_or(digits);
    if unsigned.is_empty() || !unsigned.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    if radix != 10 && unsigned.len() != digits.len() {
        return None;
    }
    if let Ok(n) = i64::from_str_radix(digits, radix) {
        return Some(n.into());
    }
    u64::from_str_radix(digits, radix).ok().map(Number::from)
}

fn looks_like_float(text: &str) -> bool {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let first = body.chars().next();
    matches!(first, Some(c) if c.is_ascii_digit() || c == '.')
        && body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Document {
        let mut stream = parse(text, true);
        assert!(stream.fatal.is_none(), "{:?}", stream.fatal);
        stream.documents.remove(0)
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let doc =
            one("a: 1\nb: '1'\nc: true\nd: ~\ne: 1.5\nf: 0x1f\ng: yes\nh: 10001\ni: 1e3\nj: .\n");
        assert_eq!(
            doc.value,
            json!({"a": 1, "b": "1", "c": true, "d": null, "e": 1.5, "f": 31, "g": "yes", "h": 10001, "i": 1000.0, "j": "."})
        );
    }

    #[test]
    fn positions_name_keys_and_values() {
        let doc = one("spec:\n  ports:\n    - container: 80\n      host: abc\n");
        let host = doc.positions["/spec/ports/0/host"];
        assert_eq!(host.key, Some(Position { line: 4, column: 7 }));
        assert_eq!(
            host.value,
            Position {
                line: 4,
                column: 13
            }
        );
        assert_eq!(
            doc.positions["/spec/ports/0"].value,
            Position { line: 3, column: 7 }
        );
    }

    #[test]
    fn duplicate_keys_are_problems_and_the_first_wins() {
        let doc = one("a: 1\nb: 2\na: 3\n");
        assert_eq!(doc.value, json!({"a": 1, "b": 2}));
        assert_eq!(doc.problems.len(), 1);
        assert_eq!(doc.problems[0].at, Position { line: 3, column: 1 });
        assert!(
            doc.problems[0]
                .message
                .contains("duplicate key \"a\" (first at line 1)")
        );
    }

    #[test]
    fn merge_keys_fill_in_without_overriding() {
        let doc = one("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n");
        assert_eq!(doc.value["c"], json!({"x": 1, "y": 3}));
    }

    #[test]
    fn alias_bombs_stop_with_a_problem() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (prev, next) in ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h"])
        {
            text.push_str(&format!("{next}: &{next} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let stream = parse(&text, false);
        let fatal = stream.fatal.expect("bomb must be refused");
        assert!(fatal.message.contains("alias bomb"), "{}", fatal.message);
    }

    #[test]
    fn deep_nesting_stops_with_a_problem() {
        let flow = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let fatal = parse(&flow, false)
            .fatal
            .expect("deep flow nesting must be refused");
        assert!(
            fatal.message.starts_with("nesting is deeper than"),
            "{}",
            fatal.message
        );
        assert_eq!(fatal.at.line, 1);
        let block: String = (0..100)
            .map(|depth| format!("{}k{depth}:\n", " ".repeat(depth)))
            .collect();
        let fatal = parse(&block, false)
            .fatal
            .expect("deep block nesting must be refused");
        assert_eq!(
            fatal.message,
            "nesting is deeper than 64 levels; flatten the document"
        );
        assert_eq!(fatal.at.line, 65);
    }

    #[test]
    fn several_documents_and_empty_ones() {
        let stream = parse("a: 1\n---\n---\nb: 2\n", false);
        let values: Vec<_> = stream.documents.iter().map(|d| d.value.clone()).collect();
        assert_eq!(values, vec![json!({"a": 1}), Value::Null, json!({"b": 2})]);
        assert_eq!(stream.documents[2].start.line, 3);
    }

    #[test]
    fn syntax_errors_have_positions() {
        let fatal = parse("a: [1, 2\nb: 3\n", false)
            .fatal
            .expect("syntax error");
        assert!(fatal.message.starts_with("YAML syntax error"));
        assert!(fatal.at.line >= 1);
    }
}
