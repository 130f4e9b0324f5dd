//! The pre-check (`discovery::limits`): what it measures agrees with what serde_yaml_ng builds,
//! nothing libyaml reads as structure can be hidden from it (quotes, comments, block scalars,
//! plain-scalar continuations, every kind of line break), and each limit is enforced with a
//! message naming it and the place.

use std::time::{Duration, Instant};

use serde_yaml_ng::Value;

use super::fixtures;
use crate::discovery::limits::{check, check_file_size, Exceeded, LimitError, Limits};
use crate::discovery::manifest::{parse, Format, ParseError};

fn yaml(text: &str, limits: &Limits) -> Result<(), LimitError> {
    check(text, Format::Yaml, limits)
}

fn json(text: &str, limits: &Limits) -> Result<(), LimitError> {
    check(text, Format::Json, limits)
}

fn with(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::DEFAULT;
    f(&mut l);
    l
}

fn exceeded(r: Result<(), LimitError>) -> Exceeded {
    match r {
        Err(e) => e.exceeded,
        Ok(()) => panic!("expected a limit to be exceeded"),
    }
}

/// How deep serde_yaml_ng's value nests (a scalar is 0, `[x]` is 1).
fn depth(v: &Value) -> usize {
    match v {
        Value::Sequence(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
        Value::Mapping(m) => 1 + m.iter().map(|(k, v)| depth(k).max(depth(v))).max().unwrap_or(0),
        Value::Tagged(t) => depth(&t.value),
        _ => 0,
    }
}

/// Every node serde_yaml_ng builds: collections, keys, values, items (aliases expanded).
fn nodes(v: &Value) -> usize {
    1 + match v {
        Value::Sequence(s) => s.iter().map(nodes).sum(),
        Value::Mapping(m) => m.iter().map(|(k, v)| nodes(k) + nodes(v)).sum(),
        Value::Tagged(t) => nodes(&t.value) - 1,
        _ => 0,
    }
}

/// Well-formed documents with the constructs the scanner must follow.
const SAMPLES: &[&str] = &[
    "a:\n- b: 1\n  c:\n  - - x\n    - y\n  - [1, {d: [2, 3]}]\ne: z\n",
    "e: \"quoted: [not, a, list]\"\nf: 'it''s [still] {a} string'\ng: \"esc \\\" [[\"\n",
    "g: |\n  block [[[ scalar\n   more {{{\n\n  after a blank line ]]]\nh: >-\n  folded ]]]\ni: 1\n",
    "i: plain [not flow] text # a comment [[[\nj: {k: \"v\", \"l\": [m, n]}\nk: b#c[[\n",
    "\"quoted key\": value\n'single key': [a]\n? explicit\n: value\n",
    "list:\n- a\n- b\nmap:\n  k: v\nindentless:\n- - nested\n  - items\n- {x: [1]}\n",
    "multi: [a,\n  b, [c,\n    d]]\nafter: {x: y,\n  z: [1]}\n",
    "long: this plain scalar\n  goes on ['not a list\n  and ends here\nnext: [ok]\n",
    "json: {\"a\":\"]]]\",\"b\":[1,2,{\"c\":null}]}\n",
    "deep:\n  a:\n    b:\n      c:\n        - d:\n            - [e, [f]]\n",
    "%YAML 1.2\n---\nafter: [a directive]\n",
    "--- [on, the, marker, line]\n",
    "k: !!str tagged\nl: !custom {a: 1}\nm: &x [1]\n",
];

/// Aliases: counted as what they expand to for nodes and size. (Not for depth: what aliases
/// nest, serde_yaml_ng bounds itself, at 128 levels.)
const ALIAS_SAMPLES: &[&str] = &[
    "base: &anchor\n  x: 1\n  y: [1, 2]\ncopy: *anchor\nmerged:\n  <<: *anchor\n  z: 3\n",
    "m: &x [1, {a: b}]\nn: [*x, *x]\no: {p: *x}\n",
    "- &item {name: a, ports: [80, 443]}\n- *item\n- [*item, *item]\n",
];

/// For each sample: the pre-check's depth is exactly serde_yaml_ng's (one less is refused, the
/// same passes), and its node count is never below serde_yaml_ng's.
#[test]
fn measures_what_serde_yaml_ng_builds() {
    let mut samples: Vec<String> = SAMPLES.iter().map(|s| s.to_string()).collect();
    samples.extend(
        [fixtures::NAMESPACE, fixtures::POD, fixtures::SERVICE, fixtures::ENDPOINT_SLICE].map(String::from),
    );
    samples.extend(
        [fixtures::ALLOW_NOTHING, fixtures::DENY_FROM_NAMESPACE, fixtures::ALLOW_PRINCIPAL_PORT]
            .map(String::from),
    );
    for text in &samples {
        let value: Value =
            serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("sample does not parse: {e}\n{text}"));
        let (d, n) = (depth(&value), nodes(&value));
        assert!(yaml(text, &with(|l| l.depth = d)).is_ok(), "depth {d} counted too deep:\n{text}");
        assert_eq!(
            exceeded(yaml(text, &with(|l| l.depth = d - 1))),
            Exceeded::Depth { limit: d - 1 },
            "{text}"
        );
        assert_eq!(
            exceeded(yaml(text, &with(|l| l.nodes = n - 1))),
            Exceeded::Nodes { limit: n - 1 },
            "fewer than serde_yaml_ng's {n} nodes counted:\n{text}"
        );
    }
    for text in ALIAS_SAMPLES {
        let n = nodes(
            &serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("sample does not parse: {e}\n{text}")),
        );
        assert_eq!(
            exceeded(yaml(text, &with(|l| l.nodes = n - 1))),
            Exceeded::Nodes { limit: n - 1 },
            "{text}"
        );
    }
}

