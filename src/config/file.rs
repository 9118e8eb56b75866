//! `--config FILE`: the flags' settings in a YAML file, in two groups.
//!
//! - **kube-proxy's own file** (`apiVersion: kubeproxy.config.k8s.io/v1alpha1`,
//!   `kind: KubeProxyConfiguration`), as kubeadm and other installers write
//!   it, so that the file a cluster already has serves as it is. Each of
//!   its fields is in [`KUBE_PROXY_FIELDS`]: the flag it sets, or why it is
//!   ignored. Fields with a value and no effect here are logged once at
//!   start; a field this version does not know is accepted the same way
//!   (kube-proxy adds fields with its releases). As in kube-proxy, a zero
//!   value (`""`, `0`, `0s`, `null`, `[]`) means "the default".
//! - **kube-uproxy's own** (`apiVersion: kube-uproxy.io/v1alpha1`, `kind:
//!   KubeUproxyConfiguration`, both optional): one field per flag, derived
//!   from the flag itself so that no setting has two definitions: the
//!   field is the flag's long name in camelCase (`--udp-max-flows` ↔
//!   `udpMaxFlows`), except the names in [`FIELD_NAMES`] (kube-proxy's,
//!   where it has one). Each value is handed to the flag's own parser, so
//!   bounds and error words are the flag's. An unknown field is an error
//!   naming it: a typo must not silently leave a default in force.
//!
//! Both may be in one file as two YAML documents (`---`); then a setting in
//! kube-uproxy's document wins over kube-proxy's. A flag given on the
//! command line wins over both (as do flags that conflict with a field:
//! `--manifests` over `clientConnection.kubeconfig`).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};
use serde::Deserialize;
use serde_norway::Value;

use crate::config::Args;

pub const API_VERSION: &str = "kube-uproxy.io/v1alpha1";
pub const KIND: &str = "KubeUproxyConfiguration";
pub const KUBE_PROXY_API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KUBE_PROXY_KIND: &str = "KubeProxyConfiguration";

/// Flags (by id) that are not settings, and so have no field: the file
/// itself, an action, and clap's own.
pub const NOT_IN_FILE: &[&str] = &["config", "cleanup", "cleanup_kube_proxy", "help", "version"];

/// kube-uproxy's fields whose name is not their flag's long name in
/// camelCase: kube-proxy's `KubeProxyConfiguration` names (nested ones
/// with a dot), which the file had before the flag was renamed or since
/// it began. Keyed by long name (or alias).
pub const FIELD_NAMES: &[(&str, &str)] = &[
    ("proxy-port-range", "portRange"),
    ("kubeconfig", "clientConnection.kubeconfig"),
    ("log-format", "logging.format"),
    ("v", "logging.verbosity"),
    ("nodeport-addresses", "nodePortAddresses"),
    ("proxy-address-ipv6", "proxyAddressIPv6"),
    ("bind-address-ipv6", "bindAddressIPv6"),
];

/// Flags (by id) for which an empty value is a setting, not "unset":
/// empty turns the server off, as the flag's empty value does.
pub const EMPTY_IS_A_VALUE: &[&str] = &["healthz_bind_address", "metrics_bind_address"];

