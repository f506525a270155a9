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
    assert!(matches!(c.bdev("vol1"), Some(BdevConfig::Encrypted(_))));
    assert_eq!(c.subsystems.len(), 1);
    assert!(c.keys.as_ref().is_some_and(|k| k.local.is_some()));
    // The built-in default is for local development: 127.0.0.1 only, any local host.
    assert!(c.subsystems[0].allow_any_host);
    assert!(c.subsystems[0].listen.iter().all(|l| l.addr == "127.0.0.1"));
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
            // Deny by default: every shipped subsystem says who may connect.
            for s in &c.subsystems {
                assert!(
                    s.allow_any_host || !s.allowed_hosts.is_empty(),
                    "{}: {} admits no host",
                    p.display(),
                    s.nqn
                );
            }
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

#[test]
fn encrypted_bdevs_need_a_known_provider_and_namespaces_known_bdevs() {
    let e = err("bdevs:\n  - name: m\n    type: malloc\n    num_blocks: 1024\n  - name: v\n    type: encrypted\n    base: m\n    provider: vault\n");
    assert_eq!(
        (e.path.as_str(), e.line),
        ("bdevs[1].provider", Some(8)),
        "{e}"
    );
    let e = err("subsystems:\n  - nqn: nqn.2026-01.io.x:a\n    serial: S1\n    namespaces:\n      - nsid: 1\n        bdev: nope\n");
    assert_eq!(
        (e.path.as_str(), e.line),
        ("subsystems[0].namespaces[0].bdev", Some(6)),
        "{e}"
    );
    let e = err("subsystems:\n  - nqn: nqn.2026-01.io.x:a\n    serial: S1\n    namespaces: []\n    listen:\n      - addr: localhost\n");
    assert_eq!(e.path, "subsystems[0].listen[0].addr", "{e}");
}

#[test]
fn subsystem_access_is_checked_with_position() {
    let sub = "subsystems:\n  - nqn: nqn.2026-01.io.x:a\n    serial: S1\n    namespaces: []\n";
    // Deny by default: no allowed_hosts and no allow_any_host parses, and admits nobody.
    let c = Config::from_yaml(sub, "t").unwrap();
    assert!(c.subsystems[0].allowed_hosts.is_empty() && !c.subsystems[0].allow_any_host);
    let c = Config::from_yaml(&format!("{sub}    allow_any_host: true\n"), "t").unwrap();
    assert!(c.subsystems[0].allow_any_host);
    // Both at once is ambiguous: refused, pointing at allow_any_host.
    let e = err(&format!(
        "{sub}    allowed_hosts:\n      - nqn.2014-08.org.nvmexpress:uuid:1\n    allow_any_host: true\n"
    ));
    assert_eq!(
        (e.path.as_str(), e.line, e.column),
        ("subsystems[0].allow_any_host", Some(7), Some(21)),
        "{e}"
    );
    assert!(e.message.contains("contradict"), "{e}");
    // A host entry that is not an NQN (an empty one would match an empty HOSTNQN).
    let e = err(&format!(
        "{sub}    allowed_hosts:\n      - nqn.2014-08.org.nvmexpress:uuid:1\n      - \"\"\n"
    ));
    assert_eq!(
        (e.path.as_str(), e.line),
        ("subsystems[0].allowed_hosts[1]", Some(7)),
        "{e}"
    );
}

#[test]
fn rpc_namespace_policy_errors_are_located() {
    let e = err("rpc:\n  socket_path: /tmp/s.sock\n  audit_log: /tmp/a.jsonl\n  namespaces:\n    paths:\n      - dir: /srv/vols\n      - dir: /srv/new\n        create: true\n");
    assert_eq!(e.path, "rpc.namespaces.paths[1].create");
    assert_eq!((e.line, e.column), (Some(8), Some(17)), "{e}");
    assert!(e.message.contains("max_size_bytes"), "{e}");
    // Granting anything needs an audit trail.
    let e = err("rpc:\n  socket_path: /tmp/s.sock\n  namespaces:\n    malloc_bytes_max: 4096\n");
    assert_eq!(e.path, "rpc.namespaces");
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.message.contains("audit"), "{e}");
    Config::from_yaml(
        "rpc:\n  socket_path: /tmp/s.sock\n  audit_log: /tmp/a.jsonl\n  namespaces:\n    paths:\n      - { device: /dev/nvme9n1 }\n",
        "t.yaml",
    )
    .unwrap();
}
