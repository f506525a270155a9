//! KMIP client and KMS cluster against real PyKMIP 0.11 servers (TLS 1.2, ECDSA P-256,
//! client-certificate authentication). Servers are started by the tests themselves.

mod common;

use std::time::Duration;

use common::kmip::{cluster, free_port, Certs, PyKmip};
use nvseal::kms::{
    KeyId, KmipClient, KmsError, Phase, ResultReason, RevocationReason, ServerAddr, Timeouts,
};

/// Generous timeouts for tests that expect answers: a loaded CI machine must not flake.
fn patient() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(30),
        response: Duration::from_secs(60),
    }
}

#[test]
fn create_activate_get_round_trip_is_stable_across_gets_and_reconnects() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let tls = certs.good_tls();

    let mut client = KmipClient::connect(&server.addr, &tls, patient()).unwrap();
    let id = client.create_kek("nvseal-kek-roundtrip").unwrap();
    let first = client.get_key(&id).unwrap();
    let second = client.get_key(&id).unwrap();
    assert_eq!(first.expose(), second.expose());
    assert_ne!(first.expose(), &[0u8; 32]);
    drop(client);

    // Reconnect by host name: the certificate's DNS SAN is checked instead of its IP SAN.
    let by_name = ServerAddr::new("localhost", server.addr.port()).unwrap();
    let mut again = KmipClient::connect(&by_name, &tls, patient()).unwrap();
    let third = again.get_key(&id).unwrap();
    assert_eq!(first.expose(), third.expose());
    assert!(third.matches(&first.fingerprint()));

    // Query and Discover Versions on the same connection.
    let info = again.query().unwrap();
    for op in [
        nvseal::kms::message::Operation::Create,
        nvseal::kms::message::Operation::Get,
    ] {
        assert!(info.supports(op), "server does not list {op}: {info:?}");
    }
    let versions = again.discover_versions().unwrap();
    assert!(
        versions.iter().any(|v| v.major == 1 && v.minor == 0),
        "{versions:?}"
    );

    // A key id that does not exist is a typed server answer.
    let err = again.get_key(&KeyId::new("999999")).err().unwrap();
    assert!(matches!(err, KmsError::Server { .. }), "{err}");
}

#[test]
fn locate_finds_a_key_by_name_and_only_that_key() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let kms = cluster(&certs, vec![server.addr.clone()], patient());

    let a = kms.create_kek("nvseal-kek-a").unwrap();
    let b = kms.create_kek("nvseal-kek-b").unwrap();
    assert_ne!(a.id, b.id);
    assert_ne!(a.fingerprint, b.fingerprint);
    assert_eq!(
        kms.locate_by_name("nvseal-kek-a").unwrap(),
        vec![a.id.clone()]
    );
    assert_eq!(
        kms.locate_by_name("nvseal-kek-b").unwrap(),
        vec![b.id.clone()]
    );
    assert_eq!(
        kms.locate_by_name("no-such-kek").unwrap(),
        Vec::<KeyId>::new()
    );
    // The fingerprint returned by create_kek is that of the key Get returns.
    kms.get_kek_checked(&a.id, &a.fingerprint).unwrap();
}

#[test]
fn revoke_then_destroy_removes_the_key() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let kms = cluster(&certs, vec![server.addr.clone()], patient());
    let kek = kms.create_kek("nvseal-kek-retired").unwrap();

    // An Active key cannot be destroyed: the server answers with a failure, no failover.
    let err = kms.destroy(&kek.id).err().unwrap();
    assert!(
        matches!(
            err,
            KmsError::Server {
                operation: "Destroy",
                ..
            }
        ),
        "{err}"
    );

    kms.revoke(&kek.id, RevocationReason::Superseded).unwrap();
    // A revoked KEK can still be fetched to unwrap existing DEKs.
    kms.get_kek_checked(&kek.id, &kek.fingerprint).unwrap();
    kms.destroy(&kek.id).unwrap();

    let err = kms.get_kek(&kek.id).err().unwrap();
    assert!(
        matches!(
            err,
            KmsError::Server {
                operation: "Get",
                ..
            }
        ),
        "{err}"
    );
    // The server answered, so it is reachable despite the failure reply.
    assert_eq!(kms.status()[0].reachable, Some(true));
    assert_eq!(kms.status()[0].last_error_kind, Some("server"));
    assert_eq!(
        kms.locate_by_name("nvseal-kek-retired").unwrap(),
        Vec::<KeyId>::new()
    );
    assert_eq!(kms.status()[0].last_error_kind, None);
}

