//! YAML text to JSON values, with the positions of every key and value.
//!
//! This module owns the translation from YAML (1.2 core schema) to `serde_json::Value`, the shape
//! JSON Schema validation works on. It is built on the event stream of `saphyr-parser` rather than
//! on a serde deserializer so that it can:
//! - record where each key and value stands (line and column) under its JSON pointer;
//! - report duplicate keys, which serde-based loaders silently merge or reject one at a time;
//! - bound the work a hostile file can cause: alias expansion ("billion laughs"), nesting depth,
//!   documents and nodes per file are limited, so a file's cost stays in proportion to its size;
//! - never name a key inside a secret in a message.
//!
//! Positions are optional: the fast path parses without them, and the loader parses a file again
//! recording only the positions of the nodes it has problems to place ([`Wanted`]).

use std::collections::{BTreeMap, HashMap};

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};
use serde_json::{Map, Number, Value};

/// Deepest nesting of mappings and sequences a document may have.
pub const MAX_DEPTH: usize = 64;

/// Most nodes one document may expand to through aliases, beyond the nodes written in it.
pub const MAX_ALIAS_NODES: usize = 10_000;

/// Most documents in one file. Each costs memory however small it is (`---` is four bytes), so
/// the count, not only the file's size, must be bounded.
pub const MAX_DOCUMENTS: usize = 1_000;

/// Most entries (items, and collections nested in them) of one flow collection (`[…]`, `{…}`).
/// The YAML parser reads a whole flow collection ahead before it reports any of it (it might turn
/// out to be a mapping key), keeping tens of bytes per entry, so a long one is refused before
/// parsing: a 4 MiB `[1,1,1,…]` would otherwise cost hundreds of megabytes.
pub const MAX_FLOW_ENTRIES: usize = 10_000;

/// Most nodes (scalars, sequences, mappings, with aliases expanded and anchored nodes counted
/// again for the copy aliases use) in one file: a node costs tens of
/// bytes once built, whatever its few bytes of text, so a file within the size limit could
/// otherwise cost many times its size.
pub const MAX_NODES: usize = 100_000;

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

/// How to read a stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reading<'a> {
    /// Record the position of every node in [`Document::positions`].
    pub all_positions: bool,
    /// Keys whose contents are secret (`secretEnv`): a problem inside them never names a key.
    pub secret_fields: &'a [String],
}

/// The nodes of one document whose positions a caller wants, as a tree of JSON pointer segments.
/// [`read`] fills in the position of each one that exists. Only these are recorded, so placing a
/// few problems in a large file costs memory for those few nodes, not for every node.
#[derive(Debug, Default)]
pub struct Wanted {
    position: Option<NodePosition>,
    children: HashMap<String, Wanted>,
}

impl Wanted {
    /// Asks for the position of the node at `pointer` (and so of its ancestors).
    pub fn insert(&mut self, pointer: &str) {
        let mut node = self;
        for segment in pointer.split('/').skip(1) {
            node = node.children.entry(segment.to_string()).or_default();
        }
    }

    /// Where the node at `pointer` stands (its key, when `at_key` and it has one), or else its
    /// nearest ancestor that exists; `None` when not even the document was found.
    pub fn locate(&self, pointer: &str, at_key: bool) -> Option<Position> {
        let mut node = self;
        let mut whole = true;
        for segment in pointer.split('/').skip(1) {
            match node.children.get(segment) {
                Some(child) if child.position.is_some() => node = child,
                _ => {
                    whole = false;
                    break;
                }
            }
        }
        let position = node.position?;
        match (whole && at_key, position.key) {
            (true, Some(key)) => Some(key),
            _ => Some(position.value),
        }
    }

    fn child(&mut self, segment: &str) -> Option<&mut Wanted> {
        self.children.get_mut(segment)
    }
}

/// Reads every document in `text`. With `with_positions`, each document carries the position of
/// every node.
pub fn parse(text: &str, with_positions: bool) -> Stream {
    let reading = Reading {
        all_positions: with_positions,
        ..Reading::default()
    };
    read(text, reading, &mut BTreeMap::new())
}

