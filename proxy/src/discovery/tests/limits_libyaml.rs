//! The YAML pre-check against libyaml itself, the parser under serde_yaml_ng. Random inputs are
//! built from the fragments that make YAML's tokenization tricky (quotes and escapes, comments,
//! block scalars, continued plain scalars, anchors and aliases, indicators, document markers,
//! every line break libyaml knows), with a deep flow payload somewhere. However deep libyaml gets
//! in flow collections while it parses an input, the pre-check must have counted at least that
//! deep. This is a bounded, seeded version (40 000 inputs, under a second) of the differential
//! fuzzing that found the cases listed in `limits::structure_cannot_hide_from_the_count`: it
//! catches gross regressions; the rarer shapes (about one in a million generated inputs) are
//! guarded by those listed cases, and a long run of the generator (138 million inputs, both
//! oracles) found nothing more.

use std::mem::MaybeUninit;

use unsafe_libyaml::*;

use crate::discovery::limits::{check, Limits};
use crate::discovery::manifest::Format;

/// libyaml's flow depth over one parse, to its end or first error, two ways: the flow
/// collections its parser opened (structure it accepted), and the flow level of its scanner (the
/// cost that is quadratic in the depth) over the tokens it read before the line of the error.
/// On that line the scanner may read ahead one line (at most 1024 characters), bounded work.
fn libyaml_flow_depth(text: &[u8]) -> (usize, usize) {
    // SAFETY: libyaml's C-style API, used as documented: initialized parsers and events, each
    // event deleted once, the parser deleted last; `text` outlives both.
    unsafe {
        let mut parser = MaybeUninit::<yaml_parser_t>::uninit();
        assert!(yaml_parser_initialize(parser.as_mut_ptr()).ok);
        let parser = parser.as_mut_ptr();
        yaml_parser_set_input_string(parser, text.as_ptr(), text.len() as u64);
        let mut event = MaybeUninit::<yaml_event_t>::uninit();
        let (mut open, mut flow, mut parsed) = (Vec::new(), 0usize, 0usize);
        let mut scanned_to = text.len();
        loop {
            if !yaml_parser_parse(parser, event.as_mut_ptr()).ok {
                let p: &yaml_parser_t = &*parser;
                scanned_to = (p.problem_mark.index - p.problem_mark.column) as usize;
                break;
            }
            let ev = &*event.as_ptr();
            let kind = ev.type_;
            match kind {
                YAML_SEQUENCE_START_EVENT | YAML_MAPPING_START_EVENT => {
                    let is_flow = if kind == YAML_SEQUENCE_START_EVENT {
                        ev.data.sequence_start.style == YAML_FLOW_SEQUENCE_STYLE
                    } else {
                        ev.data.mapping_start.style == YAML_FLOW_MAPPING_STYLE
                    };
                    open.push(is_flow);
                    flow += usize::from(is_flow);
                    parsed = parsed.max(flow);
                }
                YAML_SEQUENCE_END_EVENT | YAML_MAPPING_END_EVENT => {
                    flow -= usize::from(open.pop() == Some(true));
                }
                _ => {}
            }
            yaml_event_delete(event.as_mut_ptr());
            if kind == YAML_STREAM_END_EVENT {
                break;
            }
        }
        yaml_parser_delete(parser);

        let mut scanner = MaybeUninit::<yaml_parser_t>::uninit();
        assert!(yaml_parser_initialize(scanner.as_mut_ptr()).ok);
        let scanner = scanner.as_mut_ptr();
        yaml_parser_set_input_string(scanner, text.as_ptr(), text.len() as u64);
        let mut token = MaybeUninit::<yaml_token_t>::uninit();
        let (mut level, mut scanned) = (0usize, 0usize);
        while yaml_parser_scan(scanner, token.as_mut_ptr()).ok {
            let t = &*token.as_ptr();
            let (kind, at) = (t.type_, t.start_mark.index as usize);
            yaml_token_delete(token.as_mut_ptr());
            if kind == YAML_STREAM_END_TOKEN || at >= scanned_to {
                break;
            }
            match kind {
                YAML_FLOW_SEQUENCE_START_TOKEN | YAML_FLOW_MAPPING_START_TOKEN => {
                    level += 1;
                    scanned = scanned.max(level);
                }
                YAML_FLOW_SEQUENCE_END_TOKEN | YAML_FLOW_MAPPING_END_TOKEN => level = level.saturating_sub(1),
                _ => {}
            }
        }
        yaml_parser_delete(scanner);
        (parsed, scanned)
    }
}