/// The file that wedged discovery: a Pod whose metadata is 400 KB of `[`. Refused at its first
/// line past the limit, in a single linear pass.
#[test]
fn nested_brackets_are_refused_before_parsing() {
    let text = format!("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "[".repeat(400 * 1024));
    let start = Instant::now();
    let e = yaml(&text, &Limits::DEFAULT).unwrap_err();
    let took = start.elapsed();
    assert_eq!(
        e.to_string(),
        "document 1 (line 1) exceeds sluice's nesting limit: more than 100 levels deep (at line 3)"
    );
    assert!(took < Duration::from_secs(1), "the pre-check took {took:?}");
    // And through the parser's entry point, without the parser ever seeing it.
    assert!(matches!(parse(&text, Format::Yaml), Err(ParseError::Limit(_))));
    // The boundary: 99 brackets inside the one-level mapping is 100 levels.
    let at_limit = format!("a: {}{}\n", "[".repeat(99), "]".repeat(99));
    assert!(yaml(&at_limit, &Limits::DEFAULT).is_ok());
    let over = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
    assert_eq!(exceeded(yaml(&over, &Limits::DEFAULT)), Exceeded::Depth { limit: 100 });
}

#[test]
fn block_nesting_counts_mappings_and_sequences() {
    let mappings = |n: usize| {
        (0..n).map(|i| format!("{}k{i}:\n", "  ".repeat(i))).collect::<String>() + &"  ".repeat(n) + "v\n"
    };
    assert!(yaml(&mappings(100), &Limits::DEFAULT).is_ok());
    assert_eq!(exceeded(yaml(&mappings(101), &Limits::DEFAULT)), Exceeded::Depth { limit: 100 });
    // `- - - x`: compact nested sequences, each a level.
    let compact = format!("{}x\n", "- ".repeat(101));
    assert_eq!(exceeded(yaml(&compact, &Limits::DEFAULT)), Exceeded::Depth { limit: 100 });
    // A sequence that shares its mapping's column is still a level of its own.
    // `k:` then `- k:` one column pair further each line: a mapping and a sequence per line.
    let indentless =
        "k:\n".to_owned() + &(0..60).map(|i| format!("{}- k:\n", "  ".repeat(i))).collect::<String>();
    assert_eq!(depth(&serde_yaml_ng::from_str(&indentless).unwrap()), 121);
    assert_eq!(exceeded(yaml(&indentless, &Limits::DEFAULT)), Exceeded::Depth { limit: 100 });
}

/// Structure hidden behind what a naive scan would take for a quote, a comment or a block
/// scalar: libyaml reads it as structure, so the pre-check must count it.
#[test]
fn structure_cannot_hide_from_the_count() {
    let deep = "[".repeat(200);
    let attacks = [
        format!("a: don't\nb: {deep}"),               // apostrophe in a plain scalar
        format!("a: plain\n  'continued\nb: {deep}"), // `'` opening a continuation line
        format!("a: plain\n  \"continued\nb: {deep}"),
        format!("a: b#c\nd: {deep}"),        // `#` without a space is text
        format!("a: 'x' # it's\nb: {deep}"), // apostrophe in a comment
        format!("a: 'it''s'\nb: {deep}"),    // escaped single quote
        format!("a: \"x\\\"y\"\nb: {deep}"), // escaped double quote
        format!("a: \"x\\\\\"\nb: {deep}"),  // escaped backslash
        format!("# comment\r{deep}"),        // CR ends a comment
        format!("# comment\u{85}{deep}"),    // so do NEL, LS, PS
        format!("# comment\u{2028}{deep}"),
        format!("# comment\u{2029}{deep}"),
        format!("a: \"unclosed\n---\nb: {deep}"), // a marker ends a quote
        format!("a: 'unclosed\n...\nb: {deep}"),
        format!("a: |\n  text\nb: {deep}"),         // a block scalar ends
        format!("a: |\n      first\n   b: {deep}"), // less indented than its first line
        format!("a: |\n  text\n---\n{deep}"),
        format!("[a\"b, {deep}"), // a quote inside a flow plain scalar
        format!("[don't, {deep}"),
        format!("{{\"a\":\"]]]]\", \"b\": {deep}"), // JSON style
        format!("%YAML 1.2\n--- {deep}"),
        format!("- &anchor\n  - {deep}"),
        format!("a: !tag {deep}"),
        format!("a:\n  # comment\n  {deep}"),
        format!("- - - - {deep}"),
        // Found by fuzzing against libyaml:
        format!("*b: {deep}"),                         // an alias name stops at `:`
        format!("? - {deep}"),                         // an entry inside an explicit key
        format!("? x: >\n   \n  k: {deep}"),           // a block scalar's indentation
        format!("[*a---:#--- |\\\",':x: >\n  {deep}"), // `#` right after a token is a comment
        format!("[#{{ \"#['\nk: {deep}"),
        format!("[a, :\"]]]]]]]]\", {deep}"), // `:` in a flow collection, then a quote
        format!("[don't\n\n'x, {deep}"),      // a blank line inside a flow plain scalar
        format!("a: 1\n%YAML 1.1\n{deep}"),   // `%` inside a document is text
        format!("[? ]: ,{deep}"),             // `,` is a token in block context too
    ];
    for text in &attacks {
        assert!(
            matches!(exceeded(yaml(text, &Limits::DEFAULT)), Exceeded::Depth { .. }),
            "hidden from the depth count:\n{}",
            text.replace(&deep, "[ × 200")
        );
    }
}

#[test]
fn quotes_comments_and_block_scalars_are_not_counted() {
    let many = "[".repeat(500);
    let fine = [
        format!("a: \"{many}\"\n"),
        format!("a: '{many}'\n"),
        format!("a: \"multi\n  line {many}\n  done\"\nb: 1\n"),
        format!("a: 1 # {many}\n"),
        format!("# {many}\na: 1\n"),
        format!("a: |\n  {many}\n  {many}\nb: >\n  {many}\n"),
        format!("a: plain{many}\n"),
        format!("a: plain\n  continued {many}\n"),
        format!("a: [\"{many}\", '{many}']\n"),
    ];
    for text in &fine {
        assert!(
            yaml(text, &Limits::DEFAULT).is_ok(),
            "counted what is text:\n{}",
            text.replace(&many, "[ × 500")
        );
    }
}

#[test]
fn documents_are_measured_one_by_one() {
    let doc = |n: usize| format!("a: {}\n", "x".repeat(n));
    let limits = with(|l| l.document_bytes = 1000);
    let two_small = format!("{}---\n{}", doc(900), doc(900));
    assert!(yaml(&two_small, &limits).is_ok(), "each document is under the limit");
    let e = yaml(&format!("{}---\n{}", doc(10), doc(2000)), &limits).unwrap_err();
    assert_eq!(e.exceeded, Exceeded::DocumentBytes { limit: 1000 });
    assert_eq!(
        e.to_string(),
        "document 2 (line 2) exceeds sluice's size limit: more than 1000 bytes (at line 3)"
    );

    let limits = with(|l| l.documents = 3);
    assert!(yaml("a: 1\n---\nb: 2\n---\nc: 3\n", &limits).is_ok());
    let e = yaml("a: 1\n---\nb: 2\n---\nc: 3\n---\nd: 4\n", &limits).unwrap_err();
    assert_eq!(e.to_string(), "the file exceeds sluice's document limit: more than 3 documents (at line 6)");
    // `...` ends a document; what follows starts the next one.
    assert_eq!(
        exceeded(yaml("a: 1\n...\nb: 2\n...\nc: 3\n...\nd: 4\n", &limits)),
        Exceeded::Documents { limit: 3 }
    );
    // JSON: one document per top-level value.
    assert!(json("{}\n[]\n{\"a\": 1}", &limits).is_ok());
    assert_eq!(exceeded(json("{} [] 1 \"x\"", &limits)), Exceeded::Documents { limit: 3 });
}

#[test]
fn empty_values_and_items_count_as_nodes() {
    let limits = with(|l| l.nodes = 1000);
    assert_eq!(exceeded(yaml(&"-\n".repeat(1001), &limits)), Exceeded::Nodes { limit: 1000 });
    let keys: String = (0..600).map(|i| format!("k{i}:\n")).collect();
    assert_eq!(exceeded(yaml(&keys, &limits)), Exceeded::Nodes { limit: 1000 });
    assert_eq!(exceeded(yaml(&format!("[{}]", "0,".repeat(1000)), &limits)), Exceeded::Nodes { limit: 1000 });
    assert_eq!(
        exceeded(json(&format!("[{}0]", "0,".repeat(1000)), &limits)),
        Exceeded::Nodes { limit: 1000 }
    );
}

/// Aliases count as what they expand to: the bombs are refused, ordinary merge keys are not.
#[test]
fn alias_expansion_is_bounded() {
    // 300 KB that serde_yaml_ng expands to 10 million nodes (1.2 GB, 8 s in a release build).
    let wide = format!("a: &a [{}]\nb: [{}]\n", vec!["x"; 100].join(","), vec!["*a"; 100_000].join(","));
    assert!(matches!(
        exceeded(yaml(&wide, &Limits::DEFAULT)),
        Exceeded::Nodes { .. } | Exceeded::ExpandedBytes { .. }
    ));
    // Billion laughs: each level ten aliases of the one before.
    let mut laughs = "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n".to_owned();
    for i in 1..9 {
        laughs += &format!("l{i}: &l{i} [{}]\n", vec![format!("*l{}", i - 1); 10].join(", "));
    }
    assert!(matches!(
        exceeded(yaml(&laughs, &Limits::DEFAULT)),
        Exceeded::Nodes { .. } | Exceeded::ExpandedBytes { .. }
    ));
    // A block-anchored mapping, aliased many times.
    let block = |n: usize| {
        format!("base: &b\n  k1: {}\n  k2: v\n", "v".repeat(1000))
            + &(0..n).map(|i| format!("x{i}: *b\n")).collect::<String>()
    };
    assert!(yaml(&block(100), &Limits::DEFAULT).is_ok());
    assert_eq!(exceeded(yaml(&block(4000), &Limits::DEFAULT)), Exceeded::ExpandedBytes { limit: 3 << 20 });
    // The bulk of an anchored plain scalar on its continuation lines still counts.
    let long = format!("a: &a x\n  {}\nb: [{}]\n", "y".repeat(100_000), vec!["*a"; 40].join(", "));
    assert_eq!(exceeded(yaml(&long, &Limits::DEFAULT)), Exceeded::ExpandedBytes { limit: 3 << 20 });
    // Merge keys as manifests use them.
    let merges = "defaults: &d {app: web, tier: front}\n".to_owned()
        + &(0..200).map(|i| format!("o{i}:\n  <<: *d\n  name: n{i}\n")).collect::<String>();
    assert!(yaml(&merges, &Limits::DEFAULT).is_ok());
    serde_yaml_ng::from_str::<Value>(&merges).expect("the merge sample is valid YAML");
}

#[test]
fn json_depth_and_size() {
    assert!(json(&format!("{}{}", "[".repeat(100), "]".repeat(100)), &Limits::DEFAULT).is_ok());
    let e = json(&format!("{{\"a\":\n{}", "[".repeat(200)), &Limits::DEFAULT).unwrap_err();
    assert_eq!(
        e.to_string(),
        "document 1 (line 1) exceeds sluice's nesting limit: more than 100 levels deep (at line 2)"
    );
    // Brackets and escaped quotes inside strings are text.
    assert!(json(&format!("{{\"a\": \"\\\"{}\"}}", "[".repeat(500)), &Limits::DEFAULT).is_ok());
    let limits = with(|l| l.document_bytes = 100);
    assert!(json(&format!("{{\"a\": \"{}\"}} {{\"b\": 1}}", "x".repeat(80)), &limits).is_ok());
    assert_eq!(
        exceeded(json(&format!("{{\"a\": \"{}\"}}", "x".repeat(200)), &limits)),
        Exceeded::DocumentBytes { limit: 100 }
    );
    let manifest =
        serde_json::to_string_pretty(&serde_yaml_ng::from_str::<serde_json::Value>(fixtures::POD).unwrap())
            .unwrap();
    assert!(json(&manifest, &Limits::DEFAULT).is_ok());
}

#[test]
fn file_size_is_checked_before_reading() {
    assert!(check_file_size(8 << 20, &Limits::DEFAULT).is_ok());
    let e = check_file_size((8 << 20) + 1, &Limits::DEFAULT).unwrap_err();
    assert_eq!(e.to_string(), "the file exceeds sluice's size limit: 8388609 bytes, more than 8 MiB");
    assert!(yaml(&" ".repeat((8 << 20) + 1), &Limits::DEFAULT).is_err(), "and from the text");
}

/// The real fixtures and a large realistic object pass with room to spare.
#[test]
fn real_manifests_pass() {
    assert!(yaml(&fixtures::all(), &Limits::DEFAULT).is_ok());
    assert_eq!(parse(&fixtures::all(), Format::Yaml).map(|o| o.len()), Ok(4));
    // An EndpointSlice at its 1000-endpoint maximum, as `kubectl get -o yaml` prints it.
    let mut slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abcde\n  namespace: shop\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n".to_owned();
    for i in 0..1000 {
        slice += &format!(
            "- addresses:\n  - 10.244.{}.{}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: node-{}\n  targetRef:\n    kind: Pod\n    name: web-{i}\n    namespace: shop\n    uid: 3c1f2a9e-7b6d-4e2f-9a1b-{i:012}\n  zone: zone-a\n",
            i / 250,
            i % 250,
            i % 10
        );
    }
    let value: Value = serde_yaml_ng::from_str(&slice).unwrap();
    let n = nodes(&value);
    assert!(yaml(&slice, &with(|l| l.nodes = n * 3)).is_ok(), "counted more than 3× serde_yaml_ng's {n} nodes");
    assert!(n * 5 < Limits::DEFAULT.nodes, "{n} nodes: the default limit leaves little room");
    assert!(parse(&slice, Format::Yaml).is_ok());
}