/// Reads every document in `text` as `reading` says, and fills in the positions `wanted` asks for,
/// by document index.
pub fn read(text: &str, reading: Reading<'_>, wanted: &mut BTreeMap<usize, Wanted>) -> Stream {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        reading,
        anchors: HashMap::new(),
        positions: Positions::new(),
        problems: Vec::new(),
        alias_nodes: 0,
        nodes: 0,
    };
    let mut stream = Stream::default();
    if let Some(problem) = oversized_flow_collection(text) {
        stream.fatal = Some(problem);
        return stream;
    }
    loop {
        match builder.next() {
            Ok(None) => break,
            Ok(Some((Event::DocumentStart(_), span))) => {
                let start = Position::of(&span);
                if stream.documents.len() == MAX_DOCUMENTS {
                    stream.fatal = Some(YamlProblem {
                        at: start,
                        message: format!(
                            "more than {MAX_DOCUMENTS} documents in one file; split it into smaller files"
                        ),
                    });
                    break;
                }
                let want = wanted.get_mut(&stream.documents.len());
                match builder.document(start, want) {
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

struct Builder<'input, 'r> {
    parser: Parser<'input, saphyr_parser::StrInput<'input>>,
    reading: Reading<'r>,
    /// Anchored nodes of the current document, with their node counts.
    anchors: HashMap<usize, (Value, usize)>,
    positions: Positions,
    problems: Vec<YamlProblem>,
    /// Nodes the current document's aliases expanded to.
    alias_nodes: usize,
    /// Nodes built so far in the whole stream, aliases expanded.
    nodes: usize,
}

type Fatal = YamlProblem;

/// Where a node stands in its document, and what is asked of it.
struct Path<'p, 'w> {
    /// Its JSON pointer, kept only when every position is recorded.
    pointer: &'p mut String,
    /// Its entry in the positions wanted, if any.
    want: Option<&'w mut Wanted>,
    /// Whether it lies in a secret.
    secret: bool,
}

impl<'input> Builder<'input, '_> {
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

    fn document(&mut self, start: Position, want: Option<&mut Wanted>) -> Result<Document, Fatal> {
        self.anchors.clear();
        self.alias_nodes = 0;
        let mut value = Value::Null;
        let mut pointer = String::new();
        let mut want = want;
        while let Some((event, span)) = self.next()? {
            match event {
                Event::DocumentEnd => break,
                event => {
                    let path = Path {
                        pointer: &mut pointer,
                        want: want.as_deref_mut(),
                        secret: false,
                    };
                    value = self.node(event, span, path, None, 0)?.0;
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

    /// Counts `count` more nodes against the stream's budget.
    fn count(&mut self, at: Position, count: usize) -> Result<(), Fatal> {
        self.nodes += count;
        if self.nodes > MAX_NODES {
            return Err(YamlProblem {
                at,
                message: format!(
                    "more than {MAX_NODES} YAML nodes in one file; split it into smaller files"
                ),
            });
        }
        Ok(())
    }

    /// Builds the node that starts with `event`; returns it with its node count.
    fn node(
        &mut self,
        event: Event<'input>,
        span: Span,
        path: Path<'_, '_>,
        key: Option<Position>,
        depth: usize,
    ) -> Result<(Value, usize), Fatal> {
        let at = Position::of(&span);
        let here = NodePosition { key, value: at };
        if self.reading.all_positions {
            self.positions.insert(path.pointer.clone(), here);
        }
        let mut path = path;
        if let Some(want) = path.want.as_deref_mut() {
            want.position = Some(here);
        }
        let (value, nodes, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                self.count(at, 1)?;
                (scalar(&text, style, tag.as_deref()), 1, anchor)
            }
            Event::Alias(id) => {
                let Some((value, nodes)) = self.anchors.get(&id) else {
                    return Err(YamlProblem {
                        at,
                        message: "alias to an unknown anchor".into(),
                    });
                };
                let (value, nodes) = (value.clone(), *nodes);
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
                self.count(at, nodes)?;
                return Ok((value, nodes));
            }
            Event::SequenceStart(anchor, _) => {
                self.count(at, 1)?;
                let (value, nodes) = self.sequence(path, at, depth + 1)?;
                (value, nodes, anchor)
            }
            Event::MappingStart(anchor, _) => {
                self.count(at, 1)?;
                let (value, nodes) = self.mapping(path, at, depth + 1)?;
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
            // The copy kept for aliases costs as much as the node: nested anchors would
            // otherwise copy a deep tree once per level.
            self.count(at, nodes)?;
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
        path: Path<'_, '_>,
        at: Position,
        depth: usize,
    ) -> Result<(Value, usize), Fatal> {
        Self::check_depth(at, depth)?;
        let Path {
            pointer,
            mut want,
            secret,
        } = path;
        let mut items = Vec::new();
        let mut nodes = 1;
        while let Some((event, span)) = self.next()? {
            if matches!(event, Event::SequenceEnd) {
                break;
            }
            let len = pointer.len();
            if self.reading.all_positions {
                pointer.push('/');
                pointer.push_str(&items.len().to_string());
            }
            let item_want = match want.as_deref_mut() {
                Some(w) if !w.children.is_empty() => w.child(&items.len().to_string()),
                _ => None,
            };
            let item_path = Path {
                want: item_want,
                pointer: &mut *pointer,
                secret,
            };
            let (item, count) = self.node(event, span, item_path, None, depth)?;
            pointer.truncate(len);
            items.push(item);
            nodes += count;
        }
        Ok((Value::Array(items), nodes))
    }

    fn mapping(
        &mut self,
        path: Path<'_, '_>,
        at: Position,
        depth: usize,
    ) -> Result<(Value, usize), Fatal> {
        Self::check_depth(at, depth)?;
        let Path {
            pointer,
            mut want,
            secret,
        } = path;
        let mut map = Map::new();
        // Where each key of `map` is written, in the map's order: only a duplicate (rare) looks
        // for its first one, so keys are not copied into a second map.
        let mut key_positions: Vec<Position> = Vec::new();
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
            if self.reading.all_positions {
                pointer.push('/');
                push_escaped(pointer, &key);
            }
            let value_want = match want.as_deref_mut() {
                Some(w) if !w.children.is_empty() => w.child(&escaped(&key)),
                _ => None,
            };
            let value_path = Path {
                pointer: &mut *pointer,
                want: value_want,
                secret: secret || self.reading.secret_fields.contains(&key),
            };
            let (value, count) = self.node(event, span, value_path, Some(key_at), depth)?;
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
            if map.contains_key(&key) {
                let first = map
                    .keys()
                    .position(|known| *known == key)
                    .map_or(key_at, |index| key_positions[index]);
                // Inside a secret even a key may be part of the secret: say where, not what.
                let shown = if secret {
                    String::new()
                } else {
                    format!(" {}", show(&Value::String(key.clone())))
                };
                self.problems.push(YamlProblem {
                    at: key_at,
                    message: format!(
                        "duplicate key{shown} (first at line {}); remove one of them",
                        first.line
                    ),
                });
                continue;
            }
            key_positions.push(key_at);
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

/// Where the first flow collection with more than [`MAX_FLOW_ENTRIES`] entries, or nested deeper
/// than [`MAX_DEPTH`], passes the limit.
///
/// A quick scan that knows only what decides where flow collections are: comments, quoted scalars
/// and block scalars. Where it is unsure, it reads text as YAML rather than skip it, so it may count
/// entries the parser would not, but never misses a collection the parser would read ahead.
fn oversized_flow_collection(text: &str) -> Option<YamlProblem> {
    // Every entry takes a `,`, `[` or `{`: a text with fewer of them (a typical descriptor file)
    // cannot hold a collection past the limit, and needs no scan.
    let openers = |bytes: &[u8]| {
        bytes
            .iter()
            .filter(|b| matches!(b, b',' | b'[' | b'{'))
            .count()
    };
    if text.len() <= MAX_FLOW_ENTRIES || openers(text.as_bytes()) <= MAX_FLOW_ENTRIES {
        return None;
    }
    let mut scan = Scan {
        bytes: text.as_bytes(),
        at: 0,
        line: 1,
        column: 1,
    };
    // Lines indented deeper than this belong to a block scalar (`|`, `>`).
    let mut block_scalar_parent: Option<usize> = None;
    while scan.peek().is_some() {
        let mut indent = 0;
        while scan.peek() == Some(b' ') {
            scan.bump();
            indent += 1;
        }
        if let Some(parent) = block_scalar_parent {
            if matches!(scan.peek(), None | Some(b'\n' | b'\r')) || indent > parent {
                scan.rest_of_line();
                scan.line_break();
                continue;
            }
            block_scalar_parent = None;
        }
        let rest = &scan.bytes[scan.at..];
        if indent == 0 && (rest.starts_with(b"---") || rest.starts_with(b"...")) && scan.spaced(3) {
            (0..3).for_each(|_| scan.bump());
        }
        let mut node_start = true;
        let mut after_space = true;
        let mut first_node = None;
        while let Some(byte) = scan.peek() {
            if scan.skip_space_or_comment(&mut after_space, false) {
                continue;
            }
            match byte {
                b'\n' | b'\r' => break,
                b'-' | b'?' | b':' if scan.spaced(1) => {
                    scan.bump();
                    node_start = true;
                    after_space = false;
                    continue;
                }
                _ => {}
            }
            let column = *first_node.get_or_insert(scan.column);
            after_space = false;
            if node_start {
                match byte {
                    b'[' | b'{' => {
                        if let Some(problem) = scan.flow() {
                            return Some(problem);
                        }
                        node_start = false;
                        continue;
                    }
                    b'\'' | b'"' => {
                        scan.quoted(byte);
                        node_start = false;
                        continue;
                    }
                    b'|' | b'>' => {
                        block_scalar_parent = Some(column - 1);
                        scan.rest_of_line();
                        continue;
                    }
                    // An anchor or a tag: the node follows.
                    b'&' | b'!' => {
                        scan.property();
                        continue;
                    }
                    _ => {}
                }
            }
            node_start = false;
            scan.bump();
        }
        scan.line_break();
    }
    None
}

/// A cursor over a text's bytes that keeps the line and the column (in characters).
struct Scan<'t> {
    bytes: &'t [u8],
    at: usize,
    line: usize,
    column: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn position(&self) -> Position {
        Position {
            line: self.line,
            column: self.column,
        }
    }

    /// Whether the byte `ahead` of the cursor is a space, a line break or the end.
    fn spaced(&self, ahead: usize) -> bool {
        matches!(
            self.bytes.get(self.at + ahead),
            None | Some(b' ' | b'\t' | b'\n' | b'\r')
        )
    }

    fn bump(&mut self) {
        let Some(byte) = self.peek() else { return };
        self.at += 1;
        match byte {
            // CR LF is one break, counted at the LF; a lone CR is a break of its own.
            b'\r' if self.peek() == Some(b'\n') => {}
            b'\n' | b'\r' => {
                self.line += 1;
                self.column = 1;
            }
            // UTF-8 continuation bytes are part of the character before.
            0x80..=0xbf => {}
            _ => self.column += 1,
        }
    }

    /// Past a space (a line break too, with `breaks`) or a comment, if one is at the cursor;
    /// whether it moved. `after_space` says whether a `#` starts a comment, and is kept up.
    fn skip_space_or_comment(&mut self, after_space: &mut bool, breaks: bool) -> bool {
        match self.peek() {
            Some(b' ' | b'\t') => {}
            Some(b'\n' | b'\r') if breaks => {}
            Some(b'#') if *after_space => {
                self.rest_of_line();
                return true;
            }
            _ => return false,
        }
        self.bump();
        *after_space = true;
        true
    }

    fn rest_of_line(&mut self) {
        while !matches!(self.peek(), None | Some(b'\n' | b'\r')) {
            self.bump();
        }
    }

    fn line_break(&mut self) {
        if self.peek() == Some(b'\r') {
            self.bump();
        }
        if self.peek() == Some(b'\n') {
            self.bump();
        }
    }

    /// Past an anchor or a tag.
    fn property(&mut self) {
        while !self.spaced(0) && !matches!(self.peek(), Some(b',' | b'[' | b']' | b'{' | b'}')) {
            self.bump();
        }
    }

    /// Past a quoted scalar that starts at the cursor, line breaks included.
    fn quoted(&mut self, quote: u8) {
        self.bump();
        while let Some(byte) = self.peek() {
            self.bump();
            if quote == b'"' && byte == b'\\' {
                self.bump();
            } else if byte == quote {
                if quote == b'\'' && self.peek() == Some(b'\'') {
                    self.bump();
                } else {
                    return;
                }
            }
        }
    }

    /// Past the flow collection that starts at the cursor, counting its entries and levels; the
    /// problem where either passes its limit, if one does.
    fn flow(&mut self) -> Option<YamlProblem> {
        let mut depth = 0_usize;
        let mut entries = 0_usize;
        // Whether a node may start here: quotes, anchors and tags mean something only there.
        let mut node_start = true;
        let mut after_space = false;
        // After a quoted scalar or a collection, `:` needs no space (JSON style).
        let mut after_json_node = false;
        while let Some(byte) = self.peek() {
            if self.skip_space_or_comment(&mut after_space, true) {
                continue;
            }
            match byte {
                b'\'' | b'"' if node_start => {
                    self.quoted(byte);
                    node_start = false;
                    after_space = false;
                    after_json_node = true;
                    continue;
                }
                b'&' | b'!' if node_start => {
                    self.property();
                    after_space = false;
                    continue;
                }
                b'[' | b'{' => {
                    depth += 1;
                    entries += 1;
                    node_start = true;
                    after_json_node = false;
                    if depth > MAX_DEPTH {
                        return Some(YamlProblem {
                            at: self.position(),
                            message: format!(
                                "nesting is deeper than {MAX_DEPTH} levels; flatten the document"
                            ),
                        });
                    }
                }
                b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        self.bump();
                        return None;
                    }
                    node_start = false;
                    after_json_node = true;
                }
                b',' => {
                    entries += 1;
                    node_start = true;
                    after_json_node = false;
                }
                b':' | b'?' if after_json_node || self.spaced(1) => {
                    node_start = true;
                    after_json_node = false;
                }
                _ => {
                    node_start = false;
                    after_json_node = false;
                }
            }
            if entries > MAX_FLOW_ENTRIES {
                return Some(YamlProblem {
                    at: self.position(),
                    message: format!(
                        "a flow collection ([…] or {{…}}) with more than {MAX_FLOW_ENTRIES} entries; \
                         write it in block style, one entry per line"
                    ),
                });
            }
            after_space = false;
            self.bump();
        }
        None
    }
}

/// A written value as messages quote it: as JSON, cut after 40 characters.
pub(super) fn show(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        format!("{}…", text.chars().take(40).collect::<String>())
    } else {
        text
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

/// Resolves a scalar by the YAML 1.2 core schema (with YAML 1.1's leading-zero octal, see
/// [`integer`]); quoted scalars and `!!str` are always strings.
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

/// An integer: decimal, `0x` hex, `0o` octal, and (as YAML 1.1, which Kubernetes and kubectl
/// read, has it) a leading zero for octal, so a file mode `0644` in a manifest is the mode kubectl
/// would make of it, not 644 decimal.
fn integer(text: &str) -> Option<Number> {
    let unsigned_text = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (digits, radix) = if let Some(hex) = text.strip_prefix("0x") {
        (hex, 16)
    } else if let Some(octal) = text.strip_prefix("0o") {
        (octal, 8)
    } else if unsigned_text.len() > 1
        && unsigned_text.starts_with('0')
        && unsigned_text.chars().all(|c| c.is_digit(8))
    {
        (text, 8)
    } else {
        (text, 10)
    };
    let unsigned = digits.strip_prefix(['-', '+']).unwrap_or(digits);
    if unsigned.is_empty() || !unsigned.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    if radix != 10 && unsigned.len() != digits.len() && digits.len() != text.len() {
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

    /// Hostile finding: `defaultMode: 0400` became 400 (0o620), a mode kubectl never makes of it.
    #[test]
    fn a_leading_zero_is_octal_as_kubernetes_reads_it() {
        let doc = one("mode: 0400\nopen: 0644\nnine: 09\nzero: 0\nnegative: -010\n");
        assert_eq!(
            doc.value,
            json!({"mode": 256, "open": 420, "nine": 9, "zero": 0, "negative": -8})
        );
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

    fn fatal(text: &str) -> Option<YamlProblem> {
        parse(text, false).fatal
    }

    fn entries(count: usize) -> String {
        vec!["1"; count].join(", ")
    }

    const LONG_FLOW: &str = "a flow collection ([…] or {…}) with more than 10000 entries";

    /// Issue 8, item 16: the parser reads a whole flow collection ahead before it reports any of
    /// it, at tens of bytes per entry: a 4 MB `[1,1,…]` cost 600 MB. It is refused before
    /// parsing, at the entry past the limit, however it is dressed.
    #[test]
    fn long_flow_collections_are_refused_before_parsing() {
        let problem = fatal(&format!("a: [{}]\n", entries(10_001))).expect("refused");
        assert!(
            problem.message.starts_with(LONG_FLOW),
            "{}",
            problem.message
        );
        assert_eq!(
            problem.at,
            Position {
                line: 1,
                column: 30_003
            }
        );
        assert!(fatal(&format!("a: [{}]\n", entries(10_000))).is_none());
        for dressed in [
            format!("--- [{}]\n", entries(10_001)),
            format!("a: &x !!seq [{}]\n", entries(10_001)),
            format!("a: [b 'c, {}]\n'", entries(10_001)),
            format!("a: [a:'b, {}]\n'", entries(10_001)),
            format!("a: [\"]\", '[', {}]\n", entries(10_001)),
            format!("{{\"k\":\"]\", \"x\": [{}]}}\n", entries(10_001)),
            format!("- k: |\n    text\n  other: [{}]\n", entries(10_001)),
            format!(
                "a: {{\n{}}}\n",
                (0..10_001)
                    .map(|i| format!("  k{i}: 1,\n"))
                    .collect::<String>()
            ),
        ] {
            let problem =
                fatal(&dressed).unwrap_or_else(|| panic!("not refused: {}", &dressed[..30]));
            assert!(
                problem.message.starts_with(LONG_FLOW),
                "{}",
                problem.message
            );
        }
        // Brackets and commas that are text, not flow collections.
        for text in [
            format!("run: |\n  [{}]\nnext: 1\n", entries(20_000)),
            format!("run: \"[{}]\"\n", entries(20_000)),
            format!("# [{}]\na: 1\n", entries(20_000)),
            format!("a: b [{}]\n", entries(20_000)),
        ] {
            assert_eq!(fatal(&text), None, "{}", &text[..20]);
        }
    }

    /// Issue 8, item 16: nodes are bounded per file, counting what aliases expand to and the
    /// copies anchors keep: nested anchors would otherwise copy a tree once per level.
    #[test]
    fn nodes_are_bounded_per_file_copies_included() {
        let items: String = "    - 1\n".repeat(40_000);
        let plain = format!("a:\n  b:\n{items}");
        assert!(fatal(&plain).is_none());
        let anchored = format!("a: &a\n  b: &b\n{items}");
        let problem = fatal(&anchored).expect("copies count");
        assert_eq!(
            problem.message,
            "more than 100000 YAML nodes in one file; split it into smaller files"
        );
        let many = "- 1\n".repeat(MAX_NODES + 1);
        assert_eq!(
            fatal(&many).map(|p| p.at),
            Some(Position {
                line: MAX_NODES,
                column: 3
            })
        );
    }

    #[test]
    fn documents_are_bounded_per_file() {
        assert!(fatal(&"---\n".repeat(MAX_DOCUMENTS)).is_none());
        let problem = fatal(&"---\n".repeat(MAX_DOCUMENTS + 1)).expect("refused");
        assert_eq!(
            problem.at,
            Position {
                line: 1001,
                column: 1
            }
        );
        assert_eq!(
            problem.message,
            "more than 1000 documents in one file; split it into smaller files"
        );
    }

    /// Placing a problem records positions for the nodes asked for only, and falls back to the
    /// nearest ancestor for a node that is not there.
    #[test]
    fn wanted_positions_are_found_and_fall_back_to_ancestors() {
        let mut wanted = BTreeMap::new();
        let second: &mut Wanted = wanted.entry(1).or_default();
        second.insert("/b/1");
        second.insert("/c/missing");
        second.insert("/d~1e");
        let stream = read(
            "a: 1\n---\nb: [x, y]\nc: {k: v}\nd/e: 3\n",
            Reading::default(),
            &mut wanted,
        );
        assert!(stream.documents.iter().all(|d| d.positions.is_empty()));
        let second = &wanted[&1];
        assert_eq!(
            second.locate("/b/1", false),
            Some(Position { line: 3, column: 8 })
        );
        assert_eq!(
            second.locate("/d~1e", true),
            Some(Position { line: 5, column: 1 })
        );
        assert_eq!(
            second.locate("/c/missing", true),
            Some(Position { line: 4, column: 4 })
        );
        assert_eq!(
            second.locate("", false),
            Some(Position { line: 3, column: 1 })
        );
    }

    /// Issue 8, item 13: a duplicate key inside a secret may be the secret itself: the problem
    /// says where, never what.
    #[test]
    fn keys_inside_secrets_are_never_named() {
        let secret_fields = ["secretEnv".to_string()];
        let reading = Reading {
            all_positions: false,
            secret_fields: &secret_fields,
        };
        let text = "secretEnv: {F: {\"flag{x}\": 1, \"flag{x}\": 2}}\nenv: {A: 1, A: 2}\n";
        let stream = read(text, reading, &mut BTreeMap::new());
        let messages: Vec<&str> = stream.documents[0]
            .problems
            .iter()
            .map(|p| p.message.as_str())
            .collect();
        assert_eq!(
            messages,
            [
                "duplicate key (first at line 1); remove one of them",
                "duplicate key \"A\" (first at line 2); remove one of them"
            ]
        );
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