/// What kube-uproxy does with a field of kube-proxy's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeProxyUse {
    /// Sets the flag of this id.
    Flag(&'static str),
    /// Sets `--sync-period` when kube-proxy's `mode` is this one (an empty
    /// mode is kube-proxy's default on Linux, `iptables`).
    SyncPeriodOf(&'static str),
    /// Accepted and ignored, for this reason.
    Ignored(&'static str),
}

/// kube-proxy's `KubeProxyConfiguration` (v1alpha1), field by field. A
/// path names a field or a whole section (`ipvs`); the longest that
/// matches decides. One table, so that a field that gains a meaning here
/// is one line to change.
pub const KUBE_PROXY_FIELDS: &[(&str, KubeProxyUse)] = {
    use KubeProxyUse::{Flag, Ignored, SyncPeriodOf};
    &[
        ("hostnameOverride", Flag("hostname_override")),
        ("healthzBindAddress", Flag("healthz_bind_address")),
        ("metricsBindAddress", Flag("metrics_bind_address")),
        ("nodePortAddresses", Flag("nodeport_addresses")),
        // "previously used to configure the userspace proxy": the legacy
        // proxier's meaning, the listeners' ports, is this proxy's.
        ("portRange", Flag("proxy_port_range")),
        ("clientConnection.kubeconfig", Flag("kubeconfig")),
        ("logging.format", Flag("log_format")),
        ("logging.verbosity", Flag("verbosity")),
        ("iptables.syncPeriod", SyncPeriodOf("iptables")),
        ("nftables.syncPeriod", SyncPeriodOf("nftables")),
        ("ipvs.syncPeriod", SyncPeriodOf("ipvs")),
        ("clusterCIDR", Flag("cluster_cidr")),
        ("detectLocalMode", Flag("detect_local_mode")),
        ("detectLocal.bridgeInterface", Flag("pod_bridge_interface")),
        (
            "detectLocal.interfaceNamePrefix",
            Flag("pod_interface_name_prefix"),
        ),
        ("conntrack.maxPerCore", Flag("conntrack_max_per_core")),
        ("conntrack.min", Flag("conntrack_min")),
        (
            "conntrack.tcpEstablishedTimeout",
            Flag("conntrack_tcp_timeout_established"),
        ),
        (
            "conntrack.tcpCloseWaitTimeout",
            Flag("conntrack_tcp_timeout_close_wait"),
        ),
        (
            "conntrack",
            Ignored("kube-proxy's UDP and liberal-TCP conntrack sysctls are not set here"),
        ),
        (
            "bindAddress",
            Ignored(
                "kube-proxy's hint for the node's primary IP; kube-uproxy serves both families (its proxy address is proxyAddress in kube-uproxy.io/v1alpha1)",
            ),
        ),
        (
            "bindAddressHardFail",
            Ignored("a listener that cannot bind is always an error here"),
        ),
        (
            "clientConnection",
            Ignored("kube-rs's client has no rate limiter or protobuf"),
        ),
        (
            "configSyncPeriod",
            Ignored("watches are not resynced on a period"),
        ),
        ("enableProfiling", Ignored("no pprof handlers")),
        ("featureGates", Ignored("kube-proxy's feature gates")),
        (
            "iptables",
            Ignored("no iptables rules: one nftables table, no masquerading"),
        ),
        (
            "nftables",
            Ignored("kube-proxy's NAT settings: kube-uproxy's table does no masquerading"),
        ),
        ("ipvs", Ignored("no IPVS")),
        ("winkernel", Ignored("Windows only")),
        ("windowsRunAsService", Ignored("Windows only")),
        ("logging", Ignored("klog's buffering and per-file levels")),
        (
            "mode",
            Ignored("kube-uproxy is its own mode (a userspace relay)"),
        ),
        (
            "oomScoreAdj",
            Ignored("left to the container runtime and the pod's priority"),
        ),
        ("showHiddenMetricsForVersion", Ignored("no hidden metrics")),
    ]
};

/// The flags could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A command-line error, `--help` or `--version` (clap prints and exits).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error(transparent)]
    File(#[from] ConfigFileError),
}

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: field `{field}`: {message}", path.display())]
    Value {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// One field of the file that sets a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    /// As written in the file (`iptables.syncPeriod`).
    field: String,
    /// The flag's id.
    id: String,
    /// `--long=value`, checked by the flag's parser.
    argument: OsString,
    /// The value alone.
    value: String,
}

/// A config file, checked against the flags: what it sets and what it
/// ignores.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// By flag id; kube-uproxy's document replaces kube-proxy's.
    settings: BTreeMap<String, Setting>,
    /// kube-proxy's fields with a value and no effect: "`field` (why)".
    pub ignored: Vec<String>,
}

/// Which group a document is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    KubeProxy,
    Own,
}

/// The file's field for the flag `long` (or its alias): [`FIELD_NAMES`],
/// else `long` in camelCase.
pub fn field_name(long: &str) -> String {
    if let Some((_, f)) = FIELD_NAMES.iter().find(|(l, _)| *l == long) {
        return (*f).to_string();
    }
    let mut out = String::with_capacity(long.len());
    let mut upper = false;
    for c in long.chars() {
        if c == '-' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Every field of kube-uproxy's group and the id of its flag.
pub fn own_fields(cmd: &Command) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_IN_FILE.contains(&id) {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        let names = std::iter::once(long).chain(arg.get_all_aliases().unwrap_or_default());
        for name in names {
            fields.insert(field_name(name), id.to_string());
        }
    }
    fields
}

/// What kube-proxy's field `path` is used for: the longest entry of
/// [`KUBE_PROXY_FIELDS`] that is `path` or a section holding it.
pub fn kube_proxy_use(path: &str) -> Option<KubeProxyUse> {
    KUBE_PROXY_FIELDS
        .iter()
        .filter(|(p, _)| {
            path == *p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'.'))
        })
        .max_by_key(|(p, _)| p.len())
        .map(|(_, u)| *u)
}

