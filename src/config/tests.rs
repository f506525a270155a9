use super::*;

fn err(yaml: &str) -> ConfigError {
    match Config::from_yaml(yaml, "t.yaml") {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e,
    }
}

#[test]
fn builtin_default_and_examples_parse() {
    let c = Config::builtin_default();
    assert_eq!(c.bdevs.len(), 3);
    assert!(matches!(c.bdev("enc1"), Some(BdevConfig::Crypto(_))));
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn unknown_key_is_refused_with_position() {
    let e = err("reactor:\n  cores: 1\n  mailbox_dept: 4\n");
    assert_eq!(e.path, "reactor.mailbox_dept");
    assert_eq!((e.line, e.column), (Some(3), Some(3)), "{e}");
    assert!(e.message.contains("unknown field `mailbox_dept`"), "{e}");
    assert!(e.to_string().starts_with("t.yaml:3:3: "), "{e}");
}

#[test]
fn type_errors_name_key_line_column() {
    let e = err("reactor:\n  cores: 1\n  mailbox_depth: lots\n");
    assert_eq!(e.path, "reactor.mailbox_depth");
    assert_eq!(e.line, Some(3));
    let e = err("bdevs:\n  - name: a\n    type: floppy\n");
    assert!(e.message.contains("floppy"), "{e}");
    assert_eq!(e.line, Some(3), "{e}");
    let e = err("bdevs:\n  - name: a\n    type: null\n    num_blocks: 8\n    colour: red\n");
    assert!(e.message.contains("colour"), "{e}");
    assert!(e.line.is_some());
}

#[test]
fn semantic_errors_are_located() {
    let e = err("bdevs:\n  - name: a\n    type: null\n    num_blocks: 8\n  - name: e\n    type: crypto\n    base: zz\n    key: ephemeral\n");
    assert_eq!(e.path, "bdevs[1].base");
    assert_eq!((e.line, e.column), (Some(7), Some(11)), "{e}");
    let e = err("bdevs:\n  - name: a\n    type: null\n    num_blocks: 8\n  - name: a\n    type: null\n    num_blocks: 8\n");
    assert_eq!(e.path, "bdevs[1].name");
    assert_eq!(e.line, Some(5));
    let e = err("reactor:\n  cores: \"3-1\"\n");
    assert_eq!((e.path.as_str(), e.line), ("reactor.cores", Some(2)));
    let e = err("crypto:\n  max_tier: turbo\n");
    assert_eq!((e.path.as_str(), e.line), ("crypto.max_tier", Some(2)));
    let e = err("reactor:\n  mailbox_depth: 0\n");
    assert_eq!(e.path, "reactor.mailbox_depth");
}

#[test]
fn syntax_error_has_position() {
    let e = err("reactor:\n  cores: [1\n");
    assert!(e.line.is_some(), "{e}");
}

#[test]
fn core_specs() {
    let c = Config::from_yaml("reactor:\n  cores: \"0-1\"\n", "t").unwrap();
    assert_eq!(c.reactor.cores, CoreSpec::List("0-1".into()));
    let c = Config::from_yaml("reactor:\n  cores: 2\n", "t").unwrap();
    assert_eq!(c.reactor.cores, CoreSpec::Count(2));
}
