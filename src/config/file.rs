//! `--config FILE`: the settings of the flags in a YAML file, with
//! kube-proxy's `KubeProxyConfiguration` field names where one exists, so
//! that an operator who knows kube-proxy's ConfigMap knows this one.
//!
//! | field | flag |
//! |---|---|
//! | `bindAddress` | `--bind-address` (the proxy address; kube-proxy's field names the node's IP, which is close in spirit: the address Service traffic goes to on this node) |
//! | `healthzBindAddress` | `--healthz-bind-address` |
//! | `metricsBindAddress` | `--metrics-bind-address` |
//! | `portRange` | `--proxy-port-range` (the legacy userspace proxier's meaning of that field) |
//! | `syncPeriod` | `--sync-period` |
//! | `clientConnection.kubeconfig` | `--kubeconfig` |
//! | `logging.format` | `--log-format` |
//! | `hostnameOverride` | `--hostname-override` |
//! | `nodePortAddresses` | `--nodeport-addresses` (CIDRs, or `[primary]`) |
//! | `bindAddressIPv6` (kube-uproxy's own) | `--bind-address-ipv6` |
//! | kube-uproxy's own: `manifests`, `manifestsRescanInterval`, `shutdownGrace`, `lbAlgorithm`, `tcpRelay`, `splicePipesMax`, `metricsPerEndpoint`, `healthzSocket`, `procSysDir` | the flag of the same name |
//!
//! A flag given on the command line wins over the file. A field that is
//! not in this list is an error naming it: a typo must not silently leave
//! a default in force. `apiVersion` and `kind` are optional; when present
//! they must be `kube-uproxy.io/v1alpha1` and `KubeUproxyConfiguration`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use serde::Deserialize;

use crate::config::{
    Args, DurationBounds, HTTP_DETECT_TIMEOUT, HTTP_UPSTREAM_IDLE_TIMEOUT, LogFormat,
    MANIFESTS_RESCAN_INTERVAL, SHUTDOWN_GRACE, SPLICE_PIPES_MAX, SYNC_PERIOD, ServeAddress,
    parse_bind_address, parse_bind_address_v6, parse_mark, parse_nodeport_addresses,
};
use crate::model::Algorithm;
use crate::proxy::ports::PortRange;
use crate::proxy::relay::RelayMode;

pub const API_VERSION: &str = "kube-uproxy.io/v1alpha1";
pub const KIND: &str = "KubeUproxyConfiguration";

/// The flags could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A command-line error, `--help` or `--version` (clap prints and exits).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error(transparent)]
    File(#[from] ConfigFileError),
    #[error(
        "--manifests and --kubeconfig (or clientConnection.kubeconfig) cannot be used together"
    )]
    SourceConflict,
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
        field: &'static str,
        message: String,
    },
}

/// The file's fields; every one optional (unset: the flag's default).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    // kube-proxy's names.
    pub bind_address: Option<String>,
    #[serde(rename = "bindAddressIPv6")]
    pub bind_address_v6: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub hostname_override: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub port_range: Option<String>,
    pub sync_period: Option<String>,
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<Logging>,
    // kube-uproxy's own.
    pub manifests: Option<PathBuf>,
    pub manifests_rescan_interval: Option<String>,
    pub shutdown_grace: Option<String>,
    pub lb_algorithm: Option<String>,
    pub tcp_relay: Option<String>,
    pub splice_pipes_max: Option<i64>,
    pub metrics_per_endpoint: Option<bool>,
    pub request_balancing: Option<bool>,
    /// `--upstream-mark`: a number, or a string (`"0x2000"`) for hex.
    pub upstream_mark: Option<MarkValue>,
    pub http_detect_timeout: Option<String>,
    pub http_upstream_idle_timeout: Option<String>,
    pub healthz_socket: Option<PathBuf>,
    pub proc_sys_dir: Option<PathBuf>,
}

/// `upstreamMark`: YAML gives `0x2000` unquoted as a number and quoted
/// as a string; both mean the same mark.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MarkValue {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for MarkValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MarkValue::Number(n) => write!(f, "{n}"),
            MarkValue::Text(t) => f.write_str(t),
        }
    }
}

/// kube-proxy's `clientConnection`, of which only the kubeconfig applies.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<PathBuf>,
}

/// kube-proxy's `logging`, of which only the format applies.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Logging {
    pub format: Option<LogFormat>,
}

