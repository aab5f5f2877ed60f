//! The local-user registry: a per-user directory with one file per receiver.
//!
//! ```text
//! $DIR/              mode 0700, owned by the user
//! $DIR/secret        32 random bytes, mode 0600: authenticates local connections
//! $DIR/receivers/    one file per receiver: <handle-hash>-<receiver-id>.rec (JSON)
//! $DIR/sockets/      mode 0700: one Unix socket per receiver, <receiver-id>.sock
//! ```
//!
//! `$DIR` is `$IPCBUS_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/ipcbus`, else
//! `/tmp/ipcbus-$UID`.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Record;
use ipcbus_proto::crypto::Key;
use ipcbus_proto::handle::Handle;
use ipcbus_proto::ids::ReceiverId;

/// Largest record file we read; anything larger is not ours.
const MAX_RECORD: u64 = 64 * 1024;

/// The local-user registry directory.
#[derive(Debug, Clone)]
pub struct LocalRegistry {
    dir: PathBuf,
}

/// Why the local registry could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The directory is a symbolic link; it could point anywhere, so it is refused.
    #[error("registry directory {0} is a symbolic link; refusing to use it")]
    Symlink(PathBuf),
    /// The directory or secret belongs to another user.
    #[error("{path} is owned by uid {owner}, not by this user (uid {me}); refusing to use it")]
    NotOwned {
        /// The offending path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The current effective uid.
        me: u32,
    },
    /// The path exists but is not a directory (or the secret not a regular file).
    #[error(
        "{0} exists but is not what the registry expects (a directory, or a regular secret file)"
    )]
    WrongType(PathBuf),
    /// The secret file is readable by others or of the wrong size.
    #[error("secret file {0} is unsafe or corrupt (must be 32 bytes, mode 0600)")]
    BadSecret(PathBuf),
    /// An I/O error on a registry path.
    #[error("registry I/O on {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_owned(),
        source,
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl LocalRegistry {
    /// The default directory: `$IPCBUS_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/ipcbus`,
    /// else `/tmp/ipcbus-$UID`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("IPCBUS_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("ipcbus");
        }
        PathBuf::from(format!("/tmp/ipcbus-{}", euid()))
    }

    /// Opens (creating if missing) the default directory.
    ///
    /// # Errors
    /// See [`LocalRegistry::open`].
    pub fn open_default() -> Result<LocalRegistry, RegistryError> {
        LocalRegistry::open(LocalRegistry::default_dir())
    }

    /// Opens (creating if missing, mode 0700) a registry directory.
    ///
    /// # Errors
    /// [`RegistryError::Symlink`] or [`RegistryError::NotOwned`] when the directory is
    /// a link or belongs to another user, [`RegistryError::Io`] when it cannot be made.
    pub fn open(dir: impl Into<PathBuf>) -> Result<LocalRegistry, RegistryError> {
        let dir = dir.into();
        ensure_private_dir(&dir)?;
        ensure_private_dir(&dir.join("receivers"))?;
        ensure_private_dir(&dir.join("sockets"))?;
        Ok(LocalRegistry { dir })
    }

    /// The registry directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding one file per receiver (what discovery watches).
    pub fn receivers_dir(&self) -> PathBuf {
        self.dir.join("receivers")
    }

    /// The directory holding the receivers' Unix sockets.
    pub fn sockets_dir(&self) -> PathBuf {
        self.dir.join("sockets")
    }

    /// Where a receiver's Unix socket goes.
    pub fn socket_path(&self, receiver: &ReceiverId) -> PathBuf {
        self.sockets_dir().join(format!("{receiver}.sock"))
    }

    /// Removes the Unix socket file of a stale record: the one of its receiver id in
    /// this registry's socket directory, when the record names it. A record cannot
    /// make us remove anything else, in particular not the live socket of another
    /// receiver it names (a record found answering with the wrong handle or id).
    fn remove_sockets_of(&self, rec: &Record) {
        let own = self.socket_path(&rec.receiver);
        for path in rec.endpoints.iter().filter_map(|e| e.unix_path()) {
            if path == own {
                match fs::remove_file(path) {
                    Ok(()) => tracing::debug!(path = %path.display(), "removed stale unix socket"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove stale unix socket")
                    }
                }
            }
        }
    }

    /// The per-user key that authenticates local connections, created on first use.
    ///
    /// # Errors
    /// [`RegistryError::BadSecret`] if the file is readable by others or corrupt.
    pub fn secret_key(&self) -> Result<Key, RegistryError> {
        let path = self.dir.join("secret");
        match read_secret(&path) {
            Ok(k) => return Ok(k),
            Err(RegistryError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Write the secret to a private temporary file, then link it into place: the
        // link fails if another process won the race, and we read theirs.
        let tmp = self.dir.join(format!(
            ".secret-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let secret: [u8; 32] = rand::random();
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&secret).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Key::from_secret(&secret)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_secret(&path),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn file_prefix(handle: &Handle) -> String {
        let d = Sha256::digest(handle.as_bytes());
        hex::encode(&d[..8])
    }

    fn record_path(&self, handle: &Handle, receiver: &ReceiverId) -> PathBuf {
        self.receivers_dir()
            .join(format!("{}-{}.rec", Self::file_prefix(handle), receiver))
    }

    /// Writes a record atomically (temporary file, then rename) and returns a guard
    /// that removes it when dropped.
    ///
    /// # Errors
    /// [`RegistryError::Io`].
    pub fn register(&self, record: &Record) -> Result<Registration, RegistryError> {
        let path = self.record_path(&record.handle, &record.receiver);
        let tmp = self.receivers_dir().join(format!(
            ".tmp-{}-{}",
            record.receiver,
            rand::random::<u32>()
        ));
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&record.to_json()).map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&path)(e)
        })?;
        Ok(Registration { path: Some(path) })
    }

    /// Removes a stale receiver's record if present, and the Unix socket it names in
    /// this registry.
    pub fn remove_stale(&self, rec: &Record) {
        self.remove(&rec.handle, &rec.receiver);
        self.remove_sockets_of(rec);
    }

    /// Removes a receiver's record if present (used to clean up stale entries).
    pub fn remove(&self, handle: &Handle, receiver: &ReceiverId) {
        let path = self.record_path(handle, receiver);
        match fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed registry record"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove registry record")
            }
        }
    }

    /// Watches the records directory (inotify): the `Notify` fires on every change.
    /// `None` for the watcher when it cannot be set up (the caller then polls more
    /// often); senders and call clients follow the registry through it.
    pub(crate) fn watch(
        &self,
    ) -> (
        Option<notify::RecommendedWatcher>,
        std::sync::Arc<tokio::sync::Notify>,
    ) {
        let dirty = std::sync::Arc::new(tokio::sync::Notify::new());
        let d2 = dirty.clone();
        let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
            d2.notify_one();
        })
        .and_then(|mut w| {
            use notify::Watcher;
            w.watch(&self.receivers_dir(), notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        match watcher {
            Ok(w) => (Some(w), dirty),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the registry; falling back to polling");
                (None, dirty)
            }
        }
    }

    /// Reads every record, or only those of `handle`. Unreadable or corrupt files are
    /// skipped with a warning; records of dead processes are removed and skipped.
    ///
    /// # Errors
    /// [`RegistryError::Io`] if the directory cannot be listed.
    pub fn scan(&self, handle: Option<&Handle>) -> Result<Vec<Record>, RegistryError> {
        let dir = self.receivers_dir();
        let prefix = handle.map(|h| format!("{}-", Self::file_prefix(h)));
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(".rec") {
                continue;
            }
            if let Some(p) = &prefix {
                if !name.starts_with(p.as_str()) {
                    continue;
                }
            }
            let path = entry.path();
            let Some(rec) = read_record(&path) else {
                continue;
            };
            if handle.is_some_and(|h| *h != rec.handle) {
                continue;
            }
            if rec.pid.is_some_and(|pid| !super::pid_alive(pid)) {
                tracing::info!(handle = %rec.handle, receiver = %rec.receiver, pid = rec.pid, "removing stale registration: process is gone");
                let _ = fs::remove_file(&path);
                self.remove_sockets_of(&rec);
                continue;
            }
            out.push(rec);
        }
        out.sort_by_key(|r| (r.handle.clone(), r.since_ms));
        Ok(out)
    }
}

