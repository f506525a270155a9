//! The `spdk_nvme` bdev (issue 15, docs/spdk.md).
//!
//! Without the `spdk` feature: a config naming `type: spdk_nvme` is refused at start-up with an
//! error that says how to get the feature.
//!
//! With it (SPDK installed; `scripts/test.sh` runs these with `--features spdk` then), the
//! fabrics path on the host: `nvseal serve` A exports a RAM namespace; `nvseal serve` B takes
//! it as `spdk_nvme` over `trtype:TCP` (SPDK's NVMe/TCP initiator, no kernel) and exports it
//! encrypted; `nvseal perf --verify` drives B; A's namespace must then hold ciphertext that an
//! independent XTS (Python `cryptography`) decrypts to what perf wrote. Then A goes away: B's
//! I/O fails cleanly and B says so; A comes back: B resets the controller and serves again.

mod common;

use std::fs;
use std::process::Command;

#[cfg(not(feature = "spdk"))]
#[test]
fn without_the_feature_a_spdk_nvme_bdev_is_refused_saying_how_to_get_it() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("b.yaml");
    fs::write(
        &cfg,
        "reactor:\n  cores: 1\n  pin: false\n\
         bdevs:\n  - name: remote\n    type: spdk_nvme\n    trid: \"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2026-12.io.nvseal:a\"\n\
         subsystems:\n  - nqn: nqn.2026-12.io.nvseal:b\n    serial: B1\n    allowed_hosts: [\"nqn.2026-12.io.nvseal:host\"]\n\
         \x20   namespaces:\n      - nsid: 1\n        bdev: remote\n\
         \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args(["serve", "-c", cfg.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must refuse: {err}");
    assert!(
        err.contains("remote") && err.contains("`spdk` feature") && err.contains("docs/spdk.md"),
        "the error names the bdev and the feature: {err}"
    );
}

#[cfg(feature = "spdk")]
mod with_spdk {
    use super::*;
    use common::pass::{check_all_blocks, check_perf, python_decrypt, Area, Perf};
    use common::qemu::{harness_ready, repo, Done, Guest};
    use common::serve::{addr_of, Serve};
    use nvseal::tools::bdevperf::fill_pattern;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    const NQN_A: &str = "nqn.2026-12.io.nvseal:spdk-a";
    const NQN_B: &str = "nqn.2026-12.io.nvseal:spdk-b";
    /// The host NQN B connects to A as (A's allow-list names it).
    const HOST_B: &str = "nqn.2026-12.io.nvseal:spdk-b-initiator";
    /// The host NQN perf connects to B as.
    const HOST_PERF: &str = "nqn.2026-12.io.nvseal:spdk-perf";
    const DATA_BYTES: u64 = 8 << 20;
    const SEED: u64 = 151;

