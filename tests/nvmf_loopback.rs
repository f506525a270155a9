//! End-to-end NVMe/TCP tests over loopback against the harness in `common::nvmf`: a real target
//! and the crate's own host queue pair, plus raw-socket fault injection.

mod common;

use common::nvmf::*;

#[test]
fn identify_and_data_paths_all_digest_combinations() {
    let h = start(
        Limits {
            max_h2c_data_size: 8192,
            ..Default::default()
        },
        vec![HOST.into()],
        0,
    );
    for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
        for sqflow_off in [true, false] {
            let dg = Digests {
                header: hd,
                data: dd,
            };
            let cfg = HostConfig {
                disable_sqflow: sqflow_off,
                ..host_cfg(dg)
            };
            let mut a = admin(&h, cfg.clone());
            assert_eq!(a.digests(), dg);
            assert_eq!(a.maxh2cdata(), 8192);

            let id = a.identify_controller().unwrap();
            assert_eq!(&id[768..768 + NQN.len()], NQN.as_bytes());
            assert_eq!(id[111], 1, "I/O controller");
            assert_eq!(id[77], 5, "MDTS = 128 KiB / 4 KiB = 2^5");
            assert_eq!(
                u32::from_le_bytes(id[516..520].try_into().unwrap()),
                Limits::default().max_namespaces,
                "NN = namespace slots"
            );
            assert_eq!(
                u16::from_le_bytes(id[78..80].try_into().unwrap()),
                a.cntlid()
            );
            let ioccsz = u32::from_le_bytes(id[1792..1796].try_into().unwrap()) * 16;
            assert_eq!(ioccsz, 64 + 8192);

            let ns = a.identify(cns::NAMESPACE, 1).unwrap();
            assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), BLOCKS);
            assert_eq!(&ns[104..120], &nvseal::nvmf::target::nguid_for(NQN, 1));
            let ns2 = a.identify(cns::NAMESPACE, 2).unwrap();
            assert_eq!(
                (u32::from_le_bytes(ns2[128..132].try_into().unwrap()) >> 16) & 0xff,
                12,
                "4 KiB blocks"
            );
            let list = a.identify(cns::ACTIVE_NS_LIST, 0).unwrap();
            assert_eq!(&list[0..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
            let desc = a.identify(cns::NS_ID_DESCRIPTORS, 2).unwrap();
            assert_eq!(&desc[0..2], &[2, 16]);
            assert_eq!(&desc[4..20], &nvseal::nvmf::target::nguid_for(NQN, 2));
            assert_eq!(&desc[24..40], &nvseal::nvmf::target::uuid_for(NQN, 2));

            assert_eq!(a.namespace_geometry(1).unwrap(), (BLOCKS, BS));
            assert_eq!(
                a.namespace_geometry(2).unwrap(),
                (BLOCKS * u64::from(BS) / 4096, 4096)
            );
            let mut q = io_queue(&h, &a, 1, cfg.clone());
            assert_eq!(q.adopt_in_capsule_size(&id).unwrap(), ioccsz - 64);
            // In-capsule (<= 8 KiB) and R2T paths (several H2CData PDUs each: MAXH2CDATA 8 KiB).
            for (i, len) in [512usize, 4096, 8192, 8704, 16384, 65536, 131072]
                .into_iter()
                .enumerate()
            {
                write_read_verify(
                    &mut q,
                    1,
                    BS,
                    (i * 256) as u64,
                    len,
                    i as u32 + u32::from(hd) * 7 + u32::from(dd) * 13,
                );
            }
            write_read_verify(&mut q, 2, 4096, 3, 3 * 4096, 99);
            // R2T for small writes too.
            q.set_in_capsule_max(0);
            write_read_verify(&mut q, 1, BS, 4000, 1024, 5);
        }
    }
}

#[test]
fn queue_depth_concurrency_with_busy_bdev() {
    // With data digests, in-capsule data is copied as it arrives; without, it is handed to the
    // bdev from the receive buffer in batches (a refused one comes back with its data copied).
    for data_digest in [true, false] {
        busy_bdev_round(data_digest);
    }
}

fn busy_bdev_round(data_digest: bool) {
    // The RAM bdev answers Busy on every 3rd submit: the target must park and resubmit.
    let h = start(Limits::default(), vec![HOST.into()], 3);
    let cfg = host_cfg(Digests {
        header: true,
        data: data_digest,
    });
    let a = admin(&h, cfg.clone());
    let mut q = io_queue(
        &h,
        &a,
        1,
        HostConfig {
            queue_depth: 32,
            ..cfg
        },
    );
    let blocks_per = 8u32; // 4 KiB
    let n = 256u64;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    while completed < n {
        while submitted < n {
            let data = pattern(4096, submitted as u32);
            match q.write(1, submitted * u64::from(blocks_per), &data, BS, submitted) {
                Ok(_) => submitted += 1,
                Err(HostError::Busy) => break,
                Err(e) => panic!("{e}"),
            }
        }
        completed += q
            .poll(&mut |c| {
                assert_eq!(c.cqe.status(), Status::SUCCESS);
            })
            .unwrap() as u64;
    }
    // Read everything back with the queue full.
    let mut submitted = 0u64;
    let mut completed = 0u64;
    while completed < n {
        while submitted < n {
            match q.read(
                1,
                submitted * u64::from(blocks_per),
                blocks_per,
                BS,
                submitted,
            ) {
                Ok(_) => submitted += 1,
                Err(HostError::Busy) => break,
                Err(e) => panic!("{e}"),
            }
        }
        completed += q
            .poll(&mut |c| {
                assert_eq!(c.cqe.status(), Status::SUCCESS);
                assert!(c.data == pattern(4096, c.tag as u32), "tag {}", c.tag);
            })
            .unwrap() as u64;
    }
}

/// Reads the next `n` CapsuleResps on a raw queue: cid -> status.
fn raw_responses(s: &mut TcpStream, n: usize) -> HashMap<u16, Status> {
    let mut out = HashMap::new();
    while out.len() < n {
        match raw_read_pdu(s, Digests::default()) {
            Some((PduHeader::CapsuleResp(c), _)) => {
                out.insert(c.cid, c.status());
            }
            other => panic!("expected a CapsuleResp, got {other:?}"),
        }
    }
    out
}

/// A Write capsule with `data` in capsule, as bytes on the wire.
fn raw_write_capsule(cid: u16, nsid: u32, lba: u64, nlb: u32, data: &[u8]) -> Vec<u8> {
    let mut sqe = nvseal::nvmf::host::rw_sqe(io_op::WRITE, nsid, lba, nlb);
    sqe.cid = cid;
    sqe.sgl = nvme::SglDesc::in_capsule(0, data.len() as u32);
    let mut hb = [0u8; pdu::MAX_HEADER_REGION];
    let n = pdu::encode_capsule_cmd(&mut hb, &sqe, data.len(), Digests::default(), 0);
    let mut v = hb[..n].to_vec();
    v.extend_from_slice(data);
    v
}