fn read_record(path: &Path) -> Option<Record> {
    let f = fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_RECORD).read_to_end(&mut buf).ok()?;
    let rec = Record::from_json(&buf);
    if rec.is_none() {
        tracing::warn!(path = %path.display(), "skipping corrupt registry record");
    }
    rec
}

fn read_secret(path: &Path) -> Result<Key, RegistryError> {
    let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
    if !meta.file_type().is_file() {
        return Err(RegistryError::WrongType(path.to_owned()));
    }
    if meta.uid() != euid() {
        return Err(RegistryError::NotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            me: euid(),
        });
    }
    if meta.mode() & 0o077 != 0 || meta.len() != 32 {
        return Err(RegistryError::BadSecret(path.to_owned()));
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    if bytes.len() != 32 {
        return Err(RegistryError::BadSecret(path.to_owned()));
    }
    Ok(Key::from_secret(&bytes))
}

fn ensure_private_dir(dir: &Path) -> Result<(), RegistryError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
        }
        Err(e) => return Err(io_err(dir)(e)),
        Ok(_) => {}
    }
    let meta = fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if meta.file_type().is_symlink() {
        return Err(RegistryError::Symlink(dir.to_owned()));
    }
    if !meta.is_dir() {
        return Err(RegistryError::WrongType(dir.to_owned()));
    }
    if meta.uid() != euid() {
        return Err(RegistryError::NotOwned {
            path: dir.to_owned(),
            owner: meta.uid(),
            me: euid(),
        });
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    Ok(())
}

