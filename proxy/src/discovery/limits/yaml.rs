//! The YAML pre-check: one pass over the text, line by line, that reads tokens as libyaml's
//! scanner does (the scanner is where the cost grows with the flow depth), so that it knows for
//! every byte whether it is structure, or inside a quoted scalar, a block scalar, a plain scalar
//! or a comment, and measures each document:
//!
//! - **depth**: open flow collections (the scanner's flow level) plus open block collections,
//!   kept as libyaml keeps its indentation stack: the column of each mapping (`key:` lines, `? `)
//!   and sequence (`- ` items; a sequence may share the column of the mapping it is a value of);
//! - **nodes**: scalars, collections, aliases and the indicators of entries (`- `, `: `, `,`),
//!   so that empty values count too;
//! - **size**: bytes as written, plus what each alias expands to. An anchored node is measured
//!   from its anchor to where it must have ended (the end of its flow entry, or the next line
//!   back at or left of its parent's column); aliases inside it count as what they expand to.
//!
//! Line breaks are libyaml's (`\n`, `\r`, `\r\n`, NEL, LS, PS), and document markers at column 0
//! are recognised in any state, as libyaml does (it ends quoted and block scalars there, or
//! fails). Where the check cannot tell, it counts more, never less: what it skips as a quoted or
//! block scalar, libyaml reads as one too, or fails on at that point.

use std::collections::HashMap;

use super::{Exceeded, LimitError, Limits, Position};

pub(super) fn check(text: &str, limits: &Limits) -> Result<(), LimitError> {
    let bytes = text.as_bytes();
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut scan = Scan::new(limits);
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let len = break_len(bytes, i);
        if len == 0 {
            i += 1;
            continue;
        }
        scan.line(start, &bytes[start..i], i + len)?;
        i += len;
        start = i;
    }
    if start < bytes.len() {
        scan.line(start, &bytes[start..], bytes.len())?;
    }
    Ok(())
}

/// The length of the line break at `i` (0 if there is none).
fn break_len(b: &[u8], i: usize) -> usize {
    match b[i] {
        b'\n' => 1,
        b'\r' if b.get(i + 1) == Some(&b'\n') => 2,
        b'\r' => 1,
        0xC2 if b.get(i + 1) == Some(&0x85) => 2, // NEL
        0xE2 if b.get(i + 1) == Some(&0x80) && matches!(b.get(i + 2), Some(0xA8 | 0xA9)) => 3, // LS, PS
        _ => 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mapping,
    Sequence,
}

/// An open block collection.
#[derive(Debug, Clone, Copy)]
struct Level {
    column: usize,
    kind: Kind,
}

/// Inside a literal (`|`) or folded (`>`) scalar: lines indented at least `indent` (found on
/// its first non-empty line unless the header gives it) are its content.
struct BlockScalar {
    parent: isize,
    indent: Option<usize>,
}

impl BlockScalar {
    fn new(header: &[u8], parent: isize) -> BlockScalar {
        // An explicit indentation indicator: a digit among the (at most two) header characters.
        let digit = header.iter().take(2).find(|c| matches!(c, b'1'..=b'9')).map(|c| (c - b'0') as isize);
        let indent = digit.map(|d| if parent >= 0 { parent + d } else { d } as usize);
        BlockScalar { parent, indent }
    }

    /// Whether a line with this indentation (or a blank one) belongs to the scalar. libyaml's
    /// rule: at least one column right of the parent collection, and at least column 1.
    fn holds(&mut self, indent: usize, blank: bool) -> bool {
        if blank {
            return true;
        }
        let need = self.indent.unwrap_or_else(|| (self.parent + 1).max(1) as usize);
        if indent < need {
            return false;
        }
        self.indent.get_or_insert(indent);
        true
    }
}

/// Bytes and nodes, as written or expanded.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    bytes: usize,
    nodes: usize,
}