/// kube-proxy's zero values, which its defaulting replaces (kubeadm
/// writes every field, most of them zero).
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => matches!(s.trim(), "" | "0" | "0s" | "0-0"),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        Value::Tagged(_) => false,
    }
}

/// A value as a flag takes it: scalars as written, lists comma-separated.
/// `None`: null (unset).
fn as_flag_value(v: &Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(b.to_string())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Sequence(items) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::Sequence(_) | Value::Mapping(_) | Value::Null | Value::Tagged(_) => {
                        return Err("a list item must be a plain value".into());
                    }
                    other => parts.extend(as_flag_value(other)?),
                }
            }
            Ok(Some(parts.join(",")))
        }
        Value::Mapping(_) => Err("a mapping where a value is wanted".into()),
        Value::Tagged(_) => Err("a tagged value where a plain one is wanted".into()),
    }
}

/// Runs the flag `id`'s own parser on `value`: `Ok` with the
/// `--long=value` argument, or its error words.
fn check_with_flag(cmd: &Command, id: &str, value: &str) -> Result<OsString, String> {
    let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == id) else {
        return Err(format!("no flag {id}"));
    };
    let Some(long) = arg.get_long() else {
        return Err(format!("flag {id} has no long name"));
    };
    let argument = OsString::from(format!("--{long}={value}"));
    let bin = cmd.get_name().to_string();
    match cmd
        .clone()
        .try_get_matches_from([OsString::from(bin), argument.clone()])
    {
        Ok(_) => Ok(argument),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            Err(first.strip_prefix("error: ").unwrap_or(first).to_string())
        }
    }
}