impl ConfigFile {
    /// Reads and parses `path` (not yet checked against the flags' rules:
    /// that is [`ConfigFile::apply`]).
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the YAML `text` read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigFileError> {
        let parse_err = |message: String| ConfigFileError::Parse {
            path: path.to_path_buf(),
            message,
        };
        if text.trim().is_empty() {
            return Ok(ConfigFile::default());
        }
        let de = serde_norway::Deserializer::from_str(text);
        let file: ConfigFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            let inner = e.into_inner().to_string();
            if at.is_empty() || at == "." {
                parse_err(inner)
            } else {
                parse_err(format!("at `{at}`: {inner}"))
            }
        })?;
        let bad = |field, message: String| ConfigFileError::Value {
            path: path.to_path_buf(),
            field,
            message,
        };
        if let Some(v) = &file.api_version
            && v != API_VERSION
        {
            return Err(bad("apiVersion", format!("{v:?} is not {API_VERSION:?}")));
        }
        if let Some(k) = &file.kind
            && k != KIND
        {
            return Err(bad("kind", format!("{k:?} is not {KIND:?}")));
        }
        Ok(file)
    }

    /// Sets every field the file has on `args`, except those whose flag
    /// `given` says was on the command line. Values are checked as the
    /// flags' are.
    pub fn apply(
        &self,
        path: &Path,
        args: &mut Args,
        given: impl Fn(&str) -> bool,
    ) -> Result<(), ConfigFileError> {
        let bad = |field, message: String| ConfigFileError::Value {
            path: path.to_path_buf(),
            field,
            message,
        };
        // The flag's own bounds, so the file refuses what the flag does.
        let duration = |bounds: DurationBounds, s: &str| {
            bounds
                .parse(s)
                .map_err(|e| bad(bounds.field.unwrap_or(bounds.flag), e))
        };
        macro_rules! set {
            ($flag:literal, $value:expr, $target:expr) => {
                if let Some(v) = $value
                    && !given($flag)
                {
                    $target = v;
                }
            };
        }
        let bind = match self.bind_address.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(parse_bind_address(s).map_err(|e| bad("bindAddress", e))?),
        };
        set!("bind_address", bind, args.bind_address);
        let bind_v6 = match self.bind_address_v6.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(parse_bind_address_v6(s).map_err(|e| bad("bindAddressIPv6", e))?),
        };
        set!("bind_address_v6", bind_v6, args.bind_address_v6);
        let serve = |field, s: &Option<String>| {
            s.as_deref()
                .map(|s| ServeAddress::parse(s, 0).map_err(|e| bad(field, e)))
                .transpose()
        };
        set!(
            "healthz_bind_address",
            serve("healthzBindAddress", &self.healthz_bind_address)?,
            args.healthz_bind_address
        );
        set!(
            "metrics_bind_address",
            serve("metricsBindAddress", &self.metrics_bind_address)?,
            args.metrics_bind_address
        );
        set!(
            "hostname_override",
            self.hostname_override
                .clone()
                .filter(|h| !h.trim().is_empty())
                .map(Some),
            args.hostname_override
        );
        let nodeports = match &self.node_port_addresses {
            None => None,
            Some(list) if list.is_empty() => Some(None),
            Some(list) => Some(Some(
                parse_nodeport_addresses(&list.join(","))
                    .map_err(|e| bad("nodePortAddresses", e))?,
            )),
        };
        set!("nodeport_addresses", nodeports, args.nodeport_addresses);
        let range = match self.port_range.as_deref().map(str::trim) {
            // kube-proxy writes "" (and the legacy "0-0") for "unset".
            None | Some("") | Some("0-0") => None,
            Some(s) => Some(Some(
                s.parse::<PortRange>().map_err(|e| bad("portRange", e))?,
            )),
        };
        set!("proxy_port_range", range, args.proxy_port_range);
        let period = self
            .sync_period
            .as_deref()
            .map(|s| duration(SYNC_PERIOD, s))
            .transpose()?;
        set!("sync_period", period, args.sync_period);
        set!(
            "kubeconfig",
            self.client_connection
                .as_ref()
                .and_then(|c| c.kubeconfig.clone())
                .filter(|p| !p.as_os_str().is_empty())
                .map(Some),
            args.kubeconfig
        );
        set!(
            "log_format",
            self.logging.as_ref().and_then(|l| l.format),
            args.log_format
        );
        set!(
            "manifests",
            self.manifests.clone().map(Some),
            args.manifests
        );
        set!(
            "manifests_rescan_interval",
            self.manifests_rescan_interval
                .as_deref()
                .map(|s| duration(MANIFESTS_RESCAN_INTERVAL, s))
                .transpose()?,
            args.manifests_rescan_interval
        );
        set!(
            "shutdown_grace",
            self.shutdown_grace
                .as_deref()
                .map(|s| duration(SHUTDOWN_GRACE, s))
                .transpose()?,
            args.shutdown_grace
        );
        set!(
            "lb_algorithm",
            self.lb_algorithm
                .as_deref()
                .map(|s| s.parse::<Algorithm>().map_err(|e| bad("lbAlgorithm", e)))
                .transpose()?,
            args.lb_algorithm
        );
        set!(
            "tcp_relay",
            self.tcp_relay
                .as_deref()
                .map(|s| {
                    <RelayMode as clap::ValueEnum>::from_str(s, false)
                        .map_err(|e| bad("tcpRelay", e))
                })
                .transpose()?,
            args.tcp_relay
        );
        // The flag's own bounds and words.
        let pipes = self
            .splice_pipes_max
            .map(|n| {
                SPLICE_PIPES_MAX
                    .parse(&n.to_string())
                    .map_err(|e| bad("splicePipesMax", e))
            })
            .transpose()?;
        set!("splice_pipes_max", pipes.map(Some), args.splice_pipes_max);
        set!(
            "metrics_per_endpoint",
            self.metrics_per_endpoint,
            args.metrics_per_endpoint
        );
        set!(
            "upstream_mark",
            self.upstream_mark
                .as_ref()
                .map(|m| parse_mark(&m.to_string()).map_err(|e| bad("upstreamMark", e)))
                .transpose()?,
            args.upstream_mark
        );
        set!(
            "request_balancing",
            self.request_balancing,
            args.request_balancing
        );
        set!(
            "http_detect_timeout",
            self.http_detect_timeout
                .as_deref()
                .map(|s| duration(HTTP_DETECT_TIMEOUT, s))
                .transpose()?,
            args.http_detect_timeout
        );
        set!(
            "http_upstream_idle_timeout",
            self.http_upstream_idle_timeout
                .as_deref()
                .map(|s| duration(HTTP_UPSTREAM_IDLE_TIMEOUT, s))
                .transpose()?,
            args.http_upstream_idle_timeout
        );
        set!(
            "healthz_socket",
            self.healthz_socket.clone().map(Some),
            args.healthz_socket
        );
        set!("proc_sys_dir", self.proc_sys_dir.clone(), args.proc_sys_dir);
        Ok(())
    }
}

