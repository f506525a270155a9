//! Fuzzes the JSON-RPC request handling (framing, parsing, dispatch, role checks) in process:
//! hostile requests must give a JSON-RPC error, never a panic. Run: `cargo +nightly fuzz run rpc`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvseal::rpc::config::RpcConfig;
use nvseal::rpc::{Caller, RpcServer};
use std::sync::OnceLock;

fn server() -> &'static RpcServer {
    static S: OnceLock<RpcServer> = OnceLock::new();
    S.get_or_init(|| {
        let cfg: RpcConfig = serde_yaml_ng::from_str("socket_path: /nonexistent/fuzz.sock\n").expect("config");
        RpcServer::builder(cfg).build().expect("server")
    })
}

fuzz_target!(|data: &[u8]| {
    for uid in [0u32, 65534] {
        let _ = server().handle_line(Caller { uid, gid: uid, pid: 1 }, data);
    }
});