#[test]
fn same_id_on_two_independent_servers_fails_the_fingerprint_check() {
    let certs = Certs::generate(&["nvseal"]);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| PyKmip::start(&certs, "a", None));
        let b = s.spawn(|| PyKmip::start(&certs, "b", None));
        (a.join().unwrap(), b.join().unwrap())
    });
    let kms_a = cluster(&certs, vec![a.addr.clone()], patient());
    let kms_b = cluster(&certs, vec![b.addr.clone()], patient());
    let kek_a = kms_a.create_kek("nvseal-kek").unwrap();
    let kek_b = kms_b.create_kek("nvseal-kek").unwrap();
    // Separate databases hand out the same first id for different keys.
    assert_eq!(kek_a.id, kek_b.id);
    assert_ne!(kek_a.fingerprint, kek_b.fingerprint);

    kms_a
        .get_kek_checked(&kek_a.id, &kek_a.fingerprint)
        .unwrap();
    let err = kms_b
        .get_kek_checked(&kek_a.id, &kek_a.fingerprint)
        .err()
        .unwrap();
    match &err {
        KmsError::FingerprintMismatch {
            server,
            key_id,
            expected,
            actual,
        } => {
            assert_eq!(server, &b.addr.to_string());
            assert_eq!(key_id, &kek_a.id);
            assert_eq!(expected, &kek_a.fingerprint);
            assert_eq!(actual, &kek_b.fingerprint);
        }
        other => panic!("expected a fingerprint mismatch, got {other}"),
    }
    // The error text shows fingerprints, never key bytes.
    let text = err.to_string();
    let key_hex: String = kms_b
        .get_kek(&kek_b.id)
        .unwrap()
        .expose()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!text.contains(&key_hex));
}

#[test]
fn cluster_fails_over_from_refused_and_silent_servers_to_a_live_one() {
    let certs = Certs::generate(&["nvseal"]);
    let db = certs.path("replicated.db");
    // Servers 2 and 3 share one database: a replicated KMS cluster.
    let (silent, live) = std::thread::scope(|s| {
        let silent = s.spawn(|| PyKmip::start(&certs, "silent", Some(&db)));
        let live = s.spawn(|| PyKmip::start(&certs, "live", Some(&db)));
        (silent.join().unwrap(), live.join().unwrap())
    });
    let closed = ServerAddr::new("127.0.0.1", free_port()).unwrap();
    // Warm the live server up (PyKMIP's first request is slower) with a patient client, so
    // the short response timeout below only ever fires on the frozen server.
    KmipClient::connect(&live.addr, &certs.good_tls(), patient())
        .unwrap()
        .query()
        .unwrap();
    let timeouts = Timeouts {
        connect: Duration::from_secs(10),
        response: Duration::from_secs(2),
    };
    let servers = vec![closed.clone(), silent.addr.clone(), live.addr.clone()];
    let kms = cluster(&certs, servers.clone(), timeouts);

    // All up but the first: served by the second, after the first refused.
    let kek = kms.create_kek("nvseal-kek-cluster").unwrap();
    assert_eq!(kek.server, silent.addr);
    let status = kms.status();
    assert_eq!(status[0].reachable, Some(false));
    assert_eq!(status[0].last_error_kind, Some("refused"));
    assert_eq!(status[1].reachable, Some(true));
    assert_eq!(
        status[2].reachable, None,
        "third server must not have been tried"
    );

    // The second server freezes while its connection is cached: that connection times out,
    // the first refuses again, the third serves.
    silent.pause();
    let key = kms.get_kek_checked(&kek.id, &kek.fingerprint).unwrap();
    assert!(key.matches(&kek.fingerprint));
    let status = kms.status();
    assert_eq!(status[0].last_error_kind, Some("refused"));
    assert_eq!(status[1].reachable, Some(false));
    assert_eq!(
        status[1].last_error_kind,
        Some("timeout"),
        "{:?}",
        status[1]
    );
    assert_eq!(status[2].reachable, Some(true));
    assert!(status[2].last_latency_us.is_some());
    assert!(status.iter().all(|s| s.last_attempt_unix_ms.is_some()));

    // A fresh cluster (no cached connection): the frozen server accepts TCP but never
    // completes the TLS handshake.
    let fresh = cluster(&certs, servers, timeouts);
    let served = fresh.execute(|c| c.get_key(&kek.id)).unwrap();
    assert_eq!(served.server, live.addr);
    let status = fresh.status();
    assert!(
        status[1]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("handshake"),
        "{:?}",
        status[1]
    );

    // Nothing answers at all: every attempt is reported.
    live.pause();
    let err = fresh.get_kek(&kek.id).err().unwrap();
    match &err {
        KmsError::AllServersFailed { alias, attempts } => {
            assert_eq!(alias, "test");
            let kinds: Vec<_> = attempts.iter().map(KmsError::kind).collect();
            // Cached connection to the third times out, then 1 refuses, 2 times out.
            assert_eq!(kinds, ["timeout", "refused", "timeout"], "{err}");
        }
        other => panic!("expected AllServersFailed, got {other}"),
    }
    silent.resume();
    live.resume();
}

