//! The pre-shared cluster key: where it comes from, how it is stored, and how it never leaks.
//!
//! Resolution order: an explicit key file (`--cluster-key-file`), then the `SINEW_CLUSTER_KEY`
//! environment variable, then `cluster.key` under the user's config directory, generated on first
//! use with mode 0600. Keys are written as hex; a key file readable by group or others is refused,
//! as ssh refuses such private keys.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;
use zeroize::Zeroizing;

/// Environment variable holding a hex cluster key.
pub const KEY_ENV: &str = "SINEW_CLUSTER_KEY";
/// File name of the generated key under the config directory.
pub const KEY_FILE_NAME: &str = "cluster.key";
/// Shortest accepted key, in bytes.
pub const MIN_KEY_BYTES: usize = 16;
/// Longest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Length of a generated key, in bytes.
pub const GENERATED_KEY_BYTES: usize = 32;

/// Why a cluster key could not be had.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key text is not hex of an accepted length.
    #[error("invalid cluster key from {origin}: {reason}")]
    Invalid {
        /// Where the text came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file could not be read or written.
    #[error("cluster key file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The key file is readable by group or others.
    #[error(
        "cluster key file {path} has mode {mode:o}: it must not be readable by group or others (chmod 600 {path})"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No config directory is known for this user, so no key can be generated.
    #[error("no config directory for this user: pass --cluster-key-file or set {KEY_ENV}")]
    NoConfigDir,
    /// The system random source failed.
    #[error("random source failed: {0}")]
    Random(String),
}

/// A pre-shared cluster key. Its bytes are wiped on drop and never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Zeroizing<Vec<u8>>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({} bytes, redacted)", self.0.len())
    }
}

/// Where a resolved key came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Read from a file given explicitly.
    File(PathBuf),
    /// Read from [`KEY_ENV`].
    Env,
    /// Read from the default file under the config directory.
    ConfigDir(PathBuf),
    /// Generated now and stored at this path.
    Generated(PathBuf),
}

impl fmt::Display for KeyOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyOrigin::File(p) => write!(f, "file {}", p.display()),
            KeyOrigin::Env => write!(f, "${KEY_ENV}"),
            KeyOrigin::ConfigDir(p) => write!(f, "file {}", p.display()),
            KeyOrigin::Generated(p) => write!(f, "newly generated file {}", p.display()),
        }
    }
}

impl ClusterKey {
    /// A key from raw bytes.
    ///
    /// # Errors
    /// [`KeyError::Invalid`] when shorter than [`MIN_KEY_BYTES`] or longer than [`MAX_KEY_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&bytes.len()) {
            return Err(KeyError::Invalid {
                origin: "bytes".into(),
                reason: format!(
                    "{} bytes; a key has {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes",
                    bytes.len()
                ),
            });
        }
        Ok(ClusterKey(Zeroizing::new(bytes.to_vec())))
    }

    /// Parses hex text (surrounding whitespace ignored); `origin` names the source in errors.
    ///
    /// # Errors
    /// [`KeyError::Invalid`] for non-hex text or a length outside the accepted range.
    pub fn from_hex(text: &str, origin: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let invalid = |reason: String| KeyError::Invalid {
            origin: origin.to_string(),
            reason,
        };
        if !text.len().is_multiple_of(2) {
            return Err(invalid(format!(
                "odd number of hex digits ({})",
                text.len()
            )));
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(text.len() / 2));
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => bytes.push((h * 16 + l) as u8),
                _ => return Err(invalid(format!("not hex at character {}", 2 * i))),
            }
        }
        ClusterKey::from_bytes(&bytes).map_err(|_| {
            invalid(format!(
                "{} bytes; expected {} to {} hex digits",
                bytes.len(),
                2 * MIN_KEY_BYTES,
                2 * MAX_KEY_BYTES
            ))
        })
    }

    /// A fresh random key of [`GENERATED_KEY_BYTES`] bytes.
    ///
    /// # Errors
    /// [`KeyError::Random`] when the system random source fails.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new(vec![0u8; GENERATED_KEY_BYTES]);
        getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(ClusterKey(bytes))
    }

    /// The key's bytes, for the MAC. Never put them on the wire.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The key as lowercase hex, the format of key files and [`KEY_ENV`].
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(self.0.len() * 2));
        for b in self.0.iter() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Reads a hex key file, refusing one that group or others may read.
    ///
    /// # Errors
    /// [`KeyError::Io`], [`KeyError::Permissions`] or [`KeyError::Invalid`].
    pub fn load_file(path: &Path) -> Result<Self, KeyError> {
        let io = |error| KeyError::Io {
            path: path.to_path_buf(),
            error,
        };
        let meta = fs::metadata(path).map_err(io)?;
        check_private(path, &meta)?;
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        ClusterKey::from_hex(&text, &path.display().to_string())
    }

    /// Writes the key as hex to a new file created with mode 0600. Fails if the file exists.
    ///
    /// # Errors
    /// [`KeyError::Io`].
    pub fn store_new(&self, path: &Path) -> Result<(), KeyError> {
        let io = |error| KeyError::Io {
            path: path.to_path_buf(),
            error,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(io)?;
        let mut text = self.to_hex();
        text.push('\n');
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }
}