impl ConfigFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks the YAML `text` read from `path`: every value
    /// through its flag's parser.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigFileError> {
        let cmd = Args::command();
        let mut file = ConfigFile::default();
        let mut seen: Vec<Group> = Vec::new();
        let mut docs = Vec::new();
        for doc in serde_norway::Deserializer::from_str(text) {
            let v = Value::deserialize(doc).map_err(|e| ConfigFileError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            docs.push(v);
        }
        let mut own = BTreeMap::new();
        let mut kube_proxy = BTreeMap::new();
        for doc in docs {
            file.document(&cmd, path, &doc, &mut seen, &mut own, &mut kube_proxy)?;
        }
        // kube-uproxy's own fields win over kube-proxy's.
        file.settings = kube_proxy;
        file.settings.extend(own);
        Ok(file)
    }

    /// Reads one YAML document into `own` or `kube_proxy` (an empty one
    /// into neither); `seen`: the groups of the documents before it.
    fn document(
        &mut self,
        cmd: &Command,
        path: &Path,
        doc: &Value,
        seen: &mut Vec<Group>,
        own: &mut BTreeMap<String, Setting>,
        kube_proxy: &mut BTreeMap<String, Setting>,
    ) -> Result<(), ConfigFileError> {
        let bad = |field: &str, message: String| ConfigFileError::Value {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let map = match doc {
            Value::Null => return Ok(()),
            Value::Mapping(m) => m,
            _ => {
                return Err(ConfigFileError::Parse {
                    path: path.to_path_buf(),
                    message: "the file must be a mapping of fields".into(),
                });
            }
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str);
        let group = match (text("apiVersion"), text("kind")) {
            (Some(KUBE_PROXY_API_VERSION), Some(KUBE_PROXY_KIND)) => Group::KubeProxy,
            (Some(v), _) if v != API_VERSION => {
                return Err(bad(
                    "apiVersion",
                    format!("{v:?} is neither {API_VERSION:?} nor {KUBE_PROXY_API_VERSION:?}"),
                ));
            }
            (_, Some(k)) if k != KIND => {
                return Err(bad(
                    "kind",
                    format!(
                        "{k:?} is not {KIND:?} (or {KUBE_PROXY_KIND:?} with apiVersion {KUBE_PROXY_API_VERSION:?})"
                    ),
                ));
            }
            _ => Group::Own,
        };
        if seen.contains(&group) {
            return Err(ConfigFileError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "two {} documents: give each group once",
                    match group {
                        Group::KubeProxy => KUBE_PROXY_KIND,
                        Group::Own => KIND,
                    }
                ),
            });
        }
        seen.push(group);
        let mut fields = Vec::new();
        flatten(map, "", &mut fields, &|p| match group {
            // Sections are walked to their leaves, so that the log names
            // the fields with a value, not a whole section of zeros.
            Group::KubeProxy => KUBE_PROXY_FIELDS
                .iter()
                .any(|(f, u)| *f == p && !matches!(u, KubeProxyUse::Ignored(_))),
            Group::Own => own_fields_cached(cmd).contains_key(p),
        })
        .map_err(|(field, message)| bad(&field, message))?;
        match group {
            Group::Own => {
                let known = own_fields_cached(cmd);
                for (field, value) in fields {
                    if field == "apiVersion" || field == "kind" {
                        continue;
                    }
                    let Some(id) = known.get(&field) else {
                        return Err(ConfigFileError::Parse {
                            path: path.to_path_buf(),
                            message: format!(
                                "unknown field `{field}` (the fields are the flags' names in camelCase; see docs/operations.md)"
                            ),
                        });
                    };
                    let Some(v) = as_flag_value(value).map_err(|e| bad(&field, e))? else {
                        continue;
                    };
                    // Empty means unset (as in kube-proxy's files), but
                    // where the flag gives it a meaning of its own.
                    if v.trim().is_empty() && !EMPTY_IS_A_VALUE.contains(&id.as_str()) {
                        continue;
                    }
                    let argument = check_with_flag(cmd, id, &v).map_err(|e| bad(&field, e))?;
                    if let Some(other) = own.values().find(|s| s.id == *id) {
                        return Err(bad(
                            &field,
                            format!("the same setting as `{}`: give one", other.field),
                        ));
                    }
                    own.insert(
                        id.clone(),
                        Setting {
                            field,
                            id: id.clone(),
                            argument,
                            value: v,
                        },
                    );
                }
            }
            Group::KubeProxy => {
                let mode = match text("mode").map(str::trim) {
                    None | Some("") => "iptables",
                    Some(m) => m,
                };
                for (field, value) in fields {
                    if field == "apiVersion" || field == "kind" {
                        continue;
                    }
                    let id = match kube_proxy_use(&field) {
                        Some(KubeProxyUse::Flag(id)) => id,
                        Some(KubeProxyUse::SyncPeriodOf(m)) if m == mode => "sync_period",
                        Some(KubeProxyUse::SyncPeriodOf(m)) => {
                            if !is_zero(value) {
                                self.ignored
                                    .push(format!("`{field}` (for mode {m}; mode is {mode})"));
                            }
                            continue;
                        }
                        Some(KubeProxyUse::Ignored(why)) => {
                            // `bindAddress: 0.0.0.0` is kubeadm's default:
                            // nothing to say about it.
                            let unspecified = matches!(value.as_str(), Some("0.0.0.0" | "::"));
                            if !is_zero(value) && !unspecified {
                                self.ignored.push(format!("`{field}` ({why})"));
                            }
                            continue;
                        }
                        None => {
                            if !is_zero(value) {
                                self.ignored.push(format!(
                                    "`{field}` (unknown to this version of kube-uproxy)"
                                ));
                            }
                            continue;
                        }
                    };
                    // kube-proxy's defaulting: a zero value is the default.
                    if is_zero(value) {
                        continue;
                    }
                    let Some(v) = as_flag_value(value).map_err(|e| bad(&field, e))? else {
                        continue;
                    };
                    let argument = check_with_flag(cmd, id, &v).map_err(|e| bad(&field, e))?;
                    kube_proxy.insert(
                        id.to_string(),
                        Setting {
                            field,
                            id: id.to_string(),
                            argument,
                            value: v,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// The value the file gives the field `field` (after the checks), if
    /// it sets it.
    pub fn value(&self, field: &str) -> Option<&str> {
        self.settings
            .values()
            .find(|s| s.field == field)
            .map(|s| s.value.as_str())
    }

    /// The fields that set a flag, as `(field, flag id)`.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.settings
            .values()
            .map(|s| (s.field.as_str(), s.id.as_str()))
    }

    /// The file's settings as command-line arguments, leaving out those
    /// whose flag `given` says was on the command line, or a flag that
    /// conflicts with theirs. Two fields of the file that conflict with
    /// each other are an error.
    pub fn arguments(
        &self,
        path: &Path,
        cmd: &Command,
        given: impl Fn(&str) -> bool,
    ) -> Result<Vec<OsString>, ConfigFileError> {
        let conflicts = |a: &str, b: &str| {
            let find = |id: &str| cmd.get_arguments().find(|x| x.get_id() == id);
            let (Some(x), Some(y)) = (find(a), find(b)) else {
                return false;
            };
            cmd.get_arg_conflicts_with(x)
                .iter()
                .any(|c| c.get_id() == b)
                || cmd
                    .get_arg_conflicts_with(y)
                    .iter()
                    .any(|c| c.get_id() == a)
        };
        let given_ids: Vec<&str> = cmd
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| given(id))
            .collect();
        let kept: Vec<&Setting> = self
            .settings
            .values()
            .filter(|s| !given(&s.id) && !given_ids.iter().any(|g| conflicts(&s.id, g)))
            .collect();
        for (i, a) in kept.iter().enumerate() {
            if let Some(b) = kept[i + 1..].iter().find(|b| conflicts(&a.id, &b.id)) {
                return Err(ConfigFileError::Value {
                    path: path.to_path_buf(),
                    field: a.field.clone(),
                    message: format!("cannot be used together with `{}`", b.field),
                });
            }
        }
        Ok(kept.iter().map(|s| s.argument.clone()).collect())
    }
}

/// The fields of kube-uproxy's group, computed once per process.
fn own_fields_cached(cmd: &Command) -> &'static BTreeMap<String, String> {
    static FIELDS: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
    FIELDS.get_or_init(|| own_fields(cmd))
}

/// Every leaf of `map` as `(dotted path, value)`: a key that `is_field`
/// names is a leaf whatever its value; other mappings are walked.
fn flatten<'a>(
    map: &'a serde_norway::Mapping,
    prefix: &str,
    out: &mut Vec<(String, &'a Value)>,
    is_field: &dyn Fn(&str) -> bool,
) -> Result<(), (String, String)> {
    for (k, v) in map {
        let Some(k) = k.as_str() else {
            return Err((
                prefix.to_string(),
                format!("a key that is not a string: {k:?}"),
            ));
        };
        let path = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Mapping(m) if !is_field(&path) => flatten(m, &path, out, is_field)?,
            _ => out.push((path, v)),
        }
    }
    Ok(())
}

