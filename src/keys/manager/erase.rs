//! Crypto erase of an online encrypted namespace (docs/lifecycle.md §5): a fresh DEK replaces
//! the namespace's DEK, so everything written before reads back as unrelated bytes.
//!
//! Runs on the caller's control thread (an RPC handler, or the nvmf layer's erase worker for
//! Format NVM and Sanitize), serialized with rekeys and removals by the manager's rekey lock; it
//! blocks for one KEK fetch, a short pause of the namespace's host I/O and three durable writes
//! to the metadata region. Split out of the manager because the ordering below is what makes
//! it crash-safe and is best read on its own.
//!
//! Order, with host I/O parked for steps 3 to 6 only:
//! 1. refuse unless the namespace is online, no deep rekey is recorded in the header and the
//!    data path is keyed by one key (no conversion in flight);
//! 2. fetch the active slot's KEK, check it against the header's fingerprint, generate the new
//!    DEK and wrap it (the KMS round trip happens before any I/O is paused);
//! 3. park all host I/O on the crypto bdev ([`KeyControl::quiesce_all`]): I/O in flight drains,
//!    new I/O is answered Busy and resubmitted by its submitter later;
//! 4. zero the journal area (a deep rekey's segment copy is old-key ciphertext);
//! 5. write the new header (active slot = new wrapped DEK, no rekey state) — one durable update;
//! 6. install the new key on the data path; I/O resumes under it;
//! 7. write the same header over the other copy, so no copy on the device still holds the old
//!    wrapped DEK.
//!
//! A failure before step 5 is durable puts the old keying back (I/O resumes under the old key,
//! which is the one on disk) and reports that nothing changed. If the write in step 5 cannot be
//! proven durable the header is written once more into the other copy; only if that is not
//! durable either is the namespace left parked (host I/O keeps getting Busy), since neither key
//! is then proven to be the one on disk and acknowledging a write under the wrong one would lose
//! it. A failure in step 7 leaves the erase done (the current copy holds the new DEK) but the
//! stale copy still holding the old wrapped DEK until the next header update: reported as
//! [`CryptoEraseError::Incomplete`], and the next crypto erase or rekey rewrites it.
//!
//! The old DEK itself is never unwrapped here. Its expanded XTS key is freed (and zeroized) when
//! the last holder drops it: the key map at step 6, each channel's cached copy when the channel
//! next submits an I/O or closes.

use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use super::{lock, Inner, KeyManager, NamespaceKeyState};
use crate::crypto::bdev::DataKey;
use crate::crypto::key::XtsKey;
use crate::crypto::keymap::{KeyControl, Keying};
use crate::keys::header::{Header, RekeyState};
use crate::keys::store::{self, HeaderIo, StoreError, Stored, UpdateState};
use crate::keys::wrap::Dek;
use crate::keys::{convert, now_unix_s, rekey};

/// How long step 3 waits for host I/O in flight to drain (one I/O latency in practice; a
/// backend stuck for this long makes the erase refuse as busy, with the old key kept).
pub const ERASE_QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a crypto erase did. Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CryptoEraseReport {
    /// The namespace (encrypted bdev) name.
    pub ns_id: String,
    /// Namespace UUID (unchanged: the namespace keeps its identity, only its data is gone).
    pub namespace_uuid: String,
    /// Provider of the KEK the new DEK is wrapped under (the namespace's active KEK).
    pub kek_provider: String,
    /// That KEK.
    pub kek_id: String,
    /// Header generation after the erase.
    pub header_generation: u64,
}

