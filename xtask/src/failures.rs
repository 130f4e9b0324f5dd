//! The end of a failed test run: which tests failed and the first lines of why, read from
//! nextest's JUnit report. CI logs are often cut to their head and tail; the tail should name
//! the failure, not show the last frames of a backtrace.

use std::path::Path;

/// Lines of each failure's message to show (the assertion and its context, not a backtrace).
const LINES_PER_FAILURE: usize = 12;

/// One failed test and the start of its message.
pub struct Failure {
    pub test: String,
    pub message: Vec<String>,
}

/// The failures recorded in the JUnit file at `path` (empty if it cannot be read).
pub fn read(path: &Path) -> Vec<Failure> {
    std::fs::read_to_string(path).map(|xml| parse(&xml)).unwrap_or_default()
}

fn parse(xml: &str) -> Vec<Failure> {
    let mut out = Vec::new();
    for case in xml.split("<testcase").skip(1) {
        let Some(start) = case.find("<failure") else { continue };
        let body = &case[start..];
        let text = match (body.find('>'), body.find("</failure>")) {
            (Some(open), Some(close)) if open < close && !body[..open].ends_with('/') => &body[open + 1..close],
            _ => attr(body, "message").unwrap_or_default(),
        };
        let test = format!("{} {}", attr(case, "classname").unwrap_or_default(), attr(case, "name").unwrap_or_default());
        let message = unescape(text)
            .lines()
            .take_while(|l| !l.starts_with("stack backtrace:") && !l.starts_with("Stack backtrace:"))
            .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE=1`") && !l.trim().is_empty())
            .take(LINES_PER_FAILURE)
            .map(str::to_owned)
            .collect();
        out.push(Failure { test: unescape(&test), message });
    }
    out
}

/// The value of `name="…"` in the first tag of `s`.
fn attr<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let tag_end = s.find('>').unwrap_or(s.len());
    let key = format!(" {name}=\"");
    let from = s[..tag_end].find(&key)? + key.len();
    let len = s[from..].find('"')?;
    Some(&s[from..from + len])
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#10;", "\n")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_named_with_their_message_and_without_backtraces() {
        let xml = r#"<testsuites><testsuite name="sluice">
<testcase name="a::passes" classname="sluice" time="0.1"/>
<testcase name="a::fails" classname="sluice" time="0.1">
<failure message="thread &apos;a::fails&apos; panicked" type="test failure">thread &apos;a::fails&apos; panicked at src/a.rs:9:9:
wanted &lt;1&gt; &amp; got 2
stack backtrace:
   0: frame</failure><system-err>noise</system-err></testcase>
<testcase name="b" classname="sluice-tests::mesh"><failure message="Error: no log line" type="x"/></testcase>
</testsuite></testsuites>"#;
        let f = parse(xml);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].test, "sluice a::fails");
        assert_eq!(f[0].message, ["thread 'a::fails' panicked at src/a.rs:9:9:", "wanted <1> & got 2"]);
        assert_eq!(f[1].test, "sluice-tests::mesh b");
        assert_eq!(f[1].message, ["Error: no log line"]);
    }
}