#[test]
fn wrong_client_certificate_is_a_prompt_typed_error() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);

    // Client certificate from an unrelated CA: the server rejects the handshake.
    let wrong = certs.tls("ca", "wrong-client");
    let err = KmipClient::connect(&server.addr, &wrong, patient())
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            KmsError::Tls {
                phase: Phase::Handshake,
                ..
            } | KmsError::Closed {
                phase: Phase::Handshake,
                ..
            }
        ),
        "{err}"
    );

    // A CA bundle that does not sign the server: we reject the server.
    let untrusting = certs.tls("wrong-ca", "client");
    let err = KmipClient::connect(&server.addr, &untrusting, patient())
        .err()
        .unwrap();
    match err {
        KmsError::Tls {
            phase: Phase::Handshake,
            source: rustls::Error::InvalidCertificate(_),
            ..
        } => {}
        other => panic!("expected an invalid-certificate TLS error, got {other}"),
    }

    // Through a cluster the same failure is reported per server.
    let kms = nvseal::kms::KmsCluster::new("bad-cert", vec![server.addr.clone()], wrong, patient())
        .unwrap();
    let err = kms.query().err().unwrap();
    assert!(
        matches!(&err, KmsError::AllServersFailed { attempts, .. } if attempts.len() == 1),
        "{err}"
    );
    assert_eq!(kms.status()[0].reachable, Some(false));
}

#[test]
fn client_of_another_owner_cannot_read_the_key() {
    let certs = Certs::generate(&["nvseal", "intruder"]);
    let server = PyKmip::start(&certs, "s1", None);
    let owner = cluster(&certs, vec![server.addr.clone()], patient());
    let kek = owner.create_kek("nvseal-kek-owned").unwrap();

    let mut other =
        KmipClient::connect(&server.addr, &certs.tls("ca", "client-intruder"), patient()).unwrap();
    let err = other.get_key(&kek.id).err().unwrap();
    match &err {
        KmsError::Server {
            reason: Some(reason),
            ..
        } => {
            assert!(
                [
                    ResultReason::PERMISSION_DENIED,
                    ResultReason::ITEM_NOT_FOUND
                ]
                .contains(reason),
                "{err}"
            );
        }
        other => panic!("expected a server refusal, got {other}"),
    }
}

#[test]
fn killed_server_gives_refused_not_a_timeout() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let tls = certs.good_tls();
    let mut client = KmipClient::connect(&server.addr, &tls, patient()).unwrap();
    client.query().unwrap();

    server.kill();
    // The open connection sees the peer gone.
    let err = client.query().err().unwrap();
    assert!(
        matches!(err, KmsError::Closed { .. } | KmsError::Io { .. }),
        "{err}"
    );
    // A new connection is refused (the timeouts are long, so a Timeout here would be a bug).
    let err = KmipClient::connect(&server.addr, &tls, patient())
        .err()
        .unwrap();
    assert!(matches!(err, KmsError::Refused { .. }), "{err}");
    let kms = cluster(&certs, vec![server.addr.clone()], patient());
    let err = kms.query().err().unwrap();
    assert!(
        matches!(&err, KmsError::AllServersFailed { attempts, .. } if matches!(attempts[..], [KmsError::Refused { .. }])),
        "{err}"
    );
}

/// PyKMIP drops sessions idle for 10 s (its default socket timeout). The cluster's cached
/// connection must then be replaced transparently, without counting as a server failure.
#[test]
fn idle_session_closed_by_the_server_is_reopened_transparently() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let kms = cluster(&certs, vec![server.addr.clone()], patient());
    kms.query().unwrap();
    std::thread::sleep(Duration::from_secs(12));
    let served = kms.query().unwrap();
    assert_eq!(served.server, server.addr);
    let status = &kms.status()[0];
    assert_eq!(status.reachable, Some(true));
    assert_eq!(status.last_error, None);
    // Two sessions: the idle one the server ended, and the new one.
    assert_eq!(
        server.log().matches("Starting session").count(),
        2,
        "{}",
        server.log()
    );
}