/// A registration in the local registry; dropping it removes the record.
#[derive(Debug)]
pub struct Registration {
    path: Option<PathBuf>,
}

impl Registration {
    /// Removes the record now.
    pub fn remove(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::record_now;
    use ipcbus_proto::endpoint::Endpoint;
    use std::net::SocketAddr;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ipcbus-unit-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        d
    }

    #[test]
    fn register_scan_and_remove() {
        let dir = tmpdir("reg");
        let reg = LocalRegistry::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "registry dir must be private"
        );
        let h = Handle::new("orders").unwrap();
        let other = Handle::new("other").unwrap();
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let rec = record_now(h.clone(), vec![addr.into()], ReceiverId::random());
        let mut g = reg.register(&rec).unwrap();
        let _g2 = reg
            .register(&record_now(
                other.clone(),
                vec![addr.into()],
                ReceiverId::random(),
            ))
            .unwrap();
        assert_eq!(reg.scan(Some(&h)).unwrap(), vec![rec.clone()]);
        assert_eq!(reg.scan(None).unwrap().len(), 2);
        g.remove();
        assert!(reg.scan(Some(&h)).unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_and_corrupt_records_are_skipped() {
        let dir = tmpdir("stale");
        let reg = LocalRegistry::open(&dir).unwrap();
        let h = Handle::new("x").unwrap();
        let id = ReceiverId::random();
        let sock = reg.socket_path(&id);
        // A socket file outside the registry that a record names is never removed.
        let outside = dir.join("outside.sock");
        fs::write(&sock, b"").unwrap();
        fs::write(&outside, b"").unwrap();
        // Nor is another receiver's socket in the registry.
        let other = reg.socket_path(&ReceiverId::random());
        fs::write(&other, b"").unwrap();
        let mut rec = record_now(
            h.clone(),
            vec![
                "127.0.0.1:1".parse().unwrap(),
                Endpoint::unix(&sock),
                Endpoint::unix(&outside),
                Endpoint::unix(&other),
            ],
            id,
        );
        rec.pid = Some(0x3fff_fff0); // above pid_max: no such process
        let g = reg.register(&rec).unwrap();
        std::mem::forget(g);
        fs::write(
            reg.receivers_dir().join("garbage.rec"),
            b"\xff\x00 not json",
        )
        .unwrap();
        assert!(reg.scan(None).unwrap().is_empty());
        // the stale one was removed by the scan
        let left: Vec<_> = fs::read_dir(reg.receivers_dir()).unwrap().collect();
        assert_eq!(left.len(), 1);
        assert!(!sock.exists(), "the stale record's socket stays");
        assert!(
            outside.exists(),
            "a socket outside the registry was removed"
        );
        assert!(other.exists(), "another receiver's socket was removed");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_is_private_and_stable() {
        let dir = tmpdir("secret");
        let reg = LocalRegistry::open(&dir).unwrap();
        let a = reg.secret_key().unwrap();
        let b = reg.secret_key().unwrap();
        assert_eq!(a, b);
        let meta = fs::metadata(dir.join("secret")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        fs::set_permissions(dir.join("secret"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(reg.secret_key(), Err(RegistryError::BadSecret(_))));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn symlinked_dir_is_refused() {
        let real = tmpdir("real");
        fs::create_dir_all(&real).unwrap();
        let link = tmpdir("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            LocalRegistry::open(&link),
            Err(RegistryError::Symlink(_))
        ));
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&real).unwrap();
    }
}
