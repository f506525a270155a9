//! Crypto erase from the host over NVMe/TCP (issue 14 §3) against a real `Server`: Format NVM
//! with SES = 2 and Sanitize (crypto erase action) with its Sanitize Status log page, the
//! Identify Controller bits that advertise them, the refusals on plaintext namespaces, and the
//! `namespace.crypto_erase` RPC method.
//!
//! Layout: subsystem A holds a plaintext namespace (nsid 1, a file) and an encrypted one
//! (nsid 2, local key, a file); subsystem B holds one encrypted namespace (a file). Sanitize is
//! subsystem-wide, so A refuses it and B accepts it.

mod common;

use std::path::{Path, PathBuf};

use common::nvmf::*;
use nvseal::config::Config;
use nvseal::keys::header::{decode, CopyId, HEADER_COPY_BYTES};
use nvseal::nvme::identify::ctrl_off;
use nvseal::server::Server;
use serde_json::json;

const NQN_A: &str = "nqn.2026-01.io.nvseal:erase-a";
const NQN_B: &str = "nqn.2026-01.io.nvseal:erase-b";
const BLK: u32 = 4096;
/// 1 MiB metadata region + 1 MiB data area.
const IMG_BYTES: usize = 2 << 20;

fn config(dir: &Path) -> PathBuf {
    for f in ["enc-a.img", "plain-a.img", "enc-b.img"] {
        std::fs::write(dir.join(f), vec![0u8; IMG_BYTES]).expect("image");
    }
    let cfg = dir.join("erase.yaml");
    let d = dir.display();
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 50\n\
             keys:\n  local:\n    path: {d}/keys\n    create: true\n  audit_log: {d}/audit.jsonl\n\
             rpc:\n  socket_path: {d}/rpc.sock\n\
             bdevs:\n\
             \x20 - {{name: diska, type: uring, path: {d}/enc-a.img, direct: false, block_size: 4096}}\n\
             \x20 - {{name: vola, type: encrypted, base: diska, provider: local, create: true}}\n\
             \x20 - {{name: plaina, type: uring, path: {d}/plain-a.img, direct: false, block_size: 4096}}\n\
             \x20 - {{name: diskb, type: uring, path: {d}/enc-b.img, direct: false, block_size: 4096}}\n\
             \x20 - {{name: volb, type: encrypted, base: diskb, provider: local, create: true}}\n\
             subsystems:\n\
             \x20 - nqn: {NQN_A}\n    serial: ERA\n    allowed_hosts: [\"{HOST}\"]\n    namespaces:\n\
             \x20     - {{nsid: 1, bdev: plaina}}\n      - {{nsid: 2, bdev: vola, encrypted: true}}\n\
             \x20   listen:\n      - {{addr: 127.0.0.1, port: 0}}\n\
             \x20 - nqn: {NQN_B}\n    serial: ERB\n    allowed_hosts: [\"{HOST}\"]\n    namespaces:\n\
             \x20     - {{nsid: 1, bdev: volb, encrypted: true}}\n\
             \x20   listen:\n      - {{addr: 127.0.0.1, port: 0}}\n",
        ),
    )
    .expect("config");
    cfg
}

fn start(cfg: &Path) -> Server {
    let c = Config::load(cfg).expect("config loads");
    let s = Server::start(&c).expect("server starts");
    let km = s.key_manager().expect("keys").clone();
    for ns in ["vola", "volb"] {
        let st = km
            .wait_for(ns, Duration::from_secs(30), |s| {
                matches!(s, nvseal::keys::manager::NamespaceKeyState::Online)
            })
            .expect("state");
        assert_eq!(
            st.state,
            nvseal::keys::manager::NamespaceKeyState::Online,
            "{st:?}"
        );
    }
    s
}

/// Admin + one I/O queue to `nqn`.
fn connect(addr: SocketAddr, nqn: &str) -> (HostQpair, HostQpair) {
    let cfg = host_cfg(Digests::default());
    let mut a = HostQpair::connect(addr, nqn, 0, connect::CNTLID_DYNAMIC, cfg.clone()).unwrap();
    a.enable().unwrap();
    let io = HostQpair::connect(addr, nqn, 1, a.cntlid(), cfg).unwrap();
    (a, io)
}