/// Where an anchored node must have ended at the latest.
#[derive(Debug, Clone, Copy)]
enum AnchorEnd {
    /// Opened inside a flow collection at this depth: ends at the next `,` at this depth, or
    /// when the collection closes.
    Flow(usize),
    /// Opened in block context: ends at the first later line at or left of `column` that leaves
    /// at most `levels` block collections open.
    Block { levels: usize, column: isize },
}

struct OpenAnchor {
    name: Vec<u8>,
    start: Size,
    end: AnchorEnd,
    /// The open anchor of the same name this one hides, by index in `Doc::open`.
    shadows: Option<usize>,
}

/// The document being scanned.
struct Doc {
    number: usize,
    line: usize,
    start: usize,
    nodes: usize,
    /// Bytes added by aliases so far.
    expansion: usize,
    /// Anchored nodes whose end was found, by name (a later anchor of the same name wins).
    anchors: HashMap<Vec<u8>, Size>,
    /// Anchored nodes still open, innermost last, and the latest of each name (so that an alias
    /// is found in constant time however many are open).
    open: Vec<OpenAnchor>,
    open_by_name: HashMap<Vec<u8>, usize>,
}

impl Doc {
    /// The document's size up to byte `at`, with aliases expanded.
    fn expanded(&self, at: usize) -> Size {
        Size { bytes: at - self.start + self.expansion, nodes: self.nodes }
    }
}

struct Scan<'l> {
    limits: &'l Limits,
    line: usize,
    documents: usize,
    doc: Option<Doc>,
    block: Vec<Level>,
    flow: usize,
    /// Inside a quoted scalar that goes on past the end of the line.
    quote: Option<u8>,
    block_scalar: Option<BlockScalar>,
    /// The last line ended inside a plain scalar: the next line continues it (it is text, not
    /// structure), in a flow collection always, in block context if it is indented right of
    /// the scalar's parent collection.
    plain_open: bool,
}

impl<'l> Scan<'l> {
    fn new(limits: &'l Limits) -> Self {
        Scan {
            limits,
            line: 0,
            documents: 0,
            doc: None,
            block: Vec::new(),
            flow: 0,
            quote: None,
            block_scalar: None,
            plain_open: false,
        }
    }

    fn line(&mut self, start: usize, text: &[u8], end: usize) -> Result<(), LimitError> {
        self.line += 1;
        if let Some(rest) = marker(text, b"---") {
            self.start_document(start)?;
            // The rest of the line is the document's first node: `--- |`, `--- !tag`, `--- [a]`.
            self.inline(text, start, text.len() - rest.len(), false)?;
            return self.end_line(end);
        }
        if marker(text, b"...").is_some() {
            self.end_document();
            return Ok(());
        }
        // A directive (`%YAML 1.2`), between documents. Inside one, a `%` line is read as
        // content (libyaml takes it for text within a multi-line plain scalar).
        if text.first() == Some(&b'%') && self.doc.is_none() {
            return Ok(());
        }
        if let Some(scalar) = &mut self.block_scalar {
            let indent = leading_spaces(text);
            if scalar.holds(indent, text[indent..].iter().all(|c| is_blank(*c))) {
                return self.end_line(end);
            }
            self.block_scalar = None;
        }
        let (from, in_plain) = if let Some(quote) = self.quote {
            match skip_quoted(text, 0, quote) {
                None => return self.end_line(end),
                Some(after) => {
                    self.quote = None;
                    (after, false)
                }
            }
        } else if self.flow > 0 {
            self.continue_plain(text, 0, true)
        } else {
            let indent = leading_spaces(text);
            match text[indent..].iter().find(|c| !is_blank(**c)) {
                None => return self.end_line(end), // blank: a plain scalar may go on after it
                Some(b'#') => {
                    self.plain_open = false; // a comment ends a plain scalar
                    return self.end_line(end);
                }
                Some(_) => {}
            }
            self.content(start)?;
            if self.plain_open && indent as isize > self.parent_column() {
                self.continue_plain(text, indent, false)
            } else {
                self.plain_open = false;
                (self.block_line(text, indent, start)?, false)
            }
        };
        self.inline(text, start, from, in_plain)?;
        self.end_line(end)
    }

