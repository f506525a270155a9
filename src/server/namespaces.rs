//! The run-time namespace handlers of the control socket (`namespace.create`,
//! `namespace.delete`) and the key-manager registration of managed-key bdevs.
//!
//! Runs on RPC connection threads (and on the control thread at start-up for
//! [`register_encrypted`]), never on a reactor. Split out of `server.rs` because it is the part
//! of `serve` that takes hostile input: paths, sizes and bdev stacks from callers, checked
//! against the config's allow-list and budgets before anything is opened.

use super::*;

/// Registers a managed-key (`encrypted`) bdev of `stacks` with the key manager: it reads the
/// header through the base (the file itself for a uring base) and binds the crypto bdev when
/// the key arrives.
pub(super) fn register_encrypted(
    km: &KeyManager,
    who: &str,
    stacks: &Stacks,
    name: &str,
    ec: &EncryptedBdevConfig,
) -> Result<(), String> {
    let base = stacks
        .get(&ec.base)
        .ok_or_else(|| format!("{name}: no base bdev"))?;
    // A file base's header is read through the bdev's own descriptor, never by resolving its
    // path again (a path from a caller could point elsewhere by now).
    let header_io: Box<dyn crate::keys::store::HeaderIo + Send> = match stacks.uring.get(&ec.base) {
        Some(u) => Box::new(
            crate::keys::header_io::FileHeaderIo::open(&u.own_fd_path(), METADATA_REGION_BYTES)
                .map_err(|e| format!("{name}: header of {}: {e}", u.path().display()))?,
        ),
        None => Box::new(
            crate::keys::header_io::BdevHeaderIo::new(
                base.clone(),
                CoreId(0),
                METADATA_REGION_BYTES,
            )
            .map_err(|e| format!("{name}: header: {e}"))?,
        ),
    };
    let nk = NamespaceKeyConfig {
        provider: ec.provider.clone(),
        kek_name: ec.kek_name.clone(),
    };
    let opts = crate::keys::manager::NamespaceOptions {
        create: ec.create,
        plaintext: ec.plaintext,
        header_file: ec.header_file.as_ref().map(std::path::PathBuf::from),
    };
    km.add_namespace(who, name, base, header_io, &nk, &opts)
        .map_err(|e| e.to_string())
}

impl Dynamic {
    /// Wraps a `namespace.*` handler: logs a refusal with its reason, and refuses everything
    /// when no audit trail exists (the dispatcher records each call in it).
    fn run(
        &self,
        ctx: &crate::rpc::CallContext,
        p: &Value,
        f: impl FnOnce(&crate::rpc::CallContext, &Value) -> Result<Value, RpcError>,
    ) -> Result<Value, RpcError> {
        let r = if self.audit.is_none() {
            Err(RpcError::unavailable(format!(
                "{} is audited and no audit log is configured: set rpc.audit_log (or keys.audit_log)",
                ctx.method
            )))
        } else {
            f(ctx, p)
        };
        if let Err(e) = &r {
            tracing::warn!(caller = %ctx.caller, method = %ctx.method, code = e.code, "refused: {}", e.message);
        }
        r
    }

    pub(super) fn create(
        &self,
        ctx: &crate::rpc::CallContext,
        p: &Value,
    ) -> Result<Value, RpcError> {
        self.run(ctx, p, |ctx, p| self.create_inner(ctx, p))
    }

    pub(super) fn delete(
        &self,
        ctx: &crate::rpc::CallContext,
        p: &Value,
    ) -> Result<Value, RpcError> {
        self.run(ctx, p, |ctx, p| self.delete_inner(ctx, p))
    }

    /// RAM (regular, hugepage bytes) that run-time namespaces hold now; forgets freed ones.
    fn ram_in_use(&self) -> (u64, u64) {
        let mut ram = lock(&self.ram);
        ram.retain(|(b, _, _)| b.strong_count() > 0);
        ram.iter().fold((0, 0), |(a, h), (_, x, y)| (a + x, h + y))
    }