/// Pieces of YAML that a scanner must tokenize exactly as libyaml does.
const FRAGMENTS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    ",",
    ", ",
    ":",
    ": ",
    "- ",
    "-",
    "? ",
    "#",
    " #",
    " # c",
    "'",
    "''",
    "\"",
    "\\\"",
    "\\",
    "\\\\",
    "|",
    ">",
    "|2",
    ">-",
    "|+",
    "&a ",
    "&b",
    "*a",
    "*b",
    " *a",
    "!t ",
    "!!str ",
    "a",
    "b c",
    "x:y",
    "don't",
    " ",
    "  ",
    "\t",
    "\n",
    "\n",
    "\n",
    "\r",
    "\r\n",
    "\u{85}",
    "\u{2028}",
    "\u{2029}",
    "---",
    "--- ",
    "\n---\n",
    "...",
    "\n...\n",
    "%YAML 1.1",
    "\n%",
    "\n  ",
    "\n    ",
    "\n- ",
    "\n  - ",
    "\nk: ",
    "\n  k: ",
    "k:",
    "\"x\":",
    "'y':",
    "x: |\n  ",
    "x: >\n   ",
    "\n      ",
    "key: value",
    "\"a\\nb\"",
    "'a\nb'",
    "\"a\n  b\"",
    "[a,\n b]",
    "{a: 1,\n b: 2}",
    "#'\n",
    "#\"\n",
];

/// Whole lines, for inputs that stay valid long enough for libyaml to reach the payload.
const LINES: &[&str] = &[
    "key: value",
    "k: v # comment [",
    "- item",
    "- k: v",
    "- - x",
    "? explicit",
    ": value",
    "key:",
    "-",
    "list:",
    "text: |",
    "  block [[[ content",
    "folded: >-",
    "    more {{{",
    "q: \"multi",
    "  line [ quoted\"",
    "s: 'it''s",
    "  [ still'",
    "a: &anchor",
    "b: *anchor",
    "c: &x [1, 2]",
    "d: [*x, *x]",
    "e: {a: 1,",
    "  b: [2,",
    "  3]}",
    "# [[[ comment",
    "---",
    "...",
    "%YAML 1.1",
    "plain text",
    "  continued 'text [[",
    "\"k\": {\"a\":\"]]\"}",
    "tag: !t [x]",
    "? - a",
    "? a: b",
    "- ? a",
];

#[test]
fn the_pre_check_is_never_shallower_than_libyaml() {
    let limits = Limits { depth: 30, ..Limits::DEFAULT };
    let payloads = ["[".repeat(40), "{".repeat(40), "[{".repeat(20), "{a: [".repeat(20)];
    let mut rng = fastrand::Rng::with_seed(0x5111ce);
    let mut reached = 0;
    for _ in 0..40_000 {
        let mut text = String::new();
        if rng.bool() {
            for _ in 0..rng.usize(1..25) {
                text.push_str(FRAGMENTS[rng.usize(..FRAGMENTS.len())]);
            }
        } else {
            for _ in 0..rng.usize(1..12) {
                text.push_str(&" ".repeat(rng.usize(0..4) * 2));
                text.push_str(LINES[rng.usize(..LINES.len())]);
                text.push('\n');
            }
        }
        let payload = &payloads[rng.usize(..payloads.len())];
        match rng.u8(..4) {
            0 => text.push_str(payload),
            1 => text.push_str(&format!("\nk: {payload}")),
            2 => text.push_str(&format!("\n- {payload}")),
            _ => {
                let at = rng.usize(..=text.len());
                let at = (at..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
                text.insert_str(at, payload);
            }
        }
        for _ in 0..rng.usize(0..6) {
            text.push_str(FRAGMENTS[rng.usize(..FRAGMENTS.len())]);
        }
        let (parsed, scanned) = libyaml_flow_depth(text.as_bytes());
        if parsed.max(scanned) > limits.depth {
            reached += 1;
            assert!(
                check(&text, Format::Yaml, &limits).is_err(),
                "libyaml reached flow depth {parsed} (parser) / {scanned} (scanner), the pre-check passed: {text:?}"
            );
        }
    }
    assert!(reached > 1000, "the generator must reach the payload often ({reached} times)");
}
