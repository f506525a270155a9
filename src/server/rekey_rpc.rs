//! The conversion-pass RPC methods (`rekey.deep`, `namespace.encrypt`, `namespace.decrypt`,
//! and `rekey.pause`, `rekey.resume`, `rekey.status` for any of the three passes): parameter
//! parsing and the mapping of the key manager's errors to JSON-RPC errors. The work itself is
//! `KeyManager::deep_rekey`, `encrypt_namespace`, `decrypt_namespace` and friends
//! (src/keys/manager/deep.rs, encdec.rs).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::keys::manager::{DeepRekeyError, KeyManager};
use crate::rpc::{parse_params, CallContext, Role, RpcError, RpcServerBuilder};

fn who(ctx: &CallContext) -> String {
    format!(
        "uid={} gid={} pid={}",
        ctx.caller.uid, ctx.caller.gid, ctx.caller.pid
    )
}

fn rpc_error(e: DeepRekeyError) -> RpcError {
    match &e {
        DeepRekeyError::UnknownNamespace(ns) => RpcError::not_found("namespace", ns),
        DeepRekeyError::Busy { .. } => RpcError::busy(e.to_string()),
        DeepRekeyError::NotOnline { .. } | DeepRekeyError::Provider { .. } => {
            RpcError::unavailable(e.to_string())
        }
        DeepRekeyError::NothingToDo { .. }
        | DeepRekeyError::WrongState { .. }
        | DeepRekeyError::BadRate(_)
        | DeepRekeyError::UnknownProvider(_) => RpcError::invalid_params(e.to_string()),
        DeepRekeyError::Failed { .. } => RpcError::internal(e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeepParams {
    /// The encrypted namespace (bdev name).
    namespace: String,
    /// Wrap the new DEK under a new KEK created at this provider ("local" or a KMS cluster
    /// alias); absent = the namespace's current KEK.
    #[serde(default)]
    provider: Option<String>,
    /// MiB/s limit of the pass; absent = unlimited.
    #[serde(default)]
    rate_mib_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvertParams {
    /// The managed namespace (bdev name of its `encrypted` entry).
    namespace: String,
    /// MiB/s limit of the pass; absent = unlimited.
    #[serde(default)]
    rate_mib_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsParams {
    namespace: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeParams {
    namespace: String,
    #[serde(default)]
    rate_mib_s: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatusParams {
    #[serde(default)]
    namespace: Option<String>,
}

/// Registers the methods (crypto-admin for changes, viewer for status).
pub(super) fn register(b: RpcServerBuilder, km: Arc<KeyManager>) -> RpcServerBuilder {
    let (k1, k2, k3, k4) = (km.clone(), km.clone(), km.clone(), km.clone());
    let (k5, k6) = (km.clone(), km);
    b.method("rekey.deep", Role::Crypto, move |ctx, p| {
        let p: DeepParams = parse_params(p)?;
        let s = k1
            .deep_rekey(&who(ctx), &p.namespace, p.provider.as_deref(), p.rate_mib_s)
            .map_err(rpc_error)?;
        Ok(serde_json::to_value(s).unwrap_or(Value::Null))
    })
    .method("namespace.encrypt", Role::Crypto, move |ctx, p| {
        let p: ConvertParams = parse_params(p)?;
        let s = k5
            .encrypt_namespace(&who(ctx), &p.namespace, p.rate_mib_s)
            .map_err(rpc_error)?;
        Ok(serde_json::to_value(s).unwrap_or(Value::Null))
    })
    .method("namespace.decrypt", Role::Crypto, move |ctx, p| {
        let p: ConvertParams = parse_params(p)?;
        let s = k6
            .decrypt_namespace(&who(ctx), &p.namespace, p.rate_mib_s)
            .map_err(rpc_error)?;
        Ok(serde_json::to_value(s).unwrap_or(Value::Null))
    })
    .method("rekey.pause", Role::Crypto, move |ctx, p| {
        let p: NsParams = parse_params(p)?;
        let s = k2.pause_rekey(&who(ctx), &p.namespace).map_err(rpc_error)?;
        Ok(serde_json::to_value(s).unwrap_or(Value::Null))
    })
    .method("rekey.resume", Role::Crypto, move |ctx, p| {
        let p: ResumeParams = parse_params(p)?;
        let s = k3
            .resume_rekey(&who(ctx), &p.namespace, p.rate_mib_s)
            .map_err(rpc_error)?;
        Ok(serde_json::to_value(s).unwrap_or(Value::Null))
    })
    .method("rekey.status", Role::Viewer, move |_ctx, p| {
        let p: StatusParams = if p.is_null() {
            StatusParams::default()
        } else {
            parse_params(p)?
        };
        let v = k4.rekey_status(p.namespace.as_deref()).map_err(rpc_error)?;
        Ok(json!({ "rekeys": v }))
    })
}