/// Why a crypto erase did not happen, or did not finish.
#[derive(Debug, Error)]
pub enum CryptoEraseError {
    /// No encrypted namespace of that name is registered (a plaintext namespace, or a typo).
    #[error("{0:?} is not an encrypted namespace under key management; nothing was changed")]
    NotEncrypted(String),
    /// The namespace is locked, unlocking or in error: there is no key to replace.
    #[error("namespace {ns_id} is not online ({state}); nothing was changed")]
    NotOnline {
        /// Namespace.
        ns_id: String,
        /// Its key state.
        state: String,
    },
    /// A deep rekey or conversion is in progress, or host I/O did not drain in time.
    #[error("namespace {ns_id} is busy: {reason}; nothing was changed")]
    Busy {
        /// Namespace.
        ns_id: String,
        /// Why.
        reason: String,
    },
    /// Reading the header, the KMS or a header write failed before the new DEK was durable:
    /// the old DEK is still the namespace's key and I/O goes on under it.
    #[error("namespace {ns_id}: crypto erase failed, the old key stays: {reason}")]
    Failed {
        /// Namespace.
        ns_id: String,
        /// Why.
        reason: String,
    },
    /// The new DEK is on disk and in use (data written before is gone), but the other header
    /// copy could not be rewritten: it still holds the old wrapped DEK. Run the erase again.
    #[error("namespace {ns_id}: data erased, but {reason}; run the crypto erase again")]
    Incomplete {
        /// Namespace.
        ns_id: String,
        /// Why.
        reason: String,
    },
    /// Neither the old nor the new header is proven durable: host I/O to the namespace stays
    /// parked until nvseal is restarted and reopens the header.
    #[error("namespace {ns_id}: the new header could not be made durable ({reason}); host I/O stays paused until nvseal reopens the device")]
    Stuck {
        /// Namespace.
        ns_id: String,
        /// Why.
        reason: String,
    },
}

impl KeyManager {
    /// Crypto-erases encrypted namespace `ns_id` (see the module documentation of
    /// `keys::manager::erase` for the steps and what each failure leaves behind). Blocks for a
    /// KEK fetch, a short pause of the namespace's host I/O and three header writes; waits for
    /// a rekey in progress. `who` is recorded in the audit log (op `crypto-erase`).
    pub fn crypto_erase(
        &self,
        who: &str,
        ns_id: &str,
    ) -> Result<CryptoEraseReport, CryptoEraseError> {
        self.inner.crypto_erase(who, ns_id)
    }

    /// Whether `ns_id` is an encrypted namespace under key management (whatever its state):
    /// the only kind a crypto erase applies to.
    pub fn is_managed(&self, ns_id: &str) -> bool {
        lock(&self.inner.namespaces).contains_key(ns_id)
    }
}

impl Inner {
    pub(super) fn crypto_erase(
        &self,
        who: &str,
        ns_id: &str,
    ) -> Result<CryptoEraseReport, CryptoEraseError> {
        let _serial = lock(&self.rekey_lock);
        let result = self.erase_serialized(ns_id);
        match &result {
            Ok(r) => {
                self.audit(
                    who,
                    "crypto-erase",
                    ns_id,
                    &format!(
                        "ok: new DEK under {}/{}, generation {}",
                        r.kek_provider, r.kek_id, r.header_generation
                    ),
                );
                tracing::info!(namespace = %ns_id, who, kek = %r.kek_id,
                    generation = r.header_generation,
                    "crypto erase done: new DEK active, both header copies rewritten");
            }
            Err(e) => {
                self.audit(who, "crypto-erase", ns_id, &format!("error: {e}"));
                tracing::error!(namespace = %ns_id, who, error = %e, "crypto erase refused or failed");
            }
        }
        result
    }

