//! Configuration of the key manager: the `keys:` section (local key file, KMIP clusters,
//! unlock back-off, audit log) and each encrypted namespace's key settings.
//!
//! Plain serde types and their validation; parsed on the start-up thread (config load) and read
//! by [`super::KeyManager::new`] and the RPC handlers on control threads. Split out of the
//! manager so that the configuration surface can be read apart from the machinery behind it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ManagerError;
use crate::kms::KmsClusterConfig;

/// Name of the local key provider in [`NamespaceKeyConfig::provider`].
pub const LOCAL_PROVIDER: &str = "local";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Key-management configuration (the `keys:` section of the YAML).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// KMIP clusters; each alias is a provider name.
    #[serde(default)]
    pub kms_clusters: Vec<KmsClusterConfig>,
    /// The local key file (development and perf labs only).
    #[serde(default)]
    pub local: Option<LocalKeysConfig>,
    /// Back-off of boot-time unlock retries while the KMS is unreachable.
    #[serde(default)]
    pub unlock_retry: RetryConfig,
    /// Append one JSON line per crypto operation to this file.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Run even if key memory cannot be locked in RAM (`mlock` fails, usually for lack of
    /// `RLIMIT_MEMLOCK`): keys may then be swapped out to disk. Default false: start-up fails.
    #[serde(default)]
    pub allow_unlocked_memory: bool,
}

/// The local key file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalKeysConfig {
    /// Path of the key file.
    pub path: PathBuf,
    /// Create the file (mode 0600, one fresh KEK `default`) if it is missing.
    #[serde(default)]
    pub create: bool,
}

/// Exponential back-off: the n-th retry waits `initial_ms * 2^(n-1)`, capped at `max_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First wait (default 1 s: a KMS that restarts is usually back within seconds).
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    /// Longest wait (default 60 s, the KMS response timeout vCenter uses: retrying more often
    /// than a request can time out only adds load on a struggling KMS).
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
}

fn default_initial_ms() -> u64 {
    1_000
}

fn default_max_ms() -> u64 {
    60_000
}

/// Longest back-off accepted: beyond an hour a locked namespace looks dead to operators.
const RETRY_MAX_MS_LIMIT: u64 = 3_600_000;

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
        }
    }
}

impl RetryConfig {
    /// Checks 1 ≤ initial_ms ≤ max_ms ≤ 1 h.
    pub fn validate(&self) -> Result<(), ManagerError> {
        if self.initial_ms == 0 || self.initial_ms > self.max_ms || self.max_ms > RETRY_MAX_MS_LIMIT
        {
            return Err(ManagerError::Config(format!(
                "unlock_retry: need 1 <= initial_ms ({}) <= max_ms ({}) <= {RETRY_MAX_MS_LIMIT}",
                self.initial_ms, self.max_ms
            )));
        }
        Ok(())
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(32);
        let ms = self
            .initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_ms);
        Duration::from_millis(ms)
    }
}

/// Key settings of one encrypted namespace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceKeyConfig {
    /// `"local"` or a KMS cluster alias: where a new namespace's KEK comes from. An existing
    /// namespace is always opened with the provider its header names.
    pub provider: String,
    /// KEK for a new namespace. KMIP: the KEK Name (Locate; created and activated if no key has
    /// it). Local: the KEK id in the key file. Unset: the provider's current KEK (the one the
    /// last rekey or format created), else a new KEK (KMIP) or `default` (local).
    #[serde(default)]
    pub kek_name: Option<String>,
}