fn write(q: &mut HostQpair, nsid: u32, lba: u64, data: &[u8]) -> Status {
    let nlb = (data.len() / BLK as usize) as u32;
    run(
        q,
        nvseal::nvmf::host::rw_sqe(io_op::WRITE, nsid, lba, nlb),
        Dir::ToCtrl,
        data,
        0,
    )
    .0
}

fn read(q: &mut HostQpair, nsid: u32, lba: u64, blocks: u32) -> (Status, Vec<u8>) {
    let (s, _, d) = run(
        q,
        nvseal::nvmf::host::rw_sqe(io_op::READ, nsid, lba, blocks),
        Dir::FromCtrl,
        &[],
        blocks * BLK,
    );
    (s, d)
}

fn admin_sqe(opcode: u8, nsid: u32, cdw10: u32) -> Sqe {
    let mut sqe = Sqe {
        opcode,
        nsid,
        cdw10,
        ..Default::default()
    };
    sqe.cid = 0;
    sqe
}

/// Format NVM of `nsid` with `ses` (LBAF 0).
fn format(a: &mut HostQpair, nsid: u32, ses: u32) -> Status {
    run(
        a,
        admin_sqe(admin_op::FORMAT_NVM, nsid, ses << 9),
        Dir::None,
        &[],
        0,
    )
    .0
}

/// (SPROG, SSTAT, SCDW10) from the Sanitize Status log page.
fn sanitize_log(a: &mut HostQpair) -> (u16, u16, u32) {
    let p = a
        .get_log_page(log_id::SANITIZE_STATUS, u32::MAX, 512, 0)
        .expect("sanitize log");
    (
        u16::from_le_bytes([p[0], p[1]]),
        u16::from_le_bytes([p[2], p[3]]),
        u32::from_le_bytes(p[4..8].try_into().unwrap()),
    )
}

/// The wrapped DEK held by each header copy of an image file.
fn wrapped_deks(img: &Path) -> [Vec<u8>; 2] {
    let bytes = std::fs::read(img).expect("image");
    [CopyId::A, CopyId::B].map(|c| {
        let off = c.offset_bytes() as usize;
        decode(&bytes[off..off + HEADER_COPY_BYTES], c)
            .expect("valid header copy")
            .active
            .wrapped_dek
            .as_bytes()
            .to_vec()
    })
}