    fn erase_serialized(&self, ns_id: &str) -> Result<CryptoEraseReport, CryptoEraseError> {
        let failed = |reason: String| CryptoEraseError::Failed {
            ns_id: ns_id.to_owned(),
            reason,
        };
        let busy = |reason: String| CryptoEraseError::Busy {
            ns_id: ns_id.to_owned(),
            reason,
        };
        let (io, crypto) = {
            let table = lock(&self.namespaces);
            let e = table
                .get(ns_id)
                .ok_or_else(|| CryptoEraseError::NotEncrypted(ns_id.to_owned()))?;
            match (&e.state, &e.crypto) {
                (NamespaceKeyState::Online, Some(c)) => (e.io.clone(), c.clone()),
                (state, _) => {
                    return Err(CryptoEraseError::NotOnline {
                        ns_id: ns_id.to_owned(),
                        state: format!("{state:?}"),
                    })
                }
            }
        };
        if crypto.key_control().keying().is_plain() {
            return Err(CryptoEraseError::NotEncrypted(ns_id.to_owned()));
        }
        let mut io = lock(&io);
        let current = store::read_header(&mut **io).map_err(|e| failed(e.to_string()))?;
        match &current.header.rekey {
            RekeyState::Deep(_) => return Err(busy("a deep rekey is in progress".into())),
            RekeyState::Convert(c) => {
                return Err(busy(format!(
                    "an {} pass is in progress",
                    c.direction.as_str()
                )))
            }
            RekeyState::None | RekeyState::Shallow { .. } => {}
        }
        let ctl = crypto.key_control();
        if matches!(ctl.keying(), Keying::Split(_)) {
            return Err(busy("a conversion is running on the data path".into()));
        }

        // Step 2: new DEK wrapped under the active KEK, before any I/O is paused.
        let active = &current.header.active;
        let provider = self.provider_for_slot(active).map_err(failed)?.clone();
        let new_dek = Dek::generate().map_err(|e| failed(format!("generating the DEK: {e}")))?;
        let new_slot = {
            let mut p = lock(&provider.inner);
            let kek = p
                .as_dyn()
                .get_kek(&active.kek_id)
                .map_err(|e| failed(format!("fetching KEK {}: {e}", active.kek_id)))?;
            if !kek.matches(&active.fingerprint) {
                return Err(failed(format!(
                    "KEK {} at {} does not match the fingerprint in the header",
                    active.kek_id, provider.name
                )));
            }
            rekey::slot_for(p.as_dyn(), &active.kek_id, &kek, &new_dek)
        };
        let xts = XtsKey::from_bytes(new_dek.expose())
            .map_err(|e| failed(format!("new DEK unusable: {e}")))?;
        drop(new_dek);
        let key = DataKey::new(&xts, self.xts_max_tier)
            .map_err(|e| failed(format!("XTS engine: {e}")))?;
        drop(xts);
        let mut next = current.header.clone();
        next.active = new_slot;
        next.rekey = RekeyState::None;
        next.updated_unix_s = now_unix_s();

        // Step 3: park host I/O.
        let old = ctl.keying();
        if let Err(e) = ctl.quiesce_all(key.clone(), ERASE_QUIESCE_TIMEOUT) {
            ctl.set_keying(old);
            return Err(busy(format!("host I/O did not drain: {e}")));
        }
        // Steps 4 and 5.
        let first = match write_new_header(&mut **io, &current, &next) {
            Ok(s) => s,
            Err(WriteFail::OldCurrent(reason)) => {
                ctl.set_keying(old);
                return Err(failed(reason));
            }
            Err(WriteFail::Unproven(reason)) => {
                // Stay parked: see the module docs. The old keying is dropped (the data path
                // holds the parked split, which decrypts nothing).
                drop(old);
                return Err(CryptoEraseError::Stuck {
                    ns_id: ns_id.to_owned(),
                    reason,
                });
            }
        };
        // Step 6.
        resume(ctl, key, old);
        self.note_header(ns_id, &first);
        // Step 7.
        let last = match store::update(&mut **io, &first, &first.header.clone()) {
            Ok(s) => s,
            Err(e) => {
                return Err(CryptoEraseError::Incomplete {
                    ns_id: ns_id.to_owned(),
                    reason: format!(
                        "rewriting the other header copy failed ({e}); it may still hold the old wrapped DEK"
                    ),
                })
            }
        };
        self.note_header(ns_id, &last);
        let active = &last.header.active;
        Ok(CryptoEraseReport {
            ns_id: ns_id.to_owned(),
            namespace_uuid: last.header.namespace_uuid.to_string(),
            kek_provider: provider.name.clone(),
            kek_id: active.kek_id.to_string(),
            header_generation: last.header.generation,
        })
    }
}

/// Installs the new key and lets host I/O back in; the old keying goes with the last holder.
fn resume(ctl: &KeyControl, key: DataKey, old: Keying) {
    ctl.set_keying(Keying::Single(key));
    drop(old);
}

/// Why steps 4-5 did not make the new header durable.
enum WriteFail {
    /// The old header is what the device holds: nothing changed.
    OldCurrent(String),
    /// Neither header is proven durable.
    Unproven(String),
}