    fn config_a(d: &Path, bs: u32, port: u16) -> std::path::PathBuf {
        let cfg = d.join("a.yaml");
        fs::write(
            &cfg,
            format!(
                "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
                 bdevs:\n  - name: ram\n    type: malloc\n    size_bytes: {DATA_BYTES}\n    block_size: {bs}\n\
                 subsystems:\n  - nqn: {NQN_A}\n    serial: SPDKA\n    allowed_hosts: [\"{HOST_B}\", \"{HOST_PERF}\"]\n\
                 \x20   namespaces:\n      - nsid: 1\n        bdev: ram\n\
                 \x20   listen:\n      - addr: 127.0.0.1\n        port: {port}\n"
            ),
        )
        .unwrap();
        cfg
    }

    fn config_b(d: &Path, a: SocketAddr) -> std::path::PathBuf {
        config_b_on(d, a, NQN_A)
    }

    /// B: `spdk_nvme` over TCP to namespace 1 of `subnqn` at `a` (as [`HOST_B`]), exported
    /// encrypted (key `d/xts.hex`) as [`NQN_B`] to [`HOST_PERF`] on a port of 127.0.0.1.
    fn config_b_on(d: &Path, a: SocketAddr, subnqn: &str) -> std::path::PathBuf {
        let cfg = d.join("b.yaml");
        fs::write(
            &cfg,
            format!(
                "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
                 spdk:\n  hugepages: false\n  mem_size_mib: 512\n\
                 bdevs:\n  - name: remote\n    type: spdk_nvme\n    trid: \"trtype:TCP adrfam:IPv4 traddr:{ip} trsvcid:{port} subnqn:{subnqn}\"\n    hostnqn: {HOST_B}\n    queue_depth: 64\n\
                 \x20 - name: vol\n    type: crypto\n    base: remote\n    key:\n      file:\n        path: {key}\n\
                 subsystems:\n  - nqn: {NQN_B}\n    serial: SPDKB\n    allowed_hosts: [\"{HOST_PERF}\"]\n\
                 \x20   namespaces:\n      - nsid: 1\n        bdev: vol\n        encrypted: true\n\
                 \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
                ip = a.ip(),
                port = a.port(),
                key = d.join("xts.hex").display(),
            ),
        )
        .unwrap();
        cfg
    }

    /// A random 64-byte XTS key: as hex for nvseal (mode 0600), raw for the Python check.
    fn write_key(d: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let mut key = [0u8; 64];
        getrandom::fill(&mut key).unwrap();
        let hex = common::hex(&key);
        let p = d.join("xts.hex");
        fs::write(&p, hex).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(d.join("xts.bin"), key).unwrap();
    }

    /// The first [`DATA_BYTES`] of namespace 1 of `nqn` at `addr`, read over NVMe/TCP as
    /// [`HOST_PERF`].
    fn read_all(addr: SocketAddr, nqn: &str, bs: u32) -> Vec<u8> {
        read_all_as(addr, nqn, HOST_PERF, bs)
    }

    fn read_all_as(addr: SocketAddr, nqn: &str, host: &str, bs: u32) -> Vec<u8> {
        let (_admin, mut q) = common::host::connect_io(addr, nqn, host, 8);
        let blocks = DATA_BYTES / u64::from(bs);
        let per = u64::from(64 * 1024 / bs);
        let mut out = Vec::with_capacity(DATA_BYTES as usize);
        let mut lba = 0;
        while lba < blocks {
            let n = per.min(blocks - lba);
            out.extend(common::host::read_blocks(&mut q, 1, lba, n as u32, bs));
            lba += n;
        }
        out
    }

    /// `raw` (the first [`DATA_BYTES`] of the device under an encrypted namespace, key
    /// `d/xts.bin`, data units of `bs` at offset 0) holds ciphertext: no block of perf's
    /// pattern for [`SEED`] in the clear, and every block perf wrote decrypts, by an independent
    /// XTS (Python `cryptography`), to that pattern.
    fn assert_ciphertext_of_pattern(d: &Path, raw: &[u8], bs: u32) {
        assert_eq!(raw.len() as u64, DATA_BYTES);
        let mut want = vec![0u8; DATA_BYTES as usize];
        fill_pattern(&mut want, 0, bs as usize, SEED);
        let img = d.join("raw.img");
        fs::write(&img, raw).unwrap();
        let written: Vec<usize> = (0..(DATA_BYTES / u64::from(bs)) as usize)
            .filter(|&i| {
                let r = i * bs as usize..(i + 1) * bs as usize;
                raw[r.clone()] != vec![0u8; bs as usize][..]
            })
            .collect();
        assert!(
            !written.is_empty(),
            "perf wrote nothing through to the device"
        );
        assert!(
            !common::leaks(raw, &want[..bs as usize]),
            "plaintext of the first block is on the device"
        );
        let plain = python_decrypt(
            &Area {
                img: &img,
                unit: bs,
                offset: 0,
                blocks: DATA_BYTES / u64::from(bs),
            },
            u64::MAX,
            Some(&d.join("xts.bin")),
            None,
        );
        for &i in &written {
            let r = i * bs as usize..(i + 1) * bs as usize;
            assert_eq!(
                plain[r.clone()],
                want[r],
                "block {i} on the device does not decrypt to what perf wrote"
            );
        }
    }

    /// `nvseal perf --verify` (randrw, two passes, [`SEED`]) on namespace 1 of `nqn` at `addr`
    /// as [`HOST_PERF`], its report in `d/json`; then every block is read back and compared.
    fn verify_through(d: &Path, addr: SocketAddr, nqn: &str, bs: u32, json: &str) {
        let a = addr.to_string();
        let perf = Perf {
            addr: &a,
            nqn,
            host: HOST_PERF,
            data_bytes: DATA_BYTES,
        };
        let json = d.join(json);
        check_perf(perf.spawn(2, SEED, &json), &json);
        check_all_blocks(&perf, addr, bs, SEED, SEED);
    }

    /// Starts B from `cfg` and waits until it serves with its SPDK controller attached.
    fn start_b(cfg: &Path) -> (Serve, SocketAddr) {
        let mut b = Serve::start_with_log(cfg, "info,nvseal::spdk=debug");
        b.wait_for("SPDK environment started");
        b.wait_for("spdk_nvme: controller attached");
        let addr = addr_of(&b.wait_for("NVMe/TCP listening"));
        b.wait_for("nvseal serving");
        (b, addr)
    }

    fn fabrics_path(bs: u32) {
        let d = tempfile::tempdir().unwrap();
        write_key(d.path());
        let port = common::kmip::free_port();
        let cfg_a = config_a(d.path(), bs, port);
        let mut a = Serve::start(&cfg_a);
        let addr_a = addr_of(&a.wait_for("NVMe/TCP listening"));
        let (mut b, addr_b) = start_b(&config_b(d.path(), addr_a));
        verify_through(d.path(), addr_b, NQN_B, bs, "perf.json");

        // A holds ciphertext: not the pattern, and the independent XTS gets the pattern back.
        assert_ciphertext_of_pattern(d.path(), &read_all(addr_a, NQN_A, bs), bs);

        // A namespace the controller lacks is a start-up error naming the bdev.
        let bad = d.path().join("b-nsid.yaml");
        fs::write(
            &bad,
            fs::read_to_string(d.path().join("b.yaml"))
                .unwrap()
                .replace(
                    "    queue_depth: 64\n",
                    "    queue_depth: 64\n    nsid: 7\n",
                ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
            .args(["serve", "-c", bad.to_str().unwrap()])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("remote")
                && err.contains("no active namespace 7"),
            "nsid 7: {err}"
        );

        // A goes away: B's I/O fails (an NVMe error, not a hang) and B says why.
        a.kill9();
        b.wait_for("spdk_nvme: controller failed");
        let (_admin, mut q) = common::host::connect_io(addr_b, NQN_B, HOST_PERF, 4);
        let st = common::host::try_read_blocks(&mut q, 1, 0, 1, bs);
        assert!(
            st.is_err(),
            "a read with the backing controller gone must fail"
        );

        // A comes back on the same port (empty RAM): B resets the controller and serves again.
        let mut a = Serve::start(&cfg_a);
        a.wait_for("NVMe/TCP listening");
        b.wait_for("spdk_nvme: controller reset; namespace back online");
        if let Err(st) = common::host::try_read_blocks(&mut q, 1, 0, 1, bs) {
            let log = b.kill9();
            panic!("read after the reset failed ({st:#x}):\n{}", log.join("\n"));
        }
        b.stop();
        a.stop();
    }

    #[test]
    fn serve_over_spdk_tcp_encrypts_onto_a_remote_namespace_4096() {
        fabrics_path(4096);
    }

    #[test]
    fn serve_over_spdk_tcp_encrypts_onto_a_remote_namespace_512() {
        fabrics_path(512);
    }

    #[test]
    fn bad_transport_ids_and_namespaces_are_clear_start_up_errors() {
        let d = tempfile::tempdir().unwrap();
        write_key(d.path());
        let cases: [(&str, &str); 3] = [
            ("trtype:TCP adrfam:IPv4 traddr:127.0.0.1", "subnqn"),
            ("trtype:Bogus traddr:x", "trtype must be PCIe, TCP or RDMA"),
            ("trtype:PCIe traddr:0000:7f:1f.7", "PCIe"),
        ];
        for (trid, want) in cases {
            let cfg = d.path().join("bad.yaml");
            fs::write(
                &cfg,
                format!(
                    "reactor:\n  cores: 1\n  pin: false\n\
                     spdk:\n  hugepages: false\n  mem_size_mib: 256\n\
                     bdevs:\n  - name: remote\n    type: spdk_nvme\n    trid: \"{trid}\"\n"
                ),
            )
            .unwrap();
            let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
                .args(["serve", "-c", cfg.to_str().unwrap()])
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{trid}: serve must refuse");
            assert!(
                err.contains("remote") && err.contains(want),
                "{trid}: the error names the bdev and says {want:?}: {err}"
            );
        }
    }

    // ---- SPDK's own tools as peers ----

    /// Where SPDK's tools are: `$SPDK_PREFIX/bin` (default /opt/spdk/bin). Installed SPDK
    /// without its tools is a failure here, not a skip: these tests run only when SPDK is.
    fn spdk_tool(name: &str) -> Command {
        let prefix = std::env::var("SPDK_PREFIX").unwrap_or_else(|_| "/opt/spdk".into());
        let p = Path::new(&prefix).join("bin").join(name);
        assert!(
            p.is_file(),
            "{} missing: SPDK is installed without its tools (set SPDK_PREFIX)",
            p.display()
        );
        // An installed SPDK's tools find its libraries there (`make install` runs no ldconfig).
        let mut c = Command::new(p);
        c.env("LD_LIBRARY_PATH", Path::new(&prefix).join("lib"));
        c
    }

    /// `nvseal serve` exporting a RAM namespace to any host (SPDK's tools connect with a random
    /// host NQN), and its address.
    fn serve_any_host(d: &Path, bs: u32) -> (Serve, SocketAddr) {
        let cfg = d.join("peer.yaml");
        fs::write(
            &cfg,
            format!(
                "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
                 bdevs:\n  - name: ram\n    type: malloc\n    size_bytes: {DATA_BYTES}\n    block_size: {bs}\n\
                 subsystems:\n  - nqn: {NQN_A}\n    serial: SPDKPEER42\n    model: nvseal-peer-test\n    allow_any_host: true\n\
                 \x20   namespaces:\n      - nsid: 1\n        bdev: ram\n\
                 \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n"
            ),
        )
        .unwrap();
        let mut s = Serve::start(&cfg);
        let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
        (s, addr)
    }

    fn trid(addr: SocketAddr, nqn: &str) -> String {
        format!(
            "trtype:TCP adrfam:IPv4 traddr:{} trsvcid:{} subnqn:{nqn}",
            addr.ip(),
            addr.port()
        )
    }

    fn run_ok(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd:?} failed:\n{text}");
        text
    }

    #[test]
    fn spdk_nvme_identify_reads_nvseals_controller_and_namespace() {
        let d = tempfile::tempdir().unwrap();
        let (s, addr) = serve_any_host(d.path(), 4096);
        let out = run_ok(
            spdk_tool("spdk_nvme_identify")
                .args(["--no-huge", "-s", "256", "-r"])
                .arg(trid(addr, NQN_A)),
        );
        let field = |name: &str| -> String {
            out.lines()
                .find_map(|l| l.trim_start().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("identify output lacks {name:?}:\n{out}"))
        };
        assert_eq!(field("Serial Number:"), "SPDKPEER42");
        assert_eq!(field("Model Number:"), "nvseal-peer-test");
        assert_eq!(field("Subsystem NQN:"), NQN_A);
        assert_eq!(field("Namespace ID:"), "1");
        assert!(
            field("Size (in LBAs):").starts_with(&(DATA_BYTES / 4096).to_string()),
            "{out}"
        );
        assert_eq!(field("Volatile Write Cache:"), "Present");
        assert!(
            out.contains("LBA Format #00: Data Size:  4096  Metadata Size:     0"),
            "{out}"
        );
        s.stop();
    }

    #[test]
    fn spdk_nvme_perf_runs_against_nvseal_and_nvseal_perf_verifies_what_it_left() {
        let d = tempfile::tempdir().unwrap();
        let (s, addr) = serve_any_host(d.path(), 4096);
        let out = run_ok(
            spdk_tool("spdk_nvme_perf")
                .args(["--no-huge", "-s", "512", "-q", "32", "-o", "4096"])
                .args(["-w", "randrw", "-M", "70", "-t", "3", "-r"])
                .arg(trid(addr, NQN_A)),
        );
        let total = out
            .lines()
            .find(|l| l.trim_start().starts_with("Total"))
            .unwrap_or_else(|| panic!("no Total line:\n{out}"));
        let iops: f64 = total
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no IOPS in {total:?}"));
        assert!(iops > 0.0, "{total}");
        // The target is intact after SPDK's load: nvseal's own verifying client on it.
        let a = addr.to_string();
        let perf = Perf {
            addr: &a,
            nqn: NQN_A,
            host: HOST_PERF,
            data_bytes: DATA_BYTES,
        };
        let json = d.path().join("after.json");
        check_perf(perf.spawn(1, SEED, &json), &json);
        s.stop();
    }

    #[test]
    fn nvseal_perf_verifies_against_spdks_nvmf_tgt() {
        let d = tempfile::tempdir().unwrap();
        let port = common::kmip::free_port();
        let conf = serde_json::json!({ "subsystems": [
            { "subsystem": "bdev", "config": [
                { "method": "bdev_malloc_create",
                  "params": { "name": "Malloc0", "num_blocks": DATA_BYTES / 4096, "block_size": 4096 } }
            ] },
            { "subsystem": "nvmf", "config": [
                { "method": "nvmf_create_transport", "params": { "trtype": "TCP" } },
                { "method": "nvmf_create_subsystem",
                  "params": { "nqn": NQN_A, "allow_any_host": true, "serial_number": "SPDKTGT1" } },
                { "method": "nvmf_subsystem_add_ns",
                  "params": { "nqn": NQN_A, "namespace": { "bdev_name": "Malloc0", "nsid": 1 } } },
                { "method": "nvmf_subsystem_add_listener",
                  "params": { "nqn": NQN_A, "listen_address":
                      { "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string() } } }
            ] }
        ] });
        let cfg = d.path().join("nvmf_tgt.json");
        fs::write(&cfg, conf.to_string()).unwrap();
        let mut tgt = spdk_tool("nvmf_tgt")
            .args(["--no-huge", "-s", "512", "-m", "0x1", "--json"])
            .arg(&cfg)
            .arg("-r")
            .arg(d.path().join("spdk.sock"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(st) = tgt.try_wait().unwrap() {
                panic!("nvmf_tgt exited: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "nvmf_tgt did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        verify_through(d.path(), addr, NQN_A, 4096, "tgt.json");
        let _ = tgt.kill();
        let _ = tgt.wait();
    }

    // ---- Linux and a PCIe drive, in the QEMU guest ----

    /// B takes a namespace of Linux's own NVMe/TCP target (nvmet-tcp over a `brd` RAM disk in
    /// the QEMU guest, scripts/qemu/guest/nvmet-target.sh) as `spdk_nvme` over TCP and exports
    /// it encrypted; `nvseal perf --verify` drives B, and the RAM disk, read straight from
    /// nvmet, holds ciphertext that an independent XTS decrypts to what perf wrote.
    #[test]
    fn serve_over_spdk_tcp_encrypts_onto_linux_nvmet_in_the_guest() {
        if !harness_ready() {
            return;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let d = dir.path();
        write_key(d);
        let subnqn = "nqn.2026-12.io.nvseal:spdk-nvmet";
        let fwd = common::kmip::free_port();
        let done = Done::start();
        // nvmet allows one host NQN: B's. The raw read at the end connects as B too.
        let params = format!(
            "GUEST_PORT=4420 SUBNQN='{subnqn}' SERIAL='SPDKNVMET' HOSTNQN='{HOST_B}' \
             NS_MB={} DONE_URL='{}' WAIT_S=600 HASH_BLOCKS='1:1'\n",
            DATA_BYTES >> 20,
            done.url()
        );
        let body = fs::read_to_string(repo().join("scripts/qemu/guest/nvmet-target.sh")).unwrap();
        let script = d.join("guest.sh");
        fs::write(&script, params + &body).unwrap();
        let mut guest = Guest::start(
            &script,
            700,
            d.join("console.log"),
            &[("NVSEAL_QEMU_HOSTFWD", format!("{fwd}:4420"))],
        );
        guest.wait_for("NVMET-READY", "NVMET-FAIL", 300);
        let nvmet: SocketAddr = format!("127.0.0.1:{fwd}").parse().unwrap();

        let (b, addr_b) = start_b(&config_b_on(d, nvmet, subnqn));
        verify_through(d, addr_b, NQN_B, 512, "perf.json");
        // Shutdown Flushes every backend: it must succeed (stop() asserts a clean exit). The
        // Flush rides a queue pair opened right after the hosts' went away, which nvmet may
        // refuse while it tears the old queue down; B then asks again (src/spdk/bdev.rs).
        let log = b.stop();
        let refused = log
            .iter()
            .filter(|l| l.contains("Connect was refused"))
            .count();
        println!("B: {refused} queue pair Connect(s) refused by nvmet and asked again");

        // brd has 512-byte blocks.
        assert_ciphertext_of_pattern(d, &read_all_as(nvmet, subnqn, HOST_B, 512), 512);
        done.set();
        let (status, c, err) = guest.finish();
        assert!(
            status.success() && c.contains("NVMET-DONE"),
            "guest failed: run-guest.sh {status}\n{err}"
        );
    }

    /// Kernel bypass for real: in the QEMU guest, nvseal drives an emulated NVMe SSD (QEMU's
    /// `nvme` device, backed by a file here) through SPDK's user-space PCIe driver (the device
    /// bound to uio_pci_generic, hugepages reserved; scripts/qemu/guest/spdk-pcie.sh) and
    /// exports an encrypted namespace on it over NVMe/TCP. `nvseal perf --verify` drives it
    /// from here. Then the SSD is hot-removed (QEMU's `device_del`, an ACPI eject in the guest)
    /// while a read run goes on: the run must end (errors, no hang), nvseal must say the drive
    /// is gone and keep serving (its namespace answering errors). Last, the SSD's backing file
    /// must hold ciphertext that an independent XTS decrypts to what perf wrote.
    #[test]
    fn pcie_path_in_the_guest_encrypts_onto_an_emulated_nvme_ssd() {
        use std::os::unix::fs::PermissionsExt;
        if !harness_ready() {
            return;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let d = dir.path();
        write_key(d);
        let nqn = "nqn.2026-12.io.nvseal:spdk-pcie";
        let payload = d.join("payload");
        fs::create_dir_all(payload.join("lib")).unwrap();
        // The binary without its debug sections (the payload travels in the initramfs, in the
        // guest's RAM), and what it loads that the guest's Debian root lacks.
        let bin = Path::new(env!("CARGO_BIN_EXE_nvseal"));
        run_ok(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(bin)
                .arg(payload.join("nvseal")),
        );
        copy_libs(bin, &payload.join("lib"));
        fs::copy(d.join("xts.hex"), payload.join("xts.hex")).unwrap();
        // SPDK's environment refuses to start without an OpenSSL config file; an empty one is
        // valid (OpenSSL's defaults).
        fs::write(payload.join("openssl.cnf"), "# OpenSSL defaults\n").unwrap();
        fs::set_permissions(payload.join("xts.hex"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(
            payload.join("serve.yaml"),
            format!(
                "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 200\n\
                 spdk:\n  hugepages: true\n  mem_size_mib: 256\n\
                 bdevs:\n  - name: ssd\n    type: spdk_nvme\n    trid: \"trtype:PCIe traddr:@TRADDR@\"\n    queue_depth: 32\n\
                 \x20 - name: vol\n    type: crypto\n    base: ssd\n    key:\n      file:\n        path: /payload/xts.hex\n\
                 subsystems:\n  - nqn: {nqn}\n    serial: SPDKPCIE\n    allowed_hosts: [\"{HOST_PERF}\"]\n\
                 \x20   namespaces:\n      - nsid: 1\n        bdev: vol\n        encrypted: true\n\
                 \x20   listen:\n      - addr: 10.0.2.15\n        port: 4420\n"
            ),
        )
        .unwrap();
        let ssd = d.join("ssd.img");
        fs::File::create(&ssd).unwrap().set_len(DATA_BYTES).unwrap();
        let done = Done::start();
        let params = format!(
            "SSD_SERIAL=NVSEALSSD1 HUGEPAGES=192 DONE_URL='{}' WAIT_S=900 REMOVED=1\n",
            done.url()
        );
        let body = fs::read_to_string(repo().join("scripts/qemu/guest/spdk-pcie.sh")).unwrap();
        let script = d.join("guest.sh");
        fs::write(&script, params + &body).unwrap();
        let fwd = common::kmip::free_port();
        let mut guest = Guest::start(
            &script,
            1000,
            d.join("console.log"),
            &[
                ("NVSEAL_QEMU_HOSTFWD", format!("{fwd}:4420")),
                ("NVSEAL_QEMU_NVME", format!("NVSEALSSD1={}", ssd.display())),
                ("NVSEAL_QEMU_PAYLOAD", payload.display().to_string()),
                ("NVSEAL_QEMU_MEM_MB", "2048".to_string()),
                (
                    "NVSEAL_QEMU_MONITOR",
                    d.join("monitor.sock").display().to_string(),
                ),
            ],
        );
        guest.wait_for("SPDK-READY", "SPDK-FAIL", 600);
        println!(
            "nvseal serving in the guest after {:.1} s",
            guest.elapsed_s()
        );

        let addr: SocketAddr = format!("127.0.0.1:{fwd}").parse().unwrap();
        verify_through(d, addr, nqn, 512, "perf.json");
        let a = addr.to_string();

        // Hot removal under I/O.
        let reads = d.join("removal.json");
        let mut reader = Command::new(env!("CARGO_BIN_EXE_nvseal"))
            .args([
                "perf",
                "--traddr",
                &a,
                "--subnqn",
                nqn,
                "--hostnqn",
                HOST_PERF,
            ])
            .args([
                "--nsid", "1", "-w", "randread", "-o", "4k", "-q", "8", "-t", "15",
            ])
            .args(["--no-pin", "--no-progress", "--json"])
            .arg(&reads)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        let said = monitor(&d.join("monitor.sock"), "device_del nvme-NVSEALSSD1");
        println!("QEMU monitor: device_del: {said:?}");
        let t0 = std::time::Instant::now();
        let st = loop {
            if let Some(st) = reader.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(90) {
                let _ = reader.kill();
                panic!("perf did not end after the SSD was removed: I/O hangs");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(reader.stderr.as_mut().unwrap(), &mut err).unwrap();
        println!("perf during the removal: {st}; {err}");
        let errors = fs::read(&reads)
            .ok()
            .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok())
            .map(|v| v["jobs"][0]["io_errors"].as_u64().unwrap_or(0));
        assert!(
            !st.success() || errors.is_some_and(|e| e > 0),
            "reads of a removed drive must fail ({st}, io_errors {errors:?})"
        );
        // nvseal still serves: a new host connects, and its read fails with an NVMe status.
        let (_admin, mut q) = common::host::connect_io(addr, nqn, HOST_PERF, 4);
        assert!(
            common::host::try_read_blocks(&mut q, 1, 0, 1, 512).is_err(),
            "a read of the removed drive must fail"
        );

        done.set();
        let (status, c, err) = guest.finish();
        assert!(
            status.success() && c.contains("SPDK-DONE"),
            "guest failed: run-guest.sh {status}\n{err}"
        );
        assert!(
            c.contains("the PCIe device was removed"),
            "nvseal did not log the SSD's removal"
        );
        assert!(
            c.contains("spdk_nvme: controller attached") && c.contains("trtype:PCIe"),
            "the guest's nvseal did not say it attached the PCIe controller"
        );
        // The I/O buffers come from SPDK's DMA memory: nothing was bounced through a copy.
        assert!(
            !c.contains("bouncing it through a copy"),
            "an I/O buffer was not DMA memory"
        );
        // QEMU wrote the SSD's blocks to its backing file: 512-byte blocks from LBA 0.
        assert_ciphertext_of_pattern(d, &fs::read(&ssd).unwrap(), 512);
    }

    /// Sends `cmd` to QEMU's human monitor on `sock`; what it answered.
    fn monitor(sock: &Path, cmd: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let read_prompt = |s: &mut std::os::unix::net::UnixStream| {
            let mut got = Vec::new();
            let mut b = [0u8; 512];
            while !String::from_utf8_lossy(&got).contains("(qemu) ") {
                let n = s.read(&mut b).expect("QEMU monitor did not answer");
                assert!(n > 0, "QEMU monitor closed");
                got.extend_from_slice(&b[..n]);
            }
            String::from_utf8_lossy(&got).into_owned()
        };
        read_prompt(&mut s);
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        read_prompt(&mut s)
    }

    /// Copies every shared library `bin` loads (as `ldd` resolves them here) into `dir` under
    /// its soname, except glibc's own (the guest's Debian 12 root has the same glibc).
    fn copy_libs(bin: &Path, dir: &Path) {
        const GLIBC: [&str; 8] = [
            "libc.so.",
            "libm.so.",
            "libpthread.so.",
            "libdl.so.",
            "librt.so.",
            "libresolv.so.",
            "libutil.so.",
            "ld-linux",
        ];
        let out = run_ok(Command::new("ldd").arg(bin));
        let mut n = 0;
        for line in out.lines() {
            let Some((name, rest)) = line.trim().split_once(" => ") else {
                continue;
            };
            let path = rest.split(" (").next().unwrap_or("").trim();
            assert!(
                !path.is_empty() && path != "not found",
                "{}: {name} not found ({line})",
                bin.display()
            );
            if GLIBC.iter().any(|g| name.starts_with(g)) {
                continue;
            }
            fs::copy(path, dir.join(name)).unwrap();
            n += 1;
        }
        assert!(
            n > 0,
            "ldd listed no libraries for {}:\n{out}",
            bin.display()
        );
    }
}
