//! `nvseal rpc`: one JSON-RPC call on the control socket.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    nvseal rpc rpc.methods\n  \
    nvseal rpc subsystems.list\n  \
    nvseal rpc keys.status\n  \
    nvseal rpc kms.status\n  \
    nvseal rpc rekey.shallow '{\"provider\":\"kms-b\"}'\n\n\
    Exit codes: 0 result printed, 1 JSON-RPC error (message on stderr), 2 params are not JSON,\n\
    3 cannot reach the socket.")]
pub struct RpcArgs {
    /// Control socket of the running `nvseal serve` (its `rpc.socket_path`).
    #[arg(short, long, env = "NVSEAL_RPC_SOCKET", default_value = nvseal::rpc::config::DEFAULT_SOCKET_PATH)]
    pub socket: PathBuf,
    /// Method name (`rpc.methods` lists them with the role each needs).
    pub method: String,
    /// Parameters as one JSON object or array.
    pub params: Option<String>,
}

pub fn run(a: RpcArgs) -> ExitCode {
    nvseal::rpc::client::cli_main(&a.socket, &a.method, a.params.as_deref())
}