/// Parses the command line, then the `--config` file if one is given (the
/// command line wins), and checks what only the whole can tell.
pub fn parse_args<I, T>(argv: I) -> Result<Args, ArgsError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Args::command().try_get_matches_from(argv)?;
    let mut args = Args::from_arg_matches(&matches)?;
    if let Some(path) = args.config.clone() {
        let file = ConfigFile::load(&path)?;
        file.apply(&path, &mut args, |id| given(&matches, id))?;
    }
    if args.manifests.is_some() && args.kubeconfig.is_some() {
        return Err(ArgsError::SourceConflict);
    }
    Ok(args)
}

/// Whether the flag `id` was on the command line (not a default).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use std::time::Duration;

    use super::*;
    use crate::config::LogFormat;

    /// A file setting every field, each to a value other than its default.
    const EVERY_FIELD: &str = r#"
apiVersion: kube-uproxy.io/v1alpha1
kind: KubeUproxyConfiguration
bindAddress: 169.254.99.1
bindAddressIPv6: fd00:99::1
healthzBindAddress: 127.0.0.1:10266
metricsBindAddress: 0.0.0.0:10259
hostnameOverride: node-a
nodePortAddresses: [10.0.0.0/8, 192.168.0.0/16]
portRange: 30000-30999
syncPeriod: 1m0s
clientConnection:
  kubeconfig: /etc/kube/config
logging:
  format: json