/// A Read or Write whose SGL descriptor has a type NVMe/TCP does not define (reserved type 0xE,
/// a Keyed Data Block 0x4x that only RDMA uses, a Data Block with the transport subtype swapped)
/// fails with SGL Descriptor Type Invalid and moves no data; the queue keeps working.
#[test]
fn reads_and_writes_with_undefined_sgl_types_are_refused() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let mut s = raw_io_queue(h.addr, a.cntlid(), 1);
    let mut q = io_queue(&h, &a, 2, cfg);
    write_read_verify(&mut q, 1, BS, 40, 4096, 9);
    let mut cid = 100u16;
    for type_byte in [0xe0u8, 0xea, 0x40, 0x0a, 0x50] {
        for op in [io_op::READ, io_op::WRITE] {
            let mut sqe = nvseal::nvmf::host::rw_sqe(op, 1, 40, 8);
            sqe.cid = cid;
            sqe.sgl = nvme::SglDesc {
                addr: 0,
                len: 4096,
                type_byte,
            };
            raw_capsule(&mut s, &sqe, &[], Digests::default());
            match raw_read_pdu(&mut s, Digests::default()) {
                Some((PduHeader::CapsuleResp(c), _)) => {
                    assert_eq!(c.cid, cid);
                    assert_eq!(
                        c.status(),
                        Status::SGL_TYPE_INVALID,
                        "opcode {op:#x} SGL type {type_byte:#x}"
                    );
                }
                other => panic!("opcode {op:#x} SGL type {type_byte:#x}: got {other:?}"),
            }
            cid += 1;
        }
    }
    // Nothing was written, and the well-formed path still works on the same queue.
    let (st, _, back) = run(
        &mut q,
        nvseal::nvmf::host::rw_sqe(io_op::READ, 1, 40, 8),
        Dir::FromCtrl,
        &[],
        4096,
    );
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(back, pattern(4096, 9));
    let mut sqe = nvseal::nvmf::host::rw_sqe(io_op::READ, 1, 40, 8);
    sqe.cid = cid;
    sqe.sgl = nvme::SglDesc::transport(4096);
    raw_capsule(&mut s, &sqe, &[], Digests::default());
    match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::C2HData(_), d)) => assert_eq!(d, pattern(4096, 9)),
        other => panic!("expected C2HData, got {other:?}"),
    }
}

/// In-capsule write data is left in the target's receive buffer and handed to the bdev in
/// batches when the buffer is about to be reused. Cases: a burst of writes in one send (one
/// past the end of the namespace, one with more in-capsule data than its NLB), a capsule split
/// inside its data over two sends (copied the ordinary way), a capsule whose header and data
/// arrive in separate sends, and a burst across both namespaces. Everything is read back.
#[test]
fn in_capsule_write_bursts_and_split_capsules() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let mut s = raw_io_queue(h.addr, a.cntlid(), 1);
    let mut q = io_queue(&h, &a, 2, cfg);
    let mut expect: Vec<(u32, u64, Vec<u8>)> = Vec::new();

    // 1. A burst of 12 writes of 4 KiB (8 blocks of 512 B) in one send.
    let mut burst = Vec::new();
    for i in 0..12u16 {
        let data = pattern(4096, 100 + u32::from(i));
        let lba = match i {
            5 => BLOCKS - 4, // past the end
            _ => 8 * u64::from(i),
        };
        if i == 7 {
            // 4 KiB in capsule for a 2 KiB write: the first 2 KiB land.
            burst.extend(raw_write_capsule(10 + i, 1, lba, 4, &data));
            expect.push((1, lba, data[..2048].to_vec()));
            continue;
        }
        burst.extend(raw_write_capsule(10 + i, 1, lba, 8, &data));
        if i != 5 {
            expect.push((1, lba, data));
        }
    }
    s.write_all(&burst).unwrap();
    let st = raw_responses(&mut s, 12);
    for (cid, status) in &st {
        let want = if *cid == 15 {
            Status::LBA_OUT_OF_RANGE
        } else {
            Status::SUCCESS
        };
        assert_eq!(*status, want, "cid {cid}");
    }

    // 2. Split inside the data: 1000 bytes, a pause, the rest.
    let data = pattern(4096, 7);
    let w = raw_write_capsule(30, 1, 400, 8, &data);
    let cut = w.len() - data.len() + 1000;
    s.write_all(&w[..cut]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&w[cut..]).unwrap();
    assert_eq!(raw_responses(&mut s, 1)[&30], Status::SUCCESS);
    expect.push((1, 400, data));

    // 3. Header alone, a pause, then the whole data.
    let data = pattern(4096, 8);
    let w = raw_write_capsule(31, 1, 500, 8, &data);
    let cut = w.len() - data.len();
    s.write_all(&w[..cut]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(&w[cut..]).unwrap();
    assert_eq!(raw_responses(&mut s, 1)[&31], Status::SUCCESS);
    expect.push((1, 500, data));

    // 4. One burst over both namespaces (nsid 2 has 4 KiB blocks), interleaved.
    let mut burst = Vec::new();
    for i in 0..8u16 {
        let data = pattern(4096, 200 + u32::from(i));
        let (nsid, lba) = if i % 2 == 0 {
            (1, 600 + 8 * u64::from(i))
        } else {
            (2, 100 + u64::from(i))
        };
        let nlb = if nsid == 1 { 8 } else { 1 };
        burst.extend(raw_write_capsule(40 + i, nsid, lba, nlb, &data));
        expect.push((nsid, lba, data));
    }
    s.write_all(&burst).unwrap();
    let st = raw_responses(&mut s, 8);
    assert!(st.values().all(|&x| x == Status::SUCCESS), "{st:?}");

    for (nsid, lba, data) in expect {
        let bs = if nsid == 1 { BS } else { 4096 };
        let (status, _, back) = run(
            &mut q,
            nvseal::nvmf::host::rw_sqe(io_op::READ, nsid, lba, data.len() as u32 / bs),
            Dir::FromCtrl,
            &[],
            data.len() as u32,
        );
        assert_eq!(status, Status::SUCCESS);
        assert!(back == data, "nsid {nsid} lba {lba}");
    }
}

