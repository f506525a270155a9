//! Finds the line and column of a key path (`bdevs[1].base`) in a YAML text, so errors found
//! after parsing (a missing base bdev, a core that does not exist) point at the exact place in the
//! file, like syntax errors do.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

enum Frame {
    Map {
        key: Option<String>,
        expect_key: bool,
    },
    Seq {
        index: usize,
    },
}

#[derive(Default)]
struct Collector {
    stack: Vec<(String, Frame)>,
    positions: HashMap<String, Pos>,
}

impl Collector {
    fn pos(m: &Marker) -> Pos {
        // yaml-rust2 markers: line is 1-based, col is 0-based.
        Pos {
            line: m.line().max(1),
            column: m.col() + 1,
        }
    }

    /// Path of the node about to start under the current top frame; `None` if it is a key.
    fn child_path(&mut self, scalar: Option<&str>, mark: &Marker) -> Option<String> {
        let Some((path, frame)) = self.stack.last_mut() else {
            return Some(String::new());
        };
        match frame {
            Frame::Map { key, expect_key } => {
                if *expect_key {
                    let k = scalar.unwrap_or("?").to_string();
                    let full = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    self.positions.entry(full).or_insert(Self::pos(mark));
                    // A block mapping's own mark is unreliable: use its first key's.
                    self.positions
                        .entry(path.clone())
                        .or_insert(Self::pos(mark));
                    *key = Some(k);
                    *expect_key = false;
                    None
                } else {
                    *expect_key = true;
                    let k = key.take().unwrap_or_default();
                    Some(if path.is_empty() {
                        k
                    } else {
                        format!("{path}.{k}")
                    })
                }
            }
            Frame::Seq { index } => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(ref v, ..) => {
                if let Some(p) = self.child_path(Some(v), &mark) {
                    // A value's own position wins over its key's for value errors.
                    self.positions.insert(p, Self::pos(&mark));
                }
            }
            Event::Alias(_) => {
                if let Some(p) = self.child_path(None, &mark) {
                    self.positions.insert(p, Self::pos(&mark));
                }
            }
            Event::MappingStart(..) => {
                let p = self.child_path(None, &mark).unwrap_or_default();
                self.stack.push((
                    p,
                    Frame::Map {
                        key: None,
                        expect_key: true,
                    },
                ));
            }
            Event::SequenceStart(..) => {
                let p = self.child_path(None, &mark).unwrap_or_default();
                self.positions.entry(p.clone()).or_insert(Self::pos(&mark));
                self.stack.push((p, Frame::Seq { index: 0 }));
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// Positions of every key and value in `text` by path; empty if the text does not parse (the
/// deserializer reports that error with its own position).
pub fn positions(text: &str) -> HashMap<String, Pos> {
    let mut c = Collector::default();
    let mut parser = Parser::new_from_str(text);
    let _ = parser.load(&mut c, false);
    c.positions
}

/// The position of `path`, or of its closest ancestor that exists in the text.
pub fn locate(text: &str, path: &str) -> Option<Pos> {
    let map = positions(text);
    let mut p = path.to_string();
    loop {
        if let Some(pos) = map.get(&p) {
            return Some(*pos);
        }
        let cut = p.rfind(['.', '['])?;
        p.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_paths() {
        let y = "reactor:\n  cores: \"0-1\"\nbdevs:\n  - name: a\n    type: null\n  - name: b\n    base: zz\n";
        assert_eq!(
            locate(y, "reactor.cores"),
            Some(Pos {
                line: 2,
                column: 10
            })
        );
        assert_eq!(
            locate(y, "bdevs[1].base"),
            Some(Pos {
                line: 7,
                column: 11
            })
        );
        assert_eq!(
            locate(y, "bdevs[0].name"),
            Some(Pos {
                line: 4,
                column: 11
            })
        );
        // Unknown leaf: falls back to the closest ancestor.
        assert_eq!(
            locate(y, "bdevs[1].nothing"),
            Some(Pos { line: 6, column: 5 })
        );
        assert!(locate("{{{", "a").is_none());
    }
}
