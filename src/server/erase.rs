//! Crypto erase glue: the nvmf layer's [`CryptoEraser`] over the key manager (Format NVM and
//! Sanitize from hosts) and the `namespace.crypto_erase` RPC method. Control threads only (the
//! nvmf erase thread, RPC handlers). Split out of `server.rs` so the RPC table stays one line per
//! method; the erase itself is `KeyManager::crypto_erase`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::keys::manager::{CryptoEraseError, KeyManager};
use crate::nvmf::erase::{CryptoEraser, EraseError};
use crate::nvmf::target::Target;
use crate::rpc::{parse_params, CallContext, RpcError};

/// The key manager as the nvmf layer's eraser. A namespace's bdev name is its key manager id
/// (the stand-in bdev of a managed-key namespace carries the encrypted bdev's name).
pub(super) struct KeyEraser(pub(super) Arc<KeyManager>);

impl CryptoEraser for KeyEraser {
    fn can_crypto_erase(&self, bdev_name: &str) -> bool {
        self.0.is_managed(bdev_name)
    }

    fn crypto_erase(&self, who: &str, bdev_name: &str) -> Result<(), EraseError> {
        self.0
            .crypto_erase(who, bdev_name)
            .map(|_| ())
            .map_err(|e| match e {
                CryptoEraseError::NotEncrypted(_) => EraseError::NotEncrypted(e.to_string()),
                CryptoEraseError::NotOnline { .. } => EraseError::NotReady(e.to_string()),
                CryptoEraseError::Busy { .. } => EraseError::Busy(e.to_string()),
                CryptoEraseError::Failed { .. }
                | CryptoEraseError::Incomplete { .. }
                | CryptoEraseError::Stuck { .. } => EraseError::Failed(e.to_string()),
            })
    }
}

/// `namespace.crypto_erase {bdev}` or `{nqn, nsid}` (crypto role): replaces the namespace's DEK;
/// returns the erase report. Refusals are JSON-RPC errors that say why; nothing is changed then.
pub(super) fn crypto_erase_rpc(
    target: &Target,
    km: &KeyManager,
    ctx: &CallContext,
    p: &Value,
) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        /// The encrypted bdev (key manager namespace id).
        #[serde(default)]
        bdev: Option<String>,
        /// Or the subsystem and namespace exporting it.
        #[serde(default)]
        nqn: Option<String>,
        #[serde(default)]
        nsid: Option<u32>,
    }
    let p: P = parse_params(p)?;
    let bdev = match (p.bdev, p.nqn, p.nsid) {
        (Some(b), None, None) => b,
        (None, Some(nqn), Some(nsid)) => {
            let s = target
                .subsystem(&nqn)
                .ok_or_else(|| RpcError::not_found("subsystem", &nqn))?;
            let ns = s
                .namespace(nsid)
                .ok_or_else(|| RpcError::not_found("namespace", &format!("{nqn} nsid {nsid}")))?;
            ns.bdev.name().to_owned()
        }
        _ => {
            return Err(RpcError::invalid_params(
                "give either bdev, or nqn and nsid",
            ))
        }
    };
    ctx.audit.set(format!("crypto erase of {bdev}"));
    let who = format!(
        "uid={} gid={} pid={}",
        ctx.caller.uid, ctx.caller.gid, ctx.caller.pid
    );
    match km.crypto_erase(&who, &bdev) {
        Ok(report) => Ok(serde_json::to_value(report).unwrap_or(Value::Null)),
        Err(e @ CryptoEraseError::Busy { .. }) => Err(RpcError::busy(e.to_string())),
        Err(e @ CryptoEraseError::NotOnline { .. }) => Err(RpcError::unavailable(e.to_string())),
        Err(e @ CryptoEraseError::NotEncrypted(_)) => Err(RpcError::invalid_params(e.to_string())),
        Err(e) => Err(RpcError::internal(e.to_string())),
    }
}