#[test]
fn flush_write_zeroes_deallocate_and_statuses() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let mut a = admin(&h, cfg.clone());
    let mut q = io_queue(&h, &a, 1, cfg);
    let rw = nvseal::nvmf::host::rw_sqe;

    write_read_verify(&mut q, 1, BS, 100, 8192, 1);
    let (s, _, _) = run(
        &mut q,
        Sqe {
            opcode: io_op::FLUSH,
            nsid: 1,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SUCCESS);

    // Write Zeroes over the middle 4 blocks.
    let (s, _, _) = run(
        &mut q,
        rw(io_op::WRITE_ZEROES, 1, 104, 4),
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SUCCESS);
    let (_, _, back) = run(
        &mut q,
        rw(io_op::READ, 1, 100, 16),
        Dir::FromCtrl,
        &[],
        8192,
    );
    let orig = pattern(8192, 1);
    assert_eq!(&back[..2048], &orig[..2048]);
    assert!(back[2048..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &orig[4096..]);

    // Dataset Management, deallocate: two ranges (blocks 100..102 and 110..116).
    let mut ranges = vec![0u8; 32];
    ranges[4..8].copy_from_slice(&2u32.to_le_bytes());
    ranges[8..16].copy_from_slice(&100u64.to_le_bytes());
    ranges[20..24].copy_from_slice(&6u32.to_le_bytes());
    ranges[24..32].copy_from_slice(&110u64.to_le_bytes());
    let dsm = Sqe {
        opcode: io_op::DATASET_MANAGEMENT,
        nsid: 1,
        cdw10: 1,
        cdw11: 1 << 2,
        ..Default::default()
    };
    let (s, _, _) = run(&mut q, dsm, Dir::ToCtrl, &ranges, 0);
    assert_eq!(s, Status::SUCCESS);
    let (_, _, back) = run(
        &mut q,
        rw(io_op::READ, 1, 100, 16),
        Dir::FromCtrl,
        &[],
        8192,
    );
    assert!(back[..1024].iter().all(|&b| b == 0));
    assert_eq!(&back[1024..2048], &orig[1024..2048]);
    assert!(back[5120..8192].iter().all(|&b| b == 0));
    // A range past the end.
    ranges[24..32].copy_from_slice(&(BLOCKS - 1).to_le_bytes());
    let (s, _, _) = run(&mut q, dsm, Dir::ToCtrl, &ranges, 0);
    assert_eq!(s, Status::LBA_OUT_OF_RANGE);

    // Unknown NSID, LBA past the end, transfer over MDTS, unsupported opcode.
    let (s, _, _) = run(&mut q, rw(io_op::READ, 9, 0, 1), Dir::FromCtrl, &[], 512);
    assert_eq!(s, Status::INVALID_NAMESPACE);
    let (s, _, _) = run(
        &mut q,
        rw(io_op::READ, 1, BLOCKS - 1, 2),
        Dir::FromCtrl,
        &[],
        1024,
    );
    assert_eq!(s, Status::LBA_OUT_OF_RANGE);
    let (s, _, _) = run(
        &mut q,
        rw(io_op::WRITE, 1, u64::MAX, 1),
        Dir::ToCtrl,
        &[0; 512],
        0,
    );
    assert_eq!(s, Status::LBA_OUT_OF_RANGE);
    let (s, _, _) = run(
        &mut q,
        rw(io_op::READ, 1, 0, 512),
        Dir::FromCtrl,
        &[],
        128 * 1024,
    );
    assert_eq!(
        s,
        Status::INVALID_FIELD,
        "512 blocks of 512 B = 256 KiB > MDTS"
    );
    let (s, _, _) = run(
        &mut q,
        Sqe {
            opcode: 0x7e,
            nsid: 1,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::INVALID_OPCODE);
    // SGL shorter than the blocks.
    let (s, _, _) = run(&mut q, rw(io_op::READ, 1, 0, 2), Dir::FromCtrl, &[], 512);
    assert_eq!(s, Status::DATA_SGL_LENGTH_INVALID);
    // The queue still works.
    write_read_verify(&mut q, 1, BS, 0, 4096, 3);

    // SMART counts what was done.
    let smart = a
        .get_log_page(log_id::SMART_HEALTH, 0xffff_ffff, 512, 0)
        .unwrap();
    assert!(
        u128::from_le_bytes(smart[64..80].try_into().unwrap()) >= 4,
        "host read commands"
    );
    assert!(
        u128::from_le_bytes(smart[80..96].try_into().unwrap()) >= 2,
        "host write commands"
    );
    // Admin errors land in the error log.
    let (s, _, _) = run(
        &mut a,
        Sqe {
            opcode: 0x7e,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::INVALID_OPCODE);
    let err = a.get_log_page(log_id::ERROR_INFO, 0, 64, 0).unwrap();
    assert!(u64::from_le_bytes(err[0..8].try_into().unwrap()) >= 1);
    // Features. The I/O queue exists, so Number of Queues is fixed (tests/controller_state.rs
    // sets it before any I/O queue).
    let (s, _, _) = run(
        &mut a,
        Sqe {
            opcode: admin_op::SET_FEATURES,
            cdw10: u32::from(nvme::feature::NUMBER_OF_QUEUES),
            cdw11: 0x0003_0003,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::COMMAND_SEQUENCE_ERROR);
    let (s, _, _) = run(
        &mut a,
        Sqe {
            opcode: admin_op::KEEP_ALIVE,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SUCCESS);
    // SMART totals survive the I/O queue going away.
    drop(q);
    wait_until("the I/O queue to be reaped", || {
        h.target.connection_count() == 1
    });
    let smart = a
        .get_log_page(log_id::SMART_HEALTH, 0xffff_ffff, 512, 0)
        .unwrap();
    assert!(u128::from_le_bytes(smart[64..80].try_into().unwrap()) >= 4);
}

#[test]
fn connect_rules_and_command_before_connect() {
    let h = start(Limits::default(), vec![HOST.to_string()], 0);
    // A host not on the list.
    let other = HostConfig {
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:99999999-0000-0000-0000-000000000000".into(),
        ..host_cfg(Digests::default())
    };
    match HostQpair::connect(h.addr, NQN, 0, connect::CNTLID_DYNAMIC, other) {
        Err(HostError::Status { status, .. }) => assert_eq!(status, Status::CONNECT_INVALID_HOST),
        r => panic!("expected Connect Invalid Host, got {:?}", r.err()),
    }
    // Unknown subsystem: invalid parameters pointing at SUBNQN in the data.
    match HostQpair::connect(
        h.addr,
        "nqn.2026-01.io.nvseal:nope",
        0,
        connect::CNTLID_DYNAMIC,
        host_cfg(Digests::default()),
    ) {
        Err(HostError::Status { status, dw0 }) => {
            assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS);
            assert_eq!(dw0, connect::invalid_param_dw0(true, 256));
        }
        r => panic!("expected invalid parameters, got {:?}", r.err()),
    }
    // Command before Connect.
    let mut t = HostQpair::connect_transport(h.addr, host_cfg(Digests::default())).unwrap();
    let (s, _, _) = run(
        &mut t,
        Sqe {
            opcode: admin_op::IDENTIFY,
            cdw10: 1,
            ..Default::default()
        },
        Dir::FromCtrl,
        &[],
        4096,
    );
    assert_eq!(s, Status::COMMAND_SEQUENCE_ERROR);
    // The same connection can still Connect afterwards.
    t.fabrics_connect(NQN, 0, connect::CNTLID_DYNAMIC).unwrap();
    // I/O queue with a wrong cntlid, and before the controller is enabled.
    let cfg = host_cfg(Digests::default());
    let a = HostQpair::connect(h.addr, NQN, 0, connect::CNTLID_DYNAMIC, cfg.clone()).unwrap();
    match HostQpair::connect(h.addr, NQN, 1, a.cntlid(), cfg.clone()) {
        Err(HostError::Status { status, .. }) => assert_eq!(status, Status::COMMAND_SEQUENCE_ERROR),
        r => panic!("expected sequence error before CC.EN, got {:?}", r.err()),
    }
    let mut a = a;
    a.enable().unwrap();
    match HostQpair::connect(h.addr, NQN, 1, a.cntlid().wrapping_add(100), cfg.clone()) {
        Err(HostError::Status { status, dw0 }) => {
            assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS);
            assert_eq!(dw0, connect::invalid_param_dw0(true, 16));
        }
        r => panic!("expected invalid cntlid, got {:?}", r.err()),
    }
    let _q1 = io_queue(&h, &a, 1, cfg.clone());
    match HostQpair::connect(h.addr, NQN, 1, a.cntlid(), cfg.clone()) {
        Err(HostError::Status { status, .. }) => {
            assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS, "qid 1 twice")
        }
        r => panic!("expected invalid qid, got {:?}", r.err()),
    }
    // Queue too deep.
    match HostQpair::connect(
        h.addr,
        NQN,
        2,
        a.cntlid(),
        HostConfig {
            queue_depth: 1024,
            max_io_size: 4096,
            ..cfg
        },
    ) {
        Err(HostError::Status { status, dw0 }) => {
            assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS);
            assert_eq!(dw0, connect::invalid_param_dw0(false, 44));
        }
        r => panic!("expected invalid sqsize, got {:?}", r.err()),
    }
}

#[test]
fn malformed_pdus_get_term_req_and_healthy_queue_survives() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let mut healthy = io_queue(&h, &a, 1, cfg.clone());
    write_read_verify(&mut healthy, 1, BS, 0, 4096, 1);

    // Unknown PDU type.
    let mut s = raw_connect(h.addr, Digests::default());
    s.write_all(&[0x08, 0, 24, 0, 24, 0, 0, 0]).unwrap();
    s.write_all(&[0u8; 16]).unwrap();
    expect_term(&mut s, Fes::InvalidHeaderField);
    write_read_verify(&mut healthy, 1, BS, 8, 4096, 2);

    // Wrong HLEN for a CapsuleCmd: FEI points at HLEN.
    let mut s = raw_connect(h.addr, Digests::default());
    s.write_all(&[0x04, 0, 70, 0, 72, 0, 0, 0]).unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    assert_eq!(expect_term(&mut s, Fes::InvalidHeaderField), 2);

    // PLEN over the limit.
    let mut s = raw_connect(h.addr, Digests::default());
    s.write_all(&[0x04, 0, 72, 72, 0xff, 0xff, 0xff, 0x0f])
        .unwrap();
    assert_eq!(expect_term(&mut s, Fes::DataLimitExceeded), 4);

    // PLEN shorter than the header.
    let mut s = raw_connect(h.addr, Digests::default());
    s.write_all(&[0x04, 0, 72, 0, 40, 0, 0, 0]).unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    assert_eq!(expect_term(&mut s, Fes::InvalidHeaderField), 4);

    // Bad data digest: no FES exists for it; the connection is closed without a TermReq.
    let dd = Digests {
        header: false,
        data: true,
    };
    let mut s = raw_connect(h.addr, dd);
    let mut sqe = connect::ConnectCmd {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato_ms: 0,
    }
    .to_sqe(1);
    sqe.sgl = nvme::SglDesc::in_capsule(0, 1024);
    let mut hb = [0u8; pdu::MAX_HEADER_REGION];
    let n = pdu::encode_capsule_cmd(&mut hb, &sqe, 1024, dd, 0);
    let data = connect_data(NQN, HOST, connect::CNTLID_DYNAMIC);
    let mut v = hb[..n].to_vec();
    v.extend_from_slice(&data);
    v.extend_from_slice(&(pdu::crc32c(&data) ^ 1).to_le_bytes());
    s.write_all(&v).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "closed without a response");
    // The same capsule with a good digest connects.
    let mut s = raw_connect(h.addr, dd);
    raw_capsule(&mut s, &sqe, &data, dd);
    match raw_read_pdu(&mut s, dd) {
        Some((PduHeader::CapsuleResp(c), _)) => assert_eq!(c.status(), Status::SUCCESS),
        other => panic!("unexpected {other:?}"),
    }
    drop(s);
    write_read_verify(&mut healthy, 1, BS, 16, 4096, 3);

    // A capsule before ICReq.
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw_capsule(&mut s, &Sqe::default(), &[], Digests::default());
    expect_term(&mut s, Fes::PduSequenceError);

    // Bad header digest.
    let dg = Digests {
        header: true,
        data: false,
    };
    let mut s = raw_connect(h.addr, dg);
    let mut hb = [0u8; pdu::MAX_HEADER_REGION];
    let n = pdu::encode_capsule_cmd(
        &mut hb,
        &Sqe {
            opcode: admin_op::KEEP_ALIVE,
            ..Default::default()
        },
        0,
        dg,
        0,
    );
    hb[20] ^= 0x40;
    s.write_all(&hb[..n]).unwrap();
    expect_term(&mut s, Fes::HeaderDigestError);

    // Truncated PDU, then the peer goes away: clean teardown.
    let mut s = raw_connect(h.addr, Digests::default());
    s.write_all(&[0x04, 0, 72, 0, 72, 0, 0, 0, 1, 2, 3])
        .unwrap();
    drop(s);

    // H2CData outside the R2T window.
    let mut s = raw_io_queue(h.addr, a.cntlid(), 2);
    let mut w = nvseal::nvmf::host::rw_sqe(io_op::WRITE, 1, 0, 16);
    w.cid = 7;
    w.flags = nvme::PSDT_SGL_MPTR_CONTIG;
    w.sgl = nvme::SglDesc::transport(8192);
    raw_capsule(&mut s, &w, &[], Digests::default());
    let r2t = match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::R2T(r), _)) => r,
        other => panic!("expected R2T, got {other:?}"),
    };
    assert_eq!((r2t.cccid, r2t.r2to, r2t.r2tl), (7, 0, 8192));
    let d = pdu::DataHdr {
        cccid: 7,
        ttag: r2t.ttag,
        datao: 4096,
        datal: 8192,
        flags: pdu::flags::LAST_PDU,
    };
    let n = pdu::encode_h2c_data(&mut hb, &d, Digests::default(), 0);
    s.write_all(&hb[..n]).unwrap();
    s.write_all(&[0u8; 8192]).unwrap();
    assert_eq!(expect_term(&mut s, Fes::DataOutOfRange), 12);

    // H2CData for a tag that was never solicited.
    let mut s = raw_io_queue(h.addr, a.cntlid(), 3);
    let d = pdu::DataHdr {
        cccid: 1,
        ttag: 3,
        datao: 0,
        datal: 512,
        flags: pdu::flags::LAST_PDU,
    };
    let n = pdu::encode_h2c_data(&mut hb, &d, Digests::default(), 0);
    s.write_all(&hb[..n]).unwrap();
    s.write_all(&[0u8; 512]).unwrap();
    expect_term(&mut s, Fes::InvalidHeaderField);

    // Peer disconnecting mid-transfer (half of the H2CData sent).
    let mut s = raw_io_queue(h.addr, a.cntlid(), 4);
    raw_capsule(&mut s, &w, &[], Digests::default());
    let r2t = match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::R2T(r), _)) => r,
        other => panic!("expected R2T, got {other:?}"),
    };
    let d = pdu::DataHdr {
        cccid: 7,
        ttag: r2t.ttag,
        datao: 0,
        datal: 8192,
        flags: pdu::flags::LAST_PDU,
    };
    let n = pdu::encode_h2c_data(&mut hb, &d, Digests::default(), 0);
    s.write_all(&hb[..n]).unwrap();
    s.write_all(&[0u8; 3000]).unwrap();
    drop(s);

    // Every broken connection is gone; the admin queue and the healthy I/O queue remain.
    wait_until("broken connections to be reaped", || {
        h.live.load(Ordering::Acquire) == 2
    });
    assert_eq!(h.target.connection_count(), 2);
    for i in 0..8 {
        write_read_verify(&mut healthy, 1, BS, 64 + i * 32, 16384, i as u32);
    }
}