    /// Where the tokens of a line start, from `i`, and whether that follows plain text: past
    /// the rest of a plain scalar the last line left open. A blank line leaves it open (it is
    /// folded into the scalar); a comment ends it.
    fn continue_plain(&self, text: &[u8], i: usize, flow: bool) -> (usize, bool) {
        let j = skip_blanks(text, i);
        if !self.plain_open || (j < text.len() && text[j] == b'#') {
            return (i, false);
        }
        if j == text.len() {
            return (j, true);
        }
        (plain_end(text, j, flow), true)
    }

    /// A line in block context: adjusts the stack of block collections to it and returns where
    /// its node content starts (after any `- ` indicators).
    fn block_line(&mut self, text: &[u8], indent: usize, start: usize) -> Result<usize, LimitError> {
        while self.block.last().is_some_and(|l| l.column > indent) {
            self.block.pop();
        }
        let mut col = indent;
        let mut entries = 0;
        loop {
            // `- ` (a sequence item), `? ` and `: ` (an explicit key and value): an entry of a
            // collection at this column, whose content may be another entry (`- - x`, `? - x`)
            // or a mapping (`- a: 1`, `? a: 1`).
            let indicator = text.get(col).copied().filter(|c| matches!(c, b'-' | b'?' | b':'));
            if let Some(c) = indicator.filter(|_| blank_or_end(text, col + 1)) {
                let kind = if c == b'-' { Kind::Sequence } else { Kind::Mapping };
                self.enter_block(col, kind, col == indent)?;
                entries += 1;
                col = skip_blanks(text, col + 1);
                if col == text.len() || text[col] == b'#' {
                    break;
                }
                continue;
            }
            if starts_key(text, col) {
                self.enter_block(col, Kind::Mapping, col == indent)?;
            }
            break;
        }
        let levels = self.block.len();
        self.close_anchors(start, |end| {
            matches!(end, AnchorEnd::Block { levels: l, column } if indent as isize <= column && levels <= l)
        });
        self.count(entries)?;
        Ok(col)
    }

    /// An entry of a block collection of `kind` at `column`: the collection is open already,
    /// or starts here. A mapping entry at the column of an indentless sequence (a sequence that
    /// shares its mapping's column) ends the sequence, when it begins the line.
    fn enter_block(&mut self, column: usize, kind: Kind, line_start: bool) -> Result<(), LimitError> {
        let top = self.block.last().copied();
        if kind == Kind::Mapping
            && line_start
            && top.is_some_and(|l| l.column == column && l.kind == Kind::Sequence)
        {
            self.block.pop();
        }
        if !self.block.last().is_some_and(|l| l.column == column && l.kind == kind) {
            self.block.push(Level { column, kind });
        }
        self.check_depth() // checked at once: `- - - …` cannot pile up
    }

