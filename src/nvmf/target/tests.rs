//! Unit tests of `nvmf::target` (kept beside it, in their own file).

use super::*;

#[test]
fn ids_are_stable_and_distinct() {
    let a = nguid_for("nqn.a", 1);
    assert_eq!(a, nguid_for("nqn.a", 1));
    assert_ne!(a, nguid_for("nqn.a", 2));
    assert_ne!(a, nguid_for("nqn.b", 1));
    let u = uuid_for("nqn.a", 1);
    assert_eq!(u[6] >> 4, 8, "version 8");
    assert_eq!(u[8] >> 6, 0b10, "RFC variant");
    assert_ne!(&u[..], &a[..]);
}

#[test]
fn refusal_log_limiter_bursts_then_trickles_and_counts_what_it_dropped() {
    let l = LogLimiter::new(3, 2);
    let t0 = Instant::now();
    // A burst of 3 gets through, then everything in the same instant is dropped.
    for _ in 0..3 {
        assert_eq!(l.admit_at(t0), Some(0));
    }
    for _ in 0..100 {
        assert_eq!(l.admit_at(t0), None);
    }
    // 2 a second: after 500 ms one line, reporting the 100 dropped; then none again.
    let t1 = t0 + Duration::from_millis(500);
    assert_eq!(l.admit_at(t1), Some(100));
    assert_eq!(l.admit_at(t1), None);
    // A long quiet spell refills the burst, never more than it.
    let t2 = t1 + Duration::from_secs(3600);
    assert_eq!(l.admit_at(t2), Some(1));
    assert_eq!(l.admit_at(t2), Some(0));
    assert_eq!(l.admit_at(t2), Some(0));
    assert_eq!(l.admit_at(t2), None);
    // Time going backwards (another thread's older Instant) refills nothing.
    assert_eq!(l.admit_at(t1), None);
}

#[test]
fn subsystems_are_linked_to_ports_and_deny_by_default() {
    let sub = |nqn: &str, hosts: Vec<String>, any: bool, listen: &[(&str, u16)]| SubsystemConfig {
        nqn: nqn.into(),
        serial: "S".into(),
        model: "M".into(),
        namespaces: vec![],
        allowed_hosts: hosts,
        allow_any_host: any,
        listen: listen
            .iter()
            .map(|&(addr, port)| ListenAddr {
                addr: addr.into(),
                port,
            })
            .collect(),
    };
    let h = "nqn.2014-08.org.nvmexpress:uuid:h".to_string();
    let cfgs = [
        sub("nqn.x:a", vec![], false, &[("127.0.0.1", 4420)]),
        sub(
            "nqn.x:b",
            vec![h.clone()],
            false,
            &[("::1", 4420), ("127.0.0.1", 4420)],
        ),
        sub("nqn.x:c", vec![], true, &[]),
    ];
    let t = Target::new(&cfgs, Limits::default(), &HashMap::new()).unwrap();
    let ports: Vec<(PortId, SocketAddr)> = t.ports().collect();
    assert_eq!(
        ports,
        [
            (PortId(0), "127.0.0.1:4420".parse().unwrap()),
            (PortId(1), "[::1]:4420".parse().unwrap())
        ],
        "one port per distinct address, in order of first appearance"
    );
    let (a, b, c) = (
        t.subsystem("nqn.x:a").unwrap(),
        t.subsystem("nqn.x:b").unwrap(),
        t.subsystem("nqn.x:c").unwrap(),
    );
    let d = t.subsystem(DISCOVERY_NQN).unwrap();
    assert!(a.serves(PortId(0)) && !a.serves(PortId(1)));
    assert!(b.serves(PortId(0)) && b.serves(PortId(1)));
    assert!(
        !c.serves(PortId(0)) && !c.serves(PortId(1)),
        "no listen: nowhere"
    );
    assert!(
        d.serves(PortId(0)) && d.serves(PortId(1)),
        "discovery: everywhere"
    );
    assert!(
        !a.host_allowed(&h) && !a.host_allowed(""),
        "empty list admits no one"
    );
    assert!(b.host_allowed(&h) && !b.host_allowed("nqn.x:other") && !b.host_allowed(""));
    assert!(c.host_allowed(&h) && c.host_allowed(""), "allow_any_host");
    assert!(d.host_allowed(""), "discovery admits any host");
    // allow_any_host with a list is ambiguous: refused, not guessed.
    let bad = sub("nqn.x:d", vec![h], true, &[]);
    assert!(matches!(
        Target::new(&[bad], Limits::default(), &HashMap::new()),
        Err(TargetError::Subsystem { what, .. }) if what.contains("allow_any_host")
    ));
}

fn null(name: &str, block_size: u32) -> Arc<dyn Bdev> {
    crate::bdev::null::open(&crate::bdev::null::NullConfig {
        name: name.into(),
        num_blocks: Some(64),
        size_bytes: None,
        block_size,
    })
    .unwrap()
}

