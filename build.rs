//! Build script: records the git revision for `nvseal --version`-style reports (support bundles,
//! JSON outputs), so a result can always be traced to the code that produced it; and, with the
//! `spdk` feature, binds and links the installed SPDK (docs/spdk.md): pkg-config finds it,
//! bindgen reads our `vendor/spdk/nvseal_spdk.h` (an allow-list keeps the bindings to what
//! `src/spdk/` calls), `cc` compiles our shim for SPDK's macros, and the generated bindings go to
//! `OUT_DIR`, never into git.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    let rev = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=NVSEAL_GIT_REV={rev}");
    #[cfg(feature = "spdk")]
    spdk::build();
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::env;
    use std::path::PathBuf;

    /// Oldest SPDK release the binding is written for (the `opts_size` fields of the env,
    /// controller and qpair options, `spdk_nvme_ctrlr_disconnect`/`reconnect_poll_async`).
    const MIN_VERSION: &str = "24.01";
    /// First release not accepted: its API has not been checked yet.
    const MAX_VERSION_EXCLUSIVE: &str = "26.0";
    /// The pkg-config packages: the NVMe driver, the DPDK environment, and the system libraries
    /// they pull in (linked from their `--static` list, because SPDK's shared `libspdk_util`
    /// does not record its ISA-L dependency).
    const PACKAGES: [&str; 2] = ["spdk_nvme", "spdk_env_dpdk"];
    const SYSLIBS: &str = "spdk_syslibs";

    /// Fails the build with one message that says what is needed and where it was looked for.
    fn fail(why: &str) -> ! {
        let path = env::var("PKG_CONFIG_PATH").unwrap_or_else(|_| "(unset)".into());
        println!(
            "cargo::error=the `spdk` feature needs SPDK {MIN_VERSION} or newer (below {MAX_VERSION_EXCLUSIVE}; tested with 25.09) installed with its pkg-config files ({}.pc, {SYSLIBS}.pc); looked for with pkg-config, PKG_CONFIG_PATH={path}: {why}. Install SPDK (e.g. `make install` with --prefix=/opt/spdk) and set PKG_CONFIG_PATH=/opt/spdk/lib/pkgconfig, or build without --features spdk.",
            PACKAGES.join(".pc, ")
        );
        std::process::exit(1);
    }

    pub fn build() {
        println!("cargo:rerun-if-changed=vendor/spdk/nvseal_spdk.h");
        println!("cargo:rerun-if-changed=vendor/spdk/shim.c");
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
        let mut includes: Vec<PathBuf> = Vec::new();
        let mut link_paths: Vec<PathBuf> = Vec::new();
        let mut libs: Vec<String> = Vec::new();
        for pkg in PACKAGES {
            let lib = pkg_config::Config::new()
                .cargo_metadata(false)
                .probe(pkg)
                .unwrap_or_else(|e| fail(&e.to_string()));
            includes.extend(lib.include_paths);
            link_paths.extend(lib.link_paths);
            libs.extend(lib.libs);
        }
        let sys = pkg_config::Config::new()
            .cargo_metadata(false)
            .statik(true)
            .probe(SYSLIBS)
            .unwrap_or_else(|e| fail(&e.to_string()));
        link_paths.extend(sys.link_paths);
        libs.extend(sys.libs);
        includes.sort();
        includes.dedup();
        // The .pc files carry the shared libraries' ABI version, not SPDK's release: read the
        // release from the headers the bindings are made from.
        let version = release(&includes).unwrap_or_else(|| {
            fail("spdk/version.h (SPDK_VERSION_MAJOR/MINOR) not found under the include paths pkg-config gave")
        });
        if version_below(&version, MIN_VERSION) {
            fail(&format!(
                "found SPDK {version}, older than this binding needs"
            ));
        }
        if !version_below(&version, MAX_VERSION_EXCLUSIVE) {
            fail(&format!(
                "found SPDK {version}, which is newer than this binding knows"
            ));
        }
        link_paths.sort();
        link_paths.dedup();
        let mut seen = std::collections::BTreeSet::new();
        libs.retain(|l| seen.insert(l.clone()));

        // DT_RPATH, not DT_RUNPATH: SPDK's and DPDK's libraries find their own dependencies
        // (librte_timer under librte_power, ...) through it too.
        println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
        for p in &link_paths {
            println!("cargo:rustc-link-search=native={}", p.display());
            // The libraries are found at run time where they were found at build time.
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", p.display());
        }
        // DPDK's drivers (PCI bus, mempool ring) register themselves from constructors: nothing
        // references their symbols, so an as-needed link would drop them and SPDK's env would
        // start with no mempool handler. Keep every library named (link arguments come after
        // the objects on the linker's command line, so the libraries resolve them).
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        for l in &libs {
            println!("cargo:rustc-link-arg=-l{l}");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-env=NVSEAL_SPDK_VERSION={version}");

        let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
        let mut cc = cc::Build::new();
        cc.file("vendor/spdk/shim.c").warnings(true);
        for i in &includes {
            cc.include(i);
        }
        cc.compile("nvseal_spdk_shim");

        let mut b = bindgen::Builder::default()
            .header("vendor/spdk/nvseal_spdk.h")
            .allowlist_function("nvseal_spdk_.*")
            .allowlist_function("spdk_env_(opts_init|init|get_core_count)")
            .allowlist_function("spdk_(dma_zmalloc|dma_free|vtophys|mem_register|mem_unregister)")
            .allowlist_function("spdk_nvme_transport_id_(parse|compare)")
            .allowlist_function("spdk_nvme_(connect|detach|scan_attached)")
            .allowlist_function("spdk_nvme_ctrlr_(get_default_ctrlr_opts|get_default_io_qpair_opts|alloc_io_qpair|free_io_qpair|reconnect_io_qpair|disconnect_io_qpair|process_admin_completions|is_failed|reset|fail|get_ns|get_max_xfer_size|register_aer_callback|register_timeout_callback|get_num_ns|set_remove_cb)")
            .allowlist_function("spdk_nvme_qpair_(process_completions|get_failure_reason|is_connected)")
            .allowlist_function("spdk_nvme_ns_(is_active|get_sector_size|get_num_sectors|get_flags|get_max_io_xfer_size|get_md_size|get_pi_type)")
            .allowlist_function("spdk_nvme_ns_cmd_(read|write|flush|write_zeroes|dataset_management)")
            .allowlist_type("spdk_nvme_(cpl|dsm_range|ctrlr_opts|io_qpair_opts|transport_id)")
            .allowlist_type("spdk_env_opts")
            .allowlist_var("SPDK_NVME_IO_FLAGS_FORCE_UNIT_ACCESS")
            .opaque_type("spdk_nvme_ctrlr_data")
            .allowlist_type("spdk_nvme_dsm_attribute|spdk_nvme_ns_flags|spdk_nvme_qp_failure_reason")
            .rustified_enum("spdk_nvme_qp_failure_reason")
            .derive_default(true)
            .layout_tests(false)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for i in &includes {
            b = b.clang_arg(format!("-I{}", i.display()));
        }
        let bindings = b
            .generate()
            .unwrap_or_else(|e| fail(&format!("bindgen over vendor/spdk/nvseal_spdk.h: {e}")));
        bindings
            .write_to_file(out.join("spdk_bindings.rs"))
            .expect("write spdk_bindings.rs");
    }

    /// SPDK's release ("25.09") from `spdk/version.h` under one of `includes`.
    fn release(includes: &[PathBuf]) -> Option<String> {
        let text = includes
            .iter()
            .find_map(|i| std::fs::read_to_string(i.join("spdk/version.h")).ok())?;
        let num = |name: &str| -> Option<u32> {
            text.lines().find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("#define") && w.next() == Some(name))
                    .then(|| w.next()?.parse().ok())
                    .flatten()
            })
        };
        Some(format!(
            "{}.{:02}",
            num("SPDK_VERSION_MAJOR")?,
            num("SPDK_VERSION_MINOR")?
        ))
    }

    /// Whether `found` ("25.09") is below `limit`.
    fn version_below(found: &str, limit: &str) -> bool {
        let parse =
            |s: &str| -> Vec<u32> { s.split(['.', '-']).map_while(|p| p.parse().ok()).collect() };
        parse(found) < parse(limit)
    }
}