    /// Files and devices under an encrypted bdev: the config's and those of run-time stacks.
    fn encrypted_bases(&self) -> Vec<(BackingId, String)> {
        let mut v = self.config_encrypted_bases.clone();
        for d in lock(&self.created).values() {
            v.extend(d.stacks.encrypted_bases());
        }
        v
    }

    /// `namespace.create`: builds the bdev stack in `bdevs` (entries as in the config's
    /// `bdevs:` list, bases before what stacks on them; the last one is exported) and adds it as
    /// namespace `nsid` (default: the lowest free) of subsystem `nqn`. A stack with a `crypto`
    /// or `encrypted` entry needs the crypto role; an `encrypted` namespace starts locked and
    /// comes online when the key manager has its key.
    fn create_inner(&self, ctx: &crate::rpc::CallContext, p: &Value) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {
            nqn: String,
            #[serde(default)]
            nsid: Option<u32>,
            bdevs: Vec<BdevConfig>,
        }
        let p: P = parse_params(p)?;
        let keyed = p
            .bdevs
            .iter()
            .any(|b| matches!(b, BdevConfig::Crypto(_) | BdevConfig::Encrypted(_)));
        ctx.audit.set(format!(
            "{} nsid {} bdev {} bdevs {}",
            p.nqn,
            p.nsid
                .map_or_else(|| "(first free)".to_string(), |n| n.to_string()),
            p.bdevs.last().map_or("", |b| b.name()),
            p.bdevs
                .iter()
                .map(bdev_summary)
                .collect::<Vec<_>>()
                .join(" ")
        ));
        if keyed && !ctx.roles.contains(Role::Crypto) {
            return Err(RpcError::permission_denied(
                &ctx.method,
                Role::Crypto,
                ctx.caller.uid,
                ctx.caller.gid,
            ));
        }
        let Some(last) = p.bdevs.last() else {
            return Err(RpcError::invalid_params(
                "bdevs: at least one bdev is needed (the last one is exported)",
            ));
        };
        let exported = last.name().to_string();
        let sub = self
            .target
            .subsystem(&p.nqn)
            .filter(|s| s.kind == crate::nvmf::target::SubsystemKind::Nvm)
            .ok_or_else(|| RpcError::not_found("subsystem", &p.nqn))?
            .clone();
        let _g = lock(&self.change);
        if let Some(n) = p.nsid {
            if n == 0 || n > sub.max_nsid() {
                return Err(RpcError::invalid_params(format!(
                    "nsid: {n} is outside 1..={} (nvmf.max_namespaces)",
                    sub.max_nsid()
                )));
            }
            if sub.namespace(n).is_some() {
                return Err(RpcError::busy(format!("nsid {n} of {} is in use", p.nqn))
                    .with_data(json!({ "nqn": p.nqn, "nsid": n })));
            }
        }
        {
            let names = lock(&self.names);
            let mut seen = BTreeSet::new();
            for (i, b) in p.bdevs.iter().enumerate() {
                if names.contains(b.name()) || !seen.insert(b.name()) {
                    return Err(RpcError::busy(format!(
                        "bdevs[{i}].name: a bdev named {} already exists",
                        b.name()
                    ))
                    .with_data(json!({ "field": format!("bdevs[{i}].name"), "bdev": b.name() })));
                }
            }
        }
        let managed = match last {
            BdevConfig::Encrypted(ec) => Some(ec.clone()),
            _ => None,
        };
        if let Some(ec) = &managed {
            if ec.header_file.is_some() {
                // A path from a caller would let it create or read files anywhere nvseal can.
                return Err(RpcError::invalid_params(
                    "header_file: detached headers are configured in the config file only",
                ));
            }
            if let Err((field, why)) = ec.check() {
                return Err(RpcError::invalid_params(format!("{field}: {why}")));
            }
        }
        if p.bdevs[..p.bdevs.len() - 1]
            .iter()
            .any(|b| matches!(b, BdevConfig::Encrypted(_)))
        {
            return Err(RpcError::invalid_params(
                "bdevs: an encrypted bdev must be the last (exported) entry",
            ));
        }
        let km = match (&managed, &self.keys) {
            (Some(_), None) => {
                return Err(RpcError::unavailable(
                    "encrypted namespaces need a keys: section in the config",
                ))
            }
            (_, k) => k.clone(),
        };
        let mut cfg = self.template.clone();
        cfg.bdevs = p.bdevs;
        let (malloc_bytes_used, hugepage_bytes_used) = self.ram_in_use();
        let bases = self.encrypted_bases();
        let limits = RpcLimits {
            policy: &self.policy,
            encrypted_bases: &bases,
            malloc_bytes_used,
            hugepage_bytes_used,
        };
        let stacks = Stacks::open_rpc(&cfg, &limits).map_err(|e| {
            use crate::stack::StackError;
            match e {
                StackError::Denied { field, what } => RpcError::new(
                    crate::rpc::error::PERMISSION_DENIED,
                    format!("{field}: {what}"),
                )
                .with_data(json!({ "method": ctx.method, "field": field })),
                StackError::InUse { field, what } => {
                    RpcError::busy(format!("{field}: {what}")).with_data(json!({ "field": field }))
                }
                e => RpcError::invalid_params(format!("bdevs: {e}")),
            }
        })?;
        let dev = stacks
            .get(&exported)
            .ok_or_else(|| RpcError::internal(format!("bdev {exported} was not built")))?;
        // What the result reports is the exported bdev's to say, not the request's.
        let encrypted = dev.encrypts_data();
        let nsid = self
            .target
            .add_namespace(&p.nqn, p.nsid, dev, managed.is_none())
            .map_err(|e| match e {
                crate::nvmf::target::TargetError::NsidInUse { .. }
                | crate::nvmf::target::TargetError::NoFreeNsid { .. } => {
                    RpcError::busy(e.to_string())
                }
                crate::nvmf::target::TargetError::NoSubsystem(n) => {
                    RpcError::not_found("subsystem", &n)
                }
                e => RpcError::invalid_params(format!("bdevs: {e}")),
            })?;
        let names: Vec<String> = cfg.bdevs.iter().map(|b| b.name().to_string()).collect();
        if let (Some(ec), Some(km)) = (&managed, &km) {
            let late = stacks
                .encrypted
                .get(&exported)
                .map(|(l, _)| l.clone())
                .ok_or_else(|| RpcError::internal(format!("bdev {exported} has no stand-in")))?;
            lock(&self.late).insert(exported.clone(), (late, vec![(p.nqn.clone(), nsid)]));
            let who = ctx.caller.to_string();
            if let Err(e) = register_encrypted(km, &who, &stacks, &exported, ec) {
                lock(&self.late).remove(&exported);
                if let Err(re) = self.target.remove_namespace(
                    &p.nqn,
                    nsid,
                    Duration::from_millis(DEFAULT_DRAIN_MS),
                ) {
                    tracing::warn!("rolling back namespace {nsid}: {re}");
                }
                return Err(RpcError::invalid_params(format!("bdevs: {e}")));
            }
        }
        lock(&self.names).extend(names.iter().cloned());
        {
            let mut ram = lock(&self.ram);
            for b in &cfg.bdevs {
                if let (BdevConfig::Malloc(m), Some(dev)) = (b, stacks.get(b.name())) {
                    let bytes = m.memory_bytes().unwrap_or(0);
                    let (x, y) = if m.hugepages { (0, bytes) } else { (bytes, 0) };
                    ram.push((Arc::downgrade(&dev), x, y));
                }
            }
        }
        tracing::info!(nqn = %p.nqn, nsid, bdev = %exported, caller = %ctx.caller, "namespace created");
        let online = sub.namespace(nsid).is_some_and(|n| n.is_online());
        lock(&self.created).insert(
            (p.nqn.clone(), nsid),
            DynNamespace {
                stacks,
                names,
                encrypted: keyed,
            },
        );
        Ok(
            json!({ "nqn": p.nqn, "nsid": nsid, "bdev": exported, "encrypted": encrypted, "online": online }),
        )
    }

    /// `namespace.delete`: takes namespace `nsid` of subsystem `nqn` away from hosts and waits
    /// (up to `drain_ms`, default 5 s) until no I/O queue holds it. A namespace with a key needs
    /// the crypto role.
    fn delete_inner(&self, ctx: &crate::rpc::CallContext, p: &Value) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {
            nqn: String,
            nsid: u32,
            #[serde(default)]
            drain_ms: Option<u64>,
        }
        let p: P = parse_params(p)?;
        ctx.audit.set(format!("{} nsid {}", p.nqn, p.nsid));
        let sub = self
            .target
            .subsystem(&p.nqn)
            .ok_or_else(|| RpcError::not_found("subsystem", &p.nqn))?
            .clone();
        let _g = lock(&self.change);
        let ns = sub.namespace(p.nsid).ok_or_else(|| {
            RpcError::not_found("namespace", &format!("{} nsid {}", p.nqn, p.nsid))
        })?;
        let key = (p.nqn.clone(), p.nsid);
        let keyed = ns.encrypted
            || lock(&self.late).contains_key(ns.bdev.name())
            || lock(&self.created).get(&key).is_some_and(|d| d.encrypted);
        ctx.audit
            .set(format!("{} nsid {} bdev {}", p.nqn, p.nsid, ns.bdev.name()));
        let bdev_name = ns.bdev.name().to_string();
        drop(ns);
        if keyed && !ctx.roles.contains(Role::Crypto) {
            return Err(RpcError::permission_denied(
                &ctx.method,
                Role::Crypto,
                ctx.caller.uid,
                ctx.caller.gid,
            ));
        }
        let drain = Duration::from_millis(p.drain_ms.unwrap_or(DEFAULT_DRAIN_MS));
        let freed = match self.target.remove_namespace(&p.nqn, p.nsid, drain) {
            Ok(()) => true,
            Err(crate::nvmf::target::TargetError::DrainTimeout { .. }) => false,
            Err(e) => return Err(RpcError::not_found("namespace", &e.to_string())),
        };
        // A managed-key namespace no one exports any more: its stand-in lets go of the crypto
        // bdev and the key manager forgets it, so the DEK leaves memory once the connections
        // have closed their channels (now, when drained). The header stays on disk.
        let released = {
            let mut late = lock(&self.late);
            let gone = match late.get_mut(&bdev_name) {
                Some((_, exports)) => {
                    exports.retain(|(n, i)| !(n == &p.nqn && *i == p.nsid));
                    exports.is_empty()
                }
                None => false,
            };
            if gone {
                late.remove(&bdev_name)
            } else {
                None
            }
        };
        let mut key_released = false;
        if let Some((stand_in, _)) = released {
            stand_in.release();
            if let Some(km) = &self.keys {
                key_released = km.remove(&ctx.caller.to_string(), &bdev_name);
            }
        }
        if let Some(d) = lock(&self.created).remove(&key) {
            // Its bdevs close with it (dropped here), so their names are free again.
            let mut names = lock(&self.names);
            for n in &d.names {
                names.remove(n);
            }
        }
        tracing::info!(nqn = %p.nqn, nsid = p.nsid, freed, key_released, caller = %ctx.caller, "namespace deleted");
        Ok(json!({ "nqn": p.nqn, "nsid": p.nsid, "freed": freed, "key_released": key_released }))
    }
}

/// One bdev entry of a `namespace.create` call for its audit record: name, type and what it
/// uses (size, path, base); never key material (a development key file shows as its type only).
fn bdev_summary(b: &BdevConfig) -> String {
    match b {
        BdevConfig::Malloc(c) => format!(
            "{}=malloc({}{})",
            c.name,
            c.memory_bytes()
                .map_or_else(|_| "?".to_string(), |n| n.to_string()),
            if c.hugepages { " hugepages" } else { "" }
        ),
        BdevConfig::Null(c) => format!("{}=null", c.name),
        BdevConfig::Uring(c) => format!("{}=uring({})", c.name, c.path.display()),
        BdevConfig::SpdkNvme(c) => format!("{}=spdk_nvme({} nsid {})", c.name, c.trid, c.nsid),
        BdevConfig::Crypto(c) => format!("{}=crypto({})", c.name, c.base),
        BdevConfig::Encrypted(c) => format!("{}=encrypted({} {})", c.name, c.base, c.provider),
    }
}