#[test]
fn namespace_slots_add_and_remove() {
    const NQN: &str = "nqn.2026-01.io.nvseal:t";
    let cfg = SubsystemConfig {
        nqn: NQN.into(),
        serial: "S".into(),
        model: "M".into(),
        namespaces: vec![crate::nvmf::config::NamespaceConfig {
            nsid: 2,
            bdev: "n0".into(),
            encrypted: None,
        }],
        allowed_hosts: vec![],
        allow_any_host: false,
        listen: vec![],
    };
    let bdevs: HashMap<String, Arc<dyn Bdev>> = [("n0".to_string(), null("n0", 512))].into();
    let limits = Limits {
        max_namespaces: 4,
        ..Default::default()
    };
    let t = Target::new(&[cfg], limits, &bdevs).unwrap();
    let s = t.subsystem(NQN).unwrap().clone();
    assert_eq!(s.max_nsid(), 4, "NN = slots");
    let g0 = s.ns_generation();
    // Lowest free nsid first, then the next; a locked one stays offline.
    assert_eq!(t.add_namespace(NQN, None, null("a", 512), true).unwrap(), 1);
    assert_eq!(
        t.add_namespace(NQN, None, null("b", 4096), false).unwrap(),
        3
    );
    assert!(s.ns_generation() > g0, "every change moves the generation");
    assert!(!s.namespace(3).unwrap().is_online());
    // Whether a namespace is encrypted is the bdev's to say (issue 18 item 6): a null bdev is
    // plaintext, the stand-in for a crypto bdev is encrypted.
    assert!(!s.namespace(1).unwrap().encrypted);
    assert!(!s.namespace(3).unwrap().encrypted);
    assert_eq!(s.namespace(3).unwrap().block_size, 4096);
    assert!(matches!(
        t.add_namespace(NQN, Some(3), null("c", 512), true),
        Err(TargetError::NsidInUse { nsid: 3, .. })
    ));
    assert!(matches!(
        t.add_namespace(NQN, Some(0), null("c", 512), true),
        Err(TargetError::NsidOutOfRange { nsid: 0, .. })
    ));
    let late: Arc<dyn Bdev> = Arc::new(crate::bdev::late::LateBdev::new("d", 512, 64, 64));
    assert_eq!(t.add_namespace(NQN, None, late, false).unwrap(), 4);
    assert!(s.namespace(4).unwrap().encrypted);
    assert!(matches!(
        t.add_namespace(NQN, None, null("e", 512), true),
        Err(TargetError::NoFreeNsid { max: 4, .. })
    ));
    assert!(matches!(
        t.add_namespace(DISCOVERY_NQN, None, null("f", 512), true),
        Err(TargetError::NoSubsystem(_))
    ));
    // Removal frees the slot at once when no queue holds the namespace.
    let held = s.namespace(1).unwrap();
    let g1 = s.ns_generation();
    assert!(matches!(
        t.remove_namespace(NQN, 1, Duration::from_millis(20)),
        Err(TargetError::DrainTimeout { nsid: 1, .. })
    ));
    assert!(s.namespace(1).is_none(), "removed even though still held");
    assert!(!held.is_online());
    assert!(s.ns_generation() > g1);
    drop(held);
    t.remove_namespace(NQN, 2, Duration::from_secs(1)).unwrap();
    let left: Vec<u32> = s.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(left, [3, 4]);
    assert!(matches!(
        t.remove_namespace(NQN, 2, Duration::from_secs(1)),
        Err(TargetError::NoNamespace { nsid: 2, .. })
    ));
}

#[test]
fn socket_slots_are_two_staged_and_capped_per_source_and_host() {
    let limits = Limits {
        max_connections: 2,
        max_pre_connect: 3,
        max_connections_per_source: 3,
        max_queues_per_host: 1,
        ..Default::default()
    };
    let t = Target::new(&[], limits, &HashMap::new()).unwrap();
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    let b: IpAddr = "10.0.0.2".parse().unwrap();
    let (h1, h2, h3) = ("nqn.h:1", "nqn.h:2", "nqn.h:3");
    // Three pre-Connect sockets fill the budget (and source a's cap).
    for _ in 0..3 {
        t.admit_socket(a).unwrap();
    }
    assert_eq!(t.admit_socket(b), Err(SlotRefusal::PreConnect(3)));
    assert_eq!(t.admit_socket(a), Err(SlotRefusal::PerSource(3)));
    // Promotion frees a pre-Connect slot; the per-source count stays.
    t.promote_socket(h1).unwrap();
    assert_eq!((t.pre_connect_count(), t.connection_count()), (2, 1));
    assert_eq!(t.admit_socket(a), Err(SlotRefusal::PerSource(3)));
    t.admit_socket(b).unwrap();
    // Per host, then target-wide.
    assert_eq!(t.promote_socket(h1), Err(SlotRefusal::PerHost(1)));
    t.promote_socket(h2).unwrap();
    assert_eq!(t.promote_socket(h3), Err(SlotRefusal::Connections(2)));
    let st = t.connection_stats();
    assert_eq!((st.connected, st.pre_connect), (2, 2), "{st:?}");
    assert_eq!(
        (st.sources, st.max_per_source, st.hosts, st.max_per_host),
        (2, 3, 2, 1)
    );
    // A failed queue setup gives the connection slot back and keeps the socket pre-Connect.
    t.demote_socket(h2);
    assert_eq!((t.pre_connect_count(), t.connection_count()), (3, 1));
    t.promote_socket(h3).unwrap();
    // Release everything: counts and maps go back to empty.
    t.release_socket(a, Some(h1));
    t.release_socket(b, Some(h3));
    t.release_socket(a, None);
    t.release_socket(a, None);
    assert_eq!(t.connection_stats(), ConnectionStats::default());
}