/// Steps 4 and 5: zero the journal, then one durable header update. A write whose flush failed
/// but that reads back as current is written once more into the other copy; `Ok` only once a
/// copy holding `next` is known durable.
fn write_new_header(
    io: &mut dyn HeaderIo,
    current: &Stored,
    next: &Header,
) -> Result<Stored, WriteFail> {
    convert::clear_journal(io)
        .map_err(|e| WriteFail::OldCurrent(format!("zeroing the journal area: {e}")))?;
    match store::update(io, current, next) {
        Ok(s) => Ok(s),
        Err(StoreError::UpdateFlushFailed {
            state: UpdateState::NewNotDurable(found),
            source,
        }) => {
            tracing::warn!(namespace = %current.header.namespace_uuid, error = %source,
                "crypto erase: header flush failed but the new header reads back; writing it again");
            store::update(io, &found, &found.header.clone()).map_err(|e| {
                WriteFail::Unproven(format!(
                    "flush failed ({source}), and writing the header again failed too ({e})"
                ))
            })
        }
        Err(StoreError::UpdateFlushFailed {
            state: UpdateState::OldCurrent,
            source,
        }) => Err(WriteFail::OldCurrent(format!(
            "header write not flushed ({source}); the old header is current"
        ))),
        Err(StoreError::UpdateFlushFailed {
            state: UpdateState::Unknown(why),
            source,
        }) => Err(WriteFail::Unproven(format!(
            "header flush failed ({source}); {why}"
        ))),
        Err(e) => Err(WriteFail::OldCurrent(format!("writing the header: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::audit::AuditSink;
    use crate::bdev::malloc::{self, MallocConfig};
    use crate::bdev::{run_blocking, Bdev, BdevIo, BufPool, IoStatus, IoType};
    use crate::keys::header::{CopyId, DeepRekeyState, METADATA_REGION_BYTES};
    use crate::keys::header_io::BdevHeaderIo;
    use crate::keys::manager::{
        KeysConfig, LocalKeysConfig, ManagerOptions, NamespaceKeyConfig, LOCAL_PROVIDER,
    };
    use crate::types::CoreId;

    const BS: usize = 4096;

    #[derive(Default)]
    struct Audit(Mutex<Vec<String>>);
    impl AuditSink for Audit {
        fn record(&self, who: &str, op: &str, target: &str, result: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{who}|{op}|{target}|{result}"));
        }
    }

    fn manager(dir: &std::path::Path, audit: Arc<Audit>) -> KeyManager {
        let cfg = KeysConfig {
            local: Some(LocalKeysConfig {
                path: dir.join("keys"),
                create: true,
            }),
            ..KeysConfig::default()
        };
        KeyManager::new(
            &cfg,
            ManagerOptions {
                audit: Some(audit),
                ..ManagerOptions::default()
            },
        )
        .expect("manager")
    }

    fn online(m: &KeyManager, dev: &Arc<dyn Bdev>) -> Arc<dyn Bdev> {
        let hio = BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
        let key = NamespaceKeyConfig {
            provider: LOCAL_PROVIDER.into(),
            kek_name: None,
        };
        m.add_encrypted("test", "ns1", dev.clone(), Box::new(hio), &key, true)
            .expect("add");
        let st = m
            .wait_for("ns1", Duration::from_secs(30), |s| {
                *s == NamespaceKeyState::Online
            })
            .expect("status");
        assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
        m.bdev("ns1").expect("crypto bdev")
    }

    fn io(b: &dyn Bdev, lba: u64, write: Option<&[u8]>) -> Vec<u8> {
        let mut pool = BufPool::new(1, BS, 4096).expect("pool");
        let mut buf = pool.get(BS).expect("buf");
        let t = match write {
            Some(d) => {
                buf.as_mut_slice().copy_from_slice(d);
                IoType::Write
            }
            None => IoType::Read,
        };
        let done = run_blocking(
            b,
            CoreId(0),
            BdevIo::new(t, lba, 1, Some(buf), 0),
            Duration::from_secs(10),
        )
        .expect("io");
        assert_eq!(done.status, IoStatus::Success);
        done.buf.expect("buf").as_slice().to_vec()
    }

    fn meta(dev: &Arc<dyn Bdev>) -> BdevHeaderIo {
        BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio")
    }

    fn image(dev: &Arc<dyn Bdev>) -> Vec<u8> {
        let mut v = vec![0u8; METADATA_REGION_BYTES as usize];
        meta(dev).read_at(0, &mut v).expect("read");
        v
    }

    fn wrapped(dev: &Arc<dyn Bdev>) -> [Vec<u8>; 2] {
        let mut io = meta(dev);
        [CopyId::A, CopyId::B].map(|c| {
            store::read_copy(&mut io, c)
                .expect("copy")
                .active
                .wrapped_dek
                .as_bytes()
                .to_vec()
        })
    }

    fn dev() -> Arc<dyn Bdev> {
        malloc::open(&MallocConfig {
            name: "m-erase".into(),
            num_blocks: None,
            size_bytes: Some(METADATA_REGION_BYTES + 16 * BS as u64),
            block_size: BS as u32,
            hugepages: false,
        })
        .expect("malloc")
    }

    /// Issue 14 §3: the erase replaces the DEK on the data path and in both header copies (the
    /// old wrapped DEK is nowhere in the metadata region, the journal is zeroed), data written
    /// before reads back as other bytes, new writes work, and a restart opens the namespace
    /// with the new DEK (what the data path used is what is on disk).
    #[test]
    fn crypto_erase_replaces_the_dek_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Arc::new(Audit::default());
        let d = dev();
        let m = manager(dir.path(), audit.clone());
        let b = online(&m, &d);
        let old_data = vec![0x5a; BS];
        io(b.as_ref(), 3, Some(&old_data));
        assert_eq!(io(b.as_ref(), 3, None), old_data);
        let before = wrapped(&d);
        let gen_before = m.state("ns1").and_then(|s| s.header_generation);
        // Something in the journal area, as a deep rekey would leave.
        meta(&d)
            .write_at(convert::JOURNAL_OFFSET_BYTES + 4096, &[0xee; 512])
            .expect("journal");

        let r = m.crypto_erase("tester", "ns1").expect("erase");
        assert_eq!(Some(r.header_generation), gen_before.map(|g| g + 2));

        let after = wrapped(&d);
        let img = image(&d);
        for old in &before {
            assert!(
                !after.contains(old),
                "a header copy still holds the old wrapped DEK"
            );
            assert!(
                !img.windows(old.len()).any(|w| w == &old[..]),
                "the old wrapped DEK is still in the metadata region"
            );
        }
        assert_eq!(after[0], after[1], "both copies hold the new wrapped DEK");
        let j = convert::JOURNAL_OFFSET_BYTES as usize;
        assert!(img[j..].iter().all(|&x| x == 0), "journal area zeroed");

        assert_ne!(io(b.as_ref(), 3, None), old_data, "old data still readable");
        let new_data = vec![0xc3; BS];
        io(b.as_ref(), 4, Some(&new_data));
        assert_eq!(io(b.as_ref(), 4, None), new_data);
        assert!(audit
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("tester|crypto-erase|ns1|ok")));
        drop(b);
        drop(m);

        let m = manager(dir.path(), audit);
        let b = online(&m, &d);
        assert_eq!(
            io(b.as_ref(), 4, None),
            new_data,
            "restart opens the new DEK"
        );
        assert_ne!(io(b.as_ref(), 3, None), old_data);
    }

    /// Refusals change nothing: an unknown (plaintext) namespace, a header with a deep rekey in
    /// progress (busy). The data path keeps its key.
    #[test]
    fn crypto_erase_refusals_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Arc::new(Audit::default());
        let d = dev();
        let m = manager(dir.path(), audit.clone());
        let b = online(&m, &d);
        let data = vec![0x11; BS];
        io(b.as_ref(), 0, Some(&data));

        assert!(matches!(
            m.crypto_erase("tester", "plain0"),
            Err(CryptoEraseError::NotEncrypted(_))
        ));
        assert!(!m.is_managed("plain0"));
        assert!(m.is_managed("ns1"));

        // Record a deep rekey in the header, as the deep rekey driver does when it starts.
        let mut hio = meta(&d);
        let cur = store::read_header(&mut hio).expect("header");
        let mut h = cur.header.clone();
        h.rekey = RekeyState::Deep(DeepRekeyState {
            new: h.active.clone(),
            watermark_blocks: 0,
            started_unix_s: 1,
            segment_blocks: 1,
        });
        store::update(&mut hio, &cur, &h).expect("deep state");
        let img = image(&d);
        let e = m.crypto_erase("tester", "ns1").expect_err("busy");
        assert!(
            matches!(&e, CryptoEraseError::Busy { reason, .. } if reason.contains("deep rekey")),
            "{e}"
        );
        assert!(image(&d) == img, "a refused erase wrote to the device");
        assert_eq!(io(b.as_ref(), 0, None), data, "the old key stays");
        assert!(audit
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("tester|crypto-erase|ns1|error: ") && l.contains("busy")));
    }
}