    /// The tokens of one line from byte `i` (`base` is the line's offset in the file), up to a
    /// comment or the end of the line, as libyaml's scanner reads them: its tokens do not
    /// depend on where the parser is (it is the scanner whose work grows with the flow depth),
    /// only on the flow depth and the column. At a token boundary `#` is a comment even without
    /// a blank before it; `[`, `{`, `]`, `}`, `,`, quotes, anchors, aliases and tags are tokens
    /// wherever they come; `-` before a blank, and `?`, `:` before a blank or inside a flow
    /// collection, are indicators; `|` and `>` start block scalars outside flow collections;
    /// anything else starts a plain scalar, consumed whole by `plain_end`. `in_plain` says that
    /// `i` follows plain scalar text (a continued line).
    fn inline(&mut self, text: &[u8], base: usize, mut i: usize, in_plain: bool) -> Result<(), LimitError> {
        let mut plain_open = in_plain && i == text.len();
        while i < text.len() {
            let c = text[i];
            if is_blank(c) {
                i += 1;
                continue;
            }
            if c == b'#' {
                break;
            }
            plain_open = false;
            let flow = self.flow > 0;
            let indicator = blank_or_end(text, i + 1);
            match c {
                b'[' | b'{' => {
                    self.count(1)?;
                    self.open_flow()?;
                    i += 1;
                }
                b']' | b'}' => {
                    self.close_flow(base + i);
                    i += 1;
                }
                b',' => {
                    self.flow_entry(base + i);
                    self.count(1)?;
                    i += 1;
                }
                b'-' | b'?' | b':' if indicator || (flow && c != b'-') => {
                    // Mid-line `- ` and `? ` in block context open a level (libyaml rejects most
                    // of these; counting them errs on the safe side).
                    if !flow && c != b':' {
                        self.enter_block(i, if c == b'-' { Kind::Sequence } else { Kind::Mapping }, false)?;
                    }
                    self.count(1)?;
                    i += 1;
                }
                b'&' => {
                    let end = name_end(text, i + 1);
                    self.anchor(&text[i + 1..end], base + i);
                    i = end;
                }
                b'*' => {
                    let end = name_end(text, i + 1);
                    self.alias(&text[i + 1..end], base + i)?;
                    i = end;
                }
                b'!' => i = token_end(text, i + 1, flow),
                b'|' | b'>' if !flow => {
                    self.count(1)?;
                    self.block_scalar = Some(BlockScalar::new(&text[i + 1..], self.parent_column()));
                    break;
                }
                b'"' | b'\'' => {
                    self.count(1)?;
                    match skip_quoted(text, i + 1, c) {
                        Some(after) => i = after,
                        None => {
                            self.quote = Some(c);
                            break;
                        }
                    }
                }
                _ => {
                    self.count(1)?;
                    i = plain_end(text, i, flow);
                    plain_open = i == text.len();
                }
            }
        }
        self.plain_open = plain_open;
        Ok(())
    }

    fn end_line(&mut self, end: usize) -> Result<(), LimitError> {
        if let Some(doc) = &self.doc {
            if doc.expanded(end).bytes > self.limits.document_bytes {
                let limit = self.limits.document_bytes;
                return Err(self.error(if doc.expansion > 0 {
                    Exceeded::ExpandedBytes { limit }
                } else {
                    Exceeded::DocumentBytes { limit }
                }));
            }
        }
        Ok(())
    }

    /// Content outside any document starts one (the first document needs no `---`, and
    /// neither does one after `...`).
    fn content(&mut self, start: usize) -> Result<(), LimitError> {
        if self.doc.is_none() {
            self.start_document(start)?;
        }
        Ok(())
    }

    fn start_document(&mut self, start: usize) -> Result<(), LimitError> {
        self.end_document();
        self.documents += 1;
        self.doc = Some(Doc {
            number: self.documents,
            line: self.line,
            start,
            nodes: 0,
            expansion: 0,
            anchors: HashMap::new(),
            open: Vec::new(),
            open_by_name: HashMap::new(),
        });
        if self.documents > self.limits.documents {
            return Err(self.error(Exceeded::Documents { limit: self.limits.documents }));
        }
        Ok(())
    }

    fn end_document(&mut self) {
        self.doc = None; // anchors do not cross documents
        self.block.clear();
        self.flow = 0;
        self.quote = None;
        self.block_scalar = None;
        self.plain_open = false;
    }

    fn parent_column(&self) -> isize {
        self.block.last().map_or(-1, |l| l.column as isize)
    }

    fn open_flow(&mut self) -> Result<(), LimitError> {
        self.flow += 1;
        self.check_depth()
    }

    fn close_flow(&mut self, at: usize) {
        if self.flow == 0 {
            return; // a stray bracket; the parser reports it
        }
        self.flow -= 1;
        let flow = self.flow;
        self.close_anchors(at, |end| matches!(end, AnchorEnd::Flow(d) if flow < d));
    }

