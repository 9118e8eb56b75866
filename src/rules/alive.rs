//! Whether the instance that wrote the table still runs.
//!
//! Each instance holds, for as long as it runs, a Unix socket bound to an
//! abstract name made of its instance id, and writes that name into the
//! table's note (`alive=@kube-uproxy/instance/<id>`). The kernel releases
//! the name the moment the process is gone, however it ended (SIGKILL, the
//! OOM killer, a crash): an instance that finds another one's id in the
//! table binds the name itself to learn whether its writer still runs.
//!
//! Why a socket and not a heartbeat in the table: no clock to compare, no
//! extra write every `--sync-period`, nothing a slow node or a stopped
//! clock can fake, and the answer is immediate. Why not the writer's
//! listeners: an instance with no Service has none, and the two instances
//! share their adopted ports (`SO_REUSEPORT`), so a probe cannot tell whose
//! socket holds a port. Abstract names live in the network namespace, which
//! is the table's own scope (the proxy runs with the host's network).
//!
//! A writer whose note has no `alive=` (a version before this one) cannot
//! be checked: it is taken to run, as before.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The note's key for the marker's name.
pub const NOTE_KEY: &str = "alive";

/// The abstract socket name of instance `id`, as written in the note (the
/// leading `@` stands for the abstract namespace's NUL).
pub fn marker_name(id: u32) -> String {
    format!("@kube-uproxy/instance/{id:08x}")
}

fn address(name: &str) -> io::Result<SocketAddr> {
    let name = name.strip_prefix('@').ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an abstract socket name"),
        )
    })?;
    SocketAddr::from_abstract_name(name.as_bytes())
}

/// This instance's marker: bound for as long as it is kept.
#[derive(Debug)]
pub struct Marker {
    _socket: UnixDatagram,
}

impl Marker {
    /// Binds the marker of instance `id`; fails if the name is taken.
    pub fn hold(id: u32) -> io::Result<Marker> {
        let socket = UnixDatagram::bind_addr(&address(&marker_name(id))?)?;
        Ok(Marker { _socket: socket })
    }
}

/// Another instance, as found in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub id: u32,
    /// Its marker's name, from its note; `None`: it predates markers.
    pub marker: Option<String>,
}

impl Writer {
    /// The writer of a table with `id` and `note`.
    pub fn new(id: u32, note: Option<&str>) -> Writer {
        Writer {
            id,
            marker: note.and_then(|n| noted(n, NOTE_KEY)),
        }
    }

    /// Whether it still runs: `false` only when its marker is free. A
    /// writer without a marker, or a probe that fails for another reason,
    /// counts as running: two writers would undo each other's rules.
    pub fn alive(&self) -> bool {
        let Some(name) = &self.marker else {
            return true;
        };
        // Bound: nobody held it (the probe is dropped at once, freeing it
        // again). In use: it runs. Any other failure: we cannot tell.
        address(name)
            .and_then(|a| UnixDatagram::bind_addr(&a))
            .is_err()
    }
}

/// The value a note (`key=value; key=value`) records for `key`, if any.
pub fn noted(note: &str, key: &str) -> Option<String> {
    note.split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_runs_while_its_marker_is_held_and_not_after() {
        let id = std::process::id() ^ 0x5a5a_0000;
        let marker = Marker::hold(id).unwrap();
        let note = format!("net.ipv4.tcp_migrate_req=0; {NOTE_KEY}={}", marker_name(id));
        let writer = Writer::new(id, Some(&note));
        assert_eq!(writer.marker.as_deref(), Some(marker_name(id).as_str()));
        assert!(writer.alive());
        assert!(Marker::hold(id).is_err(), "a name is held once");
        drop(marker);
        assert!(!writer.alive());
        // The probe let go of the name again.
        assert!(!writer.alive());
        assert!(Marker::hold(id).is_ok());
    }

    #[test]
    fn a_writer_without_a_marker_is_taken_to_run() {
        assert!(Writer::new(7, Some("net.ipv4.tcp_migrate_req=0")).alive());
        assert!(Writer::new(7, None).alive());
        assert!(Writer::new(7, Some("alive=not-abstract")).alive());
    }
}