#[test]
fn format_and_sanitize_crypto_erase_from_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let server = start(&cfg);
    let addr_a = server.listen_addrs()[0];
    let addr_b = *server.listen_addrs().last().unwrap();
    let (mut a, mut io) = connect(addr_a, NQN_A);

    // Identify: Format NVM supported, crypto erase as a format secure erase, no broadcast
    // format; no Sanitize on A (a plaintext namespace), Sanitize crypto erase on B.
    let id = a.identify_controller().expect("identify");
    assert_eq!(id[ctrl_off::OACS] & 0b10, 0b10, "OACS Format NVM");
    assert_eq!(
        id[ctrl_off::FNA],
        0b1100,
        "FNA: crypto erase, no NSID FFFFFFFFh"
    );
    assert_eq!(&id[ctrl_off::SANICAP..ctrl_off::SANICAP + 4], &[0; 4]);

    let plain_data = pattern(2 * BLK as usize, 7);
    let enc_old = pattern(2 * BLK as usize, 8);
    assert_eq!(write(&mut io, 1, 0, &plain_data), Status::SUCCESS);
    assert_eq!(write(&mut io, 2, 0, &enc_old), Status::SUCCESS);
    assert_eq!(read(&mut io, 2, 0, 2).1, enc_old);
    let before = wrapped_deks(&dir.path().join("enc-a.img"));
    let plain_img = std::fs::read(dir.path().join("plain-a.img")).expect("plain image");

    // Plaintext namespace: SES 1 and 2 refused with Invalid Field, nothing written.
    assert_eq!(format(&mut a, 1, 2), Status::INVALID_FIELD);
    assert_eq!(format(&mut a, 1, 1), Status::INVALID_FIELD);
    // Sanitize on a subsystem with a plaintext namespace: refused, nothing changes.
    let (s, _, _) = run(
        &mut a,
        admin_sqe(admin_op::SANITIZE, 0, 4),
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::INVALID_FIELD);
    assert_eq!(sanitize_log(&mut a), (0xffff, 0, 0), "never sanitized");
    // Formats nvseal does not have, reserved SES, broadcast NSID, unknown namespace.
    assert_eq!(
        format(&mut a, 2, 0),
        Status::SUCCESS,
        "SES 0 changes nothing"
    );
    assert_eq!(
        run(
            &mut a,
            admin_sqe(admin_op::FORMAT_NVM, 2, 1 | (2 << 9)),
            Dir::None,
            &[],
            0
        )
        .0,
        Status::INVALID_FORMAT
    );
    assert_eq!(format(&mut a, 2, 3), Status::INVALID_FIELD);
    assert_eq!(format(&mut a, u32::MAX, 2), Status::INVALID_NAMESPACE);
    assert_eq!(format(&mut a, 9, 2), Status::INVALID_NAMESPACE);
    assert_eq!(read(&mut io, 2, 0, 2).1, enc_old, "refusals erased nothing");
    assert_eq!(wrapped_deks(&dir.path().join("enc-a.img")), before);
    assert!(
        std::fs::read(dir.path().join("plain-a.img")).expect("plain image") == plain_img,
        "a refused erase wrote to the plaintext namespace"
    );

    // Format NVM SES = 2 on the encrypted namespace.
    assert_eq!(format(&mut a, 2, 2), Status::SUCCESS);
    let (s, d) = read(&mut io, 2, 0, 2);
    assert_eq!(s, Status::SUCCESS);
    assert_ne!(d, enc_old, "data written before the erase still reads back");
    let enc_new = pattern(2 * BLK as usize, 9);
    assert_eq!(write(&mut io, 2, 4, &enc_new), Status::SUCCESS);
    assert_eq!(read(&mut io, 2, 4, 2).1, enc_new, "new writes work");
    assert_eq!(
        read(&mut io, 1, 0, 2).1,
        plain_data,
        "the other namespace kept its data"
    );
    let after = wrapped_deks(&dir.path().join("enc-a.img"));
    for old in &before {
        assert!(
            !after.contains(old),
            "a header copy still holds the old wrapped DEK"
        );
    }
    assert_eq!(after[0], after[1], "both copies hold the new wrapped DEK");

    // Subsystem B: Sanitize crypto erase, progress in log page 81h.
    let (mut b, mut iob) = connect(addr_b, NQN_B);
    let id = b.identify_controller().expect("identify");
    assert_eq!(
        &id[ctrl_off::SANICAP..ctrl_off::SANICAP + 4],
        &[1, 0, 0, 0],
        "SANICAP CES"
    );
    let b_old = pattern(BLK as usize, 10);
    assert_eq!(write(&mut iob, 1, 1, &b_old), Status::SUCCESS);
    let b_before = wrapped_deks(&dir.path().join("enc-b.img"));
    // Block erase and overwrite are not offered.
    for act in [2, 3] {
        let (s, _, _) = run(
            &mut b,
            admin_sqe(admin_op::SANITIZE, 0, act),
            Dir::None,
            &[],
            0,
        );
        assert_eq!(s, Status::INVALID_FIELD, "sanitize action {act}");
    }
    let (s, _, _) = run(
        &mut b,
        admin_sqe(admin_op::SANITIZE, 0, 4),
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SUCCESS);
    let mut log = sanitize_log(&mut b);
    wait_until("sanitize to finish", || {
        log = sanitize_log(&mut b);
        log.1 & 0x7 != 2
    });
    assert_eq!(log, (0xffff, 1, 4), "completed, SCDW10 recorded");
    let (s, d) = read(&mut iob, 1, 1, 1);
    assert_eq!(s, Status::SUCCESS);
    assert_ne!(d, b_old, "sanitize left the old data readable");
    let b_after = wrapped_deks(&dir.path().join("enc-b.img"));
    for old in &b_before {
        assert!(!b_after.contains(old), "sanitize left the old wrapped DEK");
    }
    // Sanitize status is per subsystem: A was never sanitized.
    assert_eq!(sanitize_log(&mut a).1, 0);

    // The RPC: by nqn + nsid; a plaintext namespace is refused with a clear error.
    let sock = dir.path().join("rpc.sock");
    let r = nvseal::rpc::client::call(
        &sock,
        "namespace.crypto_erase",
        Some(json!({"nqn": NQN_A, "nsid": 2})),
    )
    .expect("rpc erase");
    assert_eq!(r["ns_id"], "vola");
    assert_ne!(
        read(&mut io, 2, 4, 2).1,
        enc_new,
        "RPC erase left data readable"
    );
    let e = nvseal::rpc::client::call(
        &sock,
        "namespace.crypto_erase",
        Some(json!({"bdev": "plaina"})),
    )
    .expect_err("plaintext refused");
    assert!(e.to_string().contains("not an encrypted namespace"), "{e}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit");
    assert!(
        audit.contains("crypto-erase") && audit.contains("nvmf host"),
        "erases from hosts are audited:\n{audit}"
    );
    drop((a, io, b, iob));
    assert_eq!(server.shutdown(), 0);
}