/// Parses the command line, then the `--config` file if one is given (the
/// command line wins).
pub fn parse_args<I, T>(argv: I) -> Result<Args, ArgsError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut cmd = Args::command();
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    let args = Args::from_arg_matches(&matches)?;
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let file = ConfigFile::load(&path)?;
    cmd.build();
    let from_file = file.arguments(&path, &cmd, |id| given(&matches, id))?;
    // The file's settings go first, so that the command line's come after
    // them (its subcommand included); none is given twice.
    let mut merged = Vec::with_capacity(argv.len() + from_file.len() + 1);
    merged.push(
        argv.first()
            .cloned()
            .unwrap_or_else(|| OsStr::new("kube-uproxy").to_os_string()),
    );
    merged.extend(from_file);
    merged.extend(argv.iter().skip(1).cloned());
    let matches = cmd.try_get_matches_from(merged)?;
    let mut args = Args::from_arg_matches(&matches)?;
    args.ignored_config_fields = file.ignored;
    Ok(args)
}

/// Whether the flag `id` was on the command line (not a default), before
/// or after a subcommand.
fn given(matches: &ArgMatches, id: &str) -> bool {
    let on = |m: &ArgMatches| {
        m.ids().any(|i| i.as_str() == id) && m.value_source(id) == Some(ValueSource::CommandLine)
    };
    on(matches) || matches.subcommand().is_some_and(|(_, sub)| on(sub))
}

#[cfg(test)]
mod tests;
