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

/// Issue 18 item 7: what `serve` used to refuse only late (exit 3, no position) is refused by
/// the validation `config check` runs too, with the key, line and column.
#[test]
fn serve_refusals_are_config_errors_with_position() {
    let sub = |ns: &str| {
        format!("bdevs:\n  - name: m\n    type: null\n    num_blocks: 8\nsubsystems:\n  - nqn: nqn.2026-01.io.x:a\n    serial: S1\n    allow_any_host: true\n    namespaces:\n{ns}")
    };
    let e = err(&sub(
        "      - {nsid: 1, bdev: m}\n      - {nsid: 1, bdev: m}\n",
    ));
    assert_eq!(
        (e.path.as_str(), e.line),
        ("subsystems[0].namespaces[1].nsid", Some(11)),
        "{e}"
    );
    let e = err(&sub("      - nsid: 0\n        bdev: m\n"));
    assert_eq!(
        (e.path.as_str(), e.line, e.column),
        ("subsystems[0].namespaces[0].nsid", Some(10), Some(15)),
        "{e}"
    );
    let e = err("subsystems:\n  - nqn: vol0\n    serial: S1\n    namespaces: []\n");
    assert_eq!(
        (e.path.as_str(), e.line),
        ("subsystems[0].nqn", Some(2)),
        "{e}"
    );
    let e = err("subsystems:\n  - nqn: nqn.2014-08.org.nvmexpress.discovery\n    serial: S1\n    namespaces: []\n");
    assert_eq!(e.path, "subsystems[0].nqn", "{e}");
    let e = err("subsystems:\n  - nqn: nqn.2026-01.io.x:a\n    serial: S123456789012345678901\n    namespaces: []\n");
    assert_eq!(
        (e.path.as_str(), e.line),
        ("subsystems[0].serial", Some(3)),
        "{e}"
    );
    let e = err("bdevs:\n  - name: m\n    type: malloc\n    num_blocks: 8\n    block_size: 1000\n");
    assert_eq!(
        (e.path.as_str(), e.line),
        ("bdevs[0].block_size", Some(5)),
        "{e}"
    );
    let e = err("bdevs:\n  - name: m\n    type: null\n    size_bytes: 10000\n");
    assert_eq!(
        (e.path.as_str(), e.line),
        ("bdevs[0].size_bytes", Some(4)),
        "{e}"
    );
    let e =
        err("bdevs:\n  - name: f\n    type: uring\n    path: /tmp/x.img\n    size_bytes: 4097\n");
    assert_eq!(
        (e.path.as_str(), e.line),
        ("bdevs[0].size_bytes", Some(5)),
        "{e}"
    );
    let e =
        err("bdevs:\n  - name: f\n    type: uring\n    path: /tmp/x.img\n    block_size: 520\n");
    assert_eq!(e.path, "bdevs[0].block_size", "{e}");
    let e = err("bdevs:\n  - name: m\n    type: malloc\n");
    assert!(e.path.starts_with("bdevs[0]"), "{e}");
}