#[cfg(unix)]
fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _meta: &fs::Metadata) -> Result<(), KeyError> {
    Ok(())
}

/// The default key file: `cluster.key` in sinew's folder under the user's config directory
/// (`$XDG_CONFIG_HOME/sinew` or `~/.config/sinew` on Linux).
pub fn default_key_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("sinew").join(KEY_FILE_NAME))
}

/// Resolves the cluster key: `file` if given, else [`KEY_ENV`], else the file at `default_path`,
/// generating and storing a new key there when it does not exist yet.
///
/// # Errors
/// Any [`KeyError`]; a key that is present but invalid is an error, never silently replaced.
pub fn resolve(
    file: Option<&Path>,
    env_value: Option<&str>,
    default_path: Option<&Path>,
) -> Result<(ClusterKey, KeyOrigin), KeyError> {
    if let Some(path) = file {
        return Ok((
            ClusterKey::load_file(path)?,
            KeyOrigin::File(path.to_path_buf()),
        ));
    }
    if let Some(text) = env_value {
        return Ok((ClusterKey::from_hex(text, KEY_ENV)?, KeyOrigin::Env));
    }
    let path = default_path.ok_or(KeyError::NoConfigDir)?;
    match ClusterKey::load_file(path) {
        Ok(key) => Ok((key, KeyOrigin::ConfigDir(path.to_path_buf()))),
        Err(KeyError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = ClusterKey::generate()?;
            match key.store_new(path) {
                Ok(()) => Ok((key, KeyOrigin::Generated(path.to_path_buf()))),
                // Another process generated it between our read and our create: use theirs.
                Err(KeyError::Io { error, .. })
                    if error.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    Ok((
                        ClusterKey::load_file(path)?,
                        KeyOrigin::ConfigDir(path.to_path_buf()),
                    ))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// [`resolve`] with the process environment and the default config path.
///
/// # Errors
/// As [`resolve`].
pub fn resolve_from_environment(file: Option<&Path>) -> Result<(ClusterKey, KeyOrigin), KeyError> {
    let env_value = std::env::var(KEY_ENV).ok();
    resolve(file, env_value.as_deref(), default_key_path().as_deref())
}

/// Instructions, for a person, on giving a newly generated key to the other nodes.
pub fn copy_instructions(path: &Path) -> String {
    let p = path.display();
    format!(
        "generated a new cluster key in {p} (mode 0600).\n\
         Every node of the cluster needs the same key. Copy it to each other node, e.g.\n  \
         ssh OTHER 'mkdir -p ~/.config/sinew' && scp {p} OTHER:.config/sinew/{KEY_FILE_NAME}\n\
         or pass it explicitly: --cluster-key-file FILE, or {KEY_ENV}=$(cat {p})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_bad_text() {
        let k = ClusterKey::generate().unwrap();
        assert_eq!(ClusterKey::from_hex(&k.to_hex(), "t").unwrap(), k);
        assert!(matches!(
            ClusterKey::from_hex("zz", "t"),
            Err(KeyError::Invalid { .. })
        ));
        assert!(matches!(
            ClusterKey::from_hex("abc", "t"),
            Err(KeyError::Invalid { .. })
        ));
        // Too short: 8 bytes.
        assert!(matches!(
            ClusterKey::from_hex("0011223344556677", "t"),
            Err(KeyError::Invalid { .. })
        ));
        // Multi-byte characters must not panic the parser.
        assert!(ClusterKey::from_hex("ééééééééééééééééé", "t").is_err());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = ClusterKey::from_hex(&"ab".repeat(16), "t").unwrap();
        assert!(!format!("{k:?}").contains("abab"));
    }

    #[test]
    fn first_use_generates_a_private_key_file_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sinew").join(KEY_FILE_NAME);
        let (k1, o1) = resolve(None, None, Some(&path)).unwrap();
        assert_eq!(o1, KeyOrigin::Generated(path.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let (k2, o2) = resolve(None, None, Some(&path)).unwrap();
        assert_eq!((k1, o2), (k2, KeyOrigin::ConfigDir(path)));
    }

    #[test]
    fn explicit_file_beats_env_which_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        let kf = ClusterKey::generate().unwrap();
        kf.store_new(&file).unwrap();
        let env = "11".repeat(16);
        let default = dir.path().join("default.key");
        let (k, o) = resolve(Some(&file), Some(&env), Some(&default)).unwrap();
        assert_eq!((k, o), (kf, KeyOrigin::File(file)));
        let (k, o) = resolve(None, Some(&env), Some(&default)).unwrap();
        assert_eq!((k.expose()[0], o), (0x11, KeyOrigin::Env));
        assert!(!default.exists(), "no key is generated when one was given");
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        fs::write(&file, "22".repeat(16)).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ClusterKey::load_file(&file),
            Err(KeyError::Permissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn invalid_present_key_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        ClusterKey::generate().unwrap().store_new(&path).unwrap();
        let before = fs::read(&path).unwrap();
        assert!(resolve(None, Some("nothex"), Some(&path)).is_err());
        assert_eq!(fs::read(&path).unwrap(), before);
    }
}