#[test]
fn namespace_offline_async_event_and_abort() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let mut a = admin(&h, cfg.clone());
    let mut q = io_queue(&h, &a, 1, cfg);
    // Enable namespace attribute notices and post an AER.
    let (s, _, _) = run(
        &mut a,
        Sqe {
            opcode: admin_op::SET_FEATURES,
            cdw10: u32::from(nvme::feature::ASYNC_EVENT_CONFIG),
            cdw11: 1 << 8,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SUCCESS);
    let aer_cid = a
        .submit(
            Sqe {
                opcode: admin_op::ASYNC_EVENT_REQUEST,
                ..Default::default()
            },
            Dir::None,
            0,
            |_| {},
            42,
        )
        .unwrap();
    assert_eq!(a.poll(&mut |_| panic!("AER must be held")).unwrap(), 0);

    h.target.set_namespace_online(NQN, 2, false).unwrap();
    let mut ev = None;
    wait_until("the async event", || {
        a.poll(&mut |c| {
            assert_eq!(c.tag, 42);
            ev = Some(c.cqe);
        })
        .unwrap();
        ev.is_some()
    });
    let ev = ev.unwrap();
    assert_eq!(ev.cid, aer_cid);
    assert_eq!(ev.dw0 & 0x7, 2, "notice");
    assert_eq!((ev.dw0 >> 16) & 0xff, 0x04, "changed namespace list log");
    let changed = a.get_log_page(log_id::CHANGED_NS_LIST, 0, 4096, 0).unwrap();
    assert_eq!(&changed[0..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
    let list = a.identify(cns::ACTIVE_NS_LIST, 0).unwrap();
    assert_eq!(
        &list[0..8],
        &[1, 0, 0, 0, 0, 0, 0, 0],
        "offline namespace not active"
    );
    let ns = a.identify(cns::NAMESPACE, 2).unwrap();
    assert!(
        ns.iter().all(|&b| b == 0),
        "inactive namespace reads as zeroes"
    );
    let (s, _, _) = run(
        &mut q,
        nvseal::nvmf::host::rw_sqe(io_op::READ, 2, 0, 1),
        Dir::FromCtrl,
        &[],
        4096,
    );
    assert_eq!(s, Status::NAMESPACE_NOT_READY);
    assert!(!s.dnr, "retryable");
    write_read_verify(&mut q, 1, BS, 0, 4096, 1);

    h.target.set_namespace_online(NQN, 2, true).unwrap();
    write_read_verify(&mut q, 2, 4096, 0, 4096, 2);
    // Coming back online is an event too: an AER posted now completes at once.
    let mut ev2 = None;
    a.submit(
        Sqe {
            opcode: admin_op::ASYNC_EVENT_REQUEST,
            ..Default::default()
        },
        Dir::None,
        0,
        |_| {},
        44,
    )
    .unwrap();
    wait_until("the second async event", || {
        a.poll(&mut |c| ev2 = Some(c.cqe)).unwrap();
        ev2.is_some()
    });
    assert_eq!((ev2.unwrap().dw0 >> 16) & 0xff, 0x04);
    let changed = a.get_log_page(log_id::CHANGED_NS_LIST, 0, 4096, 0).unwrap();
    assert_eq!(&changed[0..8], &[2, 0, 0, 0, 0, 0, 0, 0]);

    // Abort: a held AER is aborted, an unknown command is "not aborted".
    let cid = a
        .submit(
            Sqe {
                opcode: admin_op::ASYNC_EVENT_REQUEST,
                ..Default::default()
            },
            Dir::None,
            0,
            |_| {},
            43,
        )
        .unwrap();
    let (s, dw0, _) = run(
        &mut a,
        Sqe {
            opcode: admin_op::ABORT,
            cdw10: u32::from(cid) << 16,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!((s, dw0 & 1), (Status::SUCCESS, 0));
    let mut aborted = None;
    wait_until("the aborted AER", || {
        a.poll(&mut |c| aborted = Some(c.cqe.status())).unwrap();
        aborted.is_some()
    });
    assert_eq!(aborted, Some(Status::ABORT_REQUESTED));
    let (s, dw0, _) = run(
        &mut a,
        Sqe {
            opcode: admin_op::ABORT,
            cdw10: (500 << 16) | 1,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!((s, dw0 & 1), (Status::SUCCESS, 1));
}

#[test]
fn keep_alive_expiry_tears_controller_down() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = HostConfig {
        kato_ms: 300,
        ..host_cfg(Digests::default())
    };
    let mut a = admin(&h, cfg.clone());
    let mut q = io_queue(&h, &a, 1, cfg);
    write_read_verify(&mut q, 1, BS, 0, 512, 1);
    // No keep alive is sent: the target must drop the admin queue and then the I/O queue.
    wait_until("the admin queue to close", || {
        matches!(
            a.poll(&mut |_| {}),
            Err(HostError::Closed) | Err(HostError::Io(_))
        )
    });
    wait_until("the I/O queue to close", || {
        matches!(
            q.poll(&mut |_| {}),
            Err(HostError::Closed) | Err(HostError::Io(_))
        )
    });
    wait_until("connections reaped", || h.target.connection_count() == 0);
    assert!(h.target.controllers_of(NQN).is_empty());
}

#[test]
fn discovery_log_page() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let mut d = HostQpair::connect(
        h.addr,
        DISCOVERY_NQN,
        0,
        connect::CNTLID_DYNAMIC,
        host_cfg(Digests::default()),
    )
    .unwrap();
    d.enable().unwrap();
    let id = d.identify_controller().unwrap();
    assert_eq!(id[111], 2, "discovery controller");
    let hdr = d.get_log_page(log_id::DISCOVERY, 0, 1024, 0).unwrap();
    let numrec = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    assert_eq!(numrec, 1);
    let full = d.get_log_page(log_id::DISCOVERY, 0, 2048, 0).unwrap();
    let e = &full[1024..2048];
    assert_eq!(e[0], 3, "TCP");
    assert_eq!(e[2], 2, "NVM subsystem");
    assert_eq!(&e[32..36], b"4420");
    assert_eq!(&e[256..256 + NQN.len()], NQN.as_bytes());
    assert_eq!(&e[512..521], b"127.0.0.1");
    // I/O queues cannot be created on a discovery controller.
    assert!(HostQpair::connect(
        h.addr,
        DISCOVERY_NQN,
        1,
        d.cntlid(),
        host_cfg(Digests::default())
    )
    .is_err());
}

/// Regression (found by the Linux-initiator interop test): a subsystem listening on port 0 (any
/// free port) had its discovery log entry say TRSVCID "0" instead of the bound port, so
/// `nvme connect-all` could not reach it.
#[test]
fn discovery_log_advertises_the_bound_port_of_a_port_zero_listener() {
    let h = start_listen(Limits::default(), vec![HOST.into()], 0, 0);
    let mut d = HostQpair::connect(
        h.addr,
        DISCOVERY_NQN,
        0,
        connect::CNTLID_DYNAMIC,
        host_cfg(Digests::default()),
    )
    .unwrap();
    d.enable().unwrap();
    let full = d.get_log_page(log_id::DISCOVERY, 0, 2048, 0).unwrap();
    assert_eq!(u64::from_le_bytes(full[8..16].try_into().unwrap()), 1);
    let e = &full[1024..2048];
    let port = h.addr.port().to_string();
    let trsvcid = &e[32..64];
    assert_eq!(
        &trsvcid[..port.len()],
        port.as_bytes(),
        "TRSVCID is the bound port"
    );
    assert!(
        trsvcid[port.len()..].iter().all(|&b| b == b' ' || b == 0),
        "TRSVCID is padded after the port"
    );
    assert_ne!(h.addr.port(), 0);
}

#[test]
fn connection_limit() {
    let h = start(
        Limits {
            max_connections: 2,
            ..Default::default()
        },
        vec![HOST.into()],
        0,
    );
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let _q = io_queue(&h, &a, 1, cfg.clone());
    // The third connection is refused (closed before ICResp).
    assert!(HostQpair::connect(h.addr, NQN, 2, a.cntlid(), cfg).is_err());
    assert_eq!(h.target.connection_count(), 2);
}

#[test]
fn idle_connection_without_connect_is_closed() {
    let h = start(
        Limits {
            connect_timeout_ms: 200,
            ..Default::default()
        },
        vec![HOST.into()],
        0,
    );
    // TCP only, then ICReq only: both are closed once the connect timeout passes.
    let mut bare = TcpStream::connect(h.addr).unwrap();
    let mut ic = raw_connect(h.addr, Digests::default());
    bare.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(bare.read(&mut b).unwrap_or(0), 0);
    assert_eq!(ic.read(&mut b).unwrap_or(0), 0);
    wait_until("connections reaped", || h.target.connection_count() == 0);
    // A connection that does Connect in time stays.
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let mut q = io_queue(&h, &a, 1, cfg);
    std::thread::sleep(Duration::from_millis(400));
    write_read_verify(&mut q, 1, BS, 0, 4096, 9);
}

/// Deterministic xorshift generator for the garbage-stream test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn mutated_and_random_streams_never_break_the_target() {
    // The target's streaming receiver sees random bytes and single-byte mutations of a valid
    // session (ICReq, Connect, Identify). Each stream must end in a TermReq or a close, the target
    // thread must not panic (debug build: overflow checks on), and a healthy queue keeps working.
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let mut healthy = io_queue(&h, &a, 1, cfg);

    let mut valid = Vec::new();
    let mut b = [0u8; 128];
    pdu::encode_ic_req(
        &mut b,
        &pdu::IcReq {
            pfv: 0,
            hpda: 0,
            digests: Digests::default(),
            maxr2t: 0,
        },
    );
    valid.extend_from_slice(&b);
    let mut sqe = connect::ConnectCmd {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 4,
        kato_ms: 0,
    }
    .to_sqe(1);
    sqe.sgl = nvme::SglDesc::in_capsule(0, 1024);
    let mut hb = [0u8; pdu::MAX_HEADER_REGION];
    let n = pdu::encode_capsule_cmd(&mut hb, &sqe, 1024, Digests::default(), 0);
    valid.extend_from_slice(&hb[..n]);
    valid.extend_from_slice(&connect_data(NQN, HOST, connect::CNTLID_DYNAMIC));
    let ident = Sqe {
        opcode: admin_op::IDENTIFY,
        cid: 2,
        cdw10: 1,
        flags: nvme::PSDT_SGL_MPTR_CONTIG,
        sgl: nvme::SglDesc::transport(4096),
        ..Default::default()
    };
    let n = pdu::encode_capsule_cmd(&mut hb, &ident, 0, Digests::default(), 0);
    valid.extend_from_slice(&hb[..n]);

    let mut rng = Rng(0x243f_6a88_85a3_08d3);
    for round in 0..400 {
        let stream: Vec<u8> = if round % 3 == 0 {
            (0..(rng.next() % 600) as usize)
                .map(|_| rng.next() as u8)
                .collect()
        } else {
            let mut v = valid.clone();
            for _ in 0..1 + round % 4 {
                let i = (rng.next() as usize) % v.len();
                v[i] ^= 1 << (rng.next() % 8);
            }
            v
        };
        let mut s = TcpStream::connect(h.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(&stream);
        // Either the target ends the connection, or the stream was still acceptable: then it
        // must keep answering. Closing our side must always be cleaned up.
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    wait_until("garbage connections reaped", || {
        h.target.connection_count() == 2 && h.target.pre_connect_count() == 0
    });
    write_read_verify(&mut healthy, 1, BS, 0, 65536, 77);
}

// ------------------------------------------------------------------------------------------------
// Run-time namespaces.

fn ram_bdev(name: &str, bs: u32, hold: &Arc<AtomicBool>) -> Arc<RamBdev> {
    Arc::new(RamBdev {
        name: name.into(),
        block_size: bs,
        data: Arc::new(Mutex::new(vec![0; BLOCKS as usize * BS as usize])),
        busy_every: 0,
        hold: Arc::clone(hold),
    })
}

/// Polls `q` until the command with `tag` completes; other completions are checked to be
/// successful. Returns its status.
fn wait_tag(q: &mut HostQpair, tag: u64) -> Status {
    let mut st = None;
    wait_until("a completion", || {
        q.poll(&mut |c| {
            if c.tag == tag {
                st = Some(c.cqe.status());
            } else {
                assert_eq!(c.cqe.status(), Status::SUCCESS, "tag {}", c.tag);
            }
        })
        .unwrap();
        st.is_some()
    });
    st.unwrap()
}

#[test]
fn namespaces_added_and_removed_at_run_time_on_a_live_connection() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let mut a = admin(&h, cfg.clone());
    let mut q = io_queue(&h, &a, 1, cfg);
    write_read_verify(&mut q, 1, BS, 0, 4096, 1);
    // Namespace attribute notices on.
    let (s, _, _) = run(
        &mut a,
        Sqe {
            opcode: admin_op::SET_FEATURES,
            cdw10: u32::from(nvme::feature::ASYNC_EVENT_CONFIG),
            cdw11: 1 << 8,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SUCCESS);

    // Before: nsid 3 does not exist.
    let (s, _, _) = run(
        &mut q,
        nvseal::nvmf::host::rw_sqe(io_op::READ, 3, 0, 1),
        Dir::FromCtrl,
        &[],
        512,
    );
    assert_eq!(s, Status::INVALID_NAMESPACE);

    // Add nsid 3 (lowest free) while the connection is up: usable on the same I/O queue.
    let hold = Arc::new(AtomicBool::new(false));
    let ram2 = ram_bdev("ram2", BS, &hold);
    let nsid = h
        .target
        .add_namespace(NQN, None, ram2.clone() as Arc<dyn Bdev>, true)
        .unwrap();
    assert_eq!(nsid, 3);
    write_read_verify(&mut q, 3, BS, 8, 8192, 3);
    let list = a.identify(cns::ACTIVE_NS_LIST, 0).unwrap();
    assert_eq!(&list[0..12], &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
    let changed = a.get_log_page(log_id::CHANGED_NS_LIST, 0, 4096, 0).unwrap();
    assert_eq!(&changed[0..8], &[3, 0, 0, 0, 0, 0, 0, 0]);

    // Refusals: nsid in use, out of range, unknown subsystem, unknown namespace.
    let other: Arc<dyn Bdev> = ram_bdev("ramx", BS, &hold);
    assert!(matches!(
        h.target.add_namespace(NQN, Some(1), other.clone(), true),
        Err(nvseal::nvmf::target::TargetError::NsidInUse { nsid: 1, .. })
    ));
    assert!(matches!(
        h.target.add_namespace(NQN, Some(33), other.clone(), true),
        Err(nvseal::nvmf::target::TargetError::NsidOutOfRange { nsid: 33, .. })
    ));
    assert!(matches!(
        h.target
            .add_namespace("nqn.2026-01.io.nvseal:nope", None, other.clone(), true),
        Err(nvseal::nvmf::target::TargetError::NoSubsystem(_))
    ));
    assert!(matches!(
        h.target.remove_namespace(NQN, 7, Duration::from_secs(1)),
        Err(nvseal::nvmf::target::TargetError::NoNamespace { nsid: 7, .. })
    ));

    // A write to nsid 3 is held in flight at the bdev while nsid 3 is removed.
    hold.store(true, Ordering::Release);
    let data = pattern(4096, 9);
    q.write(3, 100, &data, BS, 300).unwrap();
    // The RAM bdev copies the data at submit: once it is there, the write is at the bdev,
    // and its completion is held.
    wait_until("the write to reach the bdev", || {
        q.poll(&mut |_| panic!("held")).unwrap();
        ram2.data.lock().unwrap()[100 * 512..100 * 512 + 4096] == data[..]
    });
    let t = Arc::clone(&h.target);
    let remover = std::thread::spawn(move || t.remove_namespace(NQN, 3, Duration::from_secs(20)));
    wait_until("nsid 3 to leave the table", || {
        h.target.subsystem(NQN).unwrap().namespace(3).is_none()
    });
    // New I/O to the removed namespace: Invalid Namespace; the others are unaffected.
    q.read(3, 0, 1, BS, 301).unwrap();
    assert_eq!(wait_tag(&mut q, 301), Status::INVALID_NAMESPACE);
    write_read_verify(&mut q, 1, BS, 16, 4096, 4);
    write_read_verify(&mut q, 2, 4096, 1, 4096, 5);
    assert!(
        !remover.is_finished(),
        "removal waits for the I/O in flight"
    );
    // Release the held write: it completes (it was accepted before the removal), and only then
    // is the namespace freed.
    hold.store(false, Ordering::Release);
    assert_eq!(wait_tag(&mut q, 300), Status::SUCCESS);
    remover.join().unwrap().unwrap();
    assert_eq!(Arc::strong_count(&ram2), 1, "the target let go of the bdev");
    assert_eq!(
        &ram2.data.lock().unwrap()[100 * 512..100 * 512 + 4096],
        &data[..]
    );
    let list = a.identify(cns::ACTIVE_NS_LIST, 0).unwrap();
    assert_eq!(&list[0..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    let changed = a.get_log_page(log_id::CHANGED_NS_LIST, 0, 4096, 0).unwrap();
    assert_eq!(&changed[0..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
    let (s, _, _) = run(
        &mut q,
        nvseal::nvmf::host::rw_sqe(io_op::READ, 3, 0, 1),
        Dir::FromCtrl,
        &[],
        512,
    );
    assert_eq!(s, Status::INVALID_NAMESPACE);

    // The slot can be reused by another bdev (4 KiB blocks this time) on the same connection.
    let ram3 = ram_bdev("ram3", 4096, &Arc::new(AtomicBool::new(false)));
    assert_eq!(
        h.target
            .add_namespace(NQN, Some(3), ram3.clone() as Arc<dyn Bdev>, true)
            .unwrap(),
        3
    );
    write_read_verify(&mut q, 3, 4096, 2, 8192, 6);
    assert_eq!(
        &ram3.data.lock().unwrap()[2 * 4096..4 * 4096],
        &pattern(8192, 6)[..]
    );
    // A namespace added on a new I/O queue is there from Connect.
    let mut q2 = io_queue(&h, &a, 2, host_cfg(Digests::default()));
    write_read_verify(&mut q2, 3, 4096, 0, 4096, 7);
    write_read_verify(&mut q2, 1, BS, 0, 4096, 8);
}

/// Regression (issue 11 item 4): an empty `allowed_hosts` admitted every host. Now it admits
/// none unless `allow_any_host` says so, and discovery does not show the subsystem to hosts it
/// refuses. Also issue 13 item 11: an empty HOSTNQN (what SPDK's tools send unless told one)
/// was refused with Connect Invalid Parameters even where any host was meant to be allowed; it
/// is now a host like any other, admitted only where any host is.
#[test]
fn deny_by_default_and_allow_any_host() {
    const OPEN: &str = "nqn.2026-01.io.nvseal:open";
    let h = start_with(
        vec![
            test_subsystem(NQN, vec![], false, &[4420]),
            test_subsystem(OPEN, vec![], true, &[4420]),
        ],
        Limits::default(),
        0,
    );
    // Neither a list nor allow_any_host: no host at all, an empty HOSTNQN included.
    for hostnqn in [HOST, ""] {
        let c = raw_admin_connect(h.addr, NQN, hostnqn);
        assert_eq!(c.status(), Status::CONNECT_INVALID_HOST, "{hostnqn:?}");
    }
    assert!(h.target.controllers_of(NQN).is_empty());
    // allow_any_host: any NQN, and the empty one like any other.
    for hostnqn in [HOST, "nqn.2014-08.org.nvmexpress:uuid:someone-else", ""] {
        let c = raw_admin_connect(h.addr, OPEN, hostnqn);
        assert_eq!(c.status(), Status::SUCCESS, "{hostnqn:?}");
    }
    // A HOSTNQN that is not an NQN at all is still a bad parameter (IPO = 512, in the data).
    let c = raw_admin_connect(h.addr, OPEN, "host 1");
    assert_eq!(c.status(), Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(c.dw0, connect::invalid_param_dw0(true, 512));
    // Discovery admits any host and lists only what that host may connect to.
    for hostnqn in [HOST, ""] {
        let names: Vec<String> = discovered(h.addr, hostnqn)
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(names, [OPEN], "{hostnqn:?}");
    }
    // A whole session with an empty HOSTNQN on the open subsystem: admin and I/O queue.
    let cfg = HostConfig {
        hostnqn: String::new(),
        ..host_cfg(Digests::default())
    };
    let mut a = HostQpair::connect(h.addr, OPEN, 0, connect::CNTLID_DYNAMIC, cfg.clone()).unwrap();
    a.enable().unwrap();
    let mut q = HostQpair::connect(h.addr, OPEN, 1, a.cntlid(), cfg).unwrap();
    write_read_verify(&mut q, 1, BS, 0, 4096, 7);
}

/// Regression (issue 11 item 5): a subsystem configured on one address accepted Connects
/// through every listener of the target, and discovery through any listener listed every
/// subsystem. Now a subsystem is reachable only through the listeners of its own addresses;
/// through any other it looks exactly like an unknown NQN (Connect Invalid Parameters at
/// SUBNQN), and discovery lists only what the listener serves, with that listener's port.
#[test]
fn subsystems_are_bound_to_their_listeners() {
    const OTHER: &str = "nqn.2026-01.io.nvseal:other";
    const BOTH: &str = "nqn.2026-01.io.nvseal:both";
    let h = start_with(
        vec![
            test_subsystem(NQN, vec![HOST.into()], false, &[4420]),
            test_subsystem(OTHER, vec![HOST.into()], false, &[4421]),
            test_subsystem(BOTH, vec![HOST.into()], false, &[4421, 4420]),
        ],
        Limits::default(),
        0,
    );
    assert_eq!(h.addrs.len(), 2, "one listener per distinct address");
    let (a, b) = (h.addrs[0], h.addrs[1]);
    for (addr, nqn) in [(a, NQN), (b, OTHER), (a, BOTH), (b, BOTH)] {
        let c = raw_admin_connect(addr, nqn, HOST);
        assert_eq!(c.status(), Status::SUCCESS, "{nqn} through {addr}");
    }
    let unknown = raw_admin_connect(a, "nqn.2026-01.io.nvseal:nope", HOST);
    assert_eq!(unknown.status(), Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(unknown.dw0, connect::invalid_param_dw0(true, 256));
    for (addr, nqn) in [(a, OTHER), (b, NQN)] {
        let c = raw_admin_connect(addr, nqn, HOST);
        assert_eq!(
            (c.status(), c.dw0),
            (unknown.status(), unknown.dw0),
            "{nqn} through {addr} must look like an unknown NQN"
        );
    }
    // An I/O queue of a controller made through its own listener cannot come in elsewhere.
    let cfg = host_cfg(Digests::default());
    let mut adm = HostQpair::connect(a, NQN, 0, connect::CNTLID_DYNAMIC, cfg.clone()).unwrap();
    adm.enable().unwrap();
    match HostQpair::connect(b, NQN, 1, adm.cntlid(), cfg.clone()) {
        Err(HostError::Status { status, dw0 }) => {
            assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS);
            assert_eq!(dw0, connect::invalid_param_dw0(true, 256));
        }
        r => panic!("I/O queue through the other listener: {:?}", r.err()),
    }
    let mut q = HostQpair::connect(a, NQN, 1, adm.cntlid(), cfg).unwrap();
    write_read_verify(&mut q, 1, BS, 8, 4096, 3);
    // Discovery through each listener: its own subsystems only, with its port and PORTID.
    let entry = |nqn: &str, port: &str, portid: u16| (nqn.to_string(), port.to_string(), portid);
    assert_eq!(
        discovered(a, HOST),
        [entry(NQN, "4420", 0), entry(BOTH, "4420", 0)]
    );
    assert_eq!(
        discovered(b, HOST),
        [entry(OTHER, "4421", 1), entry(BOTH, "4421", 1)]
    );
}

/// Issue 13 item 11: what `spdk_nvme_identify` asks of an NVM controller and nvseal refused —
/// Get Features Arbitration (01h), Power Management (02h), Temperature Threshold (04h) and
/// Error Recovery (05h), Get Log Page Firmware Slot Information (03h) — and CTRATT bit 0
/// (128-bit host identifier), which fabrics controllers must set; with it, Get Features Host
/// Identifier (81h) returns the HOSTID of Connect.
#[test]
fn identify_tool_features_log_pages_and_ctratt() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = HostConfig {
        hostid: *b"nvseal-hostid-01",
        ..host_cfg(Digests::default())
    };
    let mut a = admin(&h, cfg);
    let id = a.identify_controller().unwrap();
    assert_eq!(
        u32::from_le_bytes(id[96..100].try_into().unwrap()) & 1,
        1,
        "CTRATT.HIDS"
    );
    assert_eq!(id[260] & 1, 1, "FRMW: slot 1 read-only");
    assert_eq!((id[260] >> 1) & 0b111, 1, "FRMW: one firmware slot");
    assert_eq!(id[263], 0, "NPSS: one power state");

    let feat = |a: &mut HostQpair, set: bool, fid: u8, sel: u32, dw11: u32| {
        let (s, dw0, _) = run(
            a,
            Sqe {
                opcode: if set {
                    admin_op::SET_FEATURES
                } else {
                    admin_op::GET_FEATURES
                },
                cdw10: u32::from(fid) | (sel << 8),
                cdw11: dw11,
                ..Default::default()
            },
            Dir::None,
            &[],
            0,
        );
        (s, dw0)
    };
    use nvme::feature::*;
    // What spdk_nvme_identify reads (01h, 02h, 04h, 05h, 07h), all current values.
    assert_eq!(
        feat(&mut a, false, ARBITRATION, 0, 0),
        (Status::SUCCESS, 0b111)
    );
    assert_eq!(
        feat(&mut a, false, POWER_MANAGEMENT, 0, 0),
        (Status::SUCCESS, 0)
    );
    assert_eq!(
        feat(&mut a, false, TEMPERATURE_THRESHOLD, 0, 0),
        (Status::SUCCESS, 343),
        "over threshold of the composite sensor"
    );
    assert_eq!(
        feat(&mut a, false, TEMPERATURE_THRESHOLD, 0, 1 << 20),
        (Status::SUCCESS, 0),
        "under threshold"
    );
    assert_eq!(
        feat(&mut a, false, ERROR_RECOVERY, 0, 0),
        (Status::SUCCESS, 0)
    );
    assert_eq!(
        feat(&mut a, false, NUMBER_OF_QUEUES, 0, 0).0,
        Status::SUCCESS
    );
    // Set, then current vs default (SEL = 1).
    assert_eq!(
        feat(&mut a, true, TEMPERATURE_THRESHOLD, 0, 350).0,
        Status::SUCCESS
    );
    assert_eq!(
        feat(&mut a, false, TEMPERATURE_THRESHOLD, 0, 0),
        (Status::SUCCESS, 350)
    );
    assert_eq!(
        feat(&mut a, false, TEMPERATURE_THRESHOLD, 1, 0),
        (Status::SUCCESS, 343)
    );
    assert_eq!(feat(&mut a, true, ERROR_RECOVERY, 0, 30).0, Status::SUCCESS);
    assert_eq!(
        feat(&mut a, false, ERROR_RECOVERY, 0, 0),
        (Status::SUCCESS, 30)
    );
    assert_eq!(
        feat(&mut a, true, ARBITRATION, 0, 0x0102_0303).0,
        Status::SUCCESS
    );
    assert_eq!(
        feat(&mut a, false, ARBITRATION, 0, 0),
        (Status::SUCCESS, 0x0102_0303)
    );
    assert_eq!(
        feat(&mut a, true, POWER_MANAGEMENT, 0, 0).0,
        Status::SUCCESS
    );
    // What nvseal cannot honour is refused: a power state that does not exist, a sensor that
    // does not exist, DULBE.
    assert_eq!(
        feat(&mut a, true, POWER_MANAGEMENT, 0, 1).0,
        Status::INVALID_FIELD
    );
    assert_eq!(
        feat(&mut a, false, TEMPERATURE_THRESHOLD, 0, 1 << 16).0,
        Status::INVALID_FIELD
    );
    assert_eq!(
        feat(&mut a, true, ERROR_RECOVERY, 0, 1 << 16).0,
        Status::INVALID_FIELD
    );
    // Host Identifier: the 128-bit HOSTID of Connect (EXHID = 1); never settable over fabrics.
    let (s, _, hostid) = run(
        &mut a,
        Sqe {
            opcode: admin_op::GET_FEATURES,
            cdw10: u32::from(HOST_IDENTIFIER),
            cdw11: 1,
            ..Default::default()
        },
        Dir::FromCtrl,
        &[],
        16,
    );
    assert_eq!(s, Status::SUCCESS);
    assert_eq!(&hostid, b"nvseal-hostid-01");
    assert_eq!(
        feat(&mut a, false, HOST_IDENTIFIER, 0, 0).0,
        Status::INVALID_FIELD,
        "EXHID = 0 asks for a 64-bit identifier"
    );
    assert_eq!(
        feat(&mut a, true, HOST_IDENTIFIER, 0, 1).0,
        Status::COMMAND_SEQUENCE_ERROR
    );

    // Log pages as spdk_nvme_identify asks them (NSID FFFFFFFFh): error information for
    // ELPE + 1 entries, SMART / health, firmware slot information.
    let elpe = u32::from(id[262]) + 1;
    a.get_log_page(log_id::ERROR_INFO, u32::MAX, 64 * elpe, 0)
        .unwrap();
    a.get_log_page(log_id::SMART_HEALTH, u32::MAX, 512, 0)
        .unwrap();
    let fw = a
        .get_log_page(log_id::FIRMWARE_SLOT, u32::MAX, 512, 0)
        .unwrap();
    assert_eq!(fw[0] & 0b111, 1, "AFI: slot 1 active");
    assert_eq!(&fw[8..16], &id[64..72], "FRS1 = Identify FR");

    // A discovery controller has none of these.
    let mut d = HostQpair::connect(
        h.addr,
        DISCOVERY_NQN,
        0,
        connect::CNTLID_DYNAMIC,
        host_cfg(Digests::default()),
    )
    .unwrap();
    d.enable().unwrap();
    assert_eq!(
        feat(&mut d, false, ARBITRATION, 0, 0).0,
        Status::INVALID_FIELD
    );
    assert!(d.get_log_page(log_id::FIRMWARE_SLOT, 0, 512, 0).is_err());
}
