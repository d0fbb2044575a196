//! The per-project state directory: lock, control socket, process records and logs, the
//! daemon's own log when detached, and the scale override.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::DaemonError;

#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// Replica counts set with `pdctl scale`, kept until `pdctl down`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scale {
    pub prefill: Option<u32>,
    pub decode: Option<u32>,
}

/// `$PDCTL_STATE_DIR`, else `$XDG_RUNTIME_DIR/pdctl`, else `~/.local/state/pdctl`.
pub fn root() -> PathBuf {
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("PDCTL_STATE_DIR") {
        return d;
    }
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        return d.join("pdctl");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".local/state/pdctl")
}

impl StateDir {
    pub fn for_project(project: &str) -> Self {
        StateDir {
            dir: root().join(project),
        }
    }

    pub fn create(&self) -> Result<(), DaemonError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| DaemonError::io("create", &self.dir, e))?;
        // Sockets and logs of engines are private to the user who runs them.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        Ok(())
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("daemon.lock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    fn scale_path(&self) -> PathBuf {
        self.dir.join("scale.json")
    }

    /// Takes the project's lock; `Ok(None)` when another daemon holds it. The kernel drops
    /// the lock when the holder dies, SIGKILL included, so a stale file never blocks.
    pub fn try_lock(&self) -> Result<Option<File>, DaemonError> {
        self.create()?;
        let path = self.lock_path();
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| DaemonError::io("open", &path, e))?;
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(DaemonError::io("lock", &path, e)),
        }
    }

    /// Takes the project's lock for a new daemon; `Ok(None)` when a live daemon holds it. A
    /// daemon that was just killed can hold it a moment longer (the kernel drops it when the
    /// last of its threads has exited), so a dead holder is waited for, briefly.
    pub fn take_lock(&self) -> Result<Option<File>, DaemonError> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(lock) = self.try_lock()? {
                return Ok(Some(lock));
            }
            let holder_dead = self.holder_pid().is_some_and(|pid| !process_alive(pid));
            if !holder_dead || Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid the lock holder wrote, for messages.
    pub fn holder_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.lock_path())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn scale(&self) -> Scale {
        std::fs::read_to_string(self.scale_path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    pub fn set_scale(&self, s: Scale) -> Result<(), DaemonError> {
        let p = self.scale_path();
        std::fs::write(&p, serde_json::to_vec(&s).expect("scale serialises"))
            .map_err(|e| DaemonError::io("write", &p, e))
    }

    pub fn clear_scale(&self) {
        let _ = std::fs::remove_file(self.scale_path());
    }
}

/// A process that exists and has not exited (a zombie has, though its /proc entry stays).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state letter follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Writes our pid into the held lock file.
pub fn write_pid(lock: &mut File) {
    use std::io::{Seek, Write};
    let _ = lock.set_len(0);
    let _ = lock.seek(std::io::SeekFrom::Start(0));
    let _ = writeln!(lock, "{}", std::process::id());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A project state directory whose lock this process holds, its pid written.
    fn locked_state() -> (tempfile::TempDir, StateDir, File) {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir {
            dir: tmp.path().join("p"),
        };
        let mut first = s.try_lock().unwrap().expect("first lock");
        write_pid(&mut first);
        (tmp, s, first)
    }

    #[test]
    fn a_second_lock_on_the_same_project_is_refused() {
        let (_tmp, s, first) = locked_state();
        assert_eq!(s.holder_pid(), Some(std::process::id()));
        assert!(s.try_lock().unwrap().is_none());
        drop(first);
        // Other tests of this binary spawn processes: a fork in the instant before its exec
        // holds a copy of every open descriptor, this lock's too (close-on-exec closes it at
        // the exec), so the lock comes free within moments rather than at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.try_lock().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the dropped lock never came free"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_live_holder_keeps_the_lock_and_a_dead_one_is_told_apart() {
        let (_tmp, s, _first) = locked_state();
        let t0 = Instant::now();
        assert!(s.take_lock().unwrap().is_none());
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "a live holder is not waited for"
        );

        assert!(process_alive(std::process::id()));
        // Exited but not reaped: a zombie, which counts as dead.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) {
            assert!(Instant::now() < deadline, "pid {pid} still counts as alive");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
    }

    #[test]
    fn scale_override_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir {
            dir: tmp.path().to_path_buf(),
        };
        assert_eq!(s.scale(), Scale::default());
        let sc = Scale {
            prefill: Some(2),
            decode: None,
        };
        s.set_scale(sc).unwrap();
        assert_eq!(s.scale(), sc);
        s.clear_scale();
        assert_eq!(s.scale(), Scale::default());
    }
}