shutdownGrace: 5s
manifestsRescanInterval: 500ms
lbAlgorithm: least-connections
tcpRelay: copy
splicePipesMax: 7
metricsPerEndpoint: true
healthzSocket: /run/kube-uproxy/healthz.sock
procSysDir: /host/proc/sys
upstreamMark: "0x4000"
requestBalancing: false
httpDetectTimeout: 2s
httpUpstreamIdleTimeout: 9s
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ku-config-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn every_field_of_the_file_reaches_its_setting() {
        let d = tmpdir("every");
        let p = write(&d, "c.yaml", EVERY_FIELD);
        let a = parse_args(["kube-uproxy", "--config", p.to_str().unwrap()]).unwrap();
        assert_eq!(a.bind_address, Ipv4Addr::new(169, 254, 99, 1));
        assert_eq!(
            a.bind_address_v6,
            "fd00:99::1".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(
            a.healthz_address(),
            Some("127.0.0.1:10266".parse().unwrap())
        );
        assert_eq!(a.metrics_address(), Some("0.0.0.0:10259".parse().unwrap()));
        assert_eq!(a.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(
            a.nodeport_addresses,
            Some(crate::config::NodePortAddresses::Cidrs(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.0.0/16".parse().unwrap()
            ]))
        );
        assert_eq!(
            a.proxy_port_range,
            Some(PortRange {
                begin: 30000,
                end: 30999
            })
        );
        assert_eq!(a.sync_period, Duration::from_secs(60));
        assert_eq!(a.kubeconfig.as_deref(), Some(Path::new("/etc/kube/config")));
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.shutdown_grace, Duration::from_secs(5));
        assert_eq!(a.manifests_rescan_interval, Duration::from_millis(500));
        assert_eq!(a.lb_algorithm, Algorithm::LeastConnections);
        assert_eq!(a.tcp_relay, RelayMode::Copy);
        assert!(a.metrics_per_endpoint);
        assert_eq!(
            a.healthz_socket.as_deref(),
            Some(Path::new("/run/kube-uproxy/healthz.sock"))
        );
        assert_eq!(a.proc_sys_dir, Path::new("/host/proc/sys"));
        assert_eq!(a.splice_pipes_max, Some(7));
        assert_eq!(a.upstream_mark, 0x4000);
        assert!(!a.request_balancing);
        assert_eq!(a.http_detect_timeout, Duration::from_secs(2));
        assert_eq!(a.http_upstream_idle_timeout, Duration::from_secs(9));
        // `manifests` conflicts with the kubeconfig above: its own file.
        let p = write(&d, "m.yaml", "manifests: /srv/cluster.yaml\n");
        let a = parse_args(["kube-uproxy", "--config", p.to_str().unwrap()]).unwrap();
        assert_eq!(a.manifests.as_deref(), Some(Path::new("/srv/cluster.yaml")));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn flags_on_the_command_line_win_over_the_file() {
        let d = tmpdir("flags");
        let p = write(&d, "c.yaml", EVERY_FIELD);
        let a = parse_args([
            "kube-uproxy",
            "--config",
            p.to_str().unwrap(),
            "--sync-period",
            "7s",
            "--bind-address",
            "169.254.42.7",
            "--bind-address-ipv6",
            "fd00:42::7",
            "--lb-algorithm",
            "round-robin",
            "--healthz-bind-address",
            "",
        ])
        .unwrap();
        assert_eq!(a.sync_period, Duration::from_secs(7));
        assert_eq!(a.bind_address, Ipv4Addr::new(169, 254, 42, 7));
        assert_eq!(a.bind_address_v6.to_string(), "fd00:42::7");
        assert_eq!(a.lb_algorithm, Algorithm::RoundRobin);
        assert_eq!(a.healthz_address(), None);
        // Not given on the command line: from the file.
        assert_eq!(a.tcp_relay, RelayMode::Copy);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn an_unknown_field_is_an_error_naming_it() {
        let path = Path::new("c.yaml");
        let e = ConfigFile::parse("syncPeriod: 30s\nsyncPeriodd: 1m\n", path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("syncPeriodd"), "{msg}");
        assert!(msg.starts_with("c.yaml:"), "{msg}");
        let e = ConfigFile::parse("clientConnection:\n  qps: 5\n", path).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("qps") && msg.contains("clientConnection"),
            "{msg}"
        );
        // kube-proxy fields that do not apply here are not silently taken.
        let e = ConfigFile::parse("mode: iptables\n", path).unwrap_err();
        assert!(e.to_string().contains("`mode`"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let path = Path::new("c.yaml");
        for (text, field) in [
            ("bindAddress: 0.0.0.0\n", "bindAddress"),
            ("portRange: 9-1\n", "portRange"),
            ("syncPeriod: soon\n", "syncPeriod"),
            ("syncPeriod: 0s\n", "syncPeriod"),
            ("metricsBindAddress: localhost\n", "metricsBindAddress"),
            ("lbAlgorithm: random\n", "lbAlgorithm"),
            ("tcpRelay: zerocopy\n", "tcpRelay"),
            ("splicePipesMax: 0\n", "splicePipesMax"),
            ("splicePipesMax: 4097\n", "splicePipesMax"),
            ("kind: KubeProxyConfiguration\n", "kind"),
        ] {
            let e = ConfigFile::parse(text, path)
                .and_then(|f| f.apply(path, &mut Args::parse_from(["kube-uproxy"]), |_| false))
                .expect_err(text);
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
        // A type error names its field too.
        let e = ConfigFile::parse("metricsPerEndpoint: maybe\n", path).unwrap_err();
        assert!(e.to_string().contains("metricsPerEndpoint"), "{e}");
    }

    #[test]
    fn the_file_refuses_what_the_flag_refuses_with_the_same_words() {
        // `manifestsRescanInterval: 0s` panicked the timer; `syncPeriod`
        // below a second spun a core on nft.
        let path = Path::new("c.yaml");
        for (bounds, bad, good) in crate::config::tests::DURATIONS {
            let Some(field) = bounds.field else { continue };
            for v in *bad {
                let why = bounds.parse(v).expect_err(v);
                let e = ConfigFile::parse(&format!("{field}: {v}\n"), path)
                    .and_then(|f| f.apply(path, &mut Args::parse_from(["kube-uproxy"]), |_| false))
                    .expect_err(&format!("{field}: {v} accepted"));
                let msg = e.to_string();
                assert!(
                    msg.contains(field) && msg.contains(&why),
                    "{field}: {v}: {msg}"
                );
                let flag =
                    Args::try_parse_from(["kube-uproxy".into(), format!("{}={v}", bounds.flag)])
                        .expect_err(v)
                        .to_string();
                assert!(flag.contains(&why), "{}: {v}: {flag}", bounds.flag);
            }
            for v in *good {
                let mut a = Args::parse_from(["kube-uproxy"]);
                ConfigFile::parse(&format!("{field}: {v}\n"), path)
                    .and_then(|f| f.apply(path, &mut a, |_| false))
                    .unwrap_or_else(|e| panic!("{field}: {v}: {e}"));
                let want = humantime::parse_duration(v).unwrap();
                let got = match field {
                    "syncPeriod" => a.sync_period,
                    "manifestsRescanInterval" => a.manifests_rescan_interval,
                    "shutdownGrace" => a.shutdown_grace,
                    other => panic!("no check for {other}"),
                };
                assert_eq!(got, want, "{field}: {v}");
            }
        }
    }

    #[test]
    fn empty_values_mean_unset_as_in_kube_proxy() {
        let path = Path::new("c.yaml");
        let f = ConfigFile::parse(
            "bindAddress: \"\"\nportRange: \"\"\nhostnameOverride: \"\"\n",
            path,
        )
        .unwrap();
        let mut a = Args::parse_from(["kube-uproxy"]);
        f.apply(path, &mut a, |_| false).unwrap();
        assert_eq!(a.bind_address, Ipv4Addr::new(169, 254, 42, 1));
        assert_eq!(a.proxy_port_range, None);
        assert_eq!(a.hostname_override, None);
        assert_eq!(ConfigFile::parse("", path).unwrap(), ConfigFile::default());
    }

    #[test]
    fn a_missing_file_and_a_source_conflict_are_errors() {
        let e =
            parse_args(["kube-uproxy", "--config", "/nonexistent/kube-uproxy.yaml"]).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/kube-uproxy.yaml"),
            "{e}"
        );
        let d = tmpdir("conflict");
        let p = write(&d, "c.yaml", "clientConnection:\n  kubeconfig: /k\n");
        let e = parse_args([
            "kube-uproxy",
            "--config",
            p.to_str().unwrap(),
            "--manifests",
            "x.yaml",
        ])
        .unwrap_err();
        assert!(matches!(e, ArgsError::SourceConflict), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn every_flag_the_file_can_set_exists() {
        // `given` is asked by flag id; a misspelt id would make the file
        // win over the command line without a word.
        let ids = std::cell::RefCell::new(Vec::new());
        let f = ConfigFile::parse(EVERY_FIELD, Path::new("c.yaml")).unwrap();
        let mut a = Args::parse_from(["kube-uproxy"]);
        f.apply(Path::new("c.yaml"), &mut a, |id| {
            ids.borrow_mut().push(id.to_string());
            false
        })
        .unwrap();
        let f = ConfigFile::parse("manifests: m.yaml\n", Path::new("c.yaml")).unwrap();
        f.apply(Path::new("c.yaml"), &mut a, |id| {
            ids.borrow_mut().push(id.to_string());
            false
        })
        .unwrap();
        let cmd = Args::command();
        let ids = ids.into_inner();
        assert_eq!(ids.len(), 23, "{ids:?}");
        for id in ids {
            assert!(
                cmd.get_arguments().any(|a| a.get_id() == id.as_str()),
                "no flag {id}"
            );
        }
    }

    use clap::Parser;
}