#[test]
fn machine_checks_refuse_missing_cores_and_paths() {
    use crate::types::CoreId;
    let two = [CoreId(0), CoreId(1)];
    let load = |y: &str| Config::from_yaml(y, "t.yaml").unwrap();
    let c = load("reactor:\n  cores: \"1,5\"\n");
    let e = c.check_host(&two).unwrap_err();
    assert_eq!((e.path.as_str(), e.line), ("reactor.cores", Some(2)), "{e}");
    assert!(e.message.contains("CPU 5"), "{e}");
    assert!(load("reactor:\n  cores: 3\n").check_host(&two).is_err());
    load("reactor:\n  cores: \"0-1\"\n")
        .check_host(&two)
        .unwrap();
    // Unpinned reactors may name any core (oversubscribed test machines).
    load("reactor:\n  cores: \"0-5\"\n  pin: false\n")
        .check_host(&two)
        .unwrap();

    let dir = std::env::temp_dir().join(format!("nvseal-cfg-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let e = load(&format!("keys:\n  audit_log: {d}/no/such/audit.jsonl\n"))
        .check_host(&two)
        .unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("keys.audit_log", Some(2)),
        "{e}"
    );
    load(&format!("keys:\n  audit_log: {d}/audit.jsonl\n"))
        .check_host(&two)
        .unwrap();
    let e = load(&format!(
        "rpc:\n  socket_path: {d}/s.sock\n  audit_log: {d}/gone/a.jsonl\n"
    ))
    .check_host(&two)
    .unwrap_err();
    assert_eq!(e.path, "rpc.audit_log", "{e}");
    let e = load(&format!("keys:\n  local:\n    path: {d}/none.keys\n"))
        .check_host(&two)
        .unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("keys.local.path", Some(3)),
        "{e}"
    );
    std::fs::write(dir.join("ca.pem"), "x").unwrap();
    let kms = |key: &str| {
        format!("keys:\n  kms_clusters:\n    - alias: kms-a\n      servers: [\"127.0.0.1:5696\"]\n      ca_file: {d}/ca.pem\n      client_cert_file: {d}/ca.pem\n      client_key_file: {key}\n")
    };
    let e = load(&kms(&format!("{d}/no-key.pem")))
        .check_host(&two)
        .unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("keys.kms_clusters[0].client_key_file", Some(7)),
        "{e}"
    );
    load(&kms(&format!("{d}/ca.pem"))).check_host(&two).unwrap();
    load(&format!(
        "keys:\n  local:\n    path: {d}/sub/new.keys\n    create: true\n"
    ))
    .check_host(&two)
    .unwrap();
    let e = load(&format!(
        "bdevs:\n  - name: f\n    type: uring\n    path: {d}/missing/f.img\n    size_bytes: 1048576\n"
    ))
    .check_host(&two)
    .unwrap_err();
    assert_eq!((e.path.as_str(), e.line), ("bdevs[0].path", Some(4)), "{e}");
    assert!(!dir.join("missing").exists(), "nothing is created");
    let e = load(&format!(
        "bdevs:\n  - name: f\n    type: uring\n    path: {d}/absent.img\n"
    ))
    .check_host(&two)
    .unwrap_err();
    assert_eq!(e.path, "bdevs[0].path", "{e}");
    assert!(!dir.join("absent.img").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn subsystems_without_listeners_are_warned_about() {
    let w = Config::from_yaml("reactor:\n  cores: 1\n", "t.yaml")
        .unwrap()
        .warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].message.contains("no subsystem has a listen address"),
        "{}",
        w[0]
    );
    let y = "subsystems:\n  - nqn: nqn.2026-01.io.x:a\n    serial: S1\n    namespaces: []\n    allow_any_host: true\n  - nqn: nqn.2026-01.io.x:b\n    serial: S2\n    namespaces: []\n    allow_any_host: true\n    listen:\n      - addr: 127.0.0.1\n";
    let w = Config::from_yaml(y, "t.yaml").unwrap().warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(
        (w[0].path.as_str(), w[0].line),
        ("subsystems[0]", Some(2)),
        "{}",
        w[0]
    );
    assert!(Config::builtin_default().warnings().is_empty());
}

#[test]
fn debug_output_leaves_the_config_text_out() {
    let c = Config::from_yaml("reactor:\n  cores: 1 # psk: 0123456789abcdef\n", "t.yaml").unwrap();
    assert_eq!(c.source.file, "t.yaml");
    assert!(c.source.text.contains("0123456789abcdef"));
    let d = format!("{c:?}");
    assert!(!d.contains("0123456789abcdef"), "{d}");
}

#[test]
fn plaintext_and_detached_header_options_are_checked_with_position() {
    let head = "keys:\n  local:\n    path: /var/tmp/nvseal-t/keys\n    create: true\nbdevs:\n  - name: m\n    type: malloc\n    num_blocks: 1024\n  - name: v\n    type: encrypted\n    base: m\n    provider: local\n";
    let e = err(&format!("{head}    create: true\n    plaintext: true\n"));
    assert_eq!(
        (e.path.as_str(), e.line),
        ("bdevs[1].plaintext", Some(14)),
        "{e}"
    );
    assert!(e.message.contains("exclude each other"), "{e}");
    let e = err(&format!(
        "{head}    plaintext: true\n    header_file: rel/v.hdr\n"
    ));
    assert_eq!(
        (e.path.as_str(), e.line),
        ("bdevs[1].header_file", Some(14)),
        "{e}"
    );
    let e = err(&format!(
        "{head}    plaintext: true\n    header_file: /var/lib/../v.hdr\n"
    ));
    assert_eq!(e.path, "bdevs[1].header_file", "{e}");
    let e = err(&format!(
        "{head}    create: true\n    header_file: /var/lib/nvseal/v.hdr\n"
    ));
    assert_eq!(
        (e.path.as_str(), e.line),
        ("bdevs[1].create", Some(13)),
        "{e}"
    );
    let ok = format!("{head}    plaintext: true\n    header_file: /var/lib/nvseal/v.hdr\n");
    let c = Config::from_yaml(&ok, "t").expect("plaintext + detached header");
    let Some(BdevConfig::Encrypted(v)) = c.bdev("v") else {
        panic!("no encrypted bdev")
    };
    assert!(v.plaintext && v.header_file.as_deref() == Some("/var/lib/nvseal/v.hdr"));
}