/// While a sanitize runs, I/O to the subsystem's namespaces completes with Sanitize In
/// Progress, and a Format NVM or a second Sanitize is refused the same way; the log page says
/// in progress. (The sanitize is marked started by hand here, through the same call the admin
/// path makes, so that the window is not a race with the erase thread.) Then: a crypto erase of
/// a namespace whose header records a deep rekey is refused as busy, from the host (Command
/// Interrupted) and over RPC (busy error), and nothing is written.
#[test]
fn sanitize_in_progress_and_deep_rekey_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let server = start(&cfg);
    let addr_a = server.listen_addrs()[0];
    let addr_b = *server.listen_addrs().last().unwrap();
    let (mut b, mut iob) = connect(addr_b, NQN_B);
    let data = pattern(BLK as usize, 11);
    assert_eq!(write(&mut iob, 1, 0, &data), Status::SUCCESS);

    let t = server.target().clone();
    let namespaces = t.subsystem(NQN_B).expect("subsystem B").namespaces();
    let prev = t
        .erase()
        .begin_sanitize(NQN_B, 4, &namespaces)
        .expect("no sanitize running");
    assert_eq!(sanitize_log(&mut b), (0, 2, 4), "in progress");
    assert_eq!(read(&mut iob, 1, 0, 1).0, Status::SANITIZE_IN_PROGRESS);
    assert_eq!(write(&mut iob, 1, 0, &data), Status::SANITIZE_IN_PROGRESS);
    assert_eq!(format(&mut b, 1, 2), Status::SANITIZE_IN_PROGRESS);
    let (s, _, _) = run(
        &mut b,
        admin_sqe(admin_op::SANITIZE, 0, 4),
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SANITIZE_IN_PROGRESS);
    t.erase().abandon_sanitize(NQN_B, prev, &namespaces);
    assert_eq!(read(&mut iob, 1, 0, 1), (Status::SUCCESS, data.clone()));

    // A deep rekey recorded in subsystem A's encrypted namespace header.
    let img = dir.path().join("enc-a.img");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .expect("open image");
    let cur = nvseal::keys::store::read_header(&mut f).expect("header");
    let mut h = cur.header.clone();
    h.rekey = nvseal::keys::RekeyState::Deep(nvseal::keys::header::DeepRekeyState {
        new: h.active.clone(),
        watermark_blocks: 0,
        started_unix_s: 1,
        segment_blocks: 1,
    });
    nvseal::keys::store::update(&mut f, &cur, &h).expect("record deep rekey");
    drop(f);
    let image_before = std::fs::read(&img).expect("image");
    let (mut a, mut io) = connect(addr_a, NQN_A);
    let enc = pattern(BLK as usize, 12);
    assert_eq!(write(&mut io, 2, 0, &enc), Status::SUCCESS);
    let image_before_data = std::fs::read(&img).expect("image");
    assert_eq!(
        image_before[..1 << 20],
        image_before_data[..1 << 20],
        "I/O touched the metadata region"
    );
    assert_eq!(format(&mut a, 2, 2), Status::COMMAND_INTERRUPTED);
    let e = nvseal::rpc::client::call(
        &dir.path().join("rpc.sock"),
        "namespace.crypto_erase",
        Some(json!({"bdev": "vola"})),
    )
    .expect_err("busy");
    assert!(e.to_string().contains("deep rekey"), "{e}");
    assert!(
        std::fs::read(&img).expect("image") == image_before_data,
        "a refused erase wrote to the device"
    );
    assert_eq!(read(&mut io, 2, 0, 1).1, enc, "the old key stays");
    drop((a, io, b, iob));
    assert_eq!(server.shutdown(), 0);
}
