//! The JSON pre-check: one pass over a stream of JSON values (a `.json` manifest holds one or
//! more, as `kubectl apply -f` accepts), measuring each value's size, nesting depth and nodes
//! (keys, values and list items). Strings are skipped whole, so brackets inside them do not count.

use super::{Exceeded, LimitError, Limits, Position};

pub(super) fn check(text: &str, limits: &Limits) -> Result<(), LimitError> {
    let bytes = text.as_bytes();
    let mut line = 1;
    let mut depth = 0usize;
    let mut documents = 0usize;
    let (mut doc_start, mut doc_line, mut nodes) = (0usize, 1usize, 0usize);
    let error = |exceeded, documents, doc_line, line| LimitError {
        exceeded,
        at: Some(Position { document: documents, document_line: doc_line, line }),
    };
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            // A top-level value starts.
            documents += 1;
            (doc_start, doc_line, nodes) = (i, line, 0);
            if documents > limits.documents {
                return Err(error(
                    Exceeded::Documents { limit: limits.documents },
                    documents,
                    doc_line,
                    line,
                ));
            }
        }
        match c {
            b'[' | b'{' => {
                nodes += 1;
                depth += 1;
                if depth > limits.depth {
                    return Err(error(Exceeded::Depth { limit: limits.depth }, documents, doc_line, line));
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1); // a stray one is the parser's to report
                i += 1;
            }
            b',' | b':' => i += 1,
            b'"' => {
                nodes += 1;
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b'\n' => {
                            line += 1; // not valid JSON, but keep the line numbers right
                            i += 1;
                        }
                        _ => i += 1,
                    }
                }
            }
            _ => {
                // A number, `true`, `false`, `null` (or garbage): up to the next delimiter.
                nodes += 1;
                i += 1;
                while i < bytes.len()
                    && !matches!(
                        bytes[i],
                        b' ' | b'\t' | b'\r' | b'\n' | b',' | b':' | b'[' | b']' | b'{' | b'}' | b'"'
                    )
                {
                    i += 1;
                }
            }
        }
        if nodes > limits.nodes {
            return Err(error(Exceeded::Nodes { limit: limits.nodes }, documents, doc_line, line));
        }
        if i.min(bytes.len()) - doc_start > limits.document_bytes {
            return Err(error(
                Exceeded::DocumentBytes { limit: limits.document_bytes },
                documents,
                doc_line,
                line,
            ));
        }
    }
    Ok(())
}