    /// A `,` in a flow collection: anchors opened in the entry it ends are complete.
    fn flow_entry(&mut self, at: usize) {
        let flow = self.flow;
        self.close_anchors(at, |end| matches!(end, AnchorEnd::Flow(d) if d == flow));
    }

    fn check_depth(&self) -> Result<(), LimitError> {
        if self.block.len() + self.flow > self.limits.depth {
            return Err(self.error(Exceeded::Depth { limit: self.limits.depth }));
        }
        Ok(())
    }

    fn count(&mut self, nodes: usize) -> Result<(), LimitError> {
        let Some(doc) = &mut self.doc else { return Ok(()) };
        doc.nodes += nodes;
        if doc.nodes > self.limits.nodes {
            return Err(self.error(Exceeded::Nodes { limit: self.limits.nodes }));
        }
        Ok(())
    }

    fn anchor(&mut self, name: &[u8], at: usize) {
        let end = if self.flow > 0 {
            AnchorEnd::Flow(self.flow)
        } else {
            AnchorEnd::Block { levels: self.block.len(), column: self.parent_column() }
        };
        if let Some(doc) = &mut self.doc {
            let start = doc.expanded(at);
            let shadows = doc.open_by_name.insert(name.to_vec(), doc.open.len());
            doc.open.push(OpenAnchor { name: name.to_vec(), start, end, shadows });
        }
    }

    /// Records the size of the innermost open anchors while `ends` says they end at `at`.
    /// Anchors nest, so the innermost ends first.
    fn close_anchors(&mut self, at: usize, ends: impl Fn(AnchorEnd) -> bool) {
        let Some(doc) = &mut self.doc else { return };
        while doc.open.last().is_some_and(|a| ends(a.end)) {
            let anchor = doc.open.pop().expect("checked above");
            match anchor.shadows {
                Some(hidden) => doc.open_by_name.insert(anchor.name.clone(), hidden),
                None => doc.open_by_name.remove(&anchor.name),
            };
            let now = doc.expanded(at);
            let size = Size { bytes: now.bytes - anchor.start.bytes, nodes: now.nodes - anchor.start.nodes };
            doc.anchors.insert(anchor.name, size);
        }
    }

    /// `*name`: the alias counts as the node it names, expanded. An alias of an anchor still
    /// open (a recursive alias) counts as what that node holds so far.
    fn alias(&mut self, name: &[u8], at: usize) -> Result<(), LimitError> {
        let Some(doc) = &mut self.doc else { return Ok(()) };
        // An open anchor of that name may be older than a closed one (`&a [&a x, *a]`): taking
        // it over-counts, which is the safe side.
        let size = match doc.open_by_name.get(name).map(|i| &doc.open[*i]) {
            Some(open) => {
                let now = doc.expanded(at);
                Size { bytes: now.bytes - open.start.bytes, nodes: now.nodes - open.start.nodes }
            }
            None => doc.anchors.get(name).copied().unwrap_or_default(), // unknown: the parser says so
        };
        doc.expansion += size.bytes;
        let expanded = doc.expanded(at).bytes;
        self.count(size.nodes + 1)?;
        if expanded > self.limits.document_bytes {
            return Err(self.error(Exceeded::ExpandedBytes { limit: self.limits.document_bytes }));
        }
        Ok(())
    }

    fn error(&self, exceeded: Exceeded) -> LimitError {
        let (document, document_line) = match &self.doc {
            Some(doc) => (doc.number, doc.line),
            None => (self.documents, self.line),
        };
        LimitError { exceeded, at: Some(Position { document, document_line, line: self.line }) }
    }
}

/// `---` or `...` at column 0 followed by a blank or the end of the line: returns the rest.
fn marker<'t>(text: &'t [u8], which: &[u8; 3]) -> Option<&'t [u8]> {
    let rest = text.strip_prefix(which)?;
    (rest.is_empty() || is_blank(rest[0])).then_some(rest)
}

fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn blank_or_end(text: &[u8], i: usize) -> bool {
    text.get(i).is_none_or(|c| is_blank(*c))
}

fn is_flow_indicator(c: u8) -> bool {
    matches!(c, b',' | b'[' | b']' | b'{' | b'}')
}

/// Indentation: spaces only (YAML does not indent with tabs).
fn leading_spaces(text: &[u8]) -> usize {
    text.iter().take_while(|c| **c == b' ').count()
}

fn skip_blanks(text: &[u8], mut i: usize) -> usize {
    while i < text.len() && is_blank(text[i]) {
        i += 1;
    }
    i
}

/// The end of an anchor or alias name: libyaml takes `[0-9A-Za-z_-]` only (so `*a: [` is an
/// alias, a value indicator and a flow sequence).
fn name_end(text: &[u8], mut i: usize) -> usize {
    while i < text.len() && (text[i].is_ascii_alphanumeric() || text[i] == b'_' || text[i] == b'-') {
        i += 1;
    }
    i
}

/// The end of a tag: up to a blank, or a flow indicator inside a flow collection (libyaml wants
/// a blank after a tag, so taking more than it does only ever skips what it rejects).
fn token_end(text: &[u8], mut i: usize, flow: bool) -> usize {
    while i < text.len() && !is_blank(text[i]) && !(flow && is_flow_indicator(text[i])) {
        i += 1;
    }
    i
}

/// The end of a quoted scalar whose body starts at `i`: the index after its closing quote, or
/// `None` if it goes on past this line. `\` escapes in double quotes, `''` in single quotes.
fn skip_quoted(text: &[u8], mut i: usize, quote: u8) -> Option<usize> {
    while i < text.len() {
        match text[i] {
            b'\\' if quote == b'"' => i += 2,
            b'\'' if quote == b'\'' && text.get(i + 1) == Some(&b'\'') => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end of the plain scalar text at `i` on this line: `: ` (and, in a flow collection, `:`
/// before an indicator, or any of `,[]{}`), or ` #`. Always past `i`: the caller has handled
/// every token that could end it right there.
fn plain_end(text: &[u8], mut i: usize, flow: bool) -> usize {
    let start = i;
    while i < text.len() {
        let c = text[i];
        let value = c == b':'
            && (blank_or_end(text, i + 1)
                || (flow && text.get(i + 1).is_some_and(|c| is_flow_indicator(*c))));
        if value || (flow && is_flow_indicator(c)) || (c == b'#' && i > start && is_blank(text[i - 1])) {
            break;
        }
        i += 1;
    }
    i.max(start + 1)
}

/// Whether the node at `i` is a block mapping's key (`key:`, `"key":`, `? `, `: `). An implicit
/// key never spans lines, so looking ahead on this line suffices.
fn starts_key(text: &[u8], mut i: usize) -> bool {
    loop {
        i = skip_blanks(text, i);
        match text.get(i) {
            Some(b'&') => i = name_end(text, i + 1),
            Some(b'!') => i = token_end(text, i + 1, false),
            _ => break,
        }
    }
    match text.get(i) {
        None | Some(b'#' | b'[' | b'{' | b'|' | b'>') => false,
        Some(b'*') => {
            let j = skip_blanks(text, name_end(text, i + 1));
            text.get(j) == Some(&b':') && blank_or_end(text, j + 1)
        }
        Some(b'?' | b':') if blank_or_end(text, i + 1) => true,
        Some(&quote @ (b'"' | b'\'')) => skip_quoted(text, i + 1, quote).is_some_and(|after| {
            let j = skip_blanks(text, after);
            text.get(j) == Some(&b':') && blank_or_end(text, j + 1)
        }),
        Some(_) => {
            for j in i..text.len() {
                match text[j] {
                    b':' if blank_or_end(text, j + 1) => return true,
                    b'#' if j > i && is_blank(text[j - 1]) => return false,
                    _ => {}
                }
            }
            false
        }
    }
}
